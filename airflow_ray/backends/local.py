"""``local``: a Ray head on this machine, loopback only, token-protected; the default backend.

``ray start --head --block`` runs detached in its own session so the cluster outlives the
setup task. Its pid, ports and token file live in a private temp dir: made by ``mkdtemp``
(mode 0700, owned by the running user) with a name that starts with the cluster's digest,
so a retried setup finds and adopts a live cluster. Nothing found on disk is trusted unless
:func:`private_dir` proves it is ours: a real directory (not a link) in the temp root, owned
by this user, closed to everyone else, with a ``cluster.json`` that is a regular file owned
by this user and names that very directory. Teardown (another task, another process) acts
only on such a directory and on processes owned by this user that reference it: the head's
own process group, then any straggler whose command line names the directory; never
``ray stop`` on the machine.

Loopback: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray keep ``--node-ip-address
127.0.0.1``; without it Ray swaps loopback for the machine's address
(ray/_private/services.py ``resolve_ip_for_localhost``) and its gRPC servers (GCS, raylet,
object manager, every worker's core worker) listen on all interfaces. With it, every TCP
listener of the cluster (those, the dashboard and its agents, the runtime-env agent, the
client server, metrics) is on 127.0.0.1 (tests/airflow_ray/test_local_cluster.py
maps each process's socket inodes to /proc/net/tcp*). The price: the cluster is one node;
no other machine can join it, by design.
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
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from airflow_ray.backends.base import ClusterBackend, check_dashboard_url
from airflow_ray.cluster import ClusterHandle
from airflow_ray.errors import ClusterError, ClusterNotReady

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
DIR_PREFIX = "rayemb-"
#: Ray's own temp dir, inside ours: Ray makes its temp dir world-writable (ray/_common/utils.py
#: ``try_make_directory_shared``), so it must not be the directory that proves ownership.
RAY_SUBDIR = "r"


#: Seconds the cluster's processes get to exit on SIGTERM before SIGKILL (see ``_kill_leftovers``).
KILL_GRACE_S = 0.5

#: The worker's environment variables ``ray start`` gets (its jobs inherit them): what a Python
#: process, its libraries and the jobs' own credential chains read. Nothing of Airflow's
#: (``AIRFLOW__*`` holds the database URL, the Fernet key, the API's JWT secret;
#: ``AIRFLOW_CONN_*`` / ``AIRFLOW_VAR_*`` connections and variables) and nothing unlisted.
ENV_NAMES = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP",
        "PYTHONPATH", "PYTHONHASHSEED", "PYTHONUNBUFFERED", "VIRTUAL_ENV", "LD_LIBRARY_PATH",
        "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM",
        "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
        "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
        "GOOGLE_APPLICATION_CREDENTIALS",
    }
)  # fmt: skip
#: ... and these families: locale, Ray's own settings, the workers' cloud credential chain
#: (AWS_*: the same chain the Airflow worker's own S3 reads use), model caches and GPU runtimes.
ENV_PREFIXES = ("LC_", "RAY_", "AWS_", "HF_", "TRANSFORMERS_", "TORCH", "CUDA_", "NVIDIA_", "NCCL_", "XDG_")
#: Ray settings that would point the head elsewhere or replace its own token.
ENV_DENIED = frozenset({"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"})


def head_environment(environ: Mapping[str, str], extra_names: tuple[str, ...] = ()) -> dict[str, str]:
    """The allow-listed part of *environ* (:data:`ENV_NAMES`, :data:`ENV_PREFIXES`, and the
    deployment's *extra_names*), without :data:`ENV_DENIED`."""
    allowed = ENV_NAMES | set(extra_names)
    return {
        k: v
        for k, v in environ.items()
        if k not in ENV_DENIED and not k.startswith("AIRFLOW") and (k in allowed or k.startswith(ENV_PREFIXES))
    }


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


def _owned_by_me(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == os.getuid()
    except OSError:
        return False


def processes_referencing(marker: str) -> list[int]:
    """Pids of live processes of this user whose command line mentions *marker* (our temp dir)."""
    out = []
    for entry in os.listdir("/proc"):
        pid = int(entry) if entry.isdigit() else 0
        if pid and pid != os.getpid() and marker in _cmdline(pid) and _owned_by_me(pid):
            out.append(pid)
    return out


def private_dir(path: str) -> bool:
    """True if *path* is a directory of this user, not a link, closed to group and others."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def _read_state(tdir: str) -> ClusterHandle | None:
    """``cluster.json`` of a private dir: a regular file of this user, naming that same dir."""
    if not private_dir(tdir):
        return None
    path = os.path.join(tdir, STATE_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            return None
        try:
            handle = ClusterHandle.from_dict(json.load(fh))
        except (ValueError, KeyError, TypeError):
            return None
    if handle.details.get("temp_dir") != tdir:
        return None
    return handle


def _read_token(tdir: str) -> str | None:
    """The token file of a private dir: a regular file of this user, closed to everyone else."""
    try:
        fd = os.open(os.path.join(tdir, TOKEN_FILE), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ClusterError(f"cannot read the local cluster's auth token in {tdir}: {exc}") from exc
    with os.fdopen(fd) as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise ClusterError(f"the auth token file in {tdir} is not a private file of this user")
        return fh.read().strip() or None


def _write_private(path: str, text: str) -> None:
    """Create *path* holding *text*: mode 0600, never over an existing file, never through a link."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


@dataclass(frozen=True)
class LocalRayBackend(ClusterBackend):
    """Settings of the local backend (all optional)."""

    num_cpus: int | None = None
    object_store_memory: int = 1 << 30
    temp_root: str | None = None
    ready_timeout_s: float = 180.0
    #: names of further environment variables of the worker that ``ray start`` may get
    #: (:func:`head_environment` lists those it always gets)
    extra_env: tuple[str, ...] = ()
    name: str = "local"
    deletes_cluster: ClassVar[bool] = True
    on_this_host: ClassVar[bool] = True

    @classmethod
    def settings_from(cls, choices: Mapping[str, Any], deployment: Mapping[str, Any]) -> dict[str, Any]:
        """*deployment*: any of this class's settings (``num_cpus`` as the default), and
        ``max_num_cpus``, the most CPUs a run may choose; *choices*: ``num_cpus``."""
        known = set(cls.__dataclass_fields__) - {"name"}
        unknown = sorted(set(deployment) - known - {"max_num_cpus"})
        if unknown:
            raise ValueError(f"unknown local backend setting(s) {unknown}; known: {sorted(known | {'max_num_cpus'})}")
        cfg = {k: v for k, v in deployment.items() if k != "max_num_cpus" and v is not None}
        chosen = choices.get("num_cpus")
        if chosen is not None:
            cfg["num_cpus"] = int(chosen)
        limit = deployment.get("max_num_cpus")
        if limit is not None and cfg.get("num_cpus") is not None and not 1 <= cfg["num_cpus"] <= int(limit):
            raise ValueError(f"num_cpus {cfg['num_cpus']} is not one the deployment allows (1 to {int(limit)})")
        return cfg

    def capacity_nodes(self, handle: ClusterHandle) -> list[dict[str, float]]:
        """The live cluster's nodes (one: the head)."""
        from airflow_ray.capacity import live_nodes

        return live_nodes(*self.credentials(handle))

    def _root(self) -> str:
        return os.path.realpath(self.temp_root or tempfile.gettempdir())

    def _prefix(self, cluster_name: str) -> str:
        # Ray's unix sockets live under the temp dir: keep the path short (< 107 bytes).
        return DIR_PREFIX + hashlib.sha256(cluster_name.encode()).hexdigest()[:12] + "-"

    def _ours(self, cluster_name: str) -> list[str]:
        """This cluster's private dirs in the temp root, newest first (a retry may have left several)."""
        root, prefix = self._root(), self._prefix(cluster_name)
        try:
            names = [n for n in os.listdir(root) if n.startswith(prefix)]
        except OSError:
            return []
        dirs = [os.path.join(root, n) for n in names if private_dir(os.path.join(root, n))]
        return sorted(dirs, key=lambda d: os.lstat(d).st_mtime, reverse=True)

    def _trusted(self, handle: ClusterHandle) -> str | None:
        """The handle's temp dir if it is one of ours for this cluster and agrees with the handle."""
        tdir = handle.details.get("temp_dir")
        if not isinstance(tdir, str) or os.path.dirname(tdir) != self._root():
            return None
        if not os.path.basename(tdir).startswith(self._prefix(handle.name)) or not private_dir(tdir):
            return None
        state = _read_state(tdir)
        if state is not None and state.details.get("pid") != handle.details.get("pid", state.details.get("pid")):
            return None
        return tdir

    # ------------------------------------------------------------------ up
    def up(self, cluster_name: str) -> ClusterHandle:
        for tdir in self._ours(cluster_name):
            adopted = self._adopt(cluster_name, tdir)
            if adopted is not None:
                log.info("adopting local Ray cluster %s (pid %s)", cluster_name, adopted.details["pid"])
                return adopted
            self._remove(tdir)  # an earlier attempt's, no longer usable
        os.makedirs(self._root(), exist_ok=True)
        tdir = tempfile.mkdtemp(prefix=self._prefix(cluster_name), dir=self._root())  # 0700, ours
        token_path = os.path.join(tdir, TOKEN_FILE)
        _write_private(token_path, secrets.token_hex(32))
        cmd, gcs, dash = self._head_command(tdir)
        env = {
            **head_environment(os.environ, tuple(self.extra_env)),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": token_path,
            # keep the loopback node IP (see the module docstring): a one-node cluster, by design
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }
        logfile = open(os.path.join(tdir, "ray-start.log"), "wb")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            cmd, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
        logfile.close()
        handle = ClusterHandle(
            backend=self.name,
            name=cluster_name,
            dashboard_url=f"http://127.0.0.1:{dash}",
            details={"pid": proc.pid, "pgid": proc.pid, "temp_dir": tdir, "gcs_address": f"127.0.0.1:{gcs}"},
        )
        _write_private(os.path.join(tdir, STATE_FILE), json.dumps(handle.to_dict()))
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

    def _head_command(self, tdir: str) -> tuple[list[str], int, int]:
        """``ray start --head`` on loopback, every port free and named, state under *tdir*;
        with its GCS and dashboard ports."""
        gcs, dash, client, node_mgr, obj_mgr, agent_listen, agent_grpc, rt_env, metrics = _free_ports(9)
        cmd = [
            _ray_executable(), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1", "--port", str(gcs),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
            "--ray-client-server-port", str(client), "--node-manager-port", str(node_mgr),
            "--object-manager-port", str(obj_mgr), "--dashboard-agent-listen-port", str(agent_listen),
            "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(rt_env),
            "--metrics-export-port", str(metrics), "--temp-dir", os.path.join(tdir, RAY_SUBDIR),
            "--num-cpus", str(self.num_cpus or os.cpu_count() or 1), "--num-gpus", "0",
            "--object-store-memory", str(self.object_store_memory),
        ]  # fmt: skip
        return cmd, gcs, dash

    def _adopt(self, cluster_name: str, tdir: str) -> ClusterHandle | None:
        handle = _read_state(tdir)
        if handle is None or handle.name != cluster_name or not self._alive(handle):
            return None
        try:
            token = _read_token(tdir)
        except ClusterError:
            return None
        return handle if self._dashboard_ok(handle, token) else None

    @staticmethod
    def _alive(handle: ClusterHandle) -> bool:
        pid = int(handle.details.get("pid", 0))
        tdir = handle.details.get("temp_dir") or "//"
        return pid > 0 and _owned_by_me(pid) and tdir in _cmdline(pid)

    @staticmethod
    def _dashboard_ok(handle: ClusterHandle, token: str | None) -> bool:
        from airflow_ray.hooks.ray_jobs import RayJobsClient

        try:
            with RayJobsClient(handle.dashboard_url, token, timeout=5) as client:
                client.version()
                return True
        except Exception:
            return False

    def _wait_ready(self, handle: ClusterHandle, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ClusterError(f"local Ray head exited with code {proc.returncode}")
            if self._dashboard_ok(handle, _read_token(handle.details["temp_dir"])):
                return
            time.sleep(1.0)
        raise ClusterNotReady(f"local Ray dashboard not ready after {self.ready_timeout_s:.0f}s")

    def credentials(self, handle: ClusterHandle) -> tuple[str, str | None]:
        """From the cluster's private dir in this backend's temp root (proven ours, see
        :func:`private_dir`): the dashboard address its ``cluster.json`` names, which the handle
        must name too, and its token file. Nothing the handle says about paths is used."""
        for tdir in self._ours(handle.name):
            state = _read_state(tdir)
            if state is not None and state.name == handle.name:
                return check_dashboard_url(handle, state.dashboard_url), _read_token(tdir)
        raise ClusterError(f"no local Ray cluster {handle.name!r} of this user in {self._root()}")

    def handle_for(self, cluster_name: str) -> ClusterHandle:
        """The handle of *cluster_name* from its newest private dir, or one that names no dir."""
        for tdir in self._ours(cluster_name):
            state = _read_state(tdir)
            if state is not None and state.name == cluster_name:
                return state
            return ClusterHandle(backend=self.name, name=cluster_name, dashboard_url="", details={"temp_dir": tdir})
        return ClusterHandle(backend=self.name, name=cluster_name, dashboard_url="", details={})

    # ------------------------------------------------------------------ down
    def down(self, handle: ClusterHandle) -> None:
        """Stop what the handle and its private dir prove is ours; anything else is left alone."""
        tdir = self._trusted(handle)
        if tdir is None:
            if handle.details.get("temp_dir"):
                log.warning("not tearing down %s: it is not a private dir of this cluster", handle.details["temp_dir"])
            return
        pid = int(handle.details.get("pid", 0))
        if pid and _owned_by_me(pid) and tdir in _cmdline(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGTERM)  # the head's own session: ray start and what it spawned
        self._remove(tdir)

    def _remove(self, tdir: str) -> None:
        self._kill_leftovers(tdir)
        if private_dir(tdir):
            shutil.rmtree(tdir, ignore_errors=True)

    @staticmethod
    def _kill_leftovers(tdir: str, grace_s: float = KILL_GRACE_S) -> None:
        """SIGTERM every process of the cluster (ours: its command line names the private dir),
        then SIGKILL what is left after *grace_s*. ``ray start --block`` and the GCS take 15-20 s
        to act on SIGTERM; nothing is lost by not waiting: the cluster is only torn down after the
        run's commits, and its session dir is deleted with it."""
        for pid in processes_referencing(tdir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not processes_referencing(tdir):
                return
            time.sleep(0.1)
        for pid in processes_referencing(tdir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + grace_s
        while processes_referencing(tdir) and time.monotonic() < deadline:
            time.sleep(0.1)
