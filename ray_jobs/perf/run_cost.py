"""What a finished run cost, estimated from what it ran: the same prices as ``capacity``.

* Compute: every operator of every committed partition holds its resources for a time, from
  the commit marker's stage statistics (:class:`~ray_jobs.contract.marker.StageStat`): an actor
  pool holds ``actors × (CPUs, GPUs)`` for its ``span_s``; a task operator (read, write) holds
  its task's CPUs for its tasks' summed ``busy_s``. CPU-hours × ``cpu_hour`` + GPU-hours ×
  ``gpu_hour``.
* Object-store requests: the GETs and PUTs of the run's partitions, rows and actor starts,
  counted as the capacity model counts them
  (:func:`ray_jobs.perf.capacity_model.object_store_requests`), × the per-1,000 request prices.

An estimate: idle nodes, the driver and the head are not counted; a run on a cluster billed by
the node costs what its nodes cost.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from ray_jobs.contract.marker import StageStat
from ray_jobs.perf.capacity_model import Prices, RunShape, object_store_requests


@dataclass(frozen=True)
class RunCost:
    cpu_hours: float
    gpu_hours: float
    gets: int
    puts: int
    prices: Prices

    @property
    def compute_usd(self) -> float:
        return self.cpu_hours * self.prices.cpu_hour + self.gpu_hours * self.prices.gpu_hour

    @property
    def requests_usd(self) -> float:
        return self.gets / 1000 * self.prices.get_per_1k + self.puts / 1000 * self.prices.put_per_1k

    @property
    def total_usd(self) -> float:
        return self.compute_usd + self.requests_usd

    def to_dict(self) -> dict:
        return {
            "cpu_hours": round(self.cpu_hours, 6),
            "gpu_hours": round(self.gpu_hours, 6),
            "gets": self.gets,
            "puts": self.puts,
            "compute_usd": round(self.compute_usd, 6),
            "requests_usd": round(self.requests_usd, 6),
            "total_usd": round(self.total_usd, 6),
            "prices": asdict(self.prices),
        }

    def line(self) -> str:
        p = self.prices
        return (
            f"${self.total_usd:,.4f}: compute ${self.compute_usd:,.4f} ({self.cpu_hours:,.3f} CPU-hours at "
            f"${p.cpu_hour:g}, {self.gpu_hours:,.3f} GPU-hours at ${p.gpu_hour:g}) + requests "
            f"${self.requests_usd:,.4f} ({self.gets:,} GETs at ${p.get_per_1k:g}/1k, {self.puts:,} PUTs at "
            f"${p.put_per_1k:g}/1k)"
        )


def resource_seconds(stats: Sequence[StageStat]) -> tuple[float, float]:
    """``(CPU-seconds, GPU-seconds)`` one partition's operators held."""
    cpu = gpu = 0.0
    for s in stats:
        if s.actors > 0:
            cpu += s.actors * s.num_cpus * s.span_s
            gpu += s.actors * s.num_gpus * s.span_s
        else:
            cpu += s.num_cpus * s.busy_s
            gpu += s.num_gpus * s.busy_s
    return cpu, gpu


def run_cost(
    partitions_stats: Iterable[Sequence[StageStat]],
    rows: int,
    prices: Prices | None = None,
    run: RunShape | None = None,
) -> RunCost:
    """The cost of the committed partitions whose stage statistics are *partitions_stats*
    (one sequence per partition), *rows* rows in all."""
    prices, run = prices or Prices(), run or RunShape()
    cpu_s = gpu_s = 0.0
    partitions = actors = 0
    for stats in partitions_stats:
        c, g = resource_seconds(stats)
        cpu_s, gpu_s = cpu_s + c, gpu_s + g
        partitions += 1
        actors += sum(s.actors for s in stats)
    if partitions == 0:
        return RunCost(0.0, 0.0, 0, 0, prices)
    per_partition_actors = math.ceil(actors / partitions)
    rows_per_partition = max(1, math.ceil(rows / partitions))
    gets, puts = object_store_requests(per_partition_actors, partitions, rows_per_partition, rows, run)
    return RunCost(cpu_s / 3600, gpu_s / 3600, gets, puts, prices)
