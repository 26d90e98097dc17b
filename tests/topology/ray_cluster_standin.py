"""A loopback stand-in of a Ray cluster's dashboard, for measuring Airflow's side at scale.

It replaces a real Ray cluster (which would spend the machine's cores on the jobs the
measurement is not about) and serves every call the DAG's tasks make against the cluster:
``/api/version``, the state API's node list (``/api/v0/nodes``: ``nodes`` alive nodes of
``node_resources`` each, so the ``capacity`` task computes the in-flight limit from it as
from a real cluster), job submission (``POST /api/jobs/``), status (``GET /api/jobs/{id}``),
``stop``, the job list (``GET /api/jobs/``, with each job's metadata), the whole log and the
log websocket (``/logs/tail``), behind bearer-token auth.

A submitted job is RUNNING for ``delays[partition]`` seconds (the partition from the
submission's metadata), then SUCCEEDED; it writes ``log_lines`` lines spread over its run,
streamed as Ray's agent does (the stream closes normally once the job is terminal and its
log fully sent). The job writes no outputs. Every submission, and the first time a status
call saw it terminal, is recorded in :attr:`RayClusterStandIn.jobs` for the figures.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

RAY_VERSION = "2.60.0"


class StandInError(RuntimeError):
    """The stand-in could not start, or was asked for something it does not serve."""


@dataclass
class TimedJob:
    submission_id: str
    partition: int
    delay_s: float
    submitted_at: float  # epoch seconds
    log_lines: int
    metadata: dict[str, str] = field(default_factory=dict)
    stopped_at: float | None = None
    seen_terminal_at: float | None = None  # first status call that answered terminal
    status_calls: int = 0
    tail_connections: int = 0

    @property
    def ends_at(self) -> float:
        return self.submitted_at + self.delay_s

    def status(self, now: float) -> str:
        if self.stopped_at is not None and self.stopped_at < self.ends_at:
            return "STOPPED"
        return "SUCCEEDED" if now >= self.ends_at else "RUNNING"

    def line(self, i: int) -> str:
        return f"partition {self.partition}: stand-in job step {i + 1}/{self.log_lines}"

    def lines_due(self, now: float) -> int:
        """Lines written by *now*: spread evenly over the job's run, all of them once it ended."""
        if self.status(now) != "RUNNING":
            return self.log_lines
        done = (now - self.submitted_at) / self.delay_s if self.delay_s > 0 else 1.0
        return min(self.log_lines, int(done * self.log_lines))


@dataclass
class RayClusterStandIn:
    delays: Sequence[float]  # by partition index
    nodes: int = 1
    node_resources: Mapping[str, float] = field(default_factory=lambda: {"CPU": 4.0})
    token: str | None = None
    log_lines: int = 5
    jobs: dict[str, TimedJob] = field(default_factory=dict)
    port: int = 0

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {self.nodes}")
        if any(d < 0 for d in self.delays):
            raise ValueError("job delays must be >= 0 s")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="ray-cluster-standin", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RayClusterStandIn:
        self._thread.start()
        if not self._started.wait(15) or self._failed is not None:
            raise StandInError(f"the Ray cluster stand-in did not start: {self._failed}")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    # ------------------------------------------------------------------ server
    def _serve(self) -> None:
        from aiohttp import web

        @web.middleware
        async def auth(request, handler):
            if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
                return web.Response(status=401, text="unauthenticated")
            return await handler(request)

        async def main():
            self._stop = asyncio.Event()
            app = web.Application(middlewares=[auth])
            app.router.add_get("/api/version", self._version)
            app.router.add_get("/api/v0/nodes", self._nodes)
            app.router.add_post("/api/jobs/", self._submit)
            app.router.add_get("/api/jobs/", self._list)
            app.router.add_get("/api/jobs/{sid}", self._get)
            app.router.add_post("/api/jobs/{sid}/stop", self._stop_job)
            app.router.add_get("/api/jobs/{sid}/logs", self._logs)
            app.router.add_get("/api/jobs/{sid}/logs/tail", self._tail)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._started.set()
            await self._stop.wait()
            await runner.cleanup()

        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:  # reported by __enter__
            self._failed = exc
            self._started.set()

    async def _version(self, request):
        from aiohttp import web

        return web.json_response({"ray_version": RAY_VERSION, "version": "1"})

    def node_list(self) -> dict[str, Any]:
        rows = [
            {"node_id": f"{i:056x}", "state": "ALIVE", "resources_total": dict(self.node_resources)}
            for i in range(self.nodes)
        ]
        return {"result": True, "data": {"result": {"total": len(rows), "result": rows}}}

    async def _nodes(self, request):
        from aiohttp import web

        return web.json_response(self.node_list())

    async def _submit(self, request):
        from aiohttp import web

        body = await request.json()
        sid = body.get("submission_id")
        try:
            partition = int((body.get("metadata") or {})["partition"])
            delay = float(self.delays[partition])
        except (KeyError, TypeError, ValueError, IndexError):
            return web.Response(status=400, text=f"no delay for the submission's partition: {body.get('metadata')}")
        if not sid or sid in self.jobs:
            return web.Response(status=400, text=f"submission id {sid!r} missing or already used")
        self.jobs[sid] = TimedJob(sid, partition, delay, time.time(), self.log_lines, dict(body["metadata"]))
        return web.json_response({"submission_id": sid})

    async def _list(self, request):
        from aiohttp import web

        now = time.time()
        rows = [
            {"submission_id": j.submission_id, "type": "SUBMISSION", "status": j.status(now), "metadata": j.metadata}
            for j in list(self.jobs.values())
        ]
        # a driver started by hand on the cluster: listed, with no submission id
        rows.append({"submission_id": None, "type": "DRIVER", "status": "RUNNING", "metadata": {}})
        return web.json_response(rows)

    async def _get(self, request):
        from aiohttp import web

        job = self.jobs.get(request.match_info["sid"])
        if job is None:
            return web.Response(status=404, text="no such job")
        now = time.time()
        status = job.status(now)
        job.status_calls += 1
        if status != "RUNNING" and job.seen_terminal_at is None:
            job.seen_terminal_at = now
        return web.json_response({"submission_id": job.submission_id, "status": status, "message": ""})

    async def _stop_job(self, request):
        from aiohttp import web

        job = self.jobs.get(request.match_info["sid"])
        if job is None:
            return web.Response(status=404, text="no such job")
        now = time.time()
        stopped = job.status(now) == "RUNNING"
        if stopped:
            job.stopped_at = now
        return web.json_response({"stopped": stopped})

    async def _logs(self, request):
        from aiohttp import web

        job = self.jobs.get(request.match_info["sid"])
        if job is None:
            return web.Response(status=404, text="no such job")
        n = job.lines_due(time.time())
        return web.json_response({"logs": "".join(job.line(i) + "\n" for i in range(n))})

    async def _tail(self, request):
        from aiohttp import web

        job = self.jobs.get(request.match_info["sid"])
        if job is None:
            return web.Response(status=404, text="no such job")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        job.tail_connections += 1
        sent = 0
        while True:
            now = time.time()
            due = job.lines_due(now)
            if due > sent:
                await ws.send_str("".join(job.line(i) + "\n" for i in range(sent, due)))
                sent = due
            if job.status(now) != "RUNNING":
                break
            step = job.delay_s / max(1, job.log_lines)
            await asyncio.sleep(max(0.05, min(step, job.ends_at - now)))
        await ws.close()  # a normal close: the job is terminal and its whole log was sent
        return ws
