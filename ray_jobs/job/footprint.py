"""A partition job's minimum footprint.

Part of the data plane's contract: pure Python, no Ray. The job reserves exactly this
footprint's bundles as one placement group before its pipeline starts
(:mod:`ray_jobs.job.admission`); ``check_inputs`` hands :meth:`Footprint.to_dict` to the
control plane, whose provider counts how many such jobs the cluster holds
(``airflow_ray.footprint``).

A footprint is a list of bundles, each of which must fit on one node:

* one bundle per actor pool (the preprocessors, each model stage): the pool's minimum
  actors times each actor's CPUs/GPUs, so a pool's minimum shares one node (a pool grows
  past its minimum outside the reservation, on capacity nobody reserved);
* one bundle for Ray Data's read tasks and one for its write tasks (``task_cpus``, two
  thirds and one third): a write task always has a slot that paused reads cannot hold;
* the driver's share (``driver_cpus`` less :data:`DRIVER_ROOM`), reserved with the rest.

The driver process itself is placed by Ray's job supervisor before the job runs, wherever
Ray's default policy puts it. It asks for only :data:`DRIVER_ENTRYPOINT_CPUS` there (enough
to keep it off a head with ``num-cpus: 0``), so where drivers land never takes the room a
reservation needs; :attr:`Footprint.driver_cpus` is that entrypoint share.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ray_jobs.config.settings import DEFAULT_DRIVER_CPUS, DEFAULT_TASK_CPUS
from ray_jobs.errors import UsageError

#: CPUs the submitter asks for the driver (``entrypoint_num_cpus``): Ray's smallest quantity.
#: Above 0, so Ray's job supervisor never places a driver on a head with ``num-cpus: 0``.
DRIVER_ENTRYPOINT_CPUS = 0.0001
#: How many drivers' entrypoint shares (its own included) a reservation leaves room for on its node: Ray's
#: default policy may put every driver on one node (each asks almost nothing), and a node
#: that exactly fits its reservations must still take them.
DRIVERS_PER_RESERVATION = 500
#: CPUs the ``driver`` bundle leaves out of ``driver_cpus``: that room.
DRIVER_ROOM = round(DRIVERS_PER_RESERVATION * DRIVER_ENTRYPOINT_CPUS, 4)
#: Read and write task slots in the ``read`` and ``write`` bundles (each slot ``task_cpus / 3``).
READ_SLOTS, WRITE_SLOTS = 2, 1


@dataclass(frozen=True)
class Bundle:
    """``count`` actors (or task slots) of ``cpus``/``gpus`` each, placed together on one node."""

    name: str
    cpus: float
    gpus: float = 0.0
    count: int = 1

    def __post_init__(self) -> None:
        if self.cpus < 0 or self.gpus < 0 or self.count < 1:
            raise UsageError(f"bundle {self.name}: cpus/gpus must be >= 0 and count >= 1")
        if self.cpus == 0 and self.gpus == 0:
            raise UsageError(f"bundle {self.name}: needs some CPU or GPU")

    def resources(self) -> dict[str, float]:
        out = {"CPU": self.cpus * self.count}
        if self.gpus:
            out["GPU"] = self.gpus * self.count
        return out


@dataclass(frozen=True)
class Footprint:
    """What one partition job holds while it runs: placement-group bundles plus the share its
    driver holds where Ray placed it (``driver_cpus``, the ``entrypoint_num_cpus``)."""

    bundles: tuple[Bundle, ...]
    driver_cpus: float = DRIVER_ENTRYPOINT_CPUS

    def __post_init__(self) -> None:
        if not self.bundles:
            raise UsageError("a footprint needs at least one bundle")
        if self.driver_cpus <= 0:
            raise UsageError(f"driver CPUs must be > 0 (drivers never run on a 0-CPU head), got {self.driver_cpus}")
        names = [b.name for b in self.bundles]
        if len(set(names)) != len(names):
            raise UsageError(f"bundle names must be unique, got {names}")

    def bundle(self, name: str) -> int:
        """Index of the bundle called *name*."""
        for i, b in enumerate(self.bundles):
            if b.name == name:
                return i
        raise KeyError(name)

    def total(self) -> dict[str, float]:
        """Everything the job holds, driver included."""
        out: dict[str, float] = {"CPU": self.driver_cpus}
        for b in self.bundles:
            for k, v in b.resources().items():
                out[k] = out.get(k, 0.0) + v
        return {k: round(v, 4) for k, v in out.items()}

    def describe(self) -> str:
        parts = [f"{b.name}={_fmt(b.resources())}" for b in self.bundles]
        return f"{_fmt(self.total())} ({', '.join(parts)}, driver entrypoint=CPU:{self.driver_cpus:g})"

    def to_dict(self) -> dict:
        return {
            "bundles": [{"name": b.name, "cpus": b.cpus, "gpus": b.gpus, "count": b.count} for b in self.bundles],
            "driver_cpus": self.driver_cpus,
            "total": self.total(),
        }


def job_footprint(
    stages: Iterable[tuple[float, float, int]],
    *,
    preprocess_cpus: float,
    preprocess_min: int,
    task_cpus: float = DEFAULT_TASK_CPUS,
    driver_cpus: float = DEFAULT_DRIVER_CPUS,
) -> Footprint:
    """The footprint of a job with these pools: ``stages`` yields (cpus, gpus, min actors) per stage.

    *task_cpus* is split into :data:`READ_SLOTS` + :data:`WRITE_SLOTS` task slots, *driver_cpus*
    into the entrypoint share and the ``driver`` bundle."""
    if driver_cpus <= DRIVER_ROOM:
        raise UsageError(
            f"--driver-cpus must be above {DRIVER_ROOM:g} (room for the drivers' entrypoints), got {driver_cpus:g}"
        )
    slot = task_slot_cpus(task_cpus)
    bundles = [Bundle("preprocess", preprocess_cpus, 0.0, preprocess_min)]
    bundles += [Bundle(f"stage{i}", cpus, gpus, n) for i, (cpus, gpus, n) in enumerate(stages)]
    bundles += [Bundle("read", slot, 0.0, READ_SLOTS), Bundle("write", slot, 0.0, WRITE_SLOTS)]
    bundles.append(Bundle("driver", round(driver_cpus - DRIVER_ROOM, 4)))
    return Footprint(tuple(bundles), DRIVER_ENTRYPOINT_CPUS)


def task_slot_cpus(task_cpus: float) -> float:
    """CPUs of one read or write task: *task_cpus* over all task slots."""
    return round(task_cpus / (READ_SLOTS + WRITE_SLOTS), 4)


def footprint_of(layout, settings) -> Footprint:
    """The footprint of a job running *layout* (a :class:`~ray_jobs.model.stage_spec.StageLayout`)
    with *settings* (a :class:`~ray_jobs.config.settings.JobSettings`): every pool at its
    minimum, the read and write task bundles, the driver."""
    return job_footprint(
        ((s.resources.num_cpus, s.resources.num_gpus, s.resources.min_pool) for s in layout.stages),
        preprocess_cpus=settings.preprocess_cpus,
        preprocess_min=settings.preprocess_pool.min,
        task_cpus=settings.task_cpus,
        driver_cpus=settings.driver_cpus,
    )


def _fmt(resources: Mapping[str, float]) -> str:
    return ",".join(f"{k}:{v:g}" for k, v in sorted(resources.items()))
