"""RayJobOperator against a stand-in Ray dashboard on loopback (no Ray cluster runs here)."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_ray.cluster import ClusterHandle
from airflow_ray.operators.ray_job import RayJobOperator
from airflow_ray.triggers.ray_job import RayJobTrigger
from tests.airflow_ray.standins import StandInTaskInstance
from tests.topology.ray_cluster_standin import RayClusterStandIn


class _MappedTaskInstance(StandInTaskInstance):
    def __init__(self, map_index: int):
        super().__init__()
        self.map_index, self.start_date = map_index, None


def test_a_try_resumed_after_the_gate_defers_with_a_numeric_poll_interval():
    """On resume Airflow renders the templates again, so ``poll_interval`` is the string the
    ``{{ params.poll_interval_s }}`` template gave; the job's trigger must get a number (a
    string made every gated partition's trigger crash with a TypeError in a real run)."""
    with RayClusterStandIn(delays=[0.0, 0.0]) as cluster:
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

    monkeypatch.setattr(op_module, "fetch_states", lambda dag_id, run_id, task_id: {0: "scheduled", 1: "running"})
    op = RayJobOperator(task_id="embed", cluster={}, entrypoint="python -V", partition=1, max_in_flight=1)
    ti = _MappedTaskInstance(map_index=1)
    ti.task_id = "embed"
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", object(), raising=False)
    assert not op_module.runs_one_task_at_a_time() and op._may_start(ti) is False
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", InProcessSupervisorComms.__new__(InProcessSupervisorComms))
    assert op_module.runs_one_task_at_a_time() and op._may_start(ti) is True
