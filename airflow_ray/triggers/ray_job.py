"""Deferrable sensing of one Ray job through the Jobs API, without blocking the event loop.

All state is in the trigger's kwargs and its event: rebuilt from ``serialize()`` on another
triggerer, it resumes polling the same job and ends with the same event.

Logs stream into the task log incrementally (:mod:`airflow_ray.hooks.ray_job_logs`): only
new log text is fetched, at most ``max_log_lines`` lines per poll are written (a marker says
how many were cut), and the position reached is checkpointed in the task instance's XCom
(``ray_log_offset``) at most every ``checkpoint_every_s`` (30 s), so a triggerer that restarts
resumes at most that much before the last line it logged instead of replaying the log. Each
checkpoint is a write through the triggerer to the metadata database: at a thousand
partitions a write per poll would be most of the triggerer's work. The end of the job needs
none (its event carries the offset). Memory per trigger is bounded whatever the log's size.

``deadline`` (epoch seconds) bounds the whole wait: past it the trigger stops the Ray job and
ends with ``TIMEOUT``, so a stuck job fails its task clearly instead of blocking the run.
With ``gate`` and ``submission`` the same trigger also waits for the partition's slot
(:func:`~airflow_ray.triggers.in_flight_gate.wait_for_slot`) and then submits or adopts its
job (:func:`~airflow_ray.submission.submit_or_adopt`, under the deterministic id), so a
partition that waits for a slot costs one deferral and one trigger instead of a worker start
between two triggers. A triggerer that restarts after the submission rebuilds the trigger
from its kwargs, finds the slot open again (the rule only counts lower indices) and adopts
the job it submitted. The submission's ``runtime_env`` uploads nothing from the triggerer:
one with a local ``working_dir`` is submitted by the worker instead (the operator decides).

Marking the deferred task failed (or clearing it) calls :meth:`on_kill`, which stops the job;
marked in the moment before the triggerer loads the trigger, nothing does, and the job ends
with its run: the teardown deletes the cluster, or on a borrowed one stops the run's leftover
jobs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_ray.errors import RayJobError, RayJobsApiError
from airflow_ray.hooks.ray_job_logs import JobLogFollower
from airflow_ray.hooks.ray_jobs import TERMINAL, AsyncRayJobsClient, RayJobsClient
from airflow_ray.links import XCOM_JOB_URL, job_url
from airflow_ray.progress import split_progress
from airflow_ray.submission import job_deadline, submit_or_adopt
from airflow_ray.triggers.in_flight_gate import wait_for_slot

#: The pause after the job's log stream closed before its status is asked again (the job is
#: likely ending); it doubles with each close in a row, up to ``poll_interval``.
_ENDING_POLL_S = 0.25
_MAX_CONSECUTIVE_ERRORS = 12
#: XCom key under which a trigger checkpoints how far into the job's log it has logged.
LOG_OFFSET_XCOM_KEY = "ray_log_offset"
#: The least time between two log-offset checkpoints (what a triggerer restart may log again).
CHECKPOINT_EVERY_S = 30.0
#: After a terminal status, how long to wait for the log stream to deliver its last lines.
_DRAIN_S = 15.0
#: Tries of a submission from the triggerer before the event reports the Jobs API's error.
_SUBMIT_TRIES = 3
#: The event's status when the wait for a slot reached its bound (nothing was submitted).
SLOT_TIMEOUT = "SLOT_TIMEOUT"
#: The keys of a ``gate`` and of a ``submission`` (the trigger's JSON kwargs).
GATE_KEYS = frozenset({"dag_id", "run_id", "task_id", "map_index", "limit", "deadline"})
SUBMISSION_KEYS = frozenset(
    {"dag_id", "run_id", "partition", "entrypoint", "runtime_env", "metadata", "entrypoint_num_cpus",
     "entrypoint_memory", "timeout_s"}
)  # fmt: skip


class _OffsetCheckpoint:
    """The log offset in the task instance's XCom, read and written through the Task SDK's
    supervisor channel (available in the triggerer); a no-op where there is none."""

    def __init__(self, task_instance: Any, log, every_s: float = CHECKPOINT_EVERY_S):
        self.ti = task_instance
        self.log = log
        self.every_s = every_s
        self.saved: int | None = None
        self.saved_at = time.monotonic()
        self.enabled = task_instance is not None and all(
            getattr(task_instance, a, None) is not None for a in ("dag_id", "task_id", "run_id")
        )

    def _key(self) -> dict[str, Any]:
        return {
            "dag_id": self.ti.dag_id,
            "task_id": self.ti.task_id,
            "run_id": self.ti.run_id,
            "map_index": getattr(self.ti, "map_index", -1),
        }

    def _load(self) -> int:
        from airflow_ray.xcom import xcom_backend

        value = xcom_backend().get_one(key=LOG_OFFSET_XCOM_KEY, **self._key())
        return int(value or 0)

    def _save(self, offset: int) -> None:
        from airflow_ray.xcom import xcom_backend

        xcom_backend().set(LOG_OFFSET_XCOM_KEY, offset, **self._key())

    async def load(self) -> int:
        if not self.enabled:
            return 0
        try:
            self.saved = await asyncio.to_thread(self._load)
        except Exception as exc:  # no supervisor channel (a test harness): checkpointing off
            self.log.info("log offset checkpoints unavailable here (%s); logs restart from the trigger's offset", exc)
            self.enabled = False
            return 0
        return self.saved

    async def publish(self, values: dict[str, Any]) -> bool:
        """Write *values* to the task instance's XCom (the job's id and link, once submitted);
        False where there is no channel or the write failed (the resumed task writes them)."""
        if not self.enabled:
            return False

        def write() -> None:
            from airflow_ray.xcom import xcom_backend

            for key, value in values.items():
                xcom_backend().set(key, value, **self._key())

        try:
            await asyncio.to_thread(write)
            return True
        except Exception as exc:
            self.log.warning("could not write the job's XComs (%s); the resumed task writes them", exc)
            return False

    async def save(self, offset: int) -> None:
        """Checkpoint *offset* if it moved and the last checkpoint is ``every_s`` old."""
        if not self.enabled or offset == self.saved or time.monotonic() - self.saved_at < self.every_s:
            return
        self.saved_at = time.monotonic()
        try:
            await asyncio.to_thread(self._save, offset)
            self.saved = offset
        except Exception as exc:
            self.log.warning("could not checkpoint the log offset (%s); a triggerer restart may repeat lines", exc)


class RayJobTrigger(BaseTrigger):
    def __init__(
        self,
        dashboard_url: str,
        submission_id: str,
        backend: str | None = None,
        cluster_name: str | None = None,
        backend_config: dict[str, Any] | None = None,
        poll_interval: float = 5.0,
        log_offset: int = 0,
        tail_lines: int = 40,
        stream_logs: bool = True,
        max_log_lines: int = 500,
        deadline: float | None = None,
        partition: int | str | None = None,
        gate: dict[str, Any] | None = None,
        submission: dict[str, Any] | None = None,
        checkpoint_every_s: float = CHECKPOINT_EVERY_S,
    ):
        super().__init__()
        if gate is not None and not set(gate) >= GATE_KEYS:
            raise ValueError(f"gate needs {sorted(GATE_KEYS)}, got {sorted(gate)}")
        if submission is not None and not set(submission) >= SUBMISSION_KEYS:
            raise ValueError(f"submission needs {sorted(SUBMISSION_KEYS)}, got {sorted(submission)}")
        if gate is not None and submission is None:
            raise ValueError("a gate goes with a submission: the trigger submits the job once the slot opens")
        self.dashboard_url = dashboard_url
        self.submission_id = submission_id
        #: where the token comes from: the deployment's backend (its settings, never a path or a
        #: secret's name), which also checks ``dashboard_url`` is this cluster's; no backend: no token
        self.backend = backend
        self.cluster_name = cluster_name
        self.backend_config = dict(backend_config or {})
        self.poll_interval = poll_interval
        self.log_offset = log_offset
        self.tail_lines = tail_lines
        self.stream_logs = stream_logs
        self.max_log_lines = max_log_lines
        self.deadline = deadline
        self.partition = partition
        #: wait for the partition's slot first (``dag_id``, ``run_id``, ``task_id``, ``map_index``,
        #: ``limit``, ``deadline``: the bound of the wait), then submit or adopt ``submission``
        self.gate = dict(gate) if gate is not None else None
        #: the job to submit or adopt (``submission_id`` is then the one it gets): ``dag_id``,
        #: ``run_id``, ``partition``, the submit arguments, and ``timeout_s``, the job's bound
        #: from its admission (``deadline`` is then set from it)
        self.submission = dict(submission) if submission is not None else None
        self.checkpoint_every_s = checkpoint_every_s
        self.published = False

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "dashboard_url": self.dashboard_url,
                "submission_id": self.submission_id,
                "backend": self.backend,
                "cluster_name": self.cluster_name,
                "backend_config": self.backend_config,
                "poll_interval": self.poll_interval,
                "log_offset": self.log_offset,
                "tail_lines": self.tail_lines,
                "stream_logs": self.stream_logs,
                "max_log_lines": self.max_log_lines,
                "deadline": self.deadline,
                "partition": self.partition,
                "gate": self.gate,
                "submission": self.submission,
                "checkpoint_every_s": self.checkpoint_every_s,
            },
        )

    async def _client(self, timeout: float = 30.0) -> AsyncRayJobsClient:
        token = None
        if self.backend:
            from airflow_ray.backends import acredentials
            from airflow_ray.cluster import ClusterHandle

            handle = ClusterHandle(self.backend, self.cluster_name or "", self.dashboard_url)
            _, token = await acredentials(handle, self.backend_config)
        return AsyncRayJobsClient(self.dashboard_url, token, timeout=timeout)

    async def _connected(self) -> AsyncRayJobsClient:
        """:meth:`_client`, its credential lookup retried like a status poll: a Kubernetes API or
        secrets backend that does not answer for a moment is not the end of the job's sensing."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._client()
            except Exception as exc:
                if attempt >= _MAX_CONSECUTIVE_ERRORS:
                    raise
                self.log.warning(
                    "credentials for cluster %r unavailable (%d/%d): %s",
                    self.cluster_name,
                    attempt,
                    _MAX_CONSECUTIVE_ERRORS,
                    exc,
                )
                await asyncio.sleep(self.poll_interval)

    def _event(self, status: str, message: str | None, follower: JobLogFollower | None, **extra) -> TriggerEvent:
        return TriggerEvent(
            {
                "status": status,
                "submission_id": self.submission_id,
                "message": message or "",
                "log_tail": "\n".join(follower.tail) if follower else "",
                "log_offset": follower.offset if follower else self.log_offset,
                "xcoms_published": self.published,
                **extra,
            }
        )

    def _write(self, lines: list[str], cut: int) -> None:
        if not self.stream_logs:
            return
        lines, progress = split_progress(lines)  # the newest progress line of this poll, in words
        for line in lines:
            self.log.info("[ray job %s] %s", self.submission_id, line)
        if progress is not None:
            self.log.info("[ray job %s] %s", self.submission_id, progress.describe(self.partition))
        if cut:
            self.log.info(
                "[ray job %s] ... %d more lines not shown (over %d per poll); the full log is in the Ray dashboard",
                self.submission_id,
                cut,
                self.max_log_lines,
            )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        waited: dict[str, Any] = {}
        if self.gate is not None:
            gate = self.gate
            waited = await wait_for_slot(
                gate["dag_id"], gate["run_id"], gate["task_id"], int(gate["map_index"]), int(gate["limit"]),
                self.poll_interval, gate["deadline"],
            )  # fmt: skip
            if waited["status"] != "open":
                yield self._event(SLOT_TIMEOUT, "", None, ahead=waited.get("ahead"), waited_s=waited["waited_s"])
                return
        try:
            client = await self._connected()
        except Exception as exc:  # the backend's lookup failed every try: the task fails, naming it
            yield self._event("ERROR", f"no credentials for cluster {self.cluster_name!r}: {exc}", None)
            return
        checkpoint = _OffsetCheckpoint(getattr(self, "task_instance", None), self.log, self.checkpoint_every_s)
        how = None
        if self.submission is not None:
            try:
                how = await self._submit(client, checkpoint)
            except (RayJobsApiError, RayJobError, OSError) as exc:
                await client.aclose()
                yield self._event("ERROR", f"submitting the job failed: {exc}", None, waited_s=waited.get("waited_s"))
                return
        # a job this trigger just submitted has logged nothing yet: no checkpoint to read
        offset = self.log_offset if how == "submitted" else max(self.log_offset, await checkpoint.load())
        follower = JobLogFollower(
            self.dashboard_url,
            self.submission_id,
            client.token,
            offset=offset,
            max_lines=self.max_log_lines,
            tail_lines=self.tail_lines,
        )
        errors = closes = 0
        try:
            while True:
                try:
                    info = await client.get(self.submission_id)
                    errors = 0
                except (RayJobsApiError, OSError, ValueError, Exception) as exc:  # httpx errors included
                    errors += 1
                    self.log.warning("Ray Jobs API unreachable (%d/%d): %s", errors, _MAX_CONSECUTIVE_ERRORS, exc)
                    if errors >= _MAX_CONSECUTIVE_ERRORS:
                        yield self._event("ERROR", f"Ray Jobs API unreachable: {exc}", follower)
                        return
                    await asyncio.sleep(self.poll_interval)
                    continue
                if info is None:
                    yield self._event("MISSING", f"no Ray job {self.submission_id} on {self.dashboard_url}", follower)
                    return
                status = info.get("status", "")
                if status in TERMINAL:
                    await self._drain(follower)
                    yield self._event(status, info.get("message"), follower, how=how, waited_s=waited.get("waited_s"))
                    return
                if self.deadline is not None and time.time() >= self.deadline:
                    stopped = await client.stop(self.submission_id)
                    await self._drain(follower, 2.0)
                    msg = (
                        f"deadline passed ({time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(self.deadline))} UTC) "
                        f"with the job {status}; stop requested: {stopped}"
                    )
                    yield self._event("TIMEOUT", msg, follower)
                    return
                chunk = await follower.read(self.poll_interval)
                self._write(chunk.lines, chunk.cut)
                await checkpoint.save(follower.offset)
                if chunk.ended:
                    # The stream closed: the job may be ending (ask its status again soon), or Ray's
                    # head lost its agent connection, whose close looks the same (code 1000): the next
                    # read reconnects and resumes from the offset. Closes in a row back off to a poll
                    # interval, so a job that has not started yet is not asked for its log in a loop.
                    closes += 1
                    await asyncio.sleep(min(self.poll_interval, _ENDING_POLL_S * 2 ** min(closes - 1, 16)))
                elif chunk.lines:
                    closes = 0
        finally:
            await follower.aclose()
            await client.aclose()

    async def _submit(self, client: AsyncRayJobsClient, checkpoint: _OffsetCheckpoint) -> str:
        """Submit or adopt the job (blocking calls, in a thread; a few tries for a Jobs API that
        does not answer); sets ``submission_id`` and the job's ``deadline`` from its admission,
        and writes its id and link to the task's XCom. Returns ``"submitted"`` or ``"adopted"``."""
        sub = self.submission
        key = (sub["dag_id"], sub["run_id"], sub["partition"])

        def submit() -> tuple[str, str, dict[str, Any] | None]:
            with RayJobsClient(self.dashboard_url, client.token) as sync:
                return submit_or_adopt(
                    sync,
                    key,
                    sub["entrypoint"],
                    runtime_env=sub["runtime_env"],
                    metadata=sub["metadata"],
                    entrypoint_num_cpus=sub["entrypoint_num_cpus"],
                    entrypoint_memory=sub["entrypoint_memory"],
                )

        for attempt in range(1, _SUBMIT_TRIES + 1):
            try:
                sid, how, info = await asyncio.to_thread(submit)
                break
            except (RayJobsApiError, OSError) as exc:
                if attempt == _SUBMIT_TRIES:
                    raise
                self.log.warning(
                    "submitting partition %s failed (%d/%d): %s", self.partition, attempt, _SUBMIT_TRIES, exc
                )
                await asyncio.sleep(self.poll_interval)
        self.submission_id = sid
        self.deadline = job_deadline(info, sub["timeout_s"])
        url = job_url(self.dashboard_url, sid)
        self.published = await checkpoint.publish({"submission_id": sid, XCOM_JOB_URL: url})
        self.log.info("%s Ray job %s for partition %s (%s)", how, sid, self.partition, url)
        return how

    async def _drain(self, follower: JobLogFollower, budget_s: float = _DRAIN_S) -> None:
        """After a terminal status: the stream ends once the log is fully sent. One that closed
        just before this status was asked has already sent it (see :mod:`~airflow_ray.hooks.ray_job_logs`)."""
        if follower.ended and not follower.complete:
            last = follower.finish()
            self._write(last.lines, last.cut)
            return
        follower.job_is_terminal()
        end = time.monotonic() + budget_s
        while time.monotonic() < end:
            chunk = await follower.read(min(2.0, end - time.monotonic()))
            self._write(chunk.lines, chunk.cut)
            if follower.complete:  # closed after the job was seen terminal: the whole log was sent
                return

    async def on_kill(self) -> None:
        """The user marked the task failed/success or cleared it: stop the job, say which, never raise."""
        if not self.submission_id:
            self.log.info(
                "task killed by a user action while partition %s waited for a slot: nothing to stop", self.partition
            )
            return
        try:
            client = await self._client(timeout=10.0)
        except Exception:
            self.log.exception("could not reach the Ray cluster to stop job %s", self.submission_id)
            return
        try:
            stopped = await client.stop(self.submission_id)
            self.log.info(
                "task killed by a user action: stop requested for Ray job %s (partition %s): %s",
                self.submission_id,
                self.partition,
                "stopping" if stopped else "already finished or not found",
            )
        except Exception:
            self.log.exception("stopping Ray job %s failed", self.submission_id)
        finally:
            await client.aclose()
