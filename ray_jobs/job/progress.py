"""A running partition's progress: counted where rows leave the pipeline, reported by the driver.

Each write task adds the rows it has written and rejected to a :class:`RowCounter` actor (no
resources, fire and forget: progress never slows or fails the write). The driver's
:class:`ProgressReporter` reads the counter every ``interval_s`` and

* prints one line to the job's log (what Airflow's trigger forwards into the task log)::

      progress: rows_done=500000 rows_total=1000000 rows_ok=499988 rows_rejected=12 rows_per_s=1234.5 eta_s=405

* writes the same figures as JSON next to the run's plan,
  ``{output}/runs/{run_id}/progress/partition=00017.json``, for the run page to read while the
  run is under way.

Rows per second count from the pipeline's start (admission and actor start-up included, as
the night experiences them); the ETA is the rows left at that rate.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ray_jobs.contract.layout import join_uri
from ray_jobs.errors import PipelineStalled

log = logging.getLogger(__name__)

#: Seconds between two progress reports of a running partition.
PROGRESS_INTERVAL_S = 2.0
PROGRESS_DIR = "progress"


def print_line(line: str) -> None:
    print(line, flush=True)  # the job's log is a pipe: unflushed, a line would arrive late


def progress_uri(plan_uri: str, partition: int) -> str:
    """Where partition *partition*'s progress is written: beside the plan, under ``progress/``."""
    run_dir = plan_uri.rstrip("/").rsplit("/", 1)[0]
    return join_uri(run_dir, PROGRESS_DIR, f"partition={partition:05d}.json")


class RowCounter:
    """Rows written and rejected so far (a Ray actor; its methods run one at a time)."""

    def __init__(self) -> None:
        self.ok = 0
        self.rejected = 0

    def add(self, ok: int, rejected: int) -> None:
        self.ok += int(ok)
        self.rejected += int(rejected)

    def totals(self) -> tuple[int, int]:
        return self.ok, self.rejected


def start_counter():
    """A :class:`RowCounter` actor holding no CPU (it never waits for a slot the pipeline needs)."""
    import ray

    return ray.remote(num_cpus=0)(RowCounter).remote()


@dataclass(frozen=True)
class ProgressFigures:
    partition: int
    rows_total: int
    rows_ok: int
    rows_rejected: int
    elapsed_s: float
    #: epoch seconds of this report
    at: float
    state: str = "running"

    @property
    def rows_done(self) -> int:
        return self.rows_ok + self.rows_rejected

    @property
    def rows_per_s(self) -> float:
        return self.rows_done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        left = max(0, self.rows_total - self.rows_done)
        if left == 0:
            return 0.0
        return left / self.rows_per_s if self.rows_per_s > 0 else None

    def line(self) -> str:
        eta = f" eta_s={self.eta_s:.0f}" if self.eta_s is not None else ""
        return (
            f"progress: rows_done={self.rows_done} rows_total={self.rows_total} rows_ok={self.rows_ok} "
            f"rows_rejected={self.rows_rejected} rows_per_s={self.rows_per_s:.1f}{eta}"
        )

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "rows_done": self.rows_done,
            "rows_per_s": round(self.rows_per_s, 3),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
        }


class ProgressReporter:
    """Report *counter*'s figures every *interval_s* from a daemon thread while the pipeline runs,
    and once more, final, when it ends (state ``done``, ``failed`` or ``stalled``). *totals* returns
    ``(rows_ok, rows_rejected)``."""

    def __init__(
        self,
        totals: Callable[[], tuple[int, int]],
        *,
        partition: int,
        rows_total: int,
        uri: str | None,
        interval_s: float = PROGRESS_INTERVAL_S,
        emit: Callable[[str], None] = print_line,
        clock: Callable[[], float] = time.time,
    ):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.totals, self.partition, self.rows_total, self.uri = totals, partition, rows_total, uri
        self.interval_s, self.emit, self.clock = interval_s, emit, clock
        self.started_at = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def report(self, state: str = "running") -> ProgressFigures | None:
        """Read the counter, print the line, write the JSON; a failure to read or write is logged,
        never raised (progress is for people; the commit marker holds the run's figures)."""
        try:
            ok, rejected = self.totals()
        except Exception as exc:
            log.warning("progress: counter unavailable (%s)", exc)
            return None
        now = self.clock()
        figures = ProgressFigures(self.partition, self.rows_total, ok, rejected, now - self.started_at, now, state)
        self.emit(figures.line())
        if self.uri:
            from ray_jobs import storage

            try:
                storage.write_text(self.uri, json.dumps(figures.to_dict(), sort_keys=True))
            except OSError as exc:
                log.warning("progress: could not write %s (%s)", self.uri, exc)
        return figures

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.report()

    def __enter__(self) -> ProgressReporter:
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)
        self.report(end_state(exc_type))


def end_state(exc_type: type[BaseException] | None) -> str:
    """The last report's state: ``done``, ``stalled`` (the stall watchdog failed the pipeline,
    :mod:`ray_jobs.job.stall`) or ``failed``."""
    if exc_type is None:
        return "done"
    return "stalled" if issubclass(exc_type, PipelineStalled) else "failed"


def actor_totals(counter) -> Callable[[], tuple[int, int]]:
    """*counter*'s ``totals()``, waited for at most 10 s."""
    import ray

    def read() -> tuple[int, int]:
        return tuple(ray.get(counter.totals.remote(), timeout=10))

    return read
