"""Data plane: everything that reads or writes manifest and embedding data.

Nothing in this package imports Airflow. Heavy modules (ray, torch, transformers) are
imported inside the functions that need them, so that ``ray_jobs.contract`` stays cheap
for the control plane to import.
"""
