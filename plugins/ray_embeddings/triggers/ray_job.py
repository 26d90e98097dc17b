"""Deferrable sensing of one Ray job through the Jobs API, without blocking the event loop.

All state is in the trigger's kwargs and its event: rebuilt from ``serialize()`` on another
triggerer, it resumes polling the same job and ends with the same event. Log lines are
written to the task log as they arrive. Marking the deferred task failed (or clearing it)
calls :meth:`on_kill`, which stops the Ray job.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from ray_embeddings.cluster import TokenRef, aresolve_token
from ray_embeddings.errors import RayJobsApiError
from ray_embeddings.hooks.ray_jobs import TERMINAL, AsyncRayJobsClient

_MAX_CONSECUTIVE_ERRORS = 12


def tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


class RayJobTrigger(BaseTrigger):
    def __init__(
        self,
        dashboard_url: str,
        submission_id: str,
        token: dict[str, Any] | None = None,
        poll_interval: float = 5.0,
        log_offset: int = 0,
        tail_lines: int = 40,
        stream_logs: bool = True,
    ):
        super().__init__()
        self.dashboard_url = dashboard_url
        self.submission_id = submission_id
        self.token = dict(token or {})
        self.poll_interval = poll_interval
        self.log_offset = log_offset
        self.tail_lines = tail_lines
        self.stream_logs = stream_logs

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "dashboard_url": self.dashboard_url,
                "submission_id": self.submission_id,
                "token": self.token,
                "poll_interval": self.poll_interval,
                "log_offset": self.log_offset,
                "tail_lines": self.tail_lines,
                "stream_logs": self.stream_logs,
            },
        )

    async def _client(self) -> AsyncRayJobsClient:
        return AsyncRayJobsClient(self.dashboard_url, await aresolve_token(TokenRef.from_dict(self.token)))

    def _event(self, status: str, message: str | None, logs: str, offset: int) -> TriggerEvent:
        return TriggerEvent(
            {
                "status": status,
                "submission_id": self.submission_id,
                "message": message or "",
                "log_tail": tail(logs, self.tail_lines),
                "log_offset": offset,
            }
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        client = await self._client()
        offset, errors = self.log_offset, 0
        try:
            while True:
                try:
                    info = await client.get(self.submission_id)
                    logs = await client.logs(self.submission_id) if info is not None else ""
                    errors = 0
                except (RayJobsApiError, OSError, ValueError) as exc:
                    errors += 1
                    self.log.warning("Ray Jobs API unreachable (%d/%d): %s", errors, _MAX_CONSECUTIVE_ERRORS, exc)
                    if errors >= _MAX_CONSECUTIVE_ERRORS:
                        yield self._event("ERROR", f"Ray Jobs API unreachable: {exc}", "", offset)
                        return
                    await asyncio.sleep(self.poll_interval)
                    continue
                except Exception as exc:  # httpx transport errors
                    errors += 1
                    self.log.warning("Ray Jobs API error (%d/%d): %s", errors, _MAX_CONSECUTIVE_ERRORS, exc)
                    if errors >= _MAX_CONSECUTIVE_ERRORS:
                        yield self._event("ERROR", f"Ray Jobs API error: {exc}", "", offset)
                        return
                    await asyncio.sleep(self.poll_interval)
                    continue
                if info is None:
                    yield self._event("MISSING", f"no Ray job {self.submission_id} on {self.dashboard_url}", "", offset)
                    return
                if self.stream_logs and len(logs) > offset:
                    for line in logs[offset:].splitlines():
                        self.log.info("[ray job %s] %s", self.submission_id, line)
                    offset = len(logs)
                status = info.get("status", "")
                if status in TERMINAL:
                    yield self._event(status, info.get("message"), logs, offset)
                    return
                await asyncio.sleep(self.poll_interval)
        finally:
            await client.aclose()

    async def on_kill(self) -> None:
        client = await self._client()
        try:
            stopped = await client.stop(self.submission_id)
            self.log.info("stopped Ray job %s: %s", self.submission_id, stopped)
        finally:
            await client.aclose()
