"""The run's teardown on a borrowed (``existing``) cluster stops the run's leftover jobs and no
one else's. Against a loopback stand-in of a Ray dashboard (no Ray cluster runs here); the
same path in the deployed topology: ``tests/topology/test_real_topology.py``."""

from __future__ import annotations

import json
import socket

import pytest

from airflow_ray.cluster import ClusterHandle
from airflow_ray.errors import ClusterError
from airflow_ray.hooks.ray_jobs import RayJobsClient
from airflow_ray.operators.ray_cluster import RayClusterTeardownOperator
from airflow_ray.submission import job_metadata
from tests.airflow_ray.standins import StandInTaskInstance
from tests.topology.ray_cluster_standin import RayClusterStandIn

TOKEN = "standin-token-for-this-test"


@pytest.fixture
def borrowed(monkeypatch):
    """The handle cluster_up returns for ``existing``: address and token from a connection."""

    def handle(url: str) -> ClusterHandle:
        conn = {"conn_type": "ray_dashboard", "host": url, "password": TOKEN}
        monkeypatch.setenv("AIRFLOW_CONN_RAY_TEST", json.dumps(conn))
        return ClusterHandle(backend="existing", name="emb-x", dashboard_url=url)

    return handle


def _teardown(handle: ClusterHandle | None) -> RayClusterTeardownOperator:
    return RayClusterTeardownOperator(
        task_id="cluster_down",
        cluster=handle.to_dict() if handle else None,
        backend="existing",
        backend_config={"conn_id": "ray_test"},
    )


def test_teardown_of_a_borrowed_cluster_stops_only_this_runs_leftover_jobs(borrowed):
    ti = StandInTaskInstance(dag_id="nightly", run_id="scheduled__1")
    with RayClusterStandIn(delays=[600.0, 600.0, 0.0], token=TOKEN) as cluster:
        handle = borrowed(cluster.url)
        with RayJobsClient(cluster.url, TOKEN) as client:
            for sid, dag_id, run_id, partition in (
                ("orphan", "nightly", "scheduled__1", 0),  # this run's, still running: stopped
                ("finished", "nightly", "scheduled__1", 2),  # this run's, ended (0 s): left alone
                ("next-night", "nightly", "scheduled__2", 1),  # another run of the same DAG
                ("other-dag", "backfill", "scheduled__1", 0),  # same run id, another DAG
            ):
                client.submit(sid, "python -V", metadata=job_metadata(dag_id, run_id, partition))
        _teardown(handle).execute({"ti": ti})
        stopped = {sid for sid, job in cluster.jobs.items() if job.stopped_at is not None}
        assert stopped == {"orphan"}
        _teardown(handle).execute({"ti": ti})  # a retried teardown: nothing left to stop
        assert {sid for sid, job in cluster.jobs.items() if job.stopped_at is not None} == {"orphan"}


def test_a_borrowed_cluster_that_cannot_be_listed_fails_the_teardown_naming_the_run(borrowed):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    ti = StandInTaskInstance(dag_id="nightly", run_id="scheduled__1")
    with pytest.raises(ClusterError, match=r"run 'scheduled__1' may still be running there.*ray job stop"):
        _teardown(borrowed(url)).execute({"ti": ti})


def test_a_teardown_without_a_handle_contacts_no_cluster(borrowed):
    """cluster_up failed before returning a handle: no job of the run was submitted."""
    borrowed("http://127.0.0.1:9")  # would refuse connections if it were contacted
    _teardown(None).execute({"ti": StandInTaskInstance()})
