"""Pools reserve their minimum and grow past it, on a real local Ray (``ray_session``, 6 CPUs).

The pipeline is a stand-in shaped like a partition job's: read tasks, a light first pool, a
slow stage pool, write tasks, each placed by a real reservation (:func:`admission.reserve`,
:meth:`Reservation.remote_args`) exactly as :func:`ray_jobs.job.pipeline.admitted` wires it.
The slow stage's per-batch cost is a sleep, a stand-in for a model stage: its actors wait
instead of computing, so more of them help even on a 2-core machine."""

from __future__ import annotations

import contextlib
import time

import pytest

from ray_jobs.job.admission import reserve
from ray_jobs.job.footprint import job_footprint

pytestmark = pytest.mark.integration

ROWS, BATCH, SLEEP_S = 1600, 4, 0.05  # one slow actor: 80 rows/s at most; four: 320


class Light:
    def __call__(self, batch):
        return batch


class Slow:
    def __call__(self, batch):
        time.sleep(SLEEP_S)
        return batch


def _run(rows: int, reserved: int, pool: tuple[int, int], hold_rest: bool = False) -> float:
    """Rows/s of the stand-in job over *rows* rows with the slow stage reserved at *reserved*
    actors and its pool at *pool* (min, max). *hold_rest*: another reservation holds every CPU
    this job does not, so nothing is free to grow on."""
    import ray
    from ray.data import ActorPoolStrategy
    from ray.data._internal.datasource.range_datasource import RangeDatasource
    from ray.util.placement_group import placement_group, remove_placement_group

    fp = job_footprint([(1.0, 0.0, reserved)], preprocess_cpus=0.5, preprocess_min=1)
    with contextlib.ExitStack() as stack:
        if hold_rest:
            # the cluster's CPUs less this job's reservation, less a margin no actor fits in; from
            # the total, not from what is free while the last test's actors are still released
            rest = ray.cluster_resources()["CPU"] - (fp.total()["CPU"] - fp.driver_cpus) - 0.1
            other = placement_group([{"CPU": round(rest, 2)}])
            assert other.wait(timeout_seconds=30)
            stack.callback(remove_placement_group, other)
        res = stack.enter_context(reserve(fp, name=f"elastic-{reserved}-{pool[1]}", timeout_s=30))
        args = res.remote_args
        start = time.monotonic()
        # one block per batch, read by read tasks in the read bundle (Ray's own range source)
        source = RangeDatasource(n=rows, block_format="arrow", column_name="id")
        ds = ray.data.read_datasource(source, override_num_blocks=rows // BATCH, ray_remote_args=args("read"))
        ds = ds.map_batches(Light, batch_size=BATCH, compute=ActorPoolStrategy(min_size=1, max_size=1),
                            num_cpus=0.5, **args("preprocess"))  # fmt: skip
        ds = ds.map_batches(Slow, batch_size=BATCH, compute=ActorPoolStrategy(min_size=pool[0], max_size=pool[1]),
                            num_cpus=1.0, **args("stage0"))  # fmt: skip
        ds = ds.map_batches(_identity, batch_size=None, **args("write"))  # stands in for the write tasks
        done = sum(len(b["id"]) for b in ds.iter_batches(batch_size=None))
        rate = done / (time.monotonic() - start)
        assert done == rows
        return rate


def _identity(batch):
    return batch


def test_a_pool_reserved_at_its_minimum_grows_to_near_the_balanced_rate(ray_session):
    pinned = _run(ROWS // 4, 1, (1, 1))  # the old behaviour: pinned at its reservation
    grown = _run(ROWS, 1, (1, 4))
    balanced = _run(ROWS, 4, (4, 4))
    print(
        f"\nslow stage rows/s: pinned at its minimum {pinned:.0f}, grown from 1 to 4 {grown:.0f}, "
        f"balanced {balanced:.0f}"
    )
    assert grown >= 0.85 * balanced, (pinned, grown, balanced)
    assert grown > 2 * pinned


def test_with_no_free_capacity_a_pool_stays_at_its_minimum_and_the_job_completes(ray_session):
    start = time.monotonic()
    rate = _run(ROWS // 8, 1, (1, 4), hold_rest=True)
    assert time.monotonic() - start < 60
    print(f"\nno free capacity: {rate:.0f} rows/s at the minimum")
