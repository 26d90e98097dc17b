"""Deferrable sensing of one Ray job through the Jobs API, without blocking the event loop.

All state is in the trigger's kwargs and its event: rebuilt from ``serialize()`` on another
triggerer, it resumes polling the same job and ends with the same event.

Logs stream into the task log incrementally (:mod:`airflow_ray.hooks.ray_job_logs`): only
new log text is fetched, at most ``max_log_lines`` lines per poll are written (a marker says
how many were cut), and the position reached is checkpointed in the task instance's XCom
(``ray_log_offset``) after every poll, so a triggerer that restarts resumes after the last
line it logged instead of replaying the log. Memory per trigger is bounded whatever the
log's size.

``deadline`` (epoch seconds) bounds the whole wait: past it the trigger stops the Ray job and
ends with ``TIMEOUT``, so a stuck job fails its task clearly instead of blocking the run.
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

from airflow_ray.errors import RayJobsApiError
from airflow_ray.hooks.ray_job_logs import JobLogFollower
from airflow_ray.hooks.ray_jobs import TERMINAL, AsyncRayJobsClient
from airflow_ray.progress import split_progress

#: The pause after the job's log stream closed before its status is asked again (the job is
#: likely ending); it doubles with each close in a row, up to ``poll_interval``.
_ENDING_POLL_S = 0.25
_MAX_CONSECUTIVE_ERRORS = 12
#: XCom key under which a trigger checkpoints how far into the job's log it has logged.
LOG_OFFSET_XCOM_KEY = "ray_log_offset"
#: After a terminal status, how long to wait for the log stream to deliver its last lines.
_DRAIN_S = 15.0


class _OffsetCheckpoint:
    """The log offset in the task instance's XCom, read and written through the Task SDK's
    supervisor channel (available in the triggerer); a no-op where there is none."""

    def __init__(self, task_instance: Any, log):
        self.ti = task_instance
        self.log = log
        self.saved: int | None = None
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

    async def save(self, offset: int) -> None:
        if not self.enabled or offset == self.saved:
            return
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
    ):
        super().__init__()
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

    def _event(self, status: str, message: str | None, follower: JobLogFollower | None) -> TriggerEvent:
        return TriggerEvent(
            {
                "status": status,
                "submission_id": self.submission_id,
                "message": message or "",
                "log_tail": "\n".join(follower.tail) if follower else "",
                "log_offset": follower.offset if follower else self.log_offset,
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
        client = await self._client()
        checkpoint = _OffsetCheckpoint(getattr(self, "task_instance", None), self.log)
        offset = max(self.log_offset, await checkpoint.load())
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
                    await checkpoint.save(follower.offset)
                    yield self._event(status, info.get("message"), follower)
                    return
                if self.deadline is not None and time.time() >= self.deadline:
                    stopped = await client.stop(self.submission_id)
                    await self._drain(follower, 2.0)
                    await checkpoint.save(follower.offset)
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
