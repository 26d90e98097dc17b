"""The capacity model: replicas, partitions, wall time and object-store requests, by hand."""

import math

import pytest

from ray_jobs.errors import UsageError
from ray_jobs.perf.capacity_model import DatasetSize, Hardware, Prices, RunShape, plan_capacity
from ray_jobs.perf.stage_balance import StageRate

GPU_RATES = [
    StageRate("preprocess", 50.0, 1.0, 0.0),
    StageRate("stage1", 400.0, 1.0, 1.0, layers="text:0-11"),
    StageRate("stage2", 200.0, 1.0, 1.0, layers="image:0-11"),
]


def test_one_job_per_node_with_balanced_pools_and_the_fewest_nodes_that_fit():
    data = DatasetSize(rows=100_000_000, image_bytes=100_000_000 * 100_000)
    hw = Hardware(cpus_per_node=32, gpus_per_node=6, reserved_cpus=2)
    run = RunShape(window_h=8, partition_rows=1_000_000, startup_s=60)
    plan = plan_capacity(GPU_RATES, data, hw, run)
    by = {s.name: s for s in plan.stages}
    # 30 usable CPUs, 6 GPUs: stage2 gets 4 GPUs, stage1 2 -> 800 rows/s; preprocess 16 actors -> 800
    assert (by["stage1"].actors_per_replica, by["stage2"].actors_per_replica) == (2, 4)
    assert by["preprocess"].actors_per_replica == 16
    assert plan.replica_rows_per_s == 800.0
    per_partition = 1_000_000 / 800 + 60
    waves = math.floor(8 * 3600 / per_partition)
    assert plan.partitions == 100 and plan.replicas == math.ceil(100 / waves) and plan.fits
    assert plan.wall_s == pytest.approx(math.ceil(100 / plan.replicas) * per_partition)
    assert plan.wall_s <= 8 * 3600
    assert by["stage2"].gpus == 4 * plan.replicas
    assert plan.image_mb_per_s_per_node == pytest.approx(800 * 100_000 / 1e6)


def test_requests_count_one_get_per_image_and_multipart_puts_per_file():
    run = RunShape(partition_rows=1_000_000, rows_per_file=100_000, embed_dim=512)
    plan = plan_capacity(GPU_RATES, DatasetSize(10_000_000, 10**12), Hardware(32, 6), run, Prices())
    actors = sum(s.actors_per_replica for s in plan.stages)
    assert plan.gets == 10_000_000 + 10 * (run.gets_per_partition + actors * run.gets_per_actor_start)
    file_bytes = 100_000 * (2 * 512 * 4 + 32)
    puts_per_file = math.ceil(file_bytes / run.upload_block_bytes) + 2
    assert plan.puts == 10 * (10 * puts_per_file + run.puts_per_partition)
    assert plan.request_cost == pytest.approx(plan.gets / 1000 * 0.0004 + plan.puts / 1000 * 0.005)


def test_partitions_are_capped_and_grow_instead():
    plan = plan_capacity(GPU_RATES, DatasetSize(10_000_000, 10**12), Hardware(32, 6), RunShape(max_partitions=4))
    assert plan.partitions == 4 and plan.rows_per_partition == 2_500_000


def test_a_window_too_short_for_one_partition_says_so():
    plan = plan_capacity(GPU_RATES, DatasetSize(10_000_000, 10**12), Hardware(32, 6), RunShape(window_h=0.1))
    assert not plan.fits and plan.replicas == plan.partitions
    assert any("does NOT fit" in line for line in plan.lines())


def test_cpu_only_stages_use_cpu_nodes_and_the_cpu_price():
    rates = [StageRate("preprocess", 50.0), StageRate("stage1", 100.0, layers="text:0-3,image:0-5")]
    plan = plan_capacity(rates, DatasetSize(1_000_000, 10**11), Hardware(16, 0, 1), RunShape(), Prices(cpu_hour=0.1))
    assert not plan.gpu_nodes and sum(s.gpus for s in plan.stages) == 0
    assert plan.compute_cost == pytest.approx(plan.node_hours * 16 * 0.1)


def test_inputs_are_validated():
    with pytest.raises(UsageError, match="rows"):
        DatasetSize(0, 1)
    with pytest.raises(UsageError, match="window_h"):
        RunShape(window_h=0)
    with pytest.raises(UsageError, match="leaves no CPU"):
        Hardware(cpus_per_node=2, reserved_cpus=2)
    with pytest.raises(UsageError, match="gpus-per-node is 0"):
        plan_capacity(GPU_RATES, DatasetSize(1, 1), Hardware(32, 0))


def test_a_nightly_run_embeds_the_changed_rows_and_their_partitions_neighbours():
    from ray_jobs.perf.capacity_model import nightly_work_fraction

    assert nightly_work_fraction(0.02, 1_000_000, 1_000_000) == pytest.approx(0.04)  # a partition per file
    assert nightly_work_fraction(0.01, 1_000_000, 250_000) == pytest.approx(0.05)  # 4 files per partition
    assert nightly_work_fraction(0.3, 1_000_000, 100_000) == 1.0  # bounded by a full run
    assert nightly_work_fraction(0.0, 1_000_000, 1_000_000) == 0.0
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(UsageError, match="--daily-change"):
            nightly_work_fraction(bad, 1_000_000, 1_000_000)


def test_the_nightly_plan_sizes_the_changed_work_within_the_same_window():
    from ray_jobs.perf.capacity_model import plan_nightly

    data = DatasetSize(rows=2_000_000_000, image_bytes=2_000_000_000 * 100_000)
    hw, run = Hardware(cpus_per_node=32, gpus_per_node=6, reserved_cpus=2), RunShape(window_h=8.0)
    full = plan_capacity(GPU_RATES, data, hw, run)
    fraction, nightly = plan_nightly(GPU_RATES, data, 0.02, 1_000_000, hw, run)
    assert fraction == pytest.approx(0.04)
    assert nightly.dataset.rows == 80_000_000 and nightly.dataset.image_bytes == 80_000_000 * 100_000
    assert nightly.partitions == 80 and nightly.replica_rows_per_s == full.replica_rows_per_s
    assert nightly.node_hours < 0.1 * full.node_hours and nightly.gets < 0.05 * full.gets
    _, everything = plan_nightly(GPU_RATES, data, 1.0, 1_000_000, hw, run)
    assert everything.partitions == full.partitions and everything.node_hours == full.node_hours
