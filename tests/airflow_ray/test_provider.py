"""The provider as Airflow and Ray see it, through their public APIs: the ``ray_dashboard``
connection form in Airflow's providers manager, the extra link and the trigger's log offset
through the deployment's XCom class, and a local ``working_dir`` shipped by Ray's own job
client (against a loopback stand-in of the dashboard: no Ray cluster runs here)."""

from __future__ import annotations

import copy
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from airflow.sdk import BaseXCom

from airflow_ray.errors import RayJobsApiError
from airflow_ray.hooks.ray_jobs import RayJobsClient, RayJobsHook
from airflow_ray.provider_info import FIELD_BEHAVIOUR, get_provider_info

#: the declaration as imported, before any test could have changed it
EXPECTED_BEHAVIOUR = copy.deepcopy(FIELD_BEHAVIOUR)


# ---------------------------------------------------------------------------------------------- connection form
def test_the_providers_manager_shows_the_ray_dashboard_form():
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    form = manager.field_behaviours["ray_dashboard"]
    assert form == FIELD_BEHAVIOUR
    assert set(form["hidden_fields"]) == {"schema", "login", "port", "extra"}, "only the URL and the token"
    assert form["relabeling"] == {"host": "Dashboard URL", "password": "Auth token"}
    (meta,) = [m for m in manager.iter_connection_type_hook_ui_metadata() if m.connection_type == "ray_dashboard"]
    assert meta.hook_class_name == "airflow_ray.hooks.ray_jobs.RayJobsHook"
    assert meta.hook_name == RayJobsHook.hook_name
    assert meta.field_behaviour == EXPECTED_BEHAVIOUR


def test_the_form_is_declared_once_for_the_provider_info_and_the_hook():
    (conn,) = get_provider_info()["connection-types"]
    assert conn["ui-field-behaviour"] == {
        "hidden-fields": EXPECTED_BEHAVIOUR["hidden_fields"],
        "relabeling": EXPECTED_BEHAVIOUR["relabeling"],
        "placeholders": EXPECTED_BEHAVIOUR["placeholders"],
    }
    assert RayJobsHook.get_ui_field_behaviour() == EXPECTED_BEHAVIOUR == FIELD_BEHAVIOUR
    RayJobsHook.get_ui_field_behaviour()["hidden_fields"].append("host")  # a copy: the declaration is unchanged
    assert FIELD_BEHAVIOUR == EXPECTED_BEHAVIOUR


def test_provider_info_names_the_installed_distribution():
    from importlib.metadata import version

    info = get_provider_info()
    assert info["versions"] == [version(info["package-name"])]


def test_fields_the_form_hides_are_still_honoured_when_a_connection_sets_them(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_RAY_SPLIT", json.dumps({"conn_type": "ray_dashboard", "host": "ray-head", "port": 8265})
    )
    assert RayJobsHook("ray_split").get_address() == "http://ray-head:8265"


# ---------------------------------------------------------------------------------------------- XCom
class RecordingXCom(BaseXCom):
    """A deployment's own XCom class (``[core] xcom_backend``): values live in a dict."""

    store: ClassVar[dict[tuple, Any]] = {}

    @classmethod
    def set(cls, key, value, *, dag_id, task_id, run_id, map_index=-1, **_):
        cls.store[(key, dag_id, task_id, run_id, map_index)] = value

    @classmethod
    def get_one(cls, *, key, dag_id, task_id, run_id, map_index=None, include_prior_dates=False):
        return cls.store.get((key, dag_id, task_id, run_id, -1 if map_index is None else map_index))


@pytest.fixture
def xcom_backend(monkeypatch):
    monkeypatch.setenv("AIRFLOW__CORE__XCOM_BACKEND", f"{__name__}.RecordingXCom")
    RecordingXCom.store.clear()
    yield RecordingXCom
    RecordingXCom.store.clear()


