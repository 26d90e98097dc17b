"""The control plane against a real Ray head started by the ``local`` backend.

Operators are executed with ``StandInTaskInstance`` in place of Airflow's task runner (which
does not run here: the DAG end-to-end tests drive the real one); the Ray cluster, the Jobs
API, the embed job and the trigger are all real.
"""

import asyncio
import logging
import os
import sys

import pytest
from airflow.sdk.exceptions import TaskDeferred

from ray_embeddings.backends.local import LocalRayBackend, processes_referencing
from ray_embeddings.cluster import ClusterHandle, resolve_token
from ray_embeddings.errors import RayJobError
from ray_embeddings.hooks.ray_jobs import RayJobsClient
from ray_embeddings.naming import cluster_name, submission_id
from ray_embeddings.operators.ray_cluster import RayClusterSetupOperator, RayClusterTeardownOperator
from ray_embeddings.operators.ray_job import RayJobOperator
from ray_embeddings.runtime_env import working_tree_runtime_env
from ray_embeddings.triggers.ray_job import RayJobTrigger
from tests.plugins.ray_embeddings.standins import StandInTaskInstance, first_event, run_trigger

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    """Up through the setup operator; down through the teardown operator *by name* (no handle)."""
    config = {"num_cpus": 6}  # default temp root: Ray's socket paths must stay short
    ti = StandInTaskInstance(dag_id="pytest_local", run_id=f"manual__{os.getpid()}")
    setup = RayClusterSetupOperator(task_id="cluster_up", backend="local", backend_config=config)
    handle = ClusterHandle.from_dict(setup.execute({"ti": ti}))
    assert handle.name == cluster_name(ti.dag_id, ti.run_id)
    yield LocalRayBackend(**config), handle
    RayClusterTeardownOperator(task_id="cluster_down", backend="local", backend_config=config).execute({"ti": ti})
    assert processes_referencing(handle.details["temp_dir"]) == [], "teardown left processes of ours behind"
    assert not os.path.exists(handle.details["temp_dir"])


def _client(handle):
    return RayJobsClient(handle.dashboard_url, resolve_token(handle.token))


def _operator(handle, entrypoint, partition, **kw):
    return RayJobOperator(
        task_id=f"job_{partition}",
        cluster=handle.to_dict(),
        entrypoint=entrypoint,
        partition=partition,
        poll_interval=0.5,
        **kw,
    )


def test_dashboard_requires_the_token_and_bind_is_loopback(cluster):
    import httpx

    _, handle = cluster
    assert handle.dashboard_url.startswith("http://127.0.0.1:")
    assert httpx.get(handle.dashboard_url + "/api/version").status_code == 401
    with _client(handle) as c:
        assert c.version()["ray_version"] == "2.60.0"


def test_setup_retry_adopts_the_running_cluster(cluster):
    backend, handle = cluster
    again = backend.up(handle.name)
    assert again == handle


def test_embed_job_submitted_and_sensed_to_success(cluster, demo_assets, tmp_path, caplog, capfd):
    _, handle = cluster
    caplog.set_level(logging.INFO)
    entry = (
        f"{sys.executable} -m ray_jobs embed --manifest {demo_assets.manifest} --output {tmp_path} "
        f"--model {demo_assets.model} --num-stages 2 --batch-size 16 --preprocess-pool 1-1"
    )
    op = _operator(handle, entry, 0, runtime_env=working_tree_runtime_env())
    ti = StandInTaskInstance()
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    trigger = deferred.value.trigger
    assert isinstance(trigger, RayJobTrigger) and trigger.submission_id == submission_id("test_dag", "manual__1", 0)
    event = run_trigger(trigger)
    assert event["status"] == "SUCCEEDED", event
    assert op.execute_complete({"ti": ti}, event)["status"] == "SUCCEEDED"
    out, err = capfd.readouterr()
    task_log = caplog.text + out + err  # Airflow's structlog writes to the process's stdout here
    assert "embed: committed: rows_in=120" in task_log, "job log lines reach the task log"
    assert ti.xcom["ray_job_url"].endswith(f"/#/jobs/{trigger.submission_id}")
    token = resolve_token(handle.token)
    assert token and token not in task_log and token not in repr(ti.xcom) and token not in repr(trigger.serialize())

    # a retried task adopts the succeeded job instead of running it again
    again = _operator(handle, entry, 0, runtime_env=working_tree_runtime_env()).execute({"ti": StandInTaskInstance()})
    assert again == {"submission_id": trigger.submission_id, "status": "SUCCEEDED", "adopted": True}


def test_failed_job_surfaces_failed_with_its_last_log_lines(cluster):
    _, handle = cluster
    entry = f"{sys.executable} -c \"import sys; print('partition exploded: bad things'); sys.exit(3)\""
    op = _operator(handle, entry, "fail", deferrable=False)
    with pytest.raises(RayJobError) as exc:
        op.execute({"ti": StandInTaskInstance()})
    assert "ended FAILED" in str(exc.value) and "partition exploded: bad things" in str(exc.value)
    # a retry does not adopt the failed job: it resubmits under the next deterministic id
    op2 = _operator(handle, entry, "fail", deferrable=True)
    ti = StandInTaskInstance()
    with pytest.raises(TaskDeferred):
        op2.execute({"ti": ti})
    assert ti.xcom["submission_id"] == submission_id("test_dag", "manual__1", "fail", attempt=1)


