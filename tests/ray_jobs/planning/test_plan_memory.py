"""Planning memory is bounded by row groups, never by rows: 10^6 row groups of 2,000 rows
(2 x 10^9 rows) plan a changed night within a worker's memory.

The manifest's footers are synthetic :class:`ManifestFile` records (what ``read_manifest``
returns), since writing 10^4 real files is not the point: the planning core
(:func:`plan_from_files`) sees exactly what it would see from footers. Peak memory is what
tracemalloc counts for the footers, the previous plan loaded from its JSON and the new plan.
"""

import gc
import time
import tracemalloc

from ray_jobs.config.settings import Partitioning
from ray_jobs.contract.plan import Plan
from ray_jobs.planning.manifest import ManifestFile
from ray_jobs.planning.plan import plan_from_files

GiB = 1024**3
MANIFEST, OUTPUT = "s3://bucket/manifest/", "s3://bucket/out"


def _footers(files: int, groups: int, rows_per_group: int, changed: frozenset[int] = frozenset()) -> list:
    return [
        ManifestFile(
            f"{MANIFEST}part-{i:06d}.parquet",
            64 << 20,
            rows_per_group * groups,
            (rows_per_group,) * groups,
            (rows_per_group * 150_000,) * groups,
            f'"etag-{i}-{2 if i in changed else 1}"',
        )
        for i in range(files)
    ]


def _second_night_peak(files: int, groups: int, rows_per_group: int) -> tuple[int, Plan, float]:
    """Plan night 1, write and reload its JSON, then plan night 2 with 1% of the files
    rewritten; return tracemalloc's peak over night 2 (footers, previous plan and new plan
    held), the new plan and night 2's planning seconds."""
    settings = Partitioning(partition_rows=rows_per_group * groups * 5, max_partitions=100_000)
    first, _ = plan_from_files(_footers(files, groups, rows_per_group), MANIFEST, OUTPUT, settings, run_id="n1")
    text = first.to_json()
    del first
    gc.collect()
    tracemalloc.start()
    try:
        previous = Plan.from_json(text)
        del text
        changed = frozenset(range(0, files, 100))
        footers = _footers(files, groups, rows_per_group, changed)
        start = time.perf_counter()
        second, _ = plan_from_files(footers, MANIFEST, OUTPUT, settings, run_id="n2", previous=previous)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, second, seconds


def test_a_million_row_groups_of_two_billion_rows_plan_within_a_small_worker():
    peak, plan, seconds = _second_night_peak(10_000, 100, 2_000)
    assert plan.rows == 2 * 10**9
    # every 100th file rewritten: 100 partitions of 5 files retired, their 500 files planned anew
    assert len(plan.retired) == 100 and plan.kept_rows == plan.rows - 500 * 100 * 2_000
    assert sum(not p.kept for p in plan.partitions) == 100
    print(f"10^6 row groups, 2x10^9 rows: night-2 peak {peak / 2**20:.0f} MiB, {peak / 10**6:.0f} B per row group, "
          f"plan_from_files {seconds:.1f}s")  # fmt: skip
    assert peak < 1.5 * GiB


def test_planning_memory_does_not_grow_with_rows():
    """The same 10^5 row groups holding 100x more rows take the same memory."""
    few, _, _ = _second_night_peak(1_000, 100, 300)
    many, plan, _ = _second_night_peak(1_000, 100, 30_000)
    assert plan.rows == 3 * 10**9
    assert many <= 1.05 * few, (few, many)