def test_the_configured_xcom_class_is_resolved_from_public_apis(xcom_backend, monkeypatch):
    from airflow_ray.xcom import xcom_backend as resolve

    assert resolve() is xcom_backend
    monkeypatch.delenv("AIRFLOW__CORE__XCOM_BACKEND")
    assert issubclass(resolve(), BaseXCom)
    monkeypatch.setenv("AIRFLOW__CORE__XCOM_BACKEND", "json.JSONDecoder")
    with pytest.raises(TypeError, match="not a subclass of BaseXCom"):
        resolve()


def test_the_job_link_reads_the_url_the_operator_pushed(xcom_backend):
    """One XCom write gives both the UI's button (the link's own key) and the link's answer at
    the task's end."""
    from airflow.sdk.types import TaskInstanceKey

    from airflow_ray.links import XCOM_JOB_URL, RayJobLink

    assert RayJobLink().xcom_key == XCOM_JOB_URL

    key = TaskInstanceKey(dag_id="d", task_id="job", run_id="r", try_number=1, map_index=4)
    assert RayJobLink().get_link(None, ti_key=key) == ""
    url = "http://127.0.0.1:8265/#/jobs/emb-0123-p4"
    xcom_backend.set(XCOM_JOB_URL, url, dag_id="d", task_id="job", run_id="r", map_index=4)
    assert RayJobLink().get_link(None, ti_key=key) == url


def test_the_trigger_checkpoints_its_log_offset_through_the_configured_xcom_class(xcom_backend):
    import logging

    from airflow_ray.triggers.ray_job import LOG_OFFSET_XCOM_KEY, _OffsetCheckpoint

    class TI:
        dag_id, task_id, run_id, map_index = "d", "job", "r", 2

    checkpoint = _OffsetCheckpoint(TI(), logging.getLogger(__name__))
    assert checkpoint._load() == 0
    checkpoint._save(1234)
    assert xcom_backend.store[(LOG_OFFSET_XCOM_KEY, "d", "job", "r", 2)] == 1234
    assert checkpoint._load() == 1234


# ---------------------------------------------------------------------------------------------- working_dir upload
class _Dashboard(BaseHTTPRequestHandler):
    """Just the calls a submission that uploads a package makes, behind a bearer token."""

    token = "standin-token"

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: Any = None) -> None:
        data = json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        self.server.calls.append((self.command, self.path))
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self._reply(401, {"error": "unauthenticated"})
            return False
        return True

    def do_GET(self):
        if not self._authorised():
            return
        if self.path == "/api/version":
            return self._reply(200, {"ray_version": "2.60.0", "version": "4"})
        if self.path.startswith("/api/packages/"):
            return self._reply(200 if self.path in self.server.packages else 404)
        self._reply(404)

    def do_PUT(self):
        if not self._authorised():
            return
        self.server.packages[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
        self._reply(200)

    def do_POST(self):
        if not self._authorised():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.server.refuse:
            return self._reply(400, {"error": f"job {body['submission_id']} already exists"})
        self.server.submitted.append(body)
        self._reply(200, {"submission_id": body["submission_id"], "job_id": None})


@pytest.fixture
def dashboard():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Dashboard)
    server.calls, server.packages, server.submitted, server.refuse = [], {}, [], False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_local_working_dir_is_uploaded_once_as_a_package_then_named_by_its_uri(dashboard, tmp_path):
    (tmp_path / "job.py").write_text("print('hello')\n")
    (tmp_path / "secret.env").write_text("NOT=shipped\n")
    runtime_env = {"working_dir": str(tmp_path), "excludes": ["secret.env"], "env_vars": {"A": "1"}}
    url = f"http://127.0.0.1:{dashboard.server_address[1]}"
    with RayJobsClient(url, _Dashboard.token) as client:
        sid = client.submit(
            "job-1", "python job.py", runtime_env=runtime_env, metadata={"k": "v"}, entrypoint_num_cpus=0.25
        )
        assert sid == "job-1"
        client.submit("job-2", "python job.py", runtime_env=runtime_env)  # same tree: not sent again
    (path, package), *more = dashboard.packages.items()
    assert not more and path.startswith("/api/packages/gcs/_ray_pkg_") and path.endswith(".zip")
    assert zipfile.ZipFile(io.BytesIO(package)).namelist() == ["job.py"], "excludes honoured"
    assert [c for c in dashboard.calls if c[0] == "PUT"] == [("PUT", path)]
    first, second = dashboard.submitted
    assert (
        first["runtime_env"]["working_dir"] == second["runtime_env"]["working_dir"] == "gcs://" + path.rsplit("/", 1)[1]
    )
    assert first["runtime_env"]["env_vars"] == {"A": "1"}
    assert first["metadata"] == {"k": "v"} and first["entrypoint_num_cpus"] == 0.25
    assert runtime_env["working_dir"] == str(tmp_path), "the caller's runtime_env is left as it was"


