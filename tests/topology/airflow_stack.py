"""Airflow as users deploy it, on this machine: PostgreSQL, and the api-server, scheduler,
dag-processor and triggerer as four separate processes with the LocalExecutor.

Each process runs in its own process group, so a test can SIGKILL one the way a node or a
container dies (the whole group) and start it again; :meth:`AirflowStack.stop` ends exactly
the groups it started. The REST API is used as users use it: a real login (the Simple auth
manager with a passwords file), a JWT, ``/api/v2``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import httpx

from tests.postgres_server import PostgresServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AIRFLOW = os.path.join(os.path.dirname(sys.executable), "airflow")
DAG_ID = "multimodal_embeddings"
FINISHED = {"success", "failed", "skipped", "upstream_failed", "removed"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AirflowStack:
    COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")

    def __init__(self, home: str, extra_env: dict[str, str] | None = None, parallelism: int = 8):
        self.home = home
        self.port = _free_port()
        self.password = secrets.token_urlsafe(16)
        self._db_password = secrets.token_urlsafe(16)
        self.pg = PostgresServer(self._db_password)
        self.procs: dict[str, subprocess.Popen] = {}
        self.parallelism = parallelism
        self.extra_env = dict(extra_env or {})
        self._token: str | None = None

    @property
    def local_root(self) -> str:
        """The local directory the deployment allows runs to read and write: the one holding
        the stack's home (pytest's base temp directory, or a bench's work directory)."""
        return os.path.dirname(os.path.abspath(self.home))

    # ------------------------------------------------------------------ lifecycle
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
        pw_file = os.path.join(self.home, "passwords.json")
        env.update(
            {
                "AIRFLOW_HOME": self.home,
                "AIRFLOW__CORE__DAGS_FOLDER": os.path.join(ROOT, "dags"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.port}/execution/",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": pw_file,
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
                "AIRFLOW__API_AUTH__JWT_SECRET": self._jwt_secret,
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{self.port}",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": (
                    f"postgresql+psycopg2://admin:{self._db_password}@127.0.0.1:{self.pg.port}/airflow"
                ),
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "30",
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
                # a crashed scheduler's running tasks are adopted by the next one after this check
                # (default 300 s), then failed and retried once their heartbeat is older than the timeout
                "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "30",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "20",
                "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
                "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "dags")]),
                "EMB_RETRIES": "1",
                "EMB_RETRY_DELAY_S": "5",
                # the runs' inputs and outputs live beside the stack's home: its one local root
                "EMB_DEPLOYMENT_ALLOWED_URI_PREFIXES": json.dumps(["s3://", "gs://", self.local_root]),
                **self.extra_env,
            }
        )
        return env

    def __enter__(self) -> AirflowStack:
        self._jwt_secret = secrets.token_urlsafe(32)
        os.makedirs(self.home, exist_ok=True)
        with open(os.path.join(self.home, "passwords.json"), "w") as fh:
            json.dump({"admin": self.password}, fh)
        self.pg.__enter__()
        try:
            self.pg.create_database("airflow")
            migrate = subprocess.run(
                [AIRFLOW, "db", "migrate"], env=self.env(), capture_output=True, text=True, timeout=600
            )
            if migrate.returncode != 0:
                raise RuntimeError(f"airflow db migrate failed:\n{migrate.stdout[-2000:]}\n{migrate.stderr[-3000:]}")
            for name in self.COMPONENTS:
                self.start(name)
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, name: str) -> None:
        args = [AIRFLOW, name] + (["--port", str(self.port), "--host", "127.0.0.1"] if name == "api-server" else [])
        log = open(os.path.join(self.home, f"{name}.log"), "ab")  # noqa: SIM115 - owned by the child
        self.procs[name] = subprocess.Popen(
            args, env=self.env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()

    def kill(self, name: str) -> None:
        """SIGKILL the component's whole process group, as when its container or node dies."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def stop(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        with contextlib.suppress(Exception):
            self.pg.__exit__(None, None, None)

    def wait_healthy(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"airflow {name} exited {proc.returncode}:\n{self.log_tail(name)}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5)
                if r.status_code == 200:
                    health = r.json()
                    if all(health.get(k, {}).get("status") == "healthy" for k in ("metadatabase", "scheduler")):
                        return
            time.sleep(2)
        raise RuntimeError("the Airflow stack did not become healthy:\n" + self.log_tail("scheduler"))

    def log_tail(self, name: str, chars: int = 3000) -> str:
        with open(os.path.join(self.home, f"{name}.log"), errors="replace") as fh:
            return fh.read()[-chars:]

    # ------------------------------------------------------------------ REST API
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self) -> str:
        if self._token is None:
            r = httpx.post(f"{self.url}/auth/token", json={"username": "admin", "password": self.password}, timeout=30)
            r.raise_for_status()
            self._token = r.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs) -> httpx.Response:
        headers = {**(headers or {}), "Authorization": f"Bearer {self.token()}"}
        return httpx.request(method, f"{self.url}/api/v2{path}", headers=headers, timeout=60, **kwargs)

    def wait_for_dag(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.api("GET", f"/dags/{DAG_ID}")
            if r.status_code == 200:
                if r.json().get("is_paused"):
                    self.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False}).raise_for_status()
                return
            time.sleep(3)
        raise RuntimeError(f"DAG {DAG_ID} never appeared:\n" + self.log_tail("dag-processor"))

    def trigger(self, conf: dict[str, Any]) -> httpx.Response:
        return self.api("POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})

    def run_count(self) -> int:
        r = self.api("GET", f"/dags/{DAG_ID}/dagRuns", params={"limit": 1})
        r.raise_for_status()
        return r.json()["total_entries"]

    def run_state(self, run_id: str) -> str:
        r = self.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")
        r.raise_for_status()
        return r.json()["state"]

    def task_instances(self, run_id: str) -> list[dict[str, Any]]:
        """Every task instance of the run, page by page: the API caps a page at
        ``[api] maximum_page_limit`` (100) rows whatever ``limit`` asks, and 200 mapped
        partitions are more than one page."""
        out: list[dict[str, Any]] = []
        while True:
            r = self.api(
                "GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", params={"limit": 100, "offset": len(out)}
            )
            r.raise_for_status()
            body = r.json()
            out += body["task_instances"]
            if not body["task_instances"] or len(out) >= body["total_entries"]:
                return out

    def embed_states(self, run_id: str) -> dict[int, str | None]:
        return {t["map_index"]: t["state"] for t in self.task_instances(run_id) if t["task_id"] == "embed"}

    def xcom(self, run_id: str, task_id: str, key: str, map_index: int = -1) -> Any:
        r = self.api(
            "GET",
            f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
            params={"map_index": map_index, "deserialize": True},
        )
        return r.json().get("value") if r.status_code == 200 else None

    def task_log(self, run_id: str, task_id: str, map_index: int = -1, try_number: int = 1) -> str:
        """The try's whole log as the UI shows it (the worker's and the triggerer's parts merged),
        one event per line, a task's exception as ``ExcType: message``."""
        r = self.api(
            "GET",
            f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
            params={"map_index": map_index, "full_content": True},
            headers={"Accept": "application/x-ndjson"},
        )
        r.raise_for_status()
        events = []
        for line in r.text.splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if not isinstance(record, dict):
                    events.append(str(record))
                    continue
                events.append(str(record.get("event", "")))
                for detail in record.get("error_detail") or ():  # a task's exception: type and message
                    if isinstance(detail, dict):
                        events.append(f"{detail.get('exc_type')}: {detail.get('exc_value')}")
        return "\n".join(events)

    def wait_run(self, run_id: str, timeout: float, on_poll=None, every: float = 2.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run_state(run_id)
            if on_poll is not None:
                on_poll()
            if state in ("success", "failed"):
                return state
            time.sleep(every)
        raise TimeoutError(f"run {run_id} still {state} after {timeout:.0f}s:\n" + self.log_tail("scheduler"))


def assert_no_ray_left(within_s: float = 0.0) -> None:
    """No process of a local cluster this harness's runs started (``rayemb-`` dirs) is left,
    waiting up to *within_s* for a teardown still under way."""
    from airflow_ray.backends.local import processes_referencing

    deadline = time.monotonic() + within_s
    while processes_referencing("rayemb-") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_referencing("rayemb-") == [], "a Ray process of the run's cluster outlived the run"
