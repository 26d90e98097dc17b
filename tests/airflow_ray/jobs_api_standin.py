"""A stand-in for the Ray Jobs API on loopback (test double: no Ray needed).

Serves what the control plane uses: ``/api/version``, ``/api/jobs/{id}``, ``POST
/api/jobs/{id}/stop`` and the websocket ``/api/jobs/{id}/logs/tail``, which streams a
*generated* log (``lines`` lines of ``width`` characters, in chunks of at most 20,000
characters, as Ray's agent does) without ever holding it in memory. A job is RUNNING while
its log is being written and SUCCEEDED after, unless stopped. ``rate`` limits lines per
second so a test can interrupt a follower mid-log.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, field


def log_line(i: int, width: int) -> str:
    head = f"line {i:09d} "
    return head + "x" * max(0, width - len(head))


@dataclass
class StandInJob:
    lines: int
    width: int = 100
    rate: float | None = None  # lines per second; None = as fast as possible
    status: str = "RUNNING"
    written: int = 0  # lines "written" so far (a slow job's log grows)
    close_first_after: int | None = None  # the first stream closes after this many lines, job still running
    #: the code of that close: 1001 (going away) as an agent restart, or 1000 as Ray's head
    #: closes its side when its connection to the agent drops
    close_first_code: int = 1001
    status_lag_s: float = 0.0  # the status turns SUCCEEDED this long after the whole log was sent
    connections: int = 0
    chars_sent: int = 0


@dataclass
class JobsApiStandIn:
    jobs: dict[str, StandInJob] = field(default_factory=dict)
    port: int = 0
    token: str | None = None

    def __post_init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> JobsApiStandIn:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _serve(self) -> None:
        from aiohttp import web

        async def main():
            self._stop = asyncio.Event()
            app = web.Application(middlewares=[self._auth])
            app.router.add_get("/api/version", lambda r: web.json_response({"ray_version": "2.60.0"}))
            app.router.add_get("/api/jobs/{sid}", self._get)
            app.router.add_post("/api/jobs/{sid}/stop", self._stop_job)
            app.router.add_get("/api/jobs/{sid}/logs/tail", self._tail)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._started.set()
            await self._stop.wait()
            await runner.cleanup()

        self._loop.run_until_complete(main())

    @property
    def _web(self):
        from aiohttp import web

        return web

    async def _auth_check(self, request) -> bool:
        return self.token is None or request.headers.get("Authorization") == f"Bearer {self.token}"

    def __hash__(self) -> int:
        return id(self)

    async def _auth(self, app, handler):  # old-style middleware factory keeps aiohttp imports local
        async def check(request):
            if not await self._auth_check(request):
                return self._web.Response(status=401, text="unauthenticated")
            return await handler(request)

        return check

    async def _get(self, request):
        job = self.jobs.get(request.match_info["sid"])
        if job is None:
            return self._web.Response(status=404, text="no such job")
        return self._web.json_response({"status": job.status, "message": ""})

    async def _stop_job(self, request):
        job = self.jobs.get(request.match_info["sid"])
        if job is None:
            return self._web.Response(status=404, text="no such job")
        stopped = job.status in ("PENDING", "RUNNING")
        if stopped:
            job.status = "STOPPED"
        return self._web.json_response({"stopped": stopped})

    async def _tail(self, request):
        job = self.jobs.get(request.match_info["sid"])
        if job is None:
            return self._web.Response(status=404, text="no such job")
        ws = self._web.WebSocketResponse()
        await ws.prepare(request)
        job.connections += 1
        i, buf = 0, []
        size = 0
        cut_at = job.close_first_after if job.connections == 1 else None
        while i < job.lines and job.status == "RUNNING":
            if cut_at is not None and i >= cut_at:  # an agent restart: the stream ends, the job does not
                break
            if job.rate is not None and i >= job.written:
                await asyncio.sleep(0.05)
                job.written = min(job.lines, job.written + max(1, int(job.rate * 0.05)))
                continue
            line = log_line(i, job.width) + "\n"
            if size + len(line) > 20_000 or len(buf) >= 10:
                text = "".join(buf)
                await ws.send_str(text)
                job.chars_sent += len(text)
                buf, size = [], 0
            buf.append(line)
            size += len(line)
            i += 1
        if buf:
            text = "".join(buf)
            await ws.send_str(text)
            job.chars_sent += len(text)
        if job.status == "RUNNING" and i >= job.lines:
            if job.status_lag_s:  # as Ray: the driver has exited, the job manager has yet to notice
                asyncio.get_running_loop().call_later(job.status_lag_s, setattr, job, "status", "SUCCEEDED")
                await ws.close()
                return ws
            job.status = "SUCCEEDED"
        if job.status == "RUNNING":  # cut short while the job runs: an agent restart, or a dropped agent
            await ws.close(code=job.close_first_code)
        else:
            await ws.close()
        return ws
