"""The in-flight gate's rule (pure) and the capacity computation from a cluster's nodes."""

from __future__ import annotations

import random

import pytest

from airflow_ray.capacity import max_in_flight, nodes_from_raycluster, nodes_from_state_api
from airflow_ray.errors import ClusterError
from airflow_ray.triggers.in_flight_gate import FINISHED, gate_open, mapped_states, unfinished_ahead
from ray_jobs.job.footprint import job_footprint


def test_unfinished_ahead_counts_only_lower_indices_that_hold_or_wait_for_a_slot():
    states = {0: "success", 1: "deferred", 2: "up_for_retry", 3: "failed", 4: None, 5: "running"}
    assert unfinished_ahead(states, 5) == 3  # 1, 2 and 4
    assert gate_open(states, 5, 4) and not gate_open(states, 5, 3)
    assert gate_open(states, 0, 1), "the lowest index always starts"


def test_mapped_states_reads_the_task_sdk_shape():
    raw = {"r1": {"embed_0": "success", "embed_12": "deferred", "embedx_1": "running", "plan": "success"}}
    assert mapped_states(raw, "r1", "embed") == {0: "success", 12: "deferred"}
    assert mapped_states(raw, "other", "embed") == {}


@pytest.mark.parametrize("seed", range(20))
def test_never_more_than_the_limit_in_flight_and_every_task_finishes(seed):
    """Simulate tasks that check the gate in random order, start, and finish at random."""
    rng = random.Random(seed)
    n, limit = rng.randint(1, 30), rng.randint(1, 6)
    states: dict[int, str | None] = dict.fromkeys(range(n))
    started: set[int] = set()
    peak = 0
    for _ in range(100_000):
        waiting = [i for i in range(n) if i not in started]
        running = [i for i in started if states[i] not in FINISHED]
        if not waiting and not running:
            break
        if waiting and (not running or rng.random() < 0.6):
            i = rng.choice(waiting)
            if gate_open(states, i, limit):
                started.add(i)
                states[i] = "running"
            else:
                states[i] = "deferred"  # waits at the gate: still unfinished, holds no Ray resources
        else:
            states[rng.choice(running)] = rng.choice(["success", "failed"])
        peak = max(peak, sum(1 for i in started if states[i] not in FINISHED))
    assert peak <= limit
    assert all(states[i] in FINISHED for i in range(n)), "no deadlock: every task got a slot and finished"


FOOT = job_footprint([(1.0, 0.0, 1), (1.0, 0.0, 1)], preprocess_cpus=1.0, preprocess_min=1).to_dict()  # 4 CPUs


def test_max_in_flight_is_what_the_cluster_holds_unless_requested():
    nodes = [{"CPU": 0.0}, {"CPU": 8.0}, {"CPU": 8.0}]
    assert max_in_flight(FOOT, nodes, None)["max_in_flight"] == 4
    assert max_in_flight(FOOT, nodes, 2)["max_in_flight"] == 2
    high = max_in_flight(FOOT, nodes, 6)  # above what fits: honoured, the extra jobs queue at admission
    assert high["max_in_flight"] == 6 and high["cluster_fits"] == 4
    with pytest.raises(ClusterError, match=r"one partition job needs CPU:4 .* holds at most CPU:3"):
        max_in_flight(FOOT, [{"CPU": 3.0}], None)
    # an autoscaling cluster with only its 0-CPU head so far: an explicit bound is honoured
    assert max_in_flight(FOOT, [{"CPU": 0.0}], 3)["max_in_flight"] == 3


def test_nodes_from_the_state_api_and_from_a_raycluster_at_max_replicas():
    payload = {
        "data": {
            "result": {
                "result": [
                    {"state": "ALIVE", "resources_total": {"CPU": 4.0, "GPU": 1.0, "memory": 1e9}},
                    {"state": "DEAD", "resources_total": {"CPU": 64.0}},
                ]
            }
        }
    }
    assert nodes_from_state_api(payload) == [{"CPU": 4.0, "GPU": 1.0}]
    with pytest.raises(ClusterError, match="unexpected answer"):
        nodes_from_state_api({"data": {}})
    manifest = {
        "spec": {
            "workerGroupSpecs": [
                {
                    "maxReplicas": 2,
                    "rayStartParams": {},
                    "template": {"spec": {"containers": [{"resources": {"limits": {"cpu": "8000m"}}}]}},
                },
                {
                    "maxReplicas": 3,
                    "rayStartParams": {"num-cpus": "6"},
                    "template": {
                        "spec": {"containers": [{"resources": {"limits": {"cpu": "8", "nvidia.com/gpu": "1"}}}]}
                    },
                },
            ]
        }
    }
    assert nodes_from_raycluster(manifest) == [{"CPU": 8.0, "GPU": 0.0}] * 2 + [{"CPU": 6.0, "GPU": 1.0}] * 3


def test_live_nodes_rides_out_a_head_whose_state_api_is_not_up_yet(monkeypatch):
    """A fresh head drops or 5xx's state-API calls for a moment: retried within the wait, not fatal."""
    import httpx

    from airflow_ray import capacity
    from airflow_ray.cluster import ClusterHandle
    from airflow_ray.errors import RayJobsApiError
    from airflow_ray.hooks.ray_jobs import RayJobsClient

    answers = [
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        RayJobsApiError("HTTP 503", 503),
        {"data": {"result": {"result": []}}},
        {"data": {"result": {"result": [{"state": "ALIVE", "resources_total": {"CPU": 8.0}}]}}},
    ]

    def nodes(self):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(RayJobsClient, "nodes", nodes)
    handle = ClusterHandle(backend="local", name="c", dashboard_url="http://127.0.0.1:9")
    assert capacity.live_nodes(handle, wait_s=30, poll_s=0.01) == [{"CPU": 8.0}]
    answers[:] = [RayJobsApiError("HTTP 401", 401)]
    with pytest.raises(ClusterError, match="refused the node list"):
        capacity.live_nodes(handle, wait_s=30, poll_s=0.01)
