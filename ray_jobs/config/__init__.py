"""The run's settings, each declared once (:mod:`ray_jobs.config.declare`).

:mod:`ray_jobs.config.settings` holds the data plane's groups; the trigger form, the job's
argv, the command line and the job's own config are all derived from them. Standard library
only, so the control plane can import it when a DAG file is parsed.
"""
