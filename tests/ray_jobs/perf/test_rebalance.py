"""Rebalancing between partitions: the split measured on committed partitions, taken when it is
predicted to gain more than the threshold; the report's per-layout history."""

import pytest

from ray_jobs.config.settings import JobSettings, StageSettings
from ray_jobs.contract.marker import StageStat
from ray_jobs.model.stage_spec import StageResources, parse_spec, resolve
from ray_jobs.output.identity import OutputIdentity
from ray_jobs.perf.rebalance import (
    MeasuredPartition,
    choose_layout,
    layout_history,
    layout_of_spec,
    pooled_layer_costs,
    predicted_rate,
)

COUNTS = {"text": 4, "image": 6}
RES = StageResources(1.0, 0.0, 1, 1)


def _layout(spec):
    return resolve(parse_spec(spec, RES), COUNTS)


def _stats(layout, per_layer_s, rows=100, pre_busy=0.1):
    """What a partition running *layout* would record if each layer cost *per_layer_s* seconds a row."""
    out = [StageStat("preprocess", "op", rows, 4, pre_busy, pre_busy, pre_busy, 1, 1.0, 0.0, "")]
    for stage in layout.stages:
        busy = rows * sum(per_layer_s[r.tower][i] for r in stage.ranges for i in range(r.start, r.stop))
        layers = ",".join(r.spec() for r in stage.ranges)
        out.append(StageStat(stage.name, "op", rows, 4, busy, busy, busy, 1, 1.0, 0.0, layers))
    return tuple(out)


#: text layers cost 1 ms a row, image layers 3 ms: a text|image split is out of balance
COST = {"text": [0.001] * 4, "image": [0.003] * 6}
BAD = _layout("text:0-3|image:0-5")


def test_the_split_measured_on_earlier_partitions_replaces_a_bad_one():
    measured = [MeasuredPartition(i, BAD.spec(), _stats(BAD, COST)) for i in range(2)]
    choice = choose_layout(BAD, measured, min_gain=0.1)
    assert choice.changed and choice.measured_on == (0, 1)
    assert choice.layout.spec() != BAD.spec() and len(choice.layout.stages) == 2
    assert all(s.resources == RES for s in choice.layout.stages), "every stage keeps its resources"
    # measured: stage2 takes 18 ms a row; the best 2-way split of 4 + 18 ms is 10 | 12 ms
    assert choice.current_rows_per_s == pytest.approx(1 / 0.018)
    assert choice.predicted_rows_per_s == pytest.approx(1 / 0.012) and choice.gain == pytest.approx(0.5)
    assert choice.layout.spec().startswith("text:0-3,image:0-1@") and "+50%" in choice.line()


def test_a_balanced_or_barely_better_split_is_kept():
    best = choose_layout(BAD, [MeasuredPartition(0, BAD.spec(), _stats(BAD, COST))], 0.1).layout
    measured = [MeasuredPartition(0, best.spec(), _stats(best, COST))]
    kept = choose_layout(best, measured, 0.1)
    assert not kept.changed and "already the balanced split" in kept.reason
    high = choose_layout(BAD, [MeasuredPartition(0, BAD.spec(), _stats(BAD, COST))], min_gain=0.5)
    assert not high.changed and "below the 50% threshold" in high.reason and high.layout is BAD


def test_the_choice_balances_the_model_stages_and_says_when_preprocessing_bounds_the_pipeline():
    slow_pre = [MeasuredPartition(0, BAD.spec(), _stats(BAD, COST, pre_busy=3.0))]  # 33 rows/s < any split
    choice = choose_layout(BAD, slow_pre, 0.1, preprocess_actors=2)
    assert choice.changed and choice.gain == pytest.approx(0.5)
    assert "bound by preprocessing at 66.7 rows/s" in choice.line()
    assert choice.to_dict()["preprocess_rows_per_s"] == pytest.approx(66.6667, abs=1e-3)


def test_nothing_to_rebalance_without_stages_or_statistics():
    one = _layout("text,image")
    assert not choose_layout(one, [MeasuredPartition(0, one.spec(), _stats(one, COST))], 0.1).changed
    assert "no committed partition" in choose_layout(BAD, [], 0.1).reason
    assert "no committed partition" in choose_layout(BAD, [MeasuredPartition(0, BAD.spec(), ())], 0.1).reason


def test_costs_pool_over_layouts_and_spread_by_the_prior():
    other = _layout("text:0-3,image:0-1|image:2-5")
    measured = [
        MeasuredPartition(0, BAD.spec(), _stats(BAD, COST)),
        MeasuredPartition(1, other.spec(), _stats(other, COST)),
    ]
    prior = {"text": [1.0] * 4, "image": [3.0] * 6}
    costs = pooled_layer_costs(measured, prior)
    assert costs["text"] == pytest.approx(COST["text"]) and costs["image"] == pytest.approx(COST["image"])
    even = pooled_layer_costs(measured[1:])  # without a prior: stage1's 10 ms spread evenly over 6 layers
    assert even["text"][0] == pytest.approx(0.010 / 6)
    assert predicted_rate(BAD, costs) == pytest.approx(1 / 0.018)


def test_the_layout_is_not_part_of_the_output_identity():
    key = OutputIdentity.of("m", StageSettings(), JobSettings()).key
    for stage in (
        StageSettings(num_stages=2),
        StageSettings(auto_stages=BAD.spec(), max_stage_memory="1GiB", rebalance_min_gain=None),
    ):
        assert OutputIdentity.of("m", stage, JobSettings()).key == key


def test_the_report_shows_each_layout_its_partitions_and_gains():
    better = choose_layout(BAD, [MeasuredPartition(0, BAD.spec(), _stats(BAD, COST))], 0.1).layout
    faster = {"text": [0.001] * 4, "image": [0.0028] * 6}  # the new split measured a little better than predicted
    ran = [
        MeasuredPartition(0, BAD.spec(), _stats(BAD, COST)),
        MeasuredPartition(1, BAD.spec(), _stats(BAD, COST)),
        MeasuredPartition(2, better.spec(), _stats(better, faster)),
        MeasuredPartition(3, better.spec(), _stats(better, faster)),
    ]
    rows, lines = layout_history(ran)
    assert [r["partitions"] for r in rows] == [[0, 1], [2, 3]]
    assert rows[1]["predicted_gain"] == pytest.approx(0.5, rel=1e-3)
    assert rows[1]["measured_gain"] > rows[1]["predicted_gain"]
    assert "| 2 | 2-3 |" in lines[-1] and better.spec() in lines[-1]
    assert layout_of_spec(better.spec()).spec() == better.spec()
