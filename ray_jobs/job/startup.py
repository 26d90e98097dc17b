"""Where a partition job's start-up goes: driver start, actor start, model load.

The driver knows when its own process started and when its pipeline started; each
preprocessing and model-stage actor records when its process started, when its constructor
began and ended, and how long its model took to load, in Ray's internal key-value store
under the attempt's scope (a few hundred bytes per actor: no extra actor, no data path).
On commit the driver reads them back and reduces them to the figures the commit marker and
the run report carry (:class:`StartupBreakdown`).

Recording is telemetry: a failure to record is logged and never fails a job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

#: Ray internal-KV namespace of the records.
KV_NAMESPACE = "ray_jobs_startup"

_IMPORTED_AT = time.time()


def process_started_at(pid: int | None = None) -> float:
    """Wall-clock time the process *pid* (default: this one) started, from ``/proc``.

    Falls back to the time this module was imported where ``/proc`` is not available."""
    try:
        with open(f"/proc/{pid or 'self'}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat(5); the split drops pid and comm
        with open("/proc/stat") as fh:
            btime = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


@dataclass(frozen=True)
class ActorStart:
    """One actor's start-up, as it recorded it (wall-clock seconds since the epoch)."""

    op: str  # "preprocess", "stage0", ...
    pid: int
    process_started_at: float
    init_started_at: float
    init_done_at: float
    model_load_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.init_started_at <= self.init_done_at:
            raise ValueError(f"actor {self.op}: constructor ended before it began")
        if self.model_load_s < 0:
            raise ValueError(f"actor {self.op}: negative model load time")


@dataclass(frozen=True)
class StartupBreakdown:
    """Time from the driver process's start to the pipeline's first batch, by phase.

    - ``driver_s``: driver process start to pipeline start, less the admission wait
      (interpreter, imports, Ray connect, input checks);
    - ``admission_wait_s``: waiting for the cluster to hold the job's footprint (queueing,
      not start-up cost);
    - ``actor_start_s``: pipeline start until the last actor to become ready had started and
      imported its libraries (scheduling, worker process boot, imports);
    - ``model_load_s``: that actor's model build and weight load (0 for preprocessing);
    - ``first_batch_s``: pipeline start to the first batch reaching the sink (includes both
      actor figures and the first batch's own work).
    """

    driver_s: float
    admission_wait_s: float
    actor_start_s: float | None
    model_load_s: float | None
    slowest_actor: str = ""

    def to_timings(self) -> dict[str, float]:
        out = {"startup_driver_s": round(self.driver_s, 3), "startup_admission_wait_s": round(self.admission_wait_s, 3)}
        if self.actor_start_s is not None:
            out["startup_actor_start_s"] = round(self.actor_start_s, 3)
        if self.model_load_s is not None:
            out["startup_model_load_s"] = round(self.model_load_s, 3)
        return out


def breakdown(
    *,
    driver_started_at: float,
    pipeline_started_at: float,
    admission_wait_s: float,
    actors: Iterable[ActorStart],
) -> StartupBreakdown:
    """Reduce the driver's and the actors' records to a :class:`StartupBreakdown`.

    The critical path is the actor that became ready last; actors that started before the
    pipeline (none should) are ignored, as are restarts after the first batch (they are not
    start-up)."""
    driver_s = max(0.0, pipeline_started_at - driver_started_at - admission_wait_s)
    ready = [a for a in actors if a.init_started_at >= pipeline_started_at]
    if not ready:
        return StartupBreakdown(driver_s, admission_wait_s, None, None)
    first_incarnation: dict[str, ActorStart] = {}
    for a in sorted(ready, key=lambda a: a.init_done_at):
        first_incarnation.setdefault(f"{a.op}/{a.pid}", a)
    # per pool, the actors it needs at its minimum are the first to be ready; the slowest
    # pool decides when the pipeline can run
    last = max(first_incarnation.values(), key=lambda a: a.init_done_at)
    actor_start = max(0.0, last.init_done_at - last.model_load_s - pipeline_started_at)
    return StartupBreakdown(driver_s, admission_wait_s, actor_start, last.model_load_s, slowest_actor=last.op)


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def record_actor(scope: str, start: ActorStart) -> None:
    """Store *start* under *scope* (the attempt id); never raises."""
    if not scope:
        return
    try:
        kv = _kv()
        if not kv._internal_kv_initialized():
            log.warning("start-up timing not recorded for %s: Ray's key-value store is not connected", start.op)
            return
        key = f"{scope}/{start.op}/{start.pid}/{start.init_started_at:.6f}"
        kv._internal_kv_put(key, json.dumps(asdict(start)), namespace=KV_NAMESPACE)
    except Exception as exc:  # telemetry must never fail the actor
        log.warning("start-up timing not recorded for %s: %s", start.op, exc)


def collect(scope: str, *, delete: bool = True) -> list[ActorStart]:
    """The records stored under *scope*, removed from the store unless *delete* is False."""
    if not scope:
        return []
    try:
        kv = _kv()
        if not kv._internal_kv_initialized():
            log.warning("start-up timings of %s not read: Ray's key-value store is not connected", scope)
            return []
        keys = kv._internal_kv_list(f"{scope}/", namespace=KV_NAMESPACE)
        out = []
        for key in keys:
            raw = kv._internal_kv_get(key, namespace=KV_NAMESPACE)
            if raw is not None:
                out.append(ActorStart(**json.loads(raw)))
            if delete:
                kv._internal_kv_del(key, namespace=KV_NAMESPACE)
        return out
    except Exception as exc:  # telemetry must never fail the commit
        log.warning("start-up timings of %s not read: %s", scope, exc)
        return []


class ActorTimer:
    """Used by an actor's constructor: ``timer = ActorTimer(op, scope)`` first, then
    ``with timer.model_load(): ...`` around the model load, then ``timer.done()``."""

    def __init__(self, op: str, scope: str):
        self.op, self.scope = op, scope
        self.init_started_at = time.time()
        self.model_load_s = 0.0

    @contextlib.contextmanager
    def model_load(self):
        t0 = time.perf_counter()
        try:
            yield self
        finally:
            self.model_load_s += time.perf_counter() - t0

    def done(self) -> ActorStart:
        start = ActorStart(
            op=self.op,
            pid=os.getpid(),
            process_started_at=process_started_at(),
            init_started_at=self.init_started_at,
            init_done_at=time.time(),
            model_load_s=self.model_load_s,
        )
        record_actor(self.scope, start)
        return start
