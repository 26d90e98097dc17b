"""Where a pool's actors go under admission: its reserved slots first, then outside (no Ray cluster)."""

from __future__ import annotations

from types import SimpleNamespace

from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ray_jobs.job.admission import PoolPlacement, Reservation, free_slot, task_cpus
from ray_jobs.job.footprint import job_footprint


def _group() -> SimpleNamespace:
    """A stand-in for a ready placement group (no cluster here): the options only carry it."""
    return SimpleNamespace(id=SimpleNamespace(hex=lambda: "00ff" * 7))


def test_free_slot_is_the_first_slot_no_live_actor_holds():
    assert free_slot("pg-stage0", 2, set()) == "pg-stage0-0"
    assert free_slot("pg-stage0", 2, {"pg-stage0-0", "pg-stage1-1"}) == "pg-stage0-1"
    assert free_slot("pg-stage0", 2, {"pg-stage0-0", "pg-stage0-1"}) is None


def test_actors_fill_the_reserved_slots_then_go_outside_and_a_released_slot_is_refilled():
    live: set[str] = set()
    place = PoolPlacement(_group(), bundle_index=1, slots=2, prefix="pg-stage0", live_names=lambda: live)
    names = []
    for _ in range(2):
        args = place()
        strategy = args["scheduling_strategy"]
        assert isinstance(strategy, PlacementGroupSchedulingStrategy)
        assert strategy.placement_group_bundle_index == 1 and not strategy.placement_group_capture_child_tasks
        live.add(args["name"])
        names.append(args["name"])
    assert names == ["pg-stage0-0", "pg-stage0-1"]
    assert place() == {}, "both slots held: an extra actor takes the operator's own options, outside the group"
    live.discard("pg-stage0-0")  # Ray Data released the reserved actor, not the extra one
    assert place()["name"] == "pg-stage0-0"


def test_tasks_run_in_their_own_bundle_and_pools_place_by_slot():
    fp = job_footprint([(1.0, 0.5, 2)], preprocess_cpus=0.5, preprocess_min=3)
    res = Reservation(_group(), fp, 0.0)
    read, write = res.remote_args("read"), res.remote_args("write")
    assert read["scheduling_strategy"].placement_group_bundle_index == fp.bundle("read")
    assert write["scheduling_strategy"].placement_group_bundle_index == fp.bundle("write")
    assert read["num_cpus"] == write["num_cpus"] == task_cpus(fp) == 0.25
    pool = res.remote_args("stage0")["ray_remote_args_fn"]
    assert (pool.bundle_index, pool.slots) == (fp.bundle("stage0"), 2)
    assert res.remote_args("preprocess")["ray_remote_args_fn"].slots == 3
    assert pool.prefix != res.remote_args("preprocess")["ray_remote_args_fn"].prefix
