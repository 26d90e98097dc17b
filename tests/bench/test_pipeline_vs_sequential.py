"""The model-parallel bench's pure logic: batches in flight per variant, the ideal gain, the
measured balanced split, and how the whole-job bench passes the job its layout."""

from __future__ import annotations

import argparse

import pytest

from bench.fair import BenchError
from bench.job_vs_torch import _num_stages, _setting, job_layout
from bench.pipeline_vs_sequential import balanced_layout, source_rows, stage_costs
from bench.stage_chain import ChainVariant, ideal_speedup, micro_batch_depth
from ray_jobs.model.stage_spec import StageResources


class _Counts:
    """A checkpoint's layer counts, all a layout needs of it."""

    def layer_counts(self) -> dict[str, int]:
        return {"text": 4, "image": 6}


def test_sequential_keeps_one_batch_in_flight_and_the_micro_batch_pipeline_two_per_worker():
    assert ChainVariant(1).name == "torch sequential model parallel"
    assert micro_batch_depth(2) == 4
    assert ChainVariant(micro_batch_depth(2)).name == "torch micro-batch pipeline (4 in flight)"
    with pytest.raises(BenchError):
        ChainVariant(0)
    with pytest.raises(BenchError):
        micro_batch_depth(0)


def test_a_perfect_pipeline_gains_the_sum_of_the_stages_over_the_slowest():
    assert ideal_speedup([1.0, 1.0]) == 2.0
    assert ideal_speedup([3.0, 1.0]) == pytest.approx(4 / 3)
    with pytest.raises(BenchError):
        ideal_speedup([])
    with pytest.raises(BenchError):
        ideal_speedup([0.0, 0.0])


def test_the_split_balances_measured_costs_so_cheap_text_layers_join_image_layers():
    # short captions: text layers nearly free, image layers 1 s each -> 3 image layers per stage
    costs = {"text": [0.01] * 4, "image": [1.0] * 6}
    layout = balanced_layout(_Counts(), costs, 2, StageResources(num_cpus=1))
    assert [[r.spec() for r in s.ranges] for s in layout.stages] == [["text:0-3", "image:0-2"], ["image:3-5"]]
    assert stage_costs(layout, costs) == pytest.approx([3.04, 3.0])
    assert all(s.resources.num_cpus == 1 for s in layout.stages)


def test_the_job_gets_an_explicit_spec_else_a_stage_count_or_auto_else_its_default():
    assert job_layout(None, None) == ()
    assert job_layout("auto", None) == (("num_stages", "auto"),)
    assert job_layout(2, "text|image") == (("stages", "text|image"),)
    assert _num_stages("auto") == "auto" and _num_stages("3") == 3
    for bad in ("0", "two"):
        with pytest.raises(argparse.ArgumentTypeError):
            _num_stages(bad)


def test_job_settings_by_name_take_numbers_pools_and_text():
    assert _setting("batch_size=16") == ("batch_size", 16)
    assert _setting("stage_num_cpus=0.5") == ("stage_num_cpus", 0.5)
    name, pool = _setting("stage_pool=2-2")
    assert name == "stage_pool" and tuple(pool) == (2, 2)
    assert _setting("max_stage_memory=4GiB") == ("max_stage_memory", "4GiB")
    with pytest.raises(argparse.ArgumentTypeError):
        _setting("no-equals-sign")


def test_the_pipeline_source_holds_a_few_times_what_the_steady_window_takes():
    # 30 s at 1.5 s per batch: 20 batches; 3x that, plus 3 warm-up and 8 in flight
    assert source_rows(16, 3, 30.0, 1.5) == 16 * (60 + 3 + 8)
    with pytest.raises(BenchError):
        source_rows(16, 3, 30.0, 0.0)
