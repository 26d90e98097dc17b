"""Submit a Ray job (deterministic submission id, adopt on retry) and sense it, deferrably."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from airflow_ray.backends import credentials
from airflow_ray.cluster import ClusterHandle
from airflow_ray.errors import RayJobError
from airflow_ray.hooks.ray_jobs import FAILED, RayJobsClient, uploads_working_dir
from airflow_ray.links import XCOM_JOB_URL, RayJobLink, job_url
from airflow_ray.submission import find_job, job_deadline, job_metadata, submit_or_adopt
from airflow_ray.triggers.in_flight_gate import InFlightGateTrigger, may_start_now, slot_wait_bound
from airflow_ray.triggers.ray_job import SLOT_TIMEOUT, RayJobTrigger
from airflow_ray.version_guard import check_compatible


def runs_one_task_at_a_time() -> bool:
    """True under ``airflow dags test`` / ``dag.test()``: the task runs in the test's own process
    (an in-process supervisor channel), tasks one after another and triggers in line."""
    try:
        # private: no public API says a task runs under dag.test(); its in-process channel is the only sign
        from airflow.sdk.execution_time import task_runner
        from airflow.sdk.execution_time.supervisor import InProcessSupervisorComms
    except ImportError:
        return False
    return isinstance(getattr(task_runner, "SUPERVISOR_COMMS", None), InProcessSupervisorComms)


class RayJobOperator(BaseOperator):
    """Run ``entrypoint`` as a Ray job on the cluster described by ``cluster`` (a ClusterHandle dict).

    :param backend_config: the deployment's settings of the cluster's backend (as the setup got
        them): the token and the dashboard address come from the backend with these settings,
        and the handle's ``dashboard_url`` must be that address

    :param partition: the key of this job within the DAG run, e.g. the index of the slice of
        the run's work it does (the submission id derives from ``(dag_id, run_id, partition)``,
        so a retried task adopts its job instead of duplicating it)
    :param runtime_env: Ray runtime environment for the job (``working_dir``, ``env_vars``, ...)
    :param entrypoint_num_cpus: CPUs of the job's driver; > 0 keeps drivers off a head that has
        ``num-cpus: 0`` (KubeRay's), since Ray places the driver where these resources are
    :param entrypoint_memory: memory of the job's driver, bytes
    :param max_in_flight: at most this many map indices of this task run their jobs at once
        (a sliding window over map indices, see :mod:`airflow_ray.triggers.in_flight_gate`);
        ``None`` or 0: no bound
    :param timeout_s: the bound of one partition's job, from the moment it is admitted (its
        submission, or for a job adopted from an earlier try, the job's own start); past it the
        job is stopped and the task fails naming the partition. Waiting for a slot is not counted.
    :param slot_wait_timeout_s: the bound of the wait for a slot; ``None``: derived from the
        queue ahead when the partition starts waiting (:func:`~airflow_ray.triggers.in_flight_gate.slot_wait_bound`:
        its waves of ``max_in_flight`` jobs, each try bounded by ``timeout_s``), no bound without ``timeout_s``
    :param deferrable: sense from the triggerer (default) instead of occupying a worker slot
    :param job_label: what the job is, in words (e.g. ``partition 17 · 1,000,000 rows``): a mapped
        task shows it instead of its index with ``map_index_template="{{ task.job_label }}"``
    """

    template_fields: Sequence[str] = (
        "entrypoint",
        "cluster",
        "backend_config",
        "partition",
        "runtime_env",
        "poll_interval",
        "max_in_flight",
        "timeout_s",
        "slot_wait_timeout_s",
    )
    operator_extra_links = (RayJobLink(),)
    ui_color = "#e8f1fb"

    def __init__(
        self,
        *,
        cluster: dict[str, Any] | Any,
        entrypoint: str,
        backend_config: dict[str, Any] | None = None,
        partition: int | str = 0,
        runtime_env: dict[str, Any] | None = None,
        entrypoint_num_cpus: float | None = None,
        entrypoint_memory: int | None = None,
        max_in_flight: int | str | None = None,
        timeout_s: float | str | None = None,
        slot_wait_timeout_s: float | str | None = None,
        deferrable: bool = True,
        poll_interval: float = 5.0,
        tail_lines: int = 40,
        max_log_lines: int = 500,
        job_label: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.cluster = cluster
        self.entrypoint = entrypoint
        self.backend_config = backend_config or {}
        self.partition = partition
        self.runtime_env = runtime_env
        self.entrypoint_num_cpus = entrypoint_num_cpus
        self.entrypoint_memory = entrypoint_memory
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.slot_wait_timeout_s = slot_wait_timeout_s
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.tail_lines = tail_lines
        self.max_log_lines = max_log_lines
        self.job_label = job_label
        self._submission_id: str | None = None
        self._handle: ClusterHandle | None = None

    def _client(self, handle: ClusterHandle) -> RayJobsClient:
        return RayJobsClient(*credentials(handle, self.backend_config))

    # ------------------------------------------------------------------ gate
    def _limit(self) -> int:
        return int(self.max_in_flight or 0)

    def _job_deadline(self, info: dict[str, Any] | None) -> float | None:
        """The job's deadline: ``timeout_s`` from its admission (:func:`~airflow_ray.submission.job_deadline`)."""
        return job_deadline(info, self.timeout_s)

    def _slot_deadline(self, ahead: int) -> float | None:
        """When waiting for a slot ends, *ahead* partitions below this one unfinished now."""
        if self.slot_wait_timeout_s:
            return time.time() + float(self.slot_wait_timeout_s)
        if not self.timeout_s:
            return None
        tries = int(self.retries or 0) + 1
        return time.time() + slot_wait_bound(ahead, self._limit(), float(self.timeout_s), tries)

    def _may_start(self, ti) -> tuple[bool, int]:
        """The in-flight gate, checked from the worker before deferring to wait for it:
        ``(open, how many partitions below are unfinished, or a lower bound of it)``."""
        limit = self._limit()
        if limit <= 0 or getattr(ti, "map_index", -1) < 0:
            return True, 0
        if runs_one_task_at_a_time():
            # `airflow dags test` runs mapped tasks one by one, in any order, and a deferred
            # task's trigger in line: a gate waiting for a lower index would wait forever, and
            # one task at a time never exceeds a limit >= 1
            self.log.info("partition %s: tasks run one at a time (dag.test), no in-flight gate", self.partition)
            return True, 0
        try:
            opened, ahead = may_start_now(ti.dag_id, ti.run_id, ti.task_id, ti.map_index, limit)
        except Exception as exc:  # no supervisor channel (e.g. a unit-test harness): nothing to bound
            self.log.warning("in-flight bound not enforced: task states unavailable (%s)", exc)
            return True, 0
        if opened:
            return True, ahead
        self.log.info(
            "partition %s waits for a slot: %d earlier partitions unfinished, at most %d in flight",
            self.partition,
            ahead,
            limit,
        )
        return False, ahead

    def execute(self, context) -> dict[str, Any]:
        self.poll_interval = float(self.poll_interval)
        handle = ClusterHandle.from_dict(self.cluster)
        ti = context["ti"]
        key = (ti.dag_id, ti.run_id, self.partition)
        with self._client(handle) as client:
            check_compatible(client.version().get("ray_version", ""))
            _, info = find_job(client, key)
        opened, ahead = (True, 0) if info is not None or not self.deferrable else self._may_start(ti)
        if not opened:
            # the bound covers every index below this one (``ahead`` may be a lower bound, and a
            # cleared task below can re-enter the queue): at least as long as the queue needs
            deadline = self._slot_deadline(max(ahead, int(ti.map_index)))
            if deadline is not None:
                self.log.info(
                    "partition %s waits for a slot until %s UTC at most (slot_wait_timeout_s=%s; the job's own "
                    "timeout_s=%s counts from its admission)",
                    self.partition,
                    time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(deadline)),
                    self.slot_wait_timeout_s or f"derived from the {ti.map_index} partitions before it",
                    self.timeout_s,
                )
            if not uploads_working_dir(self.runtime_env):
                # one deferral: the trigger waits for the slot, submits (or adopts) and senses the job
                self.defer(
                    trigger=self._job_trigger(handle, submission_id="", info=None, gate=self._gate(ti, deadline)),
                    method_name="execute_complete",
                )
            # a local working_dir is uploaded from the worker, which has it: wait, then submit here
            self.defer(
                trigger=InFlightGateTrigger(
                    dag_id=ti.dag_id,
                    run_id=ti.run_id,
                    task_id=ti.task_id,
                    map_index=ti.map_index,
                    limit=self._limit(),
                    poll_interval=self.poll_interval,
                    deadline=deadline,
                ),
                method_name="execute_after_gate",
            )
        return self._submit_and_sense(context, handle)

    def execute_after_gate(self, context, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("status") != "open":
            raise self._slot_timeout(event)
        self.log.info("partition %s got a slot after %ss", self.partition, event.get("waited_s"))
        return self._submit_and_sense(context, ClusterHandle.from_dict(self.cluster))

    def _slot_timeout(self, event: dict[str, Any]) -> RayJobError:
        return RayJobError(
            f"partition {self.partition} waited {event.get('waited_s')}s for a slot ({event.get('ahead')} earlier "
            f"partitions still unfinished, at most {self._limit()} in flight) and reached the bound of that "
            f"wait (slot_wait_timeout_s={self.slot_wait_timeout_s or 'derived from the queue ahead'}); "
            "nothing was submitted"
        )

    def _gate(self, ti, deadline: float | None) -> dict[str, Any]:
        return {
            "dag_id": ti.dag_id,
            "run_id": ti.run_id,
            "task_id": ti.task_id,
            "map_index": ti.map_index,
            "limit": self._limit(),
            "deadline": deadline,
        }

    def _job_trigger(
        self, handle: ClusterHandle, submission_id: str, info: dict[str, Any] | None, gate: dict[str, Any] | None = None
    ) -> RayJobTrigger:
        """The trigger sensing this partition's job *submission_id*; with *gate*, one that first
        waits for the slot, then submits or adopts the job itself (its id is then decided there)."""
        submission = None
        if gate is not None:
            submission = {
                "dag_id": gate["dag_id"],
                "run_id": gate["run_id"],
                "partition": self.partition,
                "entrypoint": self.entrypoint,
                "runtime_env": self.runtime_env,
                "metadata": job_metadata(gate["dag_id"], gate["run_id"], self.partition),
                "entrypoint_num_cpus": self.entrypoint_num_cpus,
                "entrypoint_memory": self.entrypoint_memory,
                "timeout_s": float(self.timeout_s) if self.timeout_s else None,
            }
        return RayJobTrigger(
            dashboard_url=handle.dashboard_url,
            submission_id=submission_id,
            backend=handle.backend,
            cluster_name=handle.name,
            backend_config=dict(self.backend_config),
            poll_interval=self.poll_interval,
            tail_lines=self.tail_lines,
            max_log_lines=self.max_log_lines,
            deadline=None if gate is not None else self._job_deadline(info),
            partition=self.partition,
            gate=gate,
            submission=submission,
        )

    # ------------------------------------------------------------------ job
    def _submit_and_sense(self, context, handle: ClusterHandle) -> dict[str, Any]:
        # a try resumed after the gate is a new operator whose templates rendered again (a string)
        self.poll_interval = float(self.poll_interval)
        self._handle = handle
        ti = context["ti"]
        key = (ti.dag_id, ti.run_id, self.partition)
        with self._client(handle) as client:
            sid, how, info = submit_or_adopt(
                client,
                key,
                self.entrypoint,
                runtime_env=self.runtime_env,
                metadata=job_metadata(ti.dag_id, ti.run_id, self.partition),
                entrypoint_num_cpus=self.entrypoint_num_cpus,
                entrypoint_memory=self.entrypoint_memory,
            )
        self._submission_id = sid
        url = self._publish(ti, handle, sid)
        self.log.info("%s Ray job %s on cluster %s (%s)", how, sid, handle.name, url)
        if info is not None and info.get("status") == "SUCCEEDED":
            return {"submission_id": sid, "status": "SUCCEEDED", "adopted": True}
        # the log is followed from its start in each try's own log: Airflow clears a task's XComs,
        # the trigger's log-offset checkpoint included, when a new try starts (not when it resumes)
        trigger = self._job_trigger(handle, sid, info)
        if self.deferrable:
            self.defer(trigger=trigger, method_name="execute_complete")
        return self.execute_complete(context, _run_trigger(trigger))

    def _publish(self, ti, handle: ClusterHandle, sid: str) -> str:
        """The job's id and dashboard link in the task's XCom (the link's button reads it)."""
        url = job_url(handle.dashboard_url, sid)
        ti.xcom_push(key="submission_id", value=sid)
        ti.xcom_push(key=XCOM_JOB_URL, value=url)
        return url

    def execute_complete(self, context, event: dict[str, Any]) -> dict[str, Any]:
        status, sid = event.get("status"), event.get("submission_id")
        if status == SLOT_TIMEOUT:
            raise self._slot_timeout(event)
        if event.get("how"):  # submitted from the trigger once the slot opened
            waited = event.get("waited_s")
            self.log.info("partition %s got a slot after %ss; %s Ray job %s", self.partition, waited, event["how"], sid)
            if sid and not event.get("xcoms_published"):
                self._publish(context["ti"], ClusterHandle.from_dict(self.cluster), sid)
        if status == "SUCCEEDED":
            self.log.info("Ray job %s succeeded", sid)
            return {"submission_id": sid, "status": status, "adopted": event.get("how") == "adopted"}
        failed = "FAILED/STOPPED" if status in FAILED else status
        raise RayJobError(
            f"Ray job {sid} (partition {self.partition}) ended {status} [{failed}]: {event.get('message', '')}\n"
            f"--- last log lines ---\n{event.get('log_tail', '')}"
        )

    def on_kill(self) -> None:
        if self._submission_id and self._handle is not None:
            with self._client(self._handle) as client:
                client.stop(self._submission_id)
            self.log.info("stopped Ray job %s (partition %s)", self._submission_id, self.partition)


def _run_trigger(trigger: RayJobTrigger) -> dict[str, Any]:
    """Non-deferrable mode: run the same trigger in this process until its event."""

    async def first_event() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise RayJobError(f"the trigger for {trigger.submission_id} ended without an event")

    return asyncio.run(first_event())