def test_retry_while_running_adopts_and_killing_the_task_stops_the_job(cluster):
    _, handle = cluster
    entry = f"{sys.executable} -c \"import time; print('working', flush=True); time.sleep(600)\""
    ti1, ti2 = StandInTaskInstance(), StandInTaskInstance()
    with pytest.raises(TaskDeferred) as first:
        _operator(handle, entry, "long").execute({"ti": ti1})
    with pytest.raises(TaskDeferred):
        _operator(handle, entry, "long").execute({"ti": ti2})
    assert ti1.xcom["submission_id"] == ti2.xcom["submission_id"], "retry adopted instead of duplicating"
    trigger = first.value.trigger

    async def cancel_mid_way_then_kill():
        task = asyncio.create_task(first_event(trigger))
        await asyncio.sleep(3)
        task.cancel()  # triggerer restart: the trigger is cancelled and later rebuilt
        rebuilt = RayJobTrigger(**trigger.serialize()[1])
        await rebuilt.on_kill()  # the user marks the task failed
        return await first_event(rebuilt)

    event = asyncio.run(cancel_mid_way_then_kill())
    assert event["status"] == "STOPPED"
    with pytest.raises(RayJobError, match="ended STOPPED"):
        _operator(handle, entry, "long").execute_complete(None, event)


def test_a_rebuilt_trigger_ends_with_the_same_event(cluster):
    _, handle = cluster
    entry = f"{sys.executable} -c \"print('line one'); print('line two')\""
    ti = StandInTaskInstance()
    with pytest.raises(TaskDeferred) as deferred:
        _operator(handle, entry, "same").execute({"ti": ti})
    trigger = deferred.value.trigger
    classpath, kwargs = trigger.serialize()
    assert classpath == "ray_embeddings.triggers.ray_job.RayJobTrigger"
    first = run_trigger(trigger)
    second = run_trigger(RayJobTrigger(**kwargs))
    assert first == second and first["status"] == "SUCCEEDED" and "line two" in first["log_tail"]


def test_non_deferrable_on_kill_stops_the_job(cluster):
    _, handle = cluster
    entry = f'{sys.executable} -c "import time; time.sleep(600)"'
    op = _operator(handle, entry, "kill")
    ti = StandInTaskInstance()
    with pytest.raises(TaskDeferred):
        op.execute({"ti": ti})
    op.on_kill()
    event = run_trigger(RayJobTrigger(handle.dashboard_url, ti.xcom["submission_id"], handle.token.to_dict(), 0.5))
    assert event["status"] == "STOPPED"


def test_existing_backend_from_an_airflow_connection(cluster, monkeypatch):
    """The same cluster reached as `existing`: address and token from a connection (env-defined)."""
    import json

    from ray_embeddings.backends.existing import ExistingClusterBackend

    _, handle = cluster
    token = resolve_token(handle.token)
    monkeypatch.setenv(
        "AIRFLOW_CONN_RAY_TEST",
        json.dumps({"conn_type": "ray_dashboard", "host": handle.dashboard_url, "password": token}),
    )
    existing = ExistingClusterBackend(conn_id="ray_test").up("whatever")
    assert existing.dashboard_url == handle.dashboard_url
    assert existing.token.to_dict() == {"kind": "connection", "conn_id": "ray_test", "key": "auth_token"}
    with RayJobsClient(existing.dashboard_url, resolve_token(existing.token)) as c:
        assert c.version()["ray_version"] == "2.60.0"
    ExistingClusterBackend(conn_id="ray_test").down(existing)  # not ours: nothing happens
    with _client(handle) as c:
        c.version()


def test_trigger_polling_never_blocks_the_event_loop(cluster):
    _, handle = cluster
    entry = f"{sys.executable} -c \"import time; time.sleep(4); print('done')\""
    ti = StandInTaskInstance()
    with pytest.raises(TaskDeferred) as deferred:
        _operator(handle, entry, "loop").execute({"ti": ti})
    trigger = deferred.value.trigger
    gaps = []

    async def ticker(stop):
        last = asyncio.get_running_loop().time()
        while not stop.is_set():
            await asyncio.sleep(0.02)
            now = asyncio.get_running_loop().time()
            gaps.append(now - last)
            last = now

    async def main():
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        event = await first_event(trigger)
        stop.set()
        await tick
        return event

    assert asyncio.run(main())["status"] == "SUCCEEDED"
    assert max(gaps) < 0.5, f"the event loop stalled for {max(gaps):.2f}s"


def test_handle_round_trips_without_the_token(cluster):
    _, handle = cluster
    data = handle.to_dict()
    assert ClusterHandle.from_dict(data) == handle
    assert resolve_token(handle.token) not in repr(data)
