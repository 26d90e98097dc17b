"""RayJobOperator against a stand-in Ray dashboard on loopback (no Ray cluster runs here)."""

from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_ray.cluster import ClusterHandle
from airflow_ray.operators.ray_job import RayJobOperator
from airflow_ray.triggers.ray_job import RayJobTrigger
from tests.airflow_ray.standins import StandInTaskInstance
from tests.topology.ray_cluster_standin import RayClusterStandIn


def _connect(monkeypatch, url: str) -> None:
    """The deployment's ``ray_default`` connection names the stand-in: where the ``existing``
    backend takes the dashboard address (and its token) from."""
    monkeypatch.setenv("AIRFLOW_CONN_RAY_DEFAULT", json.dumps({"conn_type": "ray_dashboard", "host": url}))


class _MappedTaskInstance(StandInTaskInstance):
    def __init__(self, map_index: int):
        super().__init__()
        self.map_index, self.start_date = map_index, None


def test_a_try_resumed_after_the_gate_defers_with_a_numeric_poll_interval(monkeypatch):
    """On resume Airflow renders the templates again, so ``poll_interval`` is the string the
    ``{{ params.poll_interval_s }}`` template gave; the job's trigger must get a number (a
    string made every gated partition's trigger crash with a TypeError in a real run)."""
    with RayClusterStandIn(delays=[0.0, 0.0]) as cluster:
        _connect(monkeypatch, cluster.url)
        handle = ClusterHandle(backend="existing", name="c", dashboard_url=cluster.url)
        op = RayJobOperator(
            task_id="embed", cluster=handle.to_dict(), entrypoint="python -V", partition=1, poll_interval="5"
        )
        ti = _MappedTaskInstance(map_index=1)
        with pytest.raises(TaskDeferred) as deferred:
            op.execute_after_gate({"ti": ti}, {"status": "open", "waited_s": 1.0})
    trigger = deferred.value.trigger
    assert isinstance(trigger, RayJobTrigger) and trigger.poll_interval == 5.0
    assert isinstance(trigger.poll_interval, float)
    assert [j.partition for j in cluster.jobs.values()] == [1], "submitted once, for partition 1"


def test_under_dag_test_a_higher_index_never_waits_at_the_gate(monkeypatch):
    """`airflow dags test` (`make demo`) runs mapped tasks one at a time in any order, and a
    deferred task's trigger in line: partition 1 waiting for partition 0 would wait forever (it
    did: `make demo` hung when the test picked index 1 first). There the gate is open; in a
    deployment (any other supervisor channel) the same states close it."""
    from airflow.sdk.execution_time import task_runner
    from airflow.sdk.execution_time.supervisor import InProcessSupervisorComms

    from airflow_ray.operators import ray_job as op_module
    from airflow_ray.triggers import in_flight_gate

    monkeypatch.setattr(in_flight_gate, "fetch_states", lambda dag_id, run_id, task_id: {0: "scheduled", 1: "running"})
    monkeypatch.setattr(in_flight_gate, "fetch_finished_count", lambda dag_id, run_id, task_id: 0)
    op = RayJobOperator(task_id="embed", cluster={}, entrypoint="python -V", partition=1, max_in_flight=1)
    ti = _MappedTaskInstance(map_index=1)
    ti.task_id = "embed"
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", object(), raising=False)
    assert not op_module.runs_one_task_at_a_time() and op._may_start(ti) == (False, 1)
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", InProcessSupervisorComms.__new__(InProcessSupervisorComms))
    assert op_module.runs_one_task_at_a_time() and op._may_start(ti)[0] is True


def test_the_job_deadline_counts_from_its_admission_not_from_the_try_start(monkeypatch):
    """A partition that waited at the gate longer than ``timeout_s`` still gets its whole
    ``timeout_s`` for the job: the deadline counts from the submission (the try started an
    hour earlier). A job adopted from an earlier try keeps the deadline of its own start."""
    import datetime as dt
    import time

    with RayClusterStandIn(delays=[0.0, 0.0]) as cluster:
        _connect(monkeypatch, cluster.url)
        handle = ClusterHandle(backend="existing", name="c", dashboard_url=cluster.url)
        op = RayJobOperator(
            task_id="embed", cluster=handle.to_dict(), entrypoint="python -V", partition=1, timeout_s="600"
        )
        ti = _MappedTaskInstance(map_index=1)
        ti.start_date = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)  # the try began waiting an hour ago
        before = time.time()
        with pytest.raises(TaskDeferred) as deferred:
            op.execute_after_gate({"ti": ti}, {"status": "open", "waited_s": 3600.0})
    deadline = deferred.value.trigger.deadline
    assert before + 600 <= deadline <= time.time() + 600, "the job's 600 s count from its submission"
    started = time.time() - 100
    assert op._job_deadline({"status": "RUNNING", "start_time": int(started * 1000)}) == pytest.approx(started + 600)


def test_a_partition_waiting_for_a_slot_is_bounded_by_the_queue_ahead_not_by_the_job_timeout(monkeypatch):
    """6 partitions, 1 in flight, a 600 s job bound: partition 5 has 5 partitions ahead, so its
    wait for a slot may last 5 waves of 600 s (each try of each), not 600 s."""
    import time

    from airflow_ray.triggers import in_flight_gate
    from airflow_ray.triggers.in_flight_gate import InFlightGateTrigger

    monkeypatch.setattr(in_flight_gate, "fetch_finished_count", lambda dag_id, run_id, task_id: 0)
    with RayClusterStandIn(delays=[0.0] * 6) as cluster:
        _connect(monkeypatch, cluster.url)
        handle = ClusterHandle(backend="existing", name="c", dashboard_url=cluster.url)
        op = RayJobOperator(
            task_id="embed", cluster=handle.to_dict(), entrypoint="python -V", partition=5, max_in_flight="1",
            timeout_s="600", retries=1,
        )  # fmt: skip
        ti = _MappedTaskInstance(map_index=5)
        ti.task_id = "embed"
        now = time.time()
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({"ti": ti})
    gate = deferred.value.trigger
    assert isinstance(gate, InFlightGateTrigger)
    # 5 partitions ahead x 2 tries each / 1 in flight = 10 waves of 600 s, plus 600 s of slack
    assert gate.deadline == pytest.approx(now + 10 * 600 + 600, abs=5)
    assert cluster.jobs == {}, "nothing is submitted before the slot"
    op.slot_wait_timeout_s = "120"
    assert op._slot_deadline(5) == pytest.approx(time.time() + 120, abs=1)
