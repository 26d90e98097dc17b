"""The in-flight gate's rule (pure) and the capacity computation from a cluster's nodes."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from airflow_ray.capacity import max_in_flight, nodes_from_raycluster, nodes_from_state_api
from airflow_ray.errors import ClusterError
from airflow_ray.triggers.in_flight_gate import (
    FINISHED,
    GateBoard,
    InFlightGateTrigger,
    gate_open,
    join_board,
    leave_board,
    mapped_states,
    may_start_now,
    slot_wait_bound,
    unfinished_ahead,
)
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


FOOT = job_footprint([(1.0, 0.0, 1), (1.0, 0.0, 1)], preprocess_cpus=1.0, preprocess_min=1).to_dict()  # 3.9501 CPUs


def test_max_in_flight_is_what_the_cluster_holds_unless_requested():
    nodes = [{"CPU": 0.0}, {"CPU": 8.0}, {"CPU": 8.0}]
    assert max_in_flight(FOOT, nodes, None)["max_in_flight"] == 4
    assert max_in_flight(FOOT, nodes, 2)["max_in_flight"] == 2
    high = max_in_flight(FOOT, nodes, 6)  # above what fits: honoured, the extra jobs queue at admission
    assert high["max_in_flight"] == 6 and high["cluster_fits"] == 4
    with pytest.raises(ClusterError, match=r"one partition job needs CPU:3.9501 .* holds at most CPU:3"):
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
    assert capacity.live_nodes("http://127.0.0.1:9", None, wait_s=30, poll_s=0.01) == [{"CPU": 8.0}]
    answers[:] = [RayJobsApiError("HTTP 401", 401)]
    with pytest.raises(ClusterError, match="refused the node list"):
        capacity.live_nodes("http://127.0.0.1:9", None, wait_s=30, poll_s=0.01)


# ---------------------------------------------------------------------------------------------- cost
class _Counted:
    """The supervisor channel's two calls over a run's states, counting what each call reads."""

    def __init__(self, states: dict[int, str | None]):
        self.states = states
        self.counts = 0
        self.rows_read = 0

    def count(self, dag_id, run_id, task_id) -> int:
        self.counts += 1
        return sum(1 for s in self.states.values() if s in FINISHED)

    def read(self, dag_id, run_id, task_id) -> dict[int, str | None]:
        self.rows_read += len(self.states)
        return dict(self.states)


def _board(api: _Counted, max_age_s: float = 5.0) -> GateBoard:
    return GateBoard("d", "r", "embed", max_age_s, count_fn=api.count, states_fn=api.read)


@pytest.mark.parametrize("seed", range(10))
def test_the_board_answers_as_the_rule_does_for_every_index(seed):
    rng = random.Random(seed)
    n, limit = rng.randint(1, 60), rng.randint(1, 8)
    states = {
        i: rng.choice([None, "scheduled", "deferred", "running", "success", "failed", "up_for_retry"]) for i in range(n)
    }
    board = _board(_Counted(states), max_age_s=0)
    for i in range(n):
        got = asyncio.run(board.unfinished_below(i, limit))
        assert (got < limit) == gate_open(states, i, limit), (i, got, unfinished_ahead(states, i))


def test_a_poll_of_a_thousand_waiting_gates_reads_one_count_and_no_state():
    """1,000 map indices, 16 in flight, 984 waiting: one poll cycle of every waiting gate costs
    one COUNT and no read of the 1,000 states (each gate is proved closed by the count); the
    cycle after a job finished reads the states once, for the one gate at the frontier."""
    n, limit = 1000, 16
    states: dict[int, str | None] = {i: ("running" if i < limit else "deferred") for i in range(n)}
    api = _Counted(states)
    board = _board(api, max_age_s=60)

    async def cycle() -> list[int]:
        return [await board.unfinished_below(i, limit) for i in range(limit, n)]

    assert all(a >= limit for a in asyncio.run(cycle()))
    assert (api.counts, api.rows_read) == (1, 0)
    states[3] = "success"  # a job finished: index 16 may start
    board.counted_at = float("-inf")  # the poll interval has passed
    ahead = asyncio.run(cycle())
    assert ahead[0] == limit - 1 and all(a >= limit for a in ahead[1:])
    assert (api.counts, api.rows_read) == (2, n), "one COUNT, one read of the states, for 984 gates"
    asyncio.run(cycle())  # within the poll interval: nothing asked again
    assert (api.counts, api.rows_read) == (2, n)


def test_gates_of_one_task_in_one_process_share_one_board():
    async def two():
        a = join_board("d", "r", "embed", 5.0)
        b = join_board("d", "r", "embed", 2.0)
        other = join_board("d", "r2", "embed", 5.0)
        assert a is b and a.max_age_s == 2.0 and other is not a
        for board in (a, b, other):
            leave_board(board)

    asyncio.run(two())
    from airflow_ray.triggers import in_flight_gate

    assert in_flight_gate._BOARDS == {}, "a board goes when its last gate does"


def test_a_gate_trigger_opens_when_the_count_lets_it(monkeypatch):
    from airflow_ray.triggers import in_flight_gate

    states: dict[int, str | None] = {0: "running", 1: "deferred", 2: "deferred"}
    api = _Counted(states)
    monkeypatch.setattr(in_flight_gate, "fetch_finished_count", api.count)
    monkeypatch.setattr(in_flight_gate, "fetch_states", api.read)

    async def run_gate() -> dict:
        trigger = InFlightGateTrigger("d", "r", "embed", map_index=2, limit=1, poll_interval=0.01)
        task = asyncio.ensure_future(trigger.run().__anext__())
        await asyncio.sleep(0.1)
        assert not task.done()
        states[0], states[1] = "success", "success"
        return (await asyncio.wait_for(task, 5)).payload

    assert asyncio.run(run_gate())["status"] == "open"
    # closed with a deadline already passed: times out, naming how many are ahead
    states.update({0: "running", 1: "deferred"})
    timed_out = asyncio.run(
        InFlightGateTrigger("d", "r", "embed", 2, 1, 0.01, deadline=time.time() - 1).run().__anext__()
    )
    assert timed_out.payload["status"] == "timeout" and timed_out.payload["ahead"] >= 1


def test_the_worker_side_check_reads_the_states_only_near_the_frontier(monkeypatch):
    from airflow_ray.triggers import in_flight_gate

    states = {i: ("running" if i < 4 else None) for i in range(100)}
    api = _Counted(states)
    monkeypatch.setattr(in_flight_gate, "fetch_finished_count", api.count)
    monkeypatch.setattr(in_flight_gate, "fetch_states", api.read)
    assert may_start_now("d", "r", "embed", 2, 4) == (True, 0) and api.counts == 0  # below the limit: no call
    assert may_start_now("d", "r", "embed", 50, 4) == (False, 50) and api.rows_read == 0
    states[1] = "success"
    assert may_start_now("d", "r", "embed", 4, 4) == (True, 3) and api.rows_read == 100


def test_the_slot_wait_bound_covers_the_queue_ahead():
    assert slot_wait_bound(5, 1, 600.0, tries=1, slack_s=0) == 3000.0  # 5 waves of one 600 s job
    assert slot_wait_bound(5, 1, 600.0, tries=2, slack_s=0) == 6000.0  # each may be tried twice
    assert slot_wait_bound(1023, 256, 6 * 3600.0, slack_s=0) == 4 * 6 * 3600.0
    assert slot_wait_bound(0, 4, 60.0) == 600.0
    with pytest.raises(ValueError):
        slot_wait_bound(3, 0, 60.0)
