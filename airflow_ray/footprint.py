"""What one Ray job holds while it runs, and how many such jobs a cluster's nodes hold at once.

A footprint is a list of bundles, each of which must fit on one node (as in a Ray placement
group), plus the job's driver (its ``entrypoint_num_cpus``). The provider reads it from a
plain dict, the contract between whoever builds a job and this provider::

    {"bundles": [{"name": "pool0", "cpus": 2.0, "gpus": 1.0, "count": 1}, ...], "driver_cpus": 0.0001}

A driver is not placed with its job's bundles: Ray's job supervisor puts it wherever Ray's
default policy does, before the job reserves anything, and that can be the same node for
every driver. The packing therefore keeps, on *every* node, room for the drivers of all the
jobs it counts; a job keeps that cheap by asking little for its driver and reserving the
rest of the driver's share as one of its bundles.

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
        return {k: round(sum(item.get(k, 0.0) for item in self.items()), 4) for k in keys}

    def _bundles_that_fit(self, nodes: Sequence[Mapping[str, float]], drivers: int, limit: int) -> int:
        """How many copies of the bundles fit *nodes* (first-fit decreasing) once every node
        keeps room for *drivers* drivers."""
        free = [{k: float(v) for k, v in n.items()} for n in nodes]
        for n in free:
            n["CPU"] = n.get("CPU", 0.0) - drivers * self.driver_cpus
        items = [dict(resources) for _, resources in self.bundles]
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

    def describe(self) -> str:
        parts = ", ".join(f"{name}={_fmt(resources)}" for name, resources in self.bundles)
        return f"{_fmt(self.total())} ({parts}, driver entrypoint=CPU:{self.driver_cpus:g})"

    def jobs_that_fit(self, nodes: Sequence[Mapping[str, float]], limit: int = MAX_JOBS) -> int:
        """How many copies of this footprint the *nodes* hold at once.

        Each node is a mapping of resource totals (``{"CPU": 8, "GPU": 1}``); every bundle must
        fit on one node (first-fit decreasing, a heuristic bin packing: never more than fit,
        and exact for the usual shapes), and every node keeps room for all the counted jobs'
        drivers, since any node may get them all. The largest *n* whose bundles fit beside
        *n* drivers on each node.
        """
        lo, hi = 0, self._bundles_that_fit(nodes, 0, limit)  # lo fits beside its drivers; hi bounds
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._bundles_that_fit(nodes, mid, mid) >= mid:
                lo = mid
            else:
                hi = mid - 1
        return lo


def _fmt(resources: Mapping[str, float]) -> str:
    return ",".join(f"{k}:{v:g}" for k, v in sorted(resources.items()))
