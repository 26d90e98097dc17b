"""Where a cluster's token comes from, and where it may go: from the deployment's backend only
(a ``ray_dashboard`` connection, the local backend's own private directory, the Secret KubeRay
made for the cluster: tests/airflow_ray/test_kuberay.py), never from the cluster handle that
travels through XCom, whose ``dashboard_url`` must be what the backend produces. A loopback
stand-in of a Ray dashboard answers for the cluster (no Ray runs here), and a loopback
collector records every request a forged handle might make it receive."""

from __future__ import annotations

import http.server
import json
import os
import threading

import pytest

from airflow_ray.backends import credentials
from airflow_ray.backends.local import DIR_PREFIX, STATE_FILE, TOKEN_FILE, LocalRayBackend
from airflow_ray.cluster import ClusterHandle
from airflow_ray.errors import ClusterError
from airflow_ray.operators.ray_job import RayJobOperator
from tests.airflow_ray.standins import StandInTaskInstance
from tests.topology.ray_cluster_standin import RayClusterStandIn

TOKEN = "standin-token-for-this-test"
WAREHOUSE_PASSWORD = "warehouse-password-never-sent"


class _Collector:
    """An HTTP server on loopback that answers 200 to anything and keeps each request's headers."""

    def __init__(self):
        seen = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self):
                seen.append(dict(self.headers))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"ray_version": "2.60.0"}')

            do_GET = do_POST = _any

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()


@pytest.fixture
def connections(monkeypatch):
    def define(ray_url: str) -> None:
        monkeypatch.setenv(
            "AIRFLOW_CONN_RAY_TEST", json.dumps({"conn_type": "ray_dashboard", "host": ray_url, "password": TOKEN})
        )
        monkeypatch.setenv(
            "AIRFLOW_CONN_WAREHOUSE",
            json.dumps({"conn_type": "postgres", "host": "db", "login": "u", "password": WAREHOUSE_PASSWORD}),
        )

    return define


def test_a_forged_handle_cannot_send_the_token_elsewhere_nor_pick_its_source(connections, tmp_path):
    """The handle XCom carries names a collector's address, a token file and another
    connection: the token comes from the deployment's ``ray_dashboard`` connection, is sent only
    to that connection's host, and the collector receives nothing."""
    secret_file = tmp_path / "secret"
    secret_file.write_text("a file's contents")
    with RayClusterStandIn(delays=[], token=TOKEN) as cluster, _Collector() as collector:
        connections(cluster.url)
        config = {"conn_id": "ray_test"}
        genuine = {"backend": "existing", "name": "emb-x", "dashboard_url": cluster.url, "details": {}}
        for token_ref in ({"kind": "file", "path": str(secret_file)}, {"kind": "connection", "conn_id": "warehouse"}):
            assert credentials({**genuine, "token": token_ref}, config) == (cluster.url, TOKEN)
        forged = {**genuine, "dashboard_url": collector.url, "token": {"kind": "connection", "conn_id": "ray_test"}}
        with pytest.raises(ClusterError, match="no token is sent there"):
            credentials(forged, config)
        op = RayJobOperator(task_id="embed", cluster=forged, backend_config=config, entrypoint="python -V")
        ti = StandInTaskInstance()
        ti.map_index, ti.task_id = -1, "embed"
        with pytest.raises(ClusterError, match="no token is sent there"):
            op.execute({"ti": ti})
        # a connection that is not a Ray dashboard's is never a token's source
        with pytest.raises(ClusterError, match="not 'ray_dashboard'"):
            credentials(genuine, {"conn_id": "warehouse"})
    assert collector.requests == [], "the forged address received a request"
    assert cluster.jobs == {}


def _private_cluster_dir(root, name: str, url: str, token: str = TOKEN, mode: int = 0o600) -> str:
    backend = LocalRayBackend(temp_root=str(root))
    tdir = os.path.join(backend._root(), backend._prefix(name) + "abc")
    os.mkdir(tdir, 0o700)
    handle = ClusterHandle("local", name, url, {"pid": 1, "temp_dir": tdir})
    for fname, text in ((STATE_FILE, json.dumps(handle.to_dict())), (TOKEN_FILE, token)):
        fd = os.open(os.path.join(tdir, fname), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
    os.chmod(os.path.join(tdir, TOKEN_FILE), mode)
    return tdir


def test_the_local_token_comes_from_the_clusters_own_private_dir(tmp_path):
    """The token and the address come from the private dir the backend finds for the cluster's
    name under its own temp root (``cluster.json`` naming it, the token file beside it); the
    handle's temp dir and any token path in it play no part, and its address must be the dir's."""
    root = tmp_path / "root"
    root.mkdir()
    url = "http://127.0.0.1:8265"
    tdir = _private_cluster_dir(root, "emb-a", url)
    backend = LocalRayBackend(temp_root=str(root))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (elsewhere / TOKEN_FILE).write_text("not this one")
    handle = ClusterHandle("local", "emb-a", url, {"temp_dir": str(elsewhere), "pid": 1})
    assert backend.credentials(handle) == (url, TOKEN)
    with pytest.raises(ClusterError, match="no token is sent there"):
        backend.credentials(ClusterHandle("local", "emb-a", "http://collector.example:8265", {"temp_dir": tdir}))
    with pytest.raises(ClusterError, match="no local Ray cluster 'emb-b'"):
        backend.credentials(ClusterHandle("local", "emb-b", url, {"temp_dir": tdir}))
    os.chmod(os.path.join(tdir, TOKEN_FILE), 0o644)  # readable by others: not a token of ours
    with pytest.raises(ClusterError, match="not a private file"):
        backend.credentials(handle)
    assert DIR_PREFIX in tdir


def test_the_triggerer_reuses_a_lookup_for_a_minute_but_never_a_failure_nor_for_another_handle(
    connections, monkeypatch
):
    """Every trigger needs its cluster's address and token; the triggerer looks them up once a
    minute per handle and settings instead of once per trigger. A failed lookup is asked again,
    and a forged handle (another address) is still checked and refused."""
    import asyncio

    import airflow_ray.backends as backends

    looked_up = []
    real = backends.credentials
    monkeypatch.setattr(backends, "credentials", lambda h, c=None: looked_up.append(h) or real(h, c))
    with RayClusterStandIn(delays=[], token=TOKEN) as cluster, _Collector() as collector:
        connections(cluster.url)
        config = {"conn_id": "ray_test"}
        genuine = {"backend": "existing", "name": "emb-x", "dashboard_url": cluster.url, "details": {}}
        for _ in range(3):
            assert asyncio.run(backends.acredentials(genuine, config)) == (cluster.url, TOKEN)
        assert len(looked_up) == 1
        forged = {**genuine, "dashboard_url": collector.url}
        for _ in range(2):
            with pytest.raises(ClusterError, match="no token is sent there"):
                asyncio.run(backends.acredentials(forged, config))
        assert len(looked_up) == 3, "a refused lookup is not kept"
        monkeypatch.setattr(backends, "CREDENTIALS_TTL_S", 0.0)
        asyncio.run(backends.acredentials(genuine, config))
        assert len(looked_up) == 4, "past its time an answer is looked up again"
    assert collector.requests == []
