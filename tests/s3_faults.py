"""A fault-injecting S3 endpoint on loopback: a test stand-in for S3 throttling, flaky networks,
expiring credentials and stores that ignore conditional writes.

A threaded HTTP proxy in front of moto's S3 server. Every request is forwarded unchanged,
except GETs whose path contains ``match``: a seeded fraction of those is answered with
``503 SlowDown`` (what S3 says when throttling), dropped (the socket is closed before any
response), or cut mid-body (full ``Content-Length`` announced, half the body sent). Real S3
does all three under load; moto never does, hence this proxy.

``answers`` scripts the first matched GETs instead: each is answered with the next
``(status, code)`` as S3 would (an XML error body naming the code; ``code=None``: a bare status
with an empty body), then GETs are forwarded again. That is how S3 answers an expired session
token (``400 ExpiredToken``), a skewed clock (``403 RequestTimeTooSkewed``) and the like.

``strip_request_headers`` drops those headers from every forwarded request: with
``("If-None-Match",)`` the proxy is a store that accepts a conditional PUT and ignores it, as
older MinIO, Ceph RGW and some moto releases do.
"""

from __future__ import annotations

import http.client
import random
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>proxy</RequestId></Error>"
)


def _error_body(code: str | None) -> bytes:
    if code is None:
        return b""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{code} (fault proxy)</Message>'
        "<RequestId>proxy</RequestId></Error>"
    ).encode()


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade"}


class FaultProxy:
    """``with FaultProxy(moto_endpoint, fault_rate=0.4, match="/images/") as proxy: proxy.endpoint``"""

    def __init__(
        self,
        upstream: str,
        *,
        fault_rate: float = 0.0,
        match: str,
        seed: int = 0,
        answers: Sequence[tuple[int, str | None]] = (),
        strip_request_headers: Sequence[str] = (),
    ):
        if not 0 <= fault_rate <= 1:
            raise ValueError("fault_rate must be in [0, 1]")
        target = urlparse(upstream)
        self.upstream = (target.hostname, target.port)
        self.fault_rate, self.match = fault_rate, match
        self.answers = list(answers)
        self.strip = {h.lower() for h in strip_request_headers}
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"matched_gets": 0, "slow_down": 0, "dropped": 0, "cut": 0, "answered": 0, "forwarded": 0}
        self.stripped: list[tuple[str, str]] = []  # (method, path) of requests that lost a header
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="s3-fault-proxy", daemon=True)

    @property
    def faults(self) -> int:
        return self.counts["slow_down"] + self.counts["dropped"] + self.counts["cut"]

    def _decide(self, method: str, path: str) -> str | tuple[int, str | None]:
        with self.lock:
            if method != "GET" or self.match not in path:
                return "forward"
            self.counts["matched_gets"] += 1
            if self.answers:
                self.counts["answered"] += 1
                return self.answers.pop(0)
            if self.rng.random() >= self.fault_rate:
                return "forward"
            fault = self.rng.choice(("slow_down", "dropped", "cut"))
            self.counts[fault] += 1
            return fault

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                action = proxy._decide(self.command, self.path)
                if action == "dropped":
                    self.close_connection = True
                    return
                if action == "slow_down":
                    self._reply(503, {"Content-Type": "application/xml"}, SLOW_DOWN)
                    return
                if isinstance(action, tuple):
                    status, code = action
                    self._reply(status, {"Content-Type": "application/xml"} if code else {}, _error_body(code))
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    dropped = [k for k in headers if k.lower() in proxy.strip]
                    if dropped:
                        with proxy.lock:
                            proxy.stripped.append((self.command, self.path))
                        headers = {k: v for k, v in headers.items() if k not in dropped}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP}
                    if self.command == "HEAD" and resp.getheader("Content-Length") is not None:
                        out["Content-Length"] = resp.getheader("Content-Length")  # the object's size
                finally:
                    conn.close()
                with proxy.lock:
                    proxy.counts["forwarded"] += 1
                if action == "cut" and len(data) > 1:
                    self.send_response(resp.status)
                    for k, v in out.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self._reply(resp.status, out, data, head=self.command == "HEAD")

            def _reply(self, status, headers, data, head=False):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if not (head and "Content-Length" in headers):
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        return Handler

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
