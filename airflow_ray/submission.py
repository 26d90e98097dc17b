"""A partition's Ray job: its deterministic submission ids, found or submitted once.

The id derives from ``(dag_id, run_id, partition, attempt)``: a retried task, a resumed
trigger or a restarted triggerer finds the job an earlier try submitted and adopts it
instead of submitting it again. Used by the operator on a worker and by the job trigger,
which submits from the triggerer when the partition's slot opens there.
"""

from __future__ import annotations

import time
from typing import Any

from airflow_ray.errors import RayJobError
from airflow_ray.hooks.ray_jobs import ACTIVE, RayJobsClient
from airflow_ray.naming import submission_id as make_submission_id

MAX_RESUBMISSIONS = 20
#: Metadata every job of a DAG run carries (shows in ``ray job list`` and the dashboard); the
#: run's teardown finds the run's jobs by it. ``partition``: the job's key within its run.
META_DAG_ID, META_RUN_ID, META_PARTITION = "airflow_dag_id", "airflow_run_id", "partition"


def job_metadata(dag_id: str, run_id: str, partition: int | str) -> dict[str, str]:
    return {META_DAG_ID: dag_id, META_RUN_ID: run_id, META_PARTITION: str(partition)}


def stop_jobs_of_run(client: RayJobsClient, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    """Stop every job of this DAG run that is still PENDING or RUNNING; returns the infos (status
    as listed) of those the stop ended (one that finished meanwhile is not counted). Jobs of
    other runs and DAGs, and jobs submitted by hand, are left alone."""
    stopped = []
    for info in client.jobs():
        meta = info.get("metadata") or {}
        sid = info.get("submission_id")
        if not sid or meta.get(META_DAG_ID) != dag_id or meta.get(META_RUN_ID) != run_id:
            continue
        if info.get("status") in ACTIVE and client.stop(sid):
            stopped.append(info)
    return stopped


def find_job(client: RayJobsClient, base_key: tuple[str, str, int | str]) -> tuple[str, dict[str, Any] | None]:
    """This task's job: the first deterministic id (attempt 0, 1, 2, ...) whose job is PENDING,
    RUNNING or SUCCEEDED (returned with its info), or else the first id with no job (info None).
    FAILED and STOPPED jobs are stepped over."""
    dag_id, run_id, partition = base_key
    for attempt in range(MAX_RESUBMISSIONS):
        sid = make_submission_id(dag_id, run_id, partition, attempt)
        info = client.get(sid)
        if info is None or info.get("status") in ACTIVE or info.get("status") == "SUCCEEDED":
            return sid, info
    raise RayJobError(f"{MAX_RESUBMISSIONS} earlier jobs for partition {partition} failed; not resubmitting again")


def submit_or_adopt(
    client: RayJobsClient, base_key: tuple[str, str, int | str], entrypoint: str, **submit_kwargs
) -> tuple[str, str, dict[str, Any] | None]:
    """Find this task's job (:func:`find_job`) or submit it under the first free id.
    Returns ``(submission_id, "adopted" | "submitted", info)``."""
    sid, info = find_job(client, base_key)
    if info is None:
        client.submit(sid, entrypoint, **submit_kwargs)
        return sid, "submitted", None
    return sid, "adopted", info


def job_deadline(info: dict[str, Any] | None, timeout_s: float | str | None) -> float | None:
    """A job's deadline (epoch seconds): *timeout_s* from its admission, i.e. from now for a job
    just submitted, from the job's own start (Ray's ``start_time``, ms) for one adopted."""
    if not timeout_s:
        return None
    started_ms = (info or {}).get("start_time")
    base = float(started_ms) / 1000.0 if started_ms else time.time()
    return base + float(timeout_s)
