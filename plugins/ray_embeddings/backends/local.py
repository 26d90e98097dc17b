"""``local``: a Ray head on this machine, loopback only, token-protected; the embedded default.

``ray start --head --block`` runs detached in its own session so the cluster outlives the
setup task; its pid, ports and a token file live in a per-cluster temp dir named after the
cluster, so a retried setup adopts a live cluster and teardown (another task, another
process) stops exactly the processes this cluster started — by pid and session, then by
scanning for processes that reference its temp dir — never ``ray stop`` on the machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from ray_embeddings.cluster import ClusterHandle, TokenRef
from ray_embeddings.errors import ClusterError, ClusterNotReady

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _ray_executable() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "ray")
    found = candidate if os.path.exists(candidate) else shutil.which("ray")
    if not found:
        raise ClusterError("the `ray` command is not installed next to this Python; install ray[default]")
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_referencing(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions *marker* (our cluster's temp dir)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and marker in _cmdline(int(entry)):
            out.append(int(entry))
    return out


@dataclass(frozen=True)
class LocalRayBackend:
    """Settings of the local backend (all optional)."""

    num_cpus: int | None = None
    object_store_memory: int = 1 << 30
    temp_root: str | None = None
    ready_timeout_s: float = 180.0
    name: str = "local"

    def temp_dir(self, cluster_name: str) -> str:
        # Ray's unix sockets live under the temp dir: keep the path short (< 107 bytes).
        root = self.temp_root or tempfile.gettempdir()
        return os.path.join(root, "rayemb-" + hashlib.sha256(cluster_name.encode()).hexdigest()[:12])

    # ------------------------------------------------------------------ up
    def up(self, cluster_name: str) -> ClusterHandle:
        tdir = self.temp_dir(cluster_name)
        adopted = self._adopt(cluster_name, tdir)
        if adopted is not None:
            log.info("adopting local Ray cluster %s (pid %s)", cluster_name, adopted.details["pid"])
            return adopted
        self._kill_leftovers(tdir)
        shutil.rmtree(tdir, ignore_errors=True)
        os.makedirs(tdir, mode=0o700)
        token_path = os.path.join(tdir, TOKEN_FILE)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        gcs, dash, client, node_mgr, obj_mgr, agent_listen, agent_grpc, rt_env, metrics = _free_ports(9)
        cmd = [
            _ray_executable(), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1", "--port", str(gcs),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
            "--ray-client-server-port", str(client), "--node-manager-port", str(node_mgr),
            "--object-manager-port", str(obj_mgr), "--dashboard-agent-listen-port", str(agent_listen),
            "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(rt_env),
            "--metrics-export-port", str(metrics), "--temp-dir", tdir,
            "--num-cpus", str(self.num_cpus or os.cpu_count() or 1), "--num-gpus", "0",
            "--object-store-memory", str(self.object_store_memory),
        ]  # fmt: skip
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}
        env.pop("RAY_AUTH_TOKEN", None)
        env.pop("RAY_ADDRESS", None)
        logfile = open(os.path.join(tdir, "ray-start.log"), "wb")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            cmd, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
        logfile.close()
        handle = ClusterHandle(
            backend=self.name,
            name=cluster_name,
            dashboard_url=f"http://127.0.0.1:{dash}",
            token=TokenRef(kind="file", path=token_path),
            details={"pid": proc.pid, "pgid": proc.pid, "temp_dir": tdir, "gcs_address": f"127.0.0.1:{gcs}"},
        )
        with open(os.path.join(tdir, STATE_FILE), "w") as fh:
            json.dump(handle.to_dict(), fh)
        try:
            self._wait_ready(handle, proc)
        except ClusterError as exc:
            try:
                with open(os.path.join(tdir, "ray-start.log"), errors="replace") as fh:
                    last = "".join(fh.readlines()[-15:])
            except OSError:
                last = ""
            self.down(handle)
            raise type(exc)(f"{exc}\n--- ray start output ---\n{last}") from None
        except Exception:
            self.down(handle)
            raise
        return handle

    def _adopt(self, cluster_name: str, tdir: str) -> ClusterHandle | None:
        try:
            with open(os.path.join(tdir, STATE_FILE)) as fh:
                handle = ClusterHandle.from_dict(json.load(fh))
        except (OSError, ValueError, KeyError):
            return None
        if handle.name != cluster_name or not self._alive(handle):
            return None
        return handle if self._dashboard_ok(handle) else None

    @staticmethod
    def _alive(handle: ClusterHandle) -> bool:
        pid = int(handle.details.get("pid", 0))
        return pid > 0 and handle.details.get("temp_dir", "//") in _cmdline(pid)

    @staticmethod
    def _dashboard_ok(handle: ClusterHandle) -> bool:
        from ray_embeddings.cluster import resolve_token
        from ray_embeddings.hooks.ray_jobs import RayJobsClient

        try:
            with RayJobsClient(handle.dashboard_url, resolve_token(handle.token), timeout=5) as client:
                client.version()
                return True
        except Exception:
            return False

    def _wait_ready(self, handle: ClusterHandle, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ClusterError(f"local Ray head exited with code {proc.returncode}")
            if self._dashboard_ok(handle):
                return
            time.sleep(1.0)
        raise ClusterNotReady(f"local Ray dashboard not ready after {self.ready_timeout_s:.0f}s")

    def handle_for(self, cluster_name: str) -> ClusterHandle:
        """The handle of *cluster_name* from its state file, or enough of one to tear it down."""
        tdir = self.temp_dir(cluster_name)
        try:
            with open(os.path.join(tdir, STATE_FILE)) as fh:
                return ClusterHandle.from_dict(json.load(fh))
        except (OSError, ValueError, KeyError):
            return ClusterHandle(backend=self.name, name=cluster_name, dashboard_url="", details={"temp_dir": tdir})

    # ------------------------------------------------------------------ down
    def down(self, handle: ClusterHandle) -> None:
        tdir = handle.details.get("temp_dir")
        pid = int(handle.details.get("pid", 0))
        if pid and tdir and tdir in _cmdline(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)  # the head's own session: ray start and what it spawned
        if tdir:
            self._kill_leftovers(tdir)
            shutil.rmtree(tdir, ignore_errors=True)

    @staticmethod
    def _kill_leftovers(tdir: str, grace_s: float = 15.0) -> None:
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not processes_referencing(tdir):
                return
            time.sleep(0.5)
        for pid in processes_referencing(tdir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
