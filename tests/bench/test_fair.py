"""The fair benchmarks' pure logic: steady-state rates, medians and spread, variant choice, run order."""

from __future__ import annotations

import pytest

from bench.fair import (
    BenchError,
    Spread,
    TorchVariant,
    alternating,
    best_variant,
    data_parallel_rate,
    ratio,
    shard,
    steady_rate,
    torch_variants,
)


def test_spread_is_median_min_max():
    s = Spread.of([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.low, s.high, s.samples) == (2.5, 1.0, 10.0, 4)
    assert "median of 4" in s.text() and "1.00-10.00" in s.text()


def test_spread_refuses_no_samples_and_negative_rates():
    with pytest.raises(BenchError):
        Spread.of([])
    with pytest.raises(BenchError):
        Spread.of([1.0, -1.0])


def test_best_variant_is_highest_median_not_highest_single_run():
    results = {"1x2": [10.0, 10.0, 100.0], "2x1": [20.0, 19.0, 21.0]}
    name, spread = best_variant(results)
    assert name == "2x1"
    assert (spread.median, spread.low, spread.high) == (20.0, 19.0, 21.0)


def test_best_variant_tie_keeps_first_given():
    assert best_variant({"a": [5.0], "b": [5.0]})[0] == "a"
    with pytest.raises(BenchError):
        best_variant({})


def test_cpu_variants_are_one_process_all_threads_and_data_parallel():
    assert torch_variants(2, 16, cuda=False) == (TorchVariant(1, 2, 16), TorchVariant(2, 1, 16))
    assert torch_variants(1, 16, cuda=False) == (TorchVariant(1, 1, 16),)


def test_cuda_variants_are_the_single_card_loop_at_several_batch_sizes():
    assert [v.batch for v in torch_variants(16, 32, cuda=True)] == [32, 64, 128]
    assert all(v.procs == 1 for v in torch_variants(16, 32, cuda=True))
    assert [v.batch for v in torch_variants(16, 32, cuda=True, batches=(8, 8, 256))] == [8, 256]


def test_variant_settings_are_checked():
    with pytest.raises(BenchError):
        TorchVariant(0, 1, 16)
    with pytest.raises(BenchError):
        torch_variants(0, 16, cuda=False)


def test_steady_rate_excludes_warmup_batches():
    times = [10.0, 11.0, 12.0, 13.0, 14.0]  # the first batch took 10 s (start-up); then 1 s each
    sizes = [8, 8, 8, 8, 4]
    # window opens when warm-up batch 2 (index 1) arrives: batches 2..4 = 20 rows in 3 s
    assert steady_rate(times, sizes, warmup=2) == pytest.approx(20 / 3)
    assert steady_rate(times, sizes, warmup=0) == steady_rate(times, sizes, warmup=1) == pytest.approx(28 / 4)


def test_steady_rate_needs_batches_after_warmup():
    with pytest.raises(BenchError):
        steady_rate([1.0, 2.0, 3.0], [1, 1, 1], warmup=3)
    with pytest.raises(BenchError):
        steady_rate([1.0, 2.0], [1], warmup=0)
    with pytest.raises(BenchError):
        steady_rate([1.0, 1.0], [1, 1], warmup=0)


def test_data_parallel_rate_uses_the_slowest_process():
    assert data_parallel_rate([(100, 10.0), (120, 12.0)]) == pytest.approx(220 / 12)
    with pytest.raises(BenchError):
        data_parallel_rate([])


def test_shards_cover_all_rows_once():
    parts = [shard(10, 3, i) for i in range(3)]
    assert [list(p) for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    with pytest.raises(BenchError):
        shard(10, 3, 3)


def test_alternating_order():
    assert alternating(2) == [(1, "pipeline"), (1, "torch"), (2, "pipeline"), (2, "torch")]
    with pytest.raises(BenchError):
        alternating(0)


def test_ratio():
    assert ratio(9.0, 10.0) == pytest.approx(0.9)
    with pytest.raises(BenchError):
        ratio(1.0, 0.0)
