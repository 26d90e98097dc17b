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
from tests.topology.statsd_listener import StatsdListener


@pytest.fixture(scope="session")
def ray_standin():
    """A test sets ``delays`` (seconds each partition's job runs) before it triggers a run."""
    token = secrets.token_urlsafe(16)
    with RayClusterStandIn(delays=[], nodes=2, node_resources={"CPU": 16.0}, token=token) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def statsd():
    """The deployment's StatsD server: every component sends its metrics here."""
    with StatsdListener() as listener:
        yield listener


def observability_env(home: str, statsd_port: int) -> dict[str, str]:
    """Metrics to the session's StatsD listener, OpenLineage events to a file in the stack's
    home, and a morning deadline (07:00 UTC) notified through the stand-in notifier: a run
    triggered now has its deadline up to a day ahead, one for an earlier night has missed it."""
    return {
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "AIRFLOW__METRICS__STATSD_PORT": str(statsd_port),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "embeddings-topology",
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": f"{home}/openlineage.jsonl", "append": True}
        ),
        "EMB_DEPLOYMENT_FINISH_BY": "07:00",
        "EMB_DEPLOYMENT_DEADLINE_NOTIFIER": "tests.topology.notifier_standin.FileNotifierStandIn",
        "EMB_DEPLOYMENT_DEADLINE_NOTIFIER_KWARGS": json.dumps({"path": f"{home}/deadline-notifications.jsonl"}),
    }


@pytest.fixture(scope="session")
def stack(tmp_path_factory, ray_standin, statsd):
    from tests import postgres_server

    if not postgres_server.available():
        pytest.fail("PostgreSQL binaries are missing: `make setup` installs them (Debian package postgresql)")
    conn = {"conn_type": "ray_dashboard", "host": ray_standin.url, "password": ray_standin.token}
    home = str(tmp_path_factory.mktemp("airflow-topology"))
    env = {"AIRFLOW_CONN_RAY_DEFAULT": json.dumps(conn), **observability_env(home, statsd.port)}
    with AirflowStack(home, extra_env=env) as s:
        s.wait_for_dag()
        yield s
