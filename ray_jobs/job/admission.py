"""Admission control: a partition job runs only once its whole minimum footprint is reserved.

Why a placement group (docs/concurrency.md): many partition jobs share one cluster. When
each job's actor pools start independently, two jobs can each hold part of what they need
and wait for the rest forever (job A's model stages alive and its preprocessor pending, job
B the reverse). A placement group is reserved atomically by Ray's scheduler: a job either
holds every bundle of its footprint or none, so a job that does not fit waits *without
holding anything*, and jobs queue in Ray instead of deadlocking. A pending placement group
is also a resource demand the Ray autoscaler sees, so on KubeRay the queue scales the worker
groups up to their maximum replicas, then waits. What the pipeline needs to finish (its read
and write tasks, each actor pool's minimum actors) is then scheduled inside its own bundle,
so the running job never waits for anything outside what it reserved.

Pools grow past their reservation (:class:`PoolPlacement`): each actor pool's first
``min`` actors take the slots of its bundle, and Ray Data's autoscaler adds actors up to the
pool's maximum *outside* the placement group, on capacity that no reservation holds, and
removes them when idle. A job's minimum is always held, so a pool that cannot grow (no free
capacity) runs at its minimum and the job still finishes; its extra actors wait, as demand
the Ray autoscaler sees, only until the pool's inputs are done. ``--admission none`` keeps
Ray Data's autoscaling pools with nothing reserved, for a cluster dedicated to one job at a
time.

Reads and writes have separate bundles (``read``, ``write``): streaming read tasks paused by
backpressure never hold the slot a write task needs to drain the pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field

from ray_jobs.errors import AdmissionTimeout
from ray_jobs.job.footprint import Footprint

log = logging.getLogger(__name__)

#: Ray Data's task operators, each scheduled in the footprint's bundle of the same name.
TASK_OPERATORS = ("read", "write")


def free_slot(prefix: str, slots: int, live_names: Collection[str]) -> str | None:
    """The name for a new actor in the first free slot of a pool's reserved bundle, or None
    when all *slots* are held by live actors (named ``{prefix}-{k}``)."""
    return next((f"{prefix}-{k}" for k in range(slots) if f"{prefix}-{k}" not in live_names), None)


@dataclass(frozen=True)
class PoolPlacement:
    """Where an actor pool's next actor goes (Ray Data's ``ray_remote_args_fn``, called as
    each actor starts): into a free slot of the pool's bundle, or, all slots held, outside
    every placement group, where Ray's default policy places it on free capacity.

    Ray Data releases whichever actor is idle when a pool shrinks, reserved or not. A slot
    is therefore held by a live actor named after it (``{prefix}-{k}``): a name is taken when
    the actor is created and freed when it dies, so a released slot is filled again before
    any actor goes outside. The pool's minimum actors always fit their slots; an extra actor
    never queues inside the reservation."""

    placement_group: object
    bundle_index: int
    slots: int
    prefix: str
    live_names: Callable[[], Collection[str]] = field(default=lambda: _named_actors(), compare=False)

    def __call__(self) -> dict:
        name = free_slot(self.prefix, self.slots, set(self.live_names()))
        if name is None:
            return {}  # the operator's own options: outside the reservation
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self.placement_group,
            placement_group_bundle_index=self.bundle_index,
            placement_group_capture_child_tasks=False,
        )
        return {"name": name, "scheduling_strategy": strategy}


def _named_actors() -> list[str]:
    """Live named actors in this job's namespace (one call to Ray's GCS)."""
    import ray.util

    return ray.util.list_named_actors()


@dataclass(frozen=True)
class Reservation:
    """A ready placement group and the Ray options that put each operator inside it."""

    placement_group: object
    footprint: Footprint
    waited_s: float

    def remote_args(self, op: str) -> dict:
        """Ray options for operator *op*: a task operator's tasks run in its bundle, in slots of
        :func:`task_cpus`; an actor pool places its actors by :class:`PoolPlacement`."""
        index = self.footprint.bundle(op)
        if op not in TASK_OPERATORS:
            prefix = f"{_pg_hex(self.placement_group)}-{op}"
            return {
                "ray_remote_args_fn": PoolPlacement(
                    self.placement_group, index, self.footprint.bundles[index].count, prefix
                )
            }
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self.placement_group,
            placement_group_bundle_index=index,
            placement_group_capture_child_tasks=False,
        )
        return {"scheduling_strategy": strategy, "num_cpus": task_cpus(self.footprint)}


def _pg_hex(placement_group) -> str:
    """A short unique tag of *placement_group* for its actors' names."""
    return placement_group.id.hex()[:12]  # the random part (the job id comes last)


def task_cpus(footprint: Footprint) -> float:
    """CPUs of one read or write task: one slot of the ``read`` or ``write`` bundle."""
    return footprint.bundles[footprint.bundle("read")].cpus


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
