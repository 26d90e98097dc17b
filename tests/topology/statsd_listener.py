"""A StatsD server for the real-topology tests: a UDP socket on loopback that keeps every
metric line (``name:value|type``) whose name contains one of the wanted fragments."""

from __future__ import annotations

import socket
import threading


class StatsdListener:
    def __init__(self, wanted: tuple[str, ...] = ("embeddings.",)):
        self.wanted = wanted
        self.lines: list[str] = []
        self.datagrams = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.5)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="statsd-listener", daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.datagrams += 1
            for line in data.decode(errors="replace").splitlines():
                if any(w in line for w in self.wanted):
                    with self._lock:
                        self.lines.append(line)

    def metrics(self, fragment: str) -> list[tuple[str, str, str]]:
        """``(name, value, type)`` of every kept line whose name contains *fragment*."""
        out = []
        with self._lock:
            lines = list(self.lines)
        for line in lines:
            name, _, rest = line.partition(":")
            value, _, kind = rest.partition("|")
            if fragment in name:
                out.append((name, value, kind.split("|")[0]))
        return out

    def __enter__(self) -> StatsdListener:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
