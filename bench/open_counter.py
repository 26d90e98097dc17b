"""Count the files opened in one directory, by every process, with Linux inotify.

The witness for "how many images did the run read": image fetches happen in Ray worker
processes this process cannot instrument, so the kernel counts them: every ``open()`` of a
file in the watched directory queues an ``IN_OPEN`` event, which a thread here drains. A
queue overflow (events lost) raises instead of under-counting. Linux only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import threading
import time
from collections import Counter

IN_OPEN = 0x00000020
IN_Q_OVERFLOW = 0x00004000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of NUL-padded name)


class OpenCounter:
    """``with OpenCounter(dir) as c: ...; c.settle(); c.total, c.by_name``"""

    def __init__(self, directory: str):
        self.directory = directory
        self.by_name: Counter[str] = Counter()
        self.overflowed = False
        self._lock = threading.Lock()
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if self._libc.inotify_add_watch(self._fd, os.fsencode(directory), IN_OPEN) < 0:
            os.close(self._fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch({directory}) failed")
        self._last_event = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="open-counter", daemon=True)

    def __enter__(self) -> OpenCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self._fd)

    def _drain(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.2)
            if not ready:
                continue
            try:
                data = os.read(self._fd, 1 << 20)
            except BlockingIOError:
                continue
            names = []
            offset = 0
            while offset < len(data):
                _, mask, _, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0").decode()
                offset += _EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    self.overflowed = True
                elif mask & IN_OPEN and name:
                    names.append(name)
            with self._lock:
                self.by_name.update(names)
                self._last_event = time.monotonic()

    def settle(self, quiet_s: float = 0.5) -> None:
        """Wait until no event arrived for *quiet_s* (the queue is drained); raise if events were lost."""
        while time.monotonic() - self._last_event < quiet_s:
            time.sleep(quiet_s / 4)
        if self.overflowed:
            raise RuntimeError(f"inotify queue overflowed while watching {self.directory}: opens were lost")

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.by_name.values())
