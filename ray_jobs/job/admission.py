"""Admission control: a partition job runs only once its whole minimum footprint is reserved.

Why a placement group (docs/concurrency.md): many partition jobs share one cluster. When
each job's actor pools start independently, two jobs can each hold part of what they need
and wait for the rest forever (job A's model stages alive and its preprocessor pending, job
B the reverse). A placement group is reserved atomically by Ray's scheduler: a job either
holds every bundle of its footprint or none, so a job that does not fit waits *without
holding anything*, and jobs queue in Ray instead of deadlocking. A pending placement group
is also a resource demand the Ray autoscaler sees, so on KubeRay the queue scales the worker
groups up to their maximum replicas, then waits. Every operator of the pipeline (read tasks,
preprocessor and stage actors, write tasks) is then scheduled inside its own bundle, so the
running job never asks for anything outside what it reserved.

Pools run at their minimum size under admission (a reservation is fixed); ``--admission
none`` keeps Ray Data's autoscaling pools for a cluster dedicated to one job at a time.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from ray_jobs.errors import AdmissionTimeout
from ray_jobs.job.footprint import Footprint

log = logging.getLogger(__name__)

#: Ray Data operator name -> bundle name in the footprint.
TASK_OPERATORS = ("read", "write")


@dataclass(frozen=True)
class Reservation:
    """A ready placement group and the Ray options that put each operator inside it."""

    placement_group: object
    footprint: Footprint
    waited_s: float

    def remote_args(self, op: str) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = "tasks" if op in TASK_OPERATORS else op
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self.placement_group,
            placement_group_bundle_index=self.footprint.bundle(bundle),
            placement_group_capture_child_tasks=False,
        )
        out: dict = {"scheduling_strategy": strategy}
        if op in TASK_OPERATORS:
            out["num_cpus"] = task_cpus(self.footprint)
        return out


def task_cpus(footprint: Footprint) -> float:
    """CPUs of one read or write task: a third of the tasks bundle (a read, a write and one more at once)."""
    return round(footprint.bundles[footprint.bundle("tasks")].cpus / 3, 4)


def missing_resources(needed: Mapping[str, float], available: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v - available.get(k, 0.0), 4) for k, v in needed.items() if available.get(k, 0.0) + 1e-9 < v}


def _describe_cluster(needed: Mapping[str, float]) -> str:
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    keys = sorted(set(needed) | {"CPU", "GPU"})
    fmt = lambda res: ",".join(f"{k}:{res.get(k, 0.0):g}" for k in keys)  # noqa: E731
    short_total = missing_resources(needed, total)
    hint = (
        f"the cluster is too small for one job even when idle (missing {short_total}): add nodes, raise the "
        "worker groups' max replicas, or shrink the stage layout / pool minimums"
        if short_total
        else "other jobs hold the rest: lower max_partitions_in_flight or raise the admission timeout"
    )
    return f"cluster total {fmt(total)}, available now {fmt(free)}; {hint}"


@contextlib.contextmanager
def reserve(footprint: Footprint, *, name: str, timeout_s: float, poll_s: float = 5.0) -> Iterator[Reservation]:
    """Reserve *footprint* as one placement group (all bundles or none), or raise
    :class:`AdmissionTimeout` after *timeout_s* naming what is missing. Released on exit."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [b.resources() for b in footprint.bundles]
    pg = placement_group(bundles, strategy="PACK", name=name)
    start = time.monotonic()
    needed = {k: v for k, v in footprint.total().items()}
    needed["CPU"] = round(needed["CPU"] - footprint.driver_cpus, 4)  # the driver already runs
    log.info("admission: waiting for %s (%s)", name, footprint.describe())
    next_note = start + poll_s
    try:
        while True:
            left = timeout_s - (time.monotonic() - start)
            if left <= 0:
                raise AdmissionTimeout(
                    f"admission: could not reserve this job's minimum footprint "
                    f"{','.join(f'{k}:{v:g}' for k, v in sorted(needed.items()))} within {timeout_s:g}s; "
                    + _describe_cluster(needed)
                )
            if pg.wait(timeout_seconds=max(0.1, min(poll_s, left))):
                break
            if time.monotonic() >= next_note:  # once after the first poll, then once a minute
                waited = time.monotonic() - start
                log.info("admission: %s queued for %.0fs; %s", name, waited, _describe_cluster(needed))
                next_note = time.monotonic() + 60.0
        waited = time.monotonic() - start
        log.info("admission: %s reserved after %.1fs", name, waited)
        yield Reservation(pg, footprint, waited)
    finally:
        with contextlib.suppress(Exception):
            remove_placement_group(pg)
        if ray.is_initialized():
            log.info("admission: released %s", name)


def unreserved() -> Callable[[str], dict]:
    """The per-operator options without admission (``--admission none``)."""
    return lambda op: {}
