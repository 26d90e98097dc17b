"""Pure figures of the fair benchmarks: steady-state rates, medians with spread, the best variant.

Nothing here times anything or imports torch or Ray, so the selection and summary logic is
unit-tested on its own (tests/bench/test_fair.py); the bench scripts feed it measurements.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class BenchError(ValueError):
    """A bench setting or measurement that cannot give a figure (too few batches, no samples)."""


def check_window(steady_s: float, *, pool_rows: int | None = None, batch: int | None = None) -> None:
    """A timed run's settings: a positive ``--steady-s``, and a row pool that holds a batch."""
    if steady_s <= 0:
        raise BenchError(f"--steady-s must be > 0, got {steady_s}")
    if pool_rows is not None and batch is not None and pool_rows < batch:
        raise BenchError(f"--pool-rows ({pool_rows}) must be >= the batch size ({batch})")


@dataclass(frozen=True)
class Spread:
    """The median of some repetitions' rows/s with their min and max."""

    median: float
    low: float
    high: float
    samples: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise BenchError("no measurements to summarise")
        if any(v < 0 for v in values):
            raise BenchError(f"a rate cannot be negative: {list(values)}")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def text(self, unit: str = "rows/s") -> str:
        return f"{self.median:9.2f} {unit} (median of {self.samples}, spread {self.low:.2f}-{self.high:.2f})"


@dataclass(frozen=True)
class TorchVariant:
    """One way a user could run the unsplit model: *procs* processes x *threads* intra-op threads,
    data parallel (each process on 1/procs of the rows), *batch* rows per forward pass."""

    procs: int
    threads: int
    batch: int

    def __post_init__(self) -> None:
        for name in ("procs", "threads", "batch"):
            if getattr(self, name) < 1:
                raise BenchError(f"torch variant: {name} must be >= 1, got {getattr(self, name)}")

    @property
    def name(self) -> str:
        return f"torch {self.procs}proc x {self.threads}thr b{self.batch}"


def torch_variants(cores: int, batch: int, cuda: bool, batches: Sequence[int] = ()) -> tuple[TorchVariant, ...]:
    """The bare-torch alternatives worth trying on *cores* CPU cores (or one CUDA card).

    CPU: one process with *cores* threads, and *cores* processes with one thread each (data
    parallel); CUDA: the single-card loop at each batch size of *batches* (default: batch, 2x, 4x)."""
    if cores < 1:
        raise BenchError(f"cores must be >= 1, got {cores}")
    if cuda:
        sizes = tuple(dict.fromkeys(batches or (batch, 2 * batch, 4 * batch)))
        return tuple(TorchVariant(1, 1, b) for b in sizes)
    variants = [TorchVariant(1, cores, batch)]
    if cores > 1:
        variants.append(TorchVariant(cores, 1, batch))
    return tuple(variants)


def steady_rate(times: Sequence[float], sizes: Sequence[int], warmup: int) -> float:
    """Rows/s after *warmup* warm-up batches: the rows of batches ``warmup ..`` over the time from
    the arrival of the last warm-up batch to the arrival of the last batch.

    *times* are the arrival times of the batches, *sizes* their rows. The first batch is always
    outside the window (when it started is unknown), so ``warmup`` 0 and 1 give the same figure."""
    if len(times) != len(sizes):
        raise BenchError(f"{len(times)} batch times but {len(sizes)} batch sizes")
    if warmup < 0:
        raise BenchError(f"warm-up batches must be >= 0, got {warmup}")
    first = max(0, warmup - 1)
    if len(times) < first + 2:
        raise BenchError(f"need {first + 2}+ batches for a steady state after {warmup} warm-up, got {len(times)}")
    span = times[-1] - times[first]
    if span <= 0:
        raise BenchError("batch times do not increase")
    return sum(sizes[first + 1 :]) / span


def data_parallel_rate(per_process: Sequence[tuple[int, float]]) -> float:
    """Aggregate rows/s of processes started together: all their rows over the slowest one's time.

    *per_process* is each process's ``(rows, seconds)`` in its timed window."""
    if not per_process:
        raise BenchError("no processes reported")
    slowest = max(seconds for _, seconds in per_process)
    if slowest <= 0:
        raise BenchError("a timed window of zero seconds")
    return sum(rows for rows, _ in per_process) / slowest


def shard(n: int, parts: int, index: int) -> range:
    """Row indices of shard *index* of *parts* near-equal contiguous shards of *n* rows."""
    if not 0 <= index < parts:
        raise BenchError(f"shard index {index} outside 0..{parts - 1}")
    lo, hi = n * index // parts, n * (index + 1) // parts
    return range(lo, hi)


def alternating(reps: int, sides: Sequence[str] = ("pipeline", "torch")) -> list[tuple[int, str]]:
    """The run order: rep 1 of each side in turn, then rep 2, ... (pipeline, torch, pipeline, torch ...)."""
    if reps < 1:
        raise BenchError(f"--reps must be >= 1, got {reps}")
    return [(rep, side) for rep in range(1, reps + 1) for side in sides]


def best_variant(results: Mapping[str, Sequence[float]]) -> tuple[str, Spread]:
    """The variant with the highest median rows/s (ties: the first given) and its spread."""
    if not results:
        raise BenchError("no variants measured")
    summaries = {name: Spread.of(values) for name, values in results.items()}
    name = max(summaries, key=lambda k: summaries[k].median)  # max() keeps the first of equals
    return name, summaries[name]


def ratio(pipeline: float, best: float) -> float:
    if best <= 0:
        raise BenchError(f"the baseline rate must be > 0, got {best}")
    return pipeline / best
