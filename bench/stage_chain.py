"""Bare-torch model parallel over the project's stages: one process per stage, chained by queues.

Each worker process is spawned fresh, sets its intra-op threads and builds the same
:class:`~ray_jobs.model.staged.ModelStage` a pipeline actor builds (only its own layers), then
takes batches from its inbound queue, runs them and puts the result on its outbound queue:
driver -> worker 1 -> worker 2 -> ... -> driver. Hidden states pass from one worker straight to
the next, as accelerate's ``device_map`` passes them from one GPU to the next.

How many batches the driver keeps in flight is the only difference between the two variants:

- **sequential model parallel** (*in_flight* 1): the next batch enters worker 1 only when the
  previous one has left the last worker, so one worker computes at a time, as with
  ``device_map="auto"``;
- **micro-batch pipeline** (*in_flight* > 1): the next batch enters worker 1 while worker 2
  computes the previous one (GPipe-style inference, batch = micro-batch).

The driver waits until every worker has loaded its layers, runs ``warmup`` batches, then times
batch arrivals at its end for ``steady_s`` seconds (:func:`bench.fair.steady_rate`).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue as queue_mod
import time
from dataclasses import dataclass

from bench.fair import BenchError, check_window, steady_rate
from bench.spawned import start_with_threads

#: Seconds a worker may take to import torch and load its layers before the run is abandoned.
START_TIMEOUT_S = 900.0
#: Seconds one batch may take through the whole chain before the run is abandoned.
BATCH_TIMEOUT_S = 600.0
_STOP = "stop"


@dataclass(frozen=True)
class ChainVariant:
    """*in_flight* batches at a time through the chain of stage workers."""

    in_flight: int

    def __post_init__(self) -> None:
        if self.in_flight < 1:
            raise BenchError(f"batches in flight must be >= 1, got {self.in_flight}")

    @property
    def name(self) -> str:
        if self.in_flight == 1:
            return "torch sequential model parallel"
        return f"torch micro-batch pipeline ({self.in_flight} in flight)"


def micro_batch_depth(workers: int) -> int:
    """Batches in flight for the micro-batch pipeline: one being computed by each worker and one
    waiting in front of each, so no worker waits for the driver or for a transfer."""
    if workers < 1:
        raise BenchError(f"workers must be >= 1, got {workers}")
    return 2 * workers


def ideal_speedup(stage_seconds) -> float:
    """What a perfect pipeline gains over one batch at a time: the sum of the stages' seconds per
    batch over the slowest stage's (2.0 for two equal stages)."""
    seconds = list(stage_seconds)
    if not seconds or min(seconds) < 0 or max(seconds) <= 0:
        raise BenchError(f"stage seconds must be >= 0 and not all 0, got {seconds}")
    return sum(seconds) / max(seconds)


@dataclass(frozen=True)
class ChainSettings:
    model: str
    layout_spec: str
    stages: int
    threads: int  # intra-op threads per worker
    dtype: str
    batch: int
    pool_rows: int
    warmup: int
    steady_s: float

    def __post_init__(self) -> None:
        check_window(self.steady_s, pool_rows=self.pool_rows, batch=self.batch)


@dataclass(frozen=True)
class ChainResult:
    rows_per_s: float
    load_s: float  # spawn to the last worker's layers loaded
    stage_seconds: tuple[float, ...]  # each worker's mean compute seconds per batch


def _worker(settings: ChainSettings, index: int, inbound, outbound, report) -> None:
    started = time.perf_counter()
    try:
        import torch
        from transformers.utils import logging as hf_logging

        from ray_jobs.model.staged import ModelStage

        hf_logging.disable_progress_bar()
        torch.set_num_threads(settings.threads)
        stage = ModelStage(settings.model, settings.layout_spec, index, settings.threads, settings.dtype)
        report.put(("ready", index, time.perf_counter() - started))
        busy, batches = 0.0, 0
        while True:
            batch = inbound.get()
            if isinstance(batch, str):  # _STOP: pass it on and leave
                outbound.put(batch)
                break
            t0 = time.perf_counter()
            out = stage(batch)
            if batches:  # the first batch warms the stage up
                busy += time.perf_counter() - t0
            batches += 1
            outbound.put(out)
        report.put(("busy", index, busy / max(1, batches - 1)))
    except BaseException as exc:  # reported to the driver, which fails the variant with it
        report.put(("error", index, f"{type(exc).__name__}: {exc}"))


def _batches(rows: dict, batch: int):
    starts = list(range(0, len(rows["id"]) - batch + 1, batch))
    k = 0
    while True:
        lo = starts[k % len(starts)]
        yield {key: v[lo : lo + batch] for key, v in rows.items()}
        k += 1


def _get(q, report, reports: list, timeout: float, what: str):
    """The next item of *q*; a worker's error on *report* fails the run at once, and its other
    reports are kept in *reports*."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return q.get(timeout=1.0)
        except queue_mod.Empty:
            pass
        with contextlib.suppress(queue_mod.Empty):
            reports.append(report.get_nowait())
        for kind, index, value in reports:
            if kind == "error":
                raise BenchError(f"stage worker {index + 1}: {value}")
        if time.monotonic() > deadline:
            raise BenchError(f"no {what} within {timeout:.0f}s")


def run_chain(settings: ChainSettings, variant: ChainVariant) -> ChainResult:
    """Run *variant* over fresh worker processes and return its steady-state rows/s."""
    from bench.rows import make_rows
    from ray_jobs.model.checkpoint import open_checkpoint

    rows = make_rows(open_checkpoint(settings.model), settings.pool_rows)
    ctx = mp.get_context("spawn")
    queues = [ctx.Queue() for _ in range(settings.stages + 1)]
    report = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(settings, i, queues[i], queues[i + 1], report))
        for i in range(settings.stages)
    ]
    start_with_threads(procs, settings.threads)
    try:
        load_s = 0.0
        for _ in procs:
            kind, index, value = report.get(timeout=START_TIMEOUT_S)
            if kind == "error":
                raise BenchError(f"stage worker {index + 1}: {value}")
            load_s = max(load_s, value)
        reports: list = []  # what the workers report while batches run (their errors, their busy time)
        source = _batches(rows, settings.batch)
        times: list[float] = []
        sizes: list[int] = []
        for _ in range(variant.in_flight):
            queues[0].put(next(source))
        window_opens = max(0, settings.warmup - 1)  # as bench.fair.steady_rate counts it
        while True:
            out = _get(queues[-1], report, reports, BATCH_TIMEOUT_S, "batch out of the last worker")
            times.append(time.perf_counter())
            sizes.append(len(out["id"]))
            if len(times) > window_opens + 1 and times[-1] - times[window_opens] >= settings.steady_s:
                break
            queues[0].put(next(source))
        queues[0].put(_STOP)
        while not isinstance(_get(queues[-1], report, reports, BATCH_TIMEOUT_S, "stop through the chain"), str):
            pass  # the batches still in flight
        busy: dict[int, float] = {}
        while True:
            for kind, index, value in reports:
                if kind == "error":
                    raise BenchError(f"stage worker {index + 1}: {value}")
                if kind == "busy":
                    busy[index] = value
            if len(busy) == len(procs):
                break
            reports.append(report.get(timeout=60))
        stage_seconds = tuple(busy[i] for i in range(len(procs)))
        return ChainResult(steady_rate(times, sizes, settings.warmup), load_s, stage_seconds)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
