"""A real PostgreSQL server on loopback for tests that need one (the Iceberg SQL catalog as
production runs it). Uses the machine's PostgreSQL binaries; runs as the ``postgres`` user
when the tests run as root (PostgreSQL refuses root). Password authentication only."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def available() -> bool:
    return all(_bin(n) for n in ("initdb", "pg_ctl", "psql"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """``with PostgresServer(password) as pg:`` → ``pg.port``; the superuser is ``admin``."""

    def __init__(self, password: str, user: str = "admin"):
        self.password, self.user, self.port = password, user, _free_port()
        self.root = tempfile.mkdtemp(prefix="pgtest-")
        self.data = os.path.join(self.root, "data")
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *cmd: str, env: dict[str, str] | None = None) -> None:
        subprocess.run(
            [*self._as_user, *cmd], check=True, capture_output=True, timeout=120, env={**os.environ, **(env or {})}
        )

    def __enter__(self) -> PostgresServer:
        pwfile = os.path.join(self.root, "pw")
        with open(pwfile, "w") as fh:
            fh.write(self.password)
        if self._as_user:
            shutil.chown(pwfile, "postgres")
        self._run(
            _bin("initdb"),
            "-D",
            self.data,
            "-U",
            self.user,
            "--pwfile",
            pwfile,
            "--auth",
            "scram-sha-256",
            "-E",
            "UTF8",
        )
        os.unlink(pwfile)
        opts = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root}"
        self._run(_bin("pg_ctl"), "-D", self.data, "-o", opts, "-l", os.path.join(self.root, "log"), "-w", "start")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.2)
        raise RuntimeError("PostgreSQL did not start")

    def create_database(self, name: str) -> None:
        self._run(
            _bin("psql"),
            f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres",
            "-c",
            f'CREATE DATABASE "{name}"',
            env={"PGPASSWORD": self.password},
        )

    def __exit__(self, *exc) -> None:
        subprocess.run(
            [*self._as_user, _bin("pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.root, ignore_errors=True)
