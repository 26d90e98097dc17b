"""What one Ray job holds while it runs, and how many such jobs a cluster's nodes hold at once.

A footprint is a list of bundles, each of which must fit on one node (as in a Ray placement
group), plus the job's driver (its ``entrypoint_num_cpus``). The provider reads it from a
plain dict, the contract between whoever builds a job and this provider::

    {"bundles": [{"name": "pool0", "cpus": 2.0, "gpus": 1.0, "count": 1}, ...], "driver_cpus": 0.25}

(extra keys, such as a precomputed ``total``, are ignored). Pure Python: no Ray, no Airflow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: Most jobs a packing ever reports (a bound on the work; far above any real cluster).
MAX_JOBS = 4096

_EPS = 1e-9


def _bundle(data: Mapping) -> tuple[str, dict[str, float]]:
    """One bundle's name and the resources of all its ``count`` actors (or task slots)."""
    name, cpus, gpus, count = str(data["name"]), float(data["cpus"]), float(data["gpus"]), int(data["count"])
    if cpus < 0 or gpus < 0 or count < 1:
        raise ValueError(f"bundle {name}: cpus/gpus must be >= 0 and count >= 1")
    if cpus == 0 and gpus == 0:
        raise ValueError(f"bundle {name}: needs some CPU or GPU")
    return name, {"CPU": cpus * count, **({"GPU": gpus * count} if gpus else {})}


@dataclass(frozen=True)
class JobFootprint:
    """What one job holds while it runs: named bundles (each placed on one node) plus its driver."""

    bundles: tuple[tuple[str, dict[str, float]], ...]
    driver_cpus: float

    @classmethod
    def from_dict(cls, data: Mapping) -> JobFootprint:
        try:
            bundles = tuple(_bundle(b) for b in data["bundles"])
            driver_cpus = float(data["driver_cpus"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid footprint {dict(data)!r}: {exc}") from exc
        if not bundles:
            raise ValueError(f"invalid footprint {dict(data)!r}: it needs at least one bundle")
        if driver_cpus <= 0:
            raise ValueError(f"invalid footprint {dict(data)!r}: driver CPUs must be > 0 (never a 0-CPU head)")
        return cls(bundles, driver_cpus)

    def items(self) -> list[dict[str, float]]:
        """What must each fit on one node: every bundle, and the driver."""
        return [resources for _, resources in self.bundles] + [{"CPU": self.driver_cpus}]

    def total(self) -> dict[str, float]:
        """Everything the job holds, driver included."""
        keys = sorted({k for item in self.items() for k in item})
        return {k: sum(item.get(k, 0.0) for item in self.items()) for k in keys}

    def describe(self) -> str:
        parts = ", ".join(f"{name}={_fmt(resources)}" for name, resources in self.bundles)
        return f"{_fmt(self.total())} ({parts}, driver=CPU:{self.driver_cpus:g})"

    def jobs_that_fit(self, nodes: Sequence[Mapping[str, float]], limit: int = MAX_JOBS) -> int:
        """How many copies of this footprint the *nodes* hold at once (first-fit decreasing).

        Each node is a mapping of resource totals (``{"CPU": 8, "GPU": 1}``); every bundle and
        every driver must fit on one node. A heuristic bin packing: never more than fit, and
        exact for the usual shapes (identical nodes, or one bundle per GPU).
        """
        free = [{k: float(v) for k, v in n.items()} for n in nodes]
        items = self.items()
        items.sort(key=lambda r: (r.get("GPU", 0.0), r.get("CPU", 0.0)), reverse=True)
        jobs = 0
        while jobs < limit:
            trial = [dict(n) for n in free]
            for item in items:
                node = next((n for n in trial if all(n.get(k, 0.0) + _EPS >= v for k, v in item.items())), None)
                if node is None:
                    return jobs
                for k, v in item.items():
                    node[k] = node.get(k, 0.0) - v
            free = trial
            jobs += 1
        return jobs


def _fmt(resources: Mapping[str, float]) -> str:
    return ",".join(f"{k}:{v:g}" for k, v in sorted(resources.items()))
