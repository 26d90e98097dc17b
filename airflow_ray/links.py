"""Extra link from a task to its Ray job in the Ray dashboard."""

from __future__ import annotations

from airflow.sdk import BaseOperatorLink

XCOM_JOB_URL = "ray_job_url"


def job_url(dashboard_url: str, submission_id: str) -> str:
    return f"{dashboard_url.rstrip('/')}/#/jobs/{submission_id}"


class RayJobLink(BaseOperatorLink):
    name = "Ray job"

    def get_link(self, operator, *, ti_key) -> str:
        from airflow_ray.xcom import xcom_backend

        return xcom_backend().get_value(ti_key=ti_key, key=XCOM_JOB_URL) or ""
