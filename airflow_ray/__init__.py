"""Control plane: Ray clusters (local, KubeRay, existing) and deferrable Ray jobs for Airflow 3.

Laid out like an Airflow provider. Nothing here imports ray, torch or kubernetes at module
top level: DAG files import these modules at parse time.
"""
