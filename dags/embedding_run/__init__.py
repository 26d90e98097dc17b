"""The nightly embedding run beside its DAG: its configuration (defaults file, deployment,
the trigger form) and its Python steps. The DAG file wires these; the Ray provider
(``airflow_ray``) runs the cluster and the jobs; the data plane (``ray_jobs``) does the work."""
