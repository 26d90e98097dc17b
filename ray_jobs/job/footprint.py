"""A partition job's minimum footprint.

Part of the data plane's contract: pure Python, no Ray. The job reserves exactly this
footprint as one placement group before its pipeline starts (:mod:`ray_jobs.job.admission`);
``check_inputs`` hands :meth:`Footprint.to_dict` to the control plane, whose provider counts
how many such jobs the cluster holds (``airflow_ray.footprint``).

A footprint is a list of bundles, each of which must fit on one node:

* one bundle per actor pool (the preprocessors, each model stage): the pool's minimum
  actors times each actor's CPUs/GPUs, so a pool's minimum shares one node;
* one bundle for Ray Data's read and write tasks (``task_cpus``);
* the job driver (``driver_cpus``), which Ray's job supervisor places by
  ``entrypoint_num_cpus`` — never on a head with ``num-cpus: 0``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ray_jobs.config.settings import DEFAULT_DRIVER_CPUS, DEFAULT_TASK_CPUS
from ray_jobs.errors import UsageError


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
    """What one partition job holds while it runs: placement-group bundles plus its driver."""

    bundles: tuple[Bundle, ...]
    driver_cpus: float = DEFAULT_DRIVER_CPUS

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
        return out

    def describe(self) -> str:
        parts = [f"{b.name}={_fmt(b.resources())}" for b in self.bundles]
        return f"{_fmt(self.total())} ({', '.join(parts)}, driver=CPU:{self.driver_cpus:g})"

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
    """The footprint of a job with these pools: ``stages`` yields (cpus, gpus, min actors) per stage."""
    bundles = [Bundle("preprocess", preprocess_cpus, 0.0, preprocess_min)]
    bundles += [Bundle(f"stage{i}", cpus, gpus, n) for i, (cpus, gpus, n) in enumerate(stages)]
    bundles.append(Bundle("tasks", task_cpus))
    return Footprint(tuple(bundles), driver_cpus)


def footprint_of(layout, settings) -> Footprint:
    """The footprint of a job running *layout* (a :class:`~ray_jobs.model.stage_spec.StageLayout`)
    with *settings* (a :class:`~ray_jobs.config.settings.JobSettings`): every pool at its
    minimum, the read/write task bundle, the driver."""
    return job_footprint(
        ((s.resources.num_cpus, s.resources.num_gpus, s.resources.min_pool) for s in layout.stages),
        preprocess_cpus=settings.preprocess_cpus,
        preprocess_min=settings.preprocess_pool.min,
        task_cpus=settings.task_cpus,
        driver_cpus=settings.driver_cpus,
    )


def _fmt(resources: Mapping[str, float]) -> str:
    return ",".join(f"{k}:{v:g}" for k, v in sorted(resources.items()))