def test_a_runtime_env_without_a_local_dir_is_posted_as_it_is(dashboard):
    url = f"http://127.0.0.1:{dashboard.server_address[1]}"
    remote = {"working_dir": "s3://bucket/code.zip", "env_vars": {"A": "1"}}
    with RayJobsClient(url, _Dashboard.token) as client:
        client.submit("job-1", "python -V", runtime_env=remote)
    assert dashboard.submitted == [{"entrypoint": "python -V", "submission_id": "job-1", "runtime_env": remote}]
    assert not dashboard.packages


def test_a_refused_upload_submission_is_a_jobs_api_error_that_keeps_the_token_out(dashboard, tmp_path):
    (tmp_path / "job.py").write_text("print('hello')\n")
    dashboard.refuse = True
    url = f"http://127.0.0.1:{dashboard.server_address[1]}"
    with RayJobsClient(url, _Dashboard.token) as client, pytest.raises(RayJobsApiError, match="job-1") as exc:
        client.submit("job-1", "python job.py", runtime_env={"working_dir": str(tmp_path)})
    assert "already exists" in str(exc.value) and _Dashboard.token not in str(exc.value)


# ---------------------------------------------------------------------------------------------- generic
def test_the_provider_imports_nothing_of_the_pipeline_it_serves():
    """Every module imports, and capacity is computed, with the data plane and the DAG's code
    unimportable: the provider knows Ray, Kubernetes and Airflow only."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys

        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("ray_jobs", "embedding_run", "dags"):
                    raise ImportError(f"the provider imported {name}")

        sys.meta_path.insert(0, Refuse())
        import airflow_ray
        for mod in pkgutil.walk_packages(airflow_ray.__path__, "airflow_ray."):
            importlib.import_module(mod.name)
        from airflow_ray.capacity import max_in_flight
        fp = {"bundles": [{"name": "w", "cpus": 2, "gpus": 0, "count": 1}], "driver_cpus": 0.25}
        assert max_in_flight(fp, [{"CPU": 8.0}], None)["max_in_flight"] == 3
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_jobs_api_client_of_a_process_shares_one_tls_context():
    """Building httpx's default TLS context costs ~35 ms of CPU; a triggerer opens a client per
    job, so at 1,000 partitions a night that was a third of its CPU. It is built once."""
    import httpx

    from airflow_ray.hooks.ray_jobs import AsyncRayJobsClient, RayJobsClient, tls_context

    sync_client, async_client = RayJobsClient("http://127.0.0.1:1"), AsyncRayJobsClient("http://127.0.0.1:1")
    try:
        for client in (sync_client._client, async_client._client):
            pool = client._transport._pool
            assert isinstance(client, httpx.Client | httpx.AsyncClient) and pool._ssl_context is tls_context()
    finally:
        sync_client.close()
        import asyncio

        asyncio.run(async_client.aclose())
