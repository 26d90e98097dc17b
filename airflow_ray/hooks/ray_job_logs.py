"""Follow a Ray job's log incrementally, with bounded memory, from a resumable offset.

The Ray Jobs API serves a job's log two ways: ``GET /api/jobs/{id}/logs`` returns the whole
file (200 MB for a chatty job: never used here), and ``/api/jobs/{id}/logs/tail`` streams
it over a websocket as it is written, in chunks of at most 20,000 characters, ending when the
job is terminal. :class:`JobLogFollower` keeps one such stream open and counts characters:
``offset`` is the position just after the last *complete* line handed out, so a follower
rebuilt elsewhere (another triggerer, after a restart) skips what was already logged
instead of replaying it. Each :meth:`JobLogFollower.read` hands out at most ``max_lines``
lines and counts the rest as cut; the last ``tail_lines`` lines are kept for error messages.

**A close is not the end of the log.** Ray's head proxies the stream from the agent on the
driver's node and closes its side normally (code 1000) whenever the agent's side ends: when
the job is terminal and its log fully sent, and also when the agent connection drops. The
close code says nothing, so the job's status decides, asked right after the close: Ray's agent
ends a job's stream only after reading EOF past the job's end, so a close followed by a
terminal status is the end of the log (:meth:`JobLogFollower.finish`), and a stream that
closes after the job was seen terminal (:meth:`JobLogFollower.job_is_terminal`) too. A close
while the job is still PENDING or RUNNING is resumed: the next read reconnects, and what the
new stream sends again up to ``offset`` is skipped, not logged again. (The one close taken
for the end that was not: an agent dropped in the fraction of a second between the job's end
and the status asked after the close; the lines the stream had not yet delivered then are
missing from the task log and remain in the Ray dashboard.)

**What a reconnect costs.** Ray 2.60 offers no read from an offset for a job's log: the tail
websocket takes no parameter and always starts at byte 0, ``/api/jobs/{id}/logs`` is the whole
file, and the state API's ``/api/v0/logs/{file,stream}`` counts ``lines`` from the end (its
byte offsets are internal, for task logs). A reconnect (a dropped agent, a triggerer restart,
a drain that finds the stream gone) therefore receives the log again from
its start, skipping in memory what was already handed out (``resent`` counts it); nothing
is logged twice and memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

#: A "line" without a newline is handed out in pieces of at most this many characters.
MAX_LINE_CHARS = 16_384


@dataclass
class LogChunk:
    """What one read produced: lines to log, how many more were cut, and whether the stream ended."""

    lines: list[str] = field(default_factory=list)
    cut: int = 0
    ended: bool = False


class JobLogFollower:
    def __init__(
        self,
        address: str,
        submission_id: str,
        token: str | None = None,
        *,
        offset: int = 0,
        max_lines: int = 500,
        tail_lines: int = 40,
        connect_timeout: float = 10.0,
    ):
        base = address.rstrip("/")
        self.url = ("ws" + base[4:] if base.startswith("http") else base) + f"/api/jobs/{submission_id}/logs/tail"
        self.token = token
        self.offset = offset
        self.max_lines = max_lines
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self.connect_timeout = connect_timeout
        self._session = None
        self._ws = None
        self._seen = 0  # characters received on the current connection
        self._partial = ""  # an incomplete last line, not yet counted in offset
        #: the server closed the current stream; unless it was complete, the next read
        #: reconnects and resumes from ``offset`` (a stream that closed early loses nothing)
        self.ended = False
        #: a stream closed after the job was seen terminal: the whole log was sent
        self.complete = False
        #: the job was seen terminal (:meth:`job_is_terminal`)
        self.terminal = False
        #: connections opened, and characters received again before ``offset`` (a reconnect's cost)
        self.connections = 0
        self.resent = 0

    def job_is_terminal(self) -> None:
        """The job's status is terminal: the next close of the stream is the end of the log."""
        self.terminal = True

    def finish(self) -> LogChunk:
        """The stream closed and the job's status, asked after the close, is terminal: the log is
        complete. Returns the incomplete last line, if any, as a last line."""
        out = LogChunk(ended=True)
        self.terminal = self.complete = True
        self._flush_partial(out)
        return out

    async def _connect(self) -> None:
        import aiohttp

        if self._session is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(headers=headers)
        self._ws = await self._session.ws_connect(self.url, timeout=aiohttp.ClientWSTimeout(ws_close=5.0))
        self._seen, self._partial, self.ended = 0, "", False
        self.connections += 1

    async def read(self, wait_s: float) -> LogChunk:
        """New lines that arrive within *wait_s* seconds; ``ended`` when the server closed the stream."""
        import aiohttp

        out = LogChunk()
        if self.complete:
            out.ended = True
            return out
        deadline = time.monotonic() + max(0.0, wait_s)
        try:
            if self._ws is None or self._ws.closed:
                await asyncio.wait_for(self._connect(), timeout=self.connect_timeout)
            while True:
                left = deadline - time.monotonic()
                try:
                    msg = await self._ws.receive(timeout=max(0.01, left))
                except TimeoutError:
                    break
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._take(msg.data, out)
                    if len(out.lines) >= self.max_lines and left <= 0:
                        break
                elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                    # Whatever the code (Ray's head closes with 1000 when its agent connection
                    # drops too), only a close after the job was seen terminal ends the log;
                    # any other is resumed from offset by the next read.
                    self.complete = self.terminal
                    if self.complete:
                        self._flush_partial(out)
                    self.ended = out.ended = True
                    await self._close_ws()
                    break
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    await self._close_ws()
                    break
                if time.monotonic() >= deadline:
                    break
        except (aiohttp.ClientError, OSError, TimeoutError):
            await self._close_ws()  # reconnect on the next read, from offset
        return out

    def _take(self, text: str, out: LogChunk) -> None:
        start = self._seen
        self._seen += len(text)
        if self._seen <= self.offset:
            self.resent += len(text)
            return  # already handed out before (this follower or an earlier one)
        if start < self.offset:
            self.resent += self.offset - start
            text = text[self.offset - start :]
        data = self._partial + text
        pieces = data.split("\n")
        self._partial = pieces.pop()  # "" when data ends with a newline
        for line in pieces:
            self._emit(line, len(line) + 1, out)
        while len(self._partial) > MAX_LINE_CHARS:
            piece, self._partial = self._partial[:MAX_LINE_CHARS], self._partial[MAX_LINE_CHARS:]
            self._emit(piece, len(piece), out)

    def _flush_partial(self, out: LogChunk) -> None:
        if self._partial:
            self._emit(self._partial, len(self._partial), out)
            self._partial = ""

    def _emit(self, line: str, consumed: int, out: LogChunk) -> None:
        self.offset += consumed
        self.tail.append(line)
        if len(out.lines) < self.max_lines:
            out.lines.append(line)
        else:
            out.cut += 1

    async def _close_ws(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        self._ws = None

    async def aclose(self) -> None:
        await self._close_ws()
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
        self._session = None
