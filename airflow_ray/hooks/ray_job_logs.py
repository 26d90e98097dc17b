"""Follow a Ray job's log incrementally, with bounded memory, from a resumable offset.

The Ray Jobs API serves a job's log two ways: ``GET /api/jobs/{id}/logs`` returns the whole
file (200 MB for a chatty job: never used here), and ``/api/jobs/{id}/logs/tail`` streams
it over a websocket as it is written, in chunks of at most 20,000 characters, ending when the
job is terminal. :class:`JobLogFollower` keeps one such stream open and counts characters:
``offset`` is the position just after the last *complete* line handed out, so a follower
rebuilt elsewhere (another triggerer, after a restart) skips what was already logged
instead of replaying it. Each :meth:`JobLogFollower.read` hands out at most ``max_lines``
lines and counts the rest as cut; the last ``tail_lines`` lines are kept for error messages.
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
        #: the server closed normally: the job is terminal and its whole log was sent
        self.complete = False

    async def _connect(self) -> None:
        import aiohttp

        if self._session is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(headers=headers)
        self._ws = await self._session.ws_connect(self.url, timeout=aiohttp.ClientWSTimeout(ws_close=5.0))
        self._seen, self._partial, self.ended = 0, "", False

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
                    # A normal close (1000) is Ray's "the job is terminal and its log fully sent";
                    # anything else (an agent restart, a dropped connection) is resumed from offset.
                    self.complete = msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.OK
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
            return  # already handed out before (this follower or an earlier one)
        if start < self.offset:
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
