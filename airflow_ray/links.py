"""Extra link from a task to its Ray job in the Ray dashboard."""

from __future__ import annotations

from airflow.sdk import BaseOperatorLink

#: The XCom key of the job's dashboard URL: the link's own key (``BaseOperatorLink.xcom_key``),
#: which the UI reads. Written once the job is submitted, so the button works while it runs;
#: at the task's end Airflow writes :meth:`RayJobLink.get_link`'s answer under it again.
XCOM_JOB_URL = "_link_RayJobLink"


def job_url(dashboard_url: str, submission_id: str) -> str:
    return f"{dashboard_url.rstrip('/')}/#/jobs/{submission_id}"


class RayJobLink(BaseOperatorLink):
    name = "Ray job"

    def get_link(self, operator, *, ti_key) -> str:
        from airflow_ray.xcom import xcom_backend

        return xcom_backend().get_value(ti_key=ti_key, key=XCOM_JOB_URL) or ""
