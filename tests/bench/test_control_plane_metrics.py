"""The pure figures of bench/control_plane_scale.py: delays, the ideal schedule, /proc CPU
accounting, the embed phase and the extrapolation."""

from __future__ import annotations

import os

import pytest

from bench.control_plane_metrics import (
    MetricsError,
    ProcStat,
    ScaleFigures,
    descendants,
    embed_phase,
    ideal_makespan,
    parse_proc_stat,
    peak_concurrent,
    percentile,
    read_stats,
    seeded_delays,
    tree_cpu_ticks,
)


def test_seeded_delays_are_reproducible_and_within_bounds():
    a = seeded_delays(50, 2.0, 9.0, seed=7)
    assert a == seeded_delays(50, 2.0, 9.0, seed=7) and a != seeded_delays(50, 2.0, 9.0, seed=8)
    assert len(a) == 50 and all(2.0 <= d <= 9.0 for d in a)
    with pytest.raises(MetricsError, match="min delay"):
        seeded_delays(3, 5.0, 1.0, seed=0)
    with pytest.raises(MetricsError, match="at least one"):
        seeded_delays(0, 1.0, 2.0, seed=0)


def test_ideal_makespan_schedules_greedily_in_index_order():
    # limit 2: slots [0,5) [0,1); job 2 (4 s) takes the slot free at 1 -> 5; job 3 (2 s) at 5 -> 7
    assert ideal_makespan([5, 1, 4, 2], limit=2) == 7
    assert ideal_makespan([5, 1, 4, 2], limit=1) == 12  # one chain: the sum
    assert ideal_makespan([5, 1, 4, 2], limit=10) == 5  # all at once: the slowest job
    assert ideal_makespan([3.0] * 8, limit=4) == 6.0
    with pytest.raises(MetricsError, match="limit"):
        ideal_makespan([1.0], limit=0)


def test_peak_concurrent_closes_an_interval_before_one_opening_at_the_same_instant():
    assert peak_concurrent([(0, 2), (2, 4), (4, 6)]) == 1
    assert peak_concurrent([(0, 5), (1, 2), (1.5, 3), (4, 6)]) == 3
    assert peak_concurrent([]) == 0


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 21)]
    assert percentile(values, 50) == 10.0 and percentile(values, 95) == 19.0 and percentile(values, 100) == 20.0
    with pytest.raises(MetricsError):
        percentile([], 50)


def test_proc_stat_fields_are_counted_from_the_last_parenthesis():
    # a command name holding spaces and ")" ; utime 11, stime 22, cutime 33, cstime 44
    line = "4242 (airflow ) worker) S 17 4242 4242 0 -1 4194560 100 0 0 0 11 22 33 44 20 0 3 0 5000 0 0"
    assert parse_proc_stat(line) == ProcStat(pid=4242, ppid=17, own_ticks=33, children_ticks=77)
    with pytest.raises(MetricsError):
        parse_proc_stat("not a stat line")
    with pytest.raises(MetricsError):
        parse_proc_stat("1 (x) S 0 1")


def test_tree_cpu_sums_live_descendants_with_the_children_they_reaped():
    stats = {
        1: ProcStat(1, 0, 1000, 0),
        10: ProcStat(10, 1, 5, 100),  # the root: reaped children's 100 ticks count
        11: ProcStat(11, 10, 7, 0),
        12: ProcStat(12, 11, 3, 2),
        20: ProcStat(20, 1, 50, 0),  # a sibling tree: not counted
    }
    assert descendants(stats, 10) == {10, 11, 12}
    assert tree_cpu_ticks(stats, 10) == 5 + 100 + 7 + 3 + 2
    assert tree_cpu_ticks(stats, 999) == 0


def test_read_stats_sees_this_process_and_its_parent():
    stats = read_stats()
    me = stats[os.getpid()]
    assert me.ppid == os.getppid() and os.getpid() in descendants(stats, os.getppid())


def _ti(k, state, start, end):
    return {"task_id": "embed", "map_index": k, "state": state, "start_date": start, "end_date": end}


def test_embed_phase_is_first_start_to_last_end_and_refuses_unfinished_runs():
    tis = [
        _ti(0, "success", "2026-11-29T10:00:00Z", "2026-11-29T10:00:30Z"),
        _ti(1, "success", "2026-11-29T10:00:02+00:00", "2026-11-29T10:01:10.500000Z"),
        _ti(2, "failed", "2026-11-29T10:00:01Z", "2026-11-29T10:00:40Z"),
        {"task_id": "validate", "map_index": -1, "state": "failed", "start_date": "2026-11-29T10:05:00Z"},
    ]
    phase = embed_phase(tis)
    assert phase.wall_s == pytest.approx(70.5) and phase.tasks == 3 and phase.succeeded == 2
    with pytest.raises(MetricsError, match="unfinished"):
        embed_phase([*tis, _ti(3, "deferred", "2026-11-29T10:00:03Z", None)])
    with pytest.raises(MetricsError, match="no 'embed'"):
        embed_phase(tis[3:])


def test_overhead_per_partition_and_the_linear_extrapolation():
    f = ScaleFigures(partitions=200, limit=16, wall_s=500.0, ideal_s=300.0, triggerer_cpu_s=80.0, scheduler_cpu_s=40.0)
    assert f.overhead_s == 200.0 and f.overhead_per_partition_s == 1.0
    x = f.extrapolate(1000, ideal_s=1500.0)
    assert x == {
        "partitions": 1000,
        "ideal_s": 1500.0,
        "overhead_s": 1000.0,
        "wall_s": 2500.0,
        "triggerer_cpu_s": 400.0,
        "scheduler_cpu_s": 200.0,
    }
    with pytest.raises(MetricsError):
        ScaleFigures(partitions=0, limit=1, wall_s=1, ideal_s=1, triggerer_cpu_s=0, scheduler_cpu_s=0)


def test_the_scale_bench_names_each_figure_over_its_bound():
    from bench.control_plane_scale import over_bounds

    f = ScaleFigures(partitions=1000, limit=16, wall_s=1800.0, ideal_s=1300.0, triggerer_cpu_s=250.0, scheduler_cpu_s=1)
    res = {"config": {"max_triggerer_cpu_s": 0.3, "max_overhead_s": 0.5}, "figures": f}
    assert over_bounds(res) == []  # 0.25 s of triggerer CPU and 0.5 s of overhead per partition
    res["config"] = {"max_triggerer_cpu_s": 0.2, "max_overhead_s": 0.4}
    assert over_bounds(res) == [
        "triggerer CPU 0.250 s per partition > 0.2",
        "wall overhead 0.500 s per partition > 0.4",
    ]
    res["config"] = {"max_triggerer_cpu_s": None, "max_overhead_s": None}
    assert over_bounds(res) == []
