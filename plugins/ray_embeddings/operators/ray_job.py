"""Submit a Ray job (deterministic submission id, adopt on retry) and sense it, deferrably."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from ray_embeddings.cluster import ClusterHandle, resolve_token
from ray_embeddings.errors import RayJobError
from ray_embeddings.hooks.ray_jobs import ACTIVE, FAILED, TERMINAL, RayJobsClient
from ray_embeddings.links import XCOM_JOB_URL, RayJobLink, job_url
from ray_embeddings.naming import submission_id as make_submission_id
from ray_embeddings.triggers.ray_job import RayJobTrigger, tail
from ray_embeddings.version_guard import check_compatible

MAX_RESUBMISSIONS = 20


def submit_or_adopt(
    client: RayJobsClient, base_key: tuple[str, str, int | str], entrypoint: str, **submit_kwargs
) -> tuple[str, str, dict[str, Any] | None]:
    """Find this task's job or submit it.

    Tries the deterministic ids of attempts 0, 1, 2, ... in order: a PENDING, RUNNING or
    SUCCEEDED job is adopted; a FAILED or STOPPED one moves on to the next id; the first id
    with no job is submitted. Returns ``(submission_id, "adopted" | "submitted", info)``.
    """
    dag_id, run_id, partition = base_key
    for attempt in range(MAX_RESUBMISSIONS):
        sid = make_submission_id(dag_id, run_id, partition, attempt)
        info = client.get(sid)
        if info is None:
            client.submit(sid, entrypoint, **submit_kwargs)
            return sid, "submitted", None
        if info.get("status") in ACTIVE or info.get("status") == "SUCCEEDED":
            return sid, "adopted", info
    raise RayJobError(f"{MAX_RESUBMISSIONS} earlier jobs for partition {partition} failed; not resubmitting again")


class RayJobOperator(BaseOperator):
    """Run ``entrypoint`` as a Ray job on the cluster described by ``cluster`` (a ClusterHandle dict).

    :param partition: the key of this job within the DAG run (the submission id derives from
        ``(dag_id, run_id, partition)``, so a retried task adopts its job instead of duplicating it)
    :param runtime_env: Ray runtime environment for the job (``working_dir``, ``env_vars``, ...)
    :param deferrable: sense from the triggerer (default) instead of occupying a worker slot
    """

    template_fields: Sequence[str] = ("entrypoint", "cluster", "partition", "runtime_env", "poll_interval")
    operator_extra_links = (RayJobLink(),)
    ui_color = "#e8f1fb"

    def __init__(
        self,
        *,
        cluster: dict[str, Any] | Any,
        entrypoint: str,
        partition: int | str = 0,
        runtime_env: dict[str, Any] | None = None,
        entrypoint_num_cpus: float | None = None,
        deferrable: bool = True,
        poll_interval: float = 5.0,
        tail_lines: int = 40,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.cluster = cluster
        self.entrypoint = entrypoint
        self.partition = partition
        self.runtime_env = runtime_env
        self.entrypoint_num_cpus = entrypoint_num_cpus
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.tail_lines = tail_lines
        self._submission_id: str | None = None
        self._handle: ClusterHandle | None = None

    def _client(self, handle: ClusterHandle) -> RayJobsClient:
        return RayJobsClient(handle.dashboard_url, resolve_token(handle.token))

    def execute(self, context) -> dict[str, Any]:
        handle = ClusterHandle.from_dict(self.cluster)
        self._handle = handle
        ti = context["ti"]
        key = (ti.dag_id, ti.run_id, self.partition)
        with self._client(handle) as client:
            check_compatible(client.version().get("ray_version", ""))
            sid, how, info = submit_or_adopt(
                client,
                key,
                self.entrypoint,
                runtime_env=self.runtime_env,
                metadata={"airflow_dag_id": ti.dag_id, "airflow_run_id": ti.run_id, "partition": str(self.partition)},
                entrypoint_num_cpus=self.entrypoint_num_cpus,
            )
        self._submission_id = sid
        self.poll_interval = float(self.poll_interval)
        url = job_url(handle.dashboard_url, sid)
        ti.xcom_push(key="submission_id", value=sid)
        ti.xcom_push(key=XCOM_JOB_URL, value=url)
        ti.xcom_push(key=RayJobLink().xcom_key, value=url)
        self.log.info("%s Ray job %s on cluster %s (%s)", how, sid, handle.name, url)
        if info is not None and info.get("status") == "SUCCEEDED":
            return {"submission_id": sid, "status": "SUCCEEDED", "adopted": True}
        if self.deferrable:
            self.defer(
                trigger=RayJobTrigger(
                    dashboard_url=handle.dashboard_url,
                    submission_id=sid,
                    token=handle.token.to_dict(),
                    poll_interval=self.poll_interval,
                    tail_lines=self.tail_lines,
                ),
                method_name="execute_complete",
            )
        return self._wait_blocking(handle, sid)

    def _wait_blocking(self, handle: ClusterHandle, sid: str) -> dict[str, Any]:
        offset = 0
        with self._client(handle) as client:
            while True:
                info = client.get(sid) or {"status": "MISSING", "message": f"job {sid} disappeared"}
                logs = client.logs(sid) if info["status"] != "MISSING" else ""
                for line in logs[offset:].splitlines():
                    self.log.info("[ray job %s] %s", sid, line)
                offset = max(offset, len(logs))
                if info["status"] in TERMINAL or info["status"] == "MISSING":
                    return self.execute_complete(
                        None,
                        {
                            "status": info["status"],
                            "submission_id": sid,
                            "message": info.get("message") or "",
                            "log_tail": tail(logs, self.tail_lines),
                        },
                    )
                time.sleep(self.poll_interval)

    def execute_complete(self, context, event: dict[str, Any]) -> dict[str, Any]:
        status, sid = event.get("status"), event.get("submission_id")
        if status == "SUCCEEDED":
            self.log.info("Ray job %s succeeded", sid)
            return {"submission_id": sid, "status": status, "adopted": False}
        failed = "FAILED/STOPPED" if status in FAILED else status
        raise RayJobError(
            f"Ray job {sid} (partition {self.partition}) ended {status} [{failed}]: {event.get('message', '')}\n"
            f"--- last log lines ---\n{event.get('log_tail', '')}"
        )

    def on_kill(self) -> None:
        if self._submission_id and self._handle is not None:
            with self._client(self._handle) as client:
                client.stop(self._submission_id)
            self.log.info("stopped Ray job %s", self._submission_id)
