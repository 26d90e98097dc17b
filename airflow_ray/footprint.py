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


@dataclass(frozen=True)
class Bundle:
    """``count`` actors (or task slots) of ``cpus``/``gpus`` each, placed together on one node."""

    name: str
    cpus: float
    gpus: float = 0.0
    count: int = 1

    def __post_init__(self) -> None:
        if self.cpus < 0 or self.gpus < 0 or self.count < 1:
            raise ValueError(f"bundle {self.name}: cpus/gpus must be >= 0 and count >= 1")
        if self.cpus == 0 and self.gpus == 0:
            raise ValueError(f"bundle {self.name}: needs some CPU or GPU")

    def resources(self) -> dict[str, float]:
        out = {"CPU": self.cpus * self.count}
        if self.gpus:
            out["GPU"] = self.gpus * self.count
        return out


@dataclass(frozen=True)
class JobFootprint:
    """What one job holds while it runs: its bundles plus its driver."""

    bundles: tuple[Bundle, ...]
    driver_cpus: float

    def __post_init__(self) -> None:
        if not self.bundles:
            raise ValueError("a footprint needs at least one bundle")
        if self.driver_cpus <= 0:
            raise ValueError(f"driver CPUs must be > 0 (drivers never run on a 0-CPU head), got {self.driver_cpus}")

    @classmethod
    def from_dict(cls, data: Mapping) -> JobFootprint:
        try:
            bundles = tuple(
                Bundle(b["name"], float(b["cpus"]), float(b["gpus"]), int(b["count"])) for b in data["bundles"]
            )
            return cls(bundles, float(data["driver_cpus"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid footprint {dict(data)!r}: {exc}") from exc

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

    def jobs_that_fit(self, nodes: Sequence[Mapping[str, float]], limit: int = MAX_JOBS) -> int:
        """How many copies of this footprint the *nodes* hold at once (first-fit decreasing).

        Each node is a mapping of resource totals (``{"CPU": 8, "GPU": 1}``); every bundle and
        every driver must fit on one node. A heuristic bin packing: never more than fit, and
        exact for the usual shapes (identical nodes, or one bundle per GPU).
        """
        free = [{k: float(v) for k, v in n.items()} for n in nodes]
        items = [b.resources() for b in self.bundles] + [{"CPU": self.driver_cpus}]
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
