"""Stage balance: per-actor rates, the bottleneck, the exact re-split and pool sizing."""

import itertools

import pytest

from ray_jobs.contract.marker import StageStat
from ray_jobs.errors import UsageError
from ray_jobs.perf.stage_balance import (
    StageRate,
    allocate_pools,
    balanced_split,
    bottleneck,
    layer_costs_from_rates,
    merge_stage_stats,
    pipeline_rate,
    rates_from_stats,
    recommend,
)


def _stat(name, rows, busy, actors=1, layers="", cpus=1.0):
    return StageStat(name, f"op-{name}", rows, 4, busy, busy, busy, actors, cpus, 0.0, layers)


STATS = (
    _stat("read", 100, 0.5, 0),
    _stat("preprocess", 100, 1.0),
    _stat("stage1", 100, 4.0, layers="text:0-3"),
    _stat("stage2", 100, 1.0, layers="image:0-3"),
    _stat("write", 100, 0.1, 0),
)


def _best_split_brute_force(costs, k):
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_balanced_split_is_the_exact_minimum_of_the_slowest_stage(k):
    costs = {"text": [5.0, 1.0, 1.0, 7.0], "image": [2.0, 2.0, 9.0, 1.0, 3.0]}
    split = balanced_split(costs, k)
    assert len(split) == k
    flat = costs["text"] + costs["image"]
    assert max(s.seconds_per_row for s in split) == pytest.approx(_best_split_brute_force(flat, k))
    assert sum(s.seconds_per_row for s in split) == pytest.approx(sum(flat)), "every layer in exactly one stage"


def test_rates_are_rows_per_busy_second_of_one_actor_and_skip_task_operators():
    rates = rates_from_stats(STATS)
    assert [r.name for r in rates] == ["preprocess", "stage1", "stage2"]
    assert [r.rows_per_s for r in rates] == [100.0, 25.0, 100.0]


def test_the_bottleneck_is_the_slowest_pool_counting_its_actors():
    rates = rates_from_stats(STATS)
    assert bottleneck(rates).name == "stage1"
    doubled = [StageRate("stage1", 25.0, actors=5, layers="text:0-3"), StageRate("stage2", 100.0, layers="image:0-3")]
    assert bottleneck(doubled).name == "stage2"


def test_pools_grow_the_slowest_stage_first_within_the_budget():
    rates = [StageRate("preprocess", 100.0), StageRate("stage1", 25.0), StageRate("stage2", 50.0)]
    counts = allocate_pools(rates, cpus=7)
    assert counts == (1, 4, 2) and pipeline_rate(rates, counts) == 100.0
    with pytest.raises(UsageError, match="one actor per stage needs 3 CPUs"):
        allocate_pools(rates, cpus=2)


def test_gpu_stages_are_sized_by_gpus():
    rates = [StageRate("preprocess", 300.0), StageRate("stage1", 100.0, 1, 1), StageRate("stage2", 200.0, 1, 1)]
    assert allocate_pools(rates, cpus=32, gpus=3) == (1, 2, 1)


def test_layer_costs_spread_a_stages_cost_over_its_layers():
    costs = layer_costs_from_rates(rates_from_stats(STATS))
    assert costs == {"text": [0.01] * 4, "image": [0.0025] * 4}


def test_recommendation_moves_layers_off_the_bottleneck_and_prints_the_spec():
    rec = recommend(rates_from_stats(STATS))
    assert rec.bottleneck == "stage1" and rec.measured_rows_per_s == 25.0
    # same budget as measured (3 CPUs): the text tower's cost spread over two stages
    assert rec.spec.startswith("text:0-1@cpus=1,gpus=0,pool=1-1|text:2-3,image:0-3@")
    assert rec.rows_per_s == pytest.approx(1 / 0.03)  # 0.05 s per row in all, no split beats 0.03
    bigger = recommend(rates_from_stats(STATS), cpus=8)
    assert bigger.rows_per_s > rec.rows_per_s and bigger.preprocess_pool >= 1
    text = "\n".join(bigger.lines())
    assert "**bottleneck**" in text and f"--stages '{bigger.spec}'" in text


def test_merge_sums_partitions_by_stage_name():
    merged = {s.name: s for s in merge_stage_stats([STATS, STATS])}
    assert merged["stage1"].rows == 200 and merged["stage1"].busy_s == 8.0
    assert rates_from_stats(tuple(merged.values()))[1].rows_per_s == 25.0


def test_bad_rates_are_refused_with_the_stage_named():
    with pytest.raises(UsageError, match="stage1: rows/s per actor"):
        StageRate("stage1", 0.0)
    with pytest.raises(UsageError, match="no model stage"):
        rates_from_stats((_stat("preprocess", 10, 1.0),))
