"""RayJobOperator against a stand-in Ray dashboard on loopback (no Ray cluster runs here)."""

from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_ray.cluster import ClusterHandle
from airflow_ray.errors import RayJobError
from airflow_ray.operators.ray_job import RayJobOperator
from airflow_ray.triggers.ray_job import RayJobTrigger
from tests.airflow_ray.standins import StandInTaskInstance, run_trigger
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
    trigger = deferred.value.trigger
    assert isinstance(trigger, RayJobTrigger) and trigger.gate["map_index"] == 5
    # 5 partitions ahead x 2 tries each / 1 in flight = 10 waves of 600 s, plus 600 s of slack
    assert trigger.gate["deadline"] == pytest.approx(now + 10 * 600 + 600, abs=5)
    assert trigger.submission["timeout_s"] == 600.0 and trigger.deadline is None, "the job's bound starts at admission"
    assert cluster.jobs == {}, "nothing is submitted before the slot"
    op.slot_wait_timeout_s = "120"
    assert op._slot_deadline(5) == pytest.approx(time.time() + 120, abs=1)


def _waiting_partition(monkeypatch, cluster, **kwargs) -> tuple[RayJobOperator, _MappedTaskInstance]:
    """Partition 3 of a task with 1 in flight, three lower indices unfinished: it must wait."""
    from airflow_ray.triggers import in_flight_gate

    monkeypatch.setattr(in_flight_gate, "fetch_finished_count", lambda dag_id, run_id, task_id: 0)
    _connect(monkeypatch, cluster.url)
    handle = ClusterHandle(backend="existing", name="c", dashboard_url=cluster.url)
    op = RayJobOperator(
        task_id="embed", cluster=handle.to_dict(), entrypoint="python -V", partition=3, max_in_flight="1",
        timeout_s="600", poll_interval="0.05", **kwargs,
    )  # fmt: skip
    ti = _MappedTaskInstance(map_index=3)
    ti.task_id = "embed"
    return op, ti


def test_a_waiting_partition_defers_once_and_its_trigger_submits_when_the_slot_opens(monkeypatch):
    """One deferral per waiting partition: the job trigger waits for the slot, submits under the
    deterministic id, and the resumed task returns the job's result and records its link. A
    trigger rebuilt after a triggerer restart adopts the job instead of submitting it again."""
    from airflow_ray.triggers import in_flight_gate

    with RayClusterStandIn(delays=[0.0] * 4) as cluster:
        op, ti = _waiting_partition(monkeypatch, cluster)
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({"ti": ti})
        assert deferred.value.method_name == "execute_complete" and cluster.jobs == {}
        assert ti.xcom == {}, "nothing written before the slot opens (a new try starts with its XComs cleared)"
        _, kwargs = deferred.value.trigger.serialize()
        json.dumps(kwargs)  # what the triggerer stores: JSON only
        monkeypatch.setattr(in_flight_gate, "fetch_finished_count", lambda dag_id, run_id, task_id: 3)
        finished = {0: "success", 1: "success", 2: "failed", 3: "deferred"}
        monkeypatch.setattr(in_flight_gate, "fetch_states", lambda dag_id, run_id, task_id: finished)
        event = run_trigger(RayJobTrigger(**kwargs))
        assert event["status"] == "SUCCEEDED" and event["how"] == "submitted" and event["waited_s"] >= 0
        assert [j.partition for j in cluster.jobs.values()] == [3]
        again = run_trigger(RayJobTrigger(**kwargs))  # the triggerer restarted: same kwargs
        assert again["how"] == "adopted" and again["submission_id"] == event["submission_id"]
        assert len(cluster.jobs) == 1, "adopted, not submitted twice"
    result = op.execute_complete({"ti": ti}, event)
    assert result == {"submission_id": event["submission_id"], "status": "SUCCEEDED", "adopted": False}
    assert ti.xcom["submission_id"] == event["submission_id"], "no XCom channel in the trigger: the task wrote them"
    assert ti.xcom["_link_RayJobLink"].endswith(event["submission_id"])


def test_a_slot_wait_past_its_bound_submits_nothing_and_says_so(monkeypatch):
    with RayClusterStandIn(delays=[0.0] * 4) as cluster:
        op, ti = _waiting_partition(monkeypatch, cluster, slot_wait_timeout_s="0.01")
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({"ti": ti})
        event = run_trigger(deferred.value.trigger)
        assert event["status"] == "SLOT_TIMEOUT" and event["ahead"] == 3 and cluster.jobs == {}
    with pytest.raises(RayJobError, match=r"partition 3 waited .* for a slot .* nothing was submitted"):
        op.execute_complete({"ti": ti}, event)


def test_a_job_that_uploads_a_local_working_dir_is_submitted_by_the_worker_after_the_gate(monkeypatch, tmp_path):
    """A local ``working_dir`` is on the worker's disk, not necessarily the triggerer's: the gate
    alone is deferred, and the resumed task submits."""
    from airflow_ray.triggers.in_flight_gate import InFlightGateTrigger

    with RayClusterStandIn(delays=[0.0] * 4) as cluster:
        op, ti = _waiting_partition(monkeypatch, cluster, runtime_env={"working_dir": str(tmp_path)})
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({"ti": ti})
    assert isinstance(deferred.value.trigger, InFlightGateTrigger)
    assert deferred.value.method_name == "execute_after_gate"
