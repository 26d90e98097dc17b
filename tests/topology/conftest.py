"""One Airflow stack (PostgreSQL, api-server, scheduler, dag-processor, triggerer) for every
real-topology module: starting one costs about a minute, so the modules share it. Each test
leaves it as it found it (its runs finished, no Ray process left).

The deployment also has the Airflow connection ``ray_default`` (the ``existing`` backend's):
it names a loopback stand-in of a Ray cluster's dashboard (``ray_standin``), for the tests
about a cluster the run borrows rather than creates."""

from __future__ import annotations

import json
import secrets

import pytest

from tests.topology.airflow_stack import AirflowStack
from tests.topology.ray_cluster_standin import RayClusterStandIn


@pytest.fixture(scope="session")
def ray_standin():
    """A test sets ``delays`` (seconds each partition's job runs) before it triggers a run."""
    token = secrets.token_urlsafe(16)
    with RayClusterStandIn(delays=[], nodes=2, node_resources={"CPU": 16.0}, token=token) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def stack(tmp_path_factory, ray_standin):
    from tests import postgres_server

    if not postgres_server.available():
        pytest.fail("PostgreSQL binaries are missing: `make setup` installs them (Debian package postgresql)")
    conn = {"conn_type": "ray_dashboard", "host": ray_standin.url, "password": ray_standin.token}
    env = {"AIRFLOW_CONN_RAY_DEFAULT": json.dumps(conn)}
    with AirflowStack(str(tmp_path_factory.mktemp("airflow-topology")), extra_env=env) as s:
        s.wait_for_dag()
        yield s
