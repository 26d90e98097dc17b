"""The bare-torch side: a variant's processes run the unsplit model on their shard of the rows.

Every process is spawned fresh (no Ray, no state from another side), loads the reference
model with its own intra-op thread count, runs its warm-up batches, waits at a barrier for
its siblings, then runs batches over its own shard (cycling) until the steady window has
lasted ``steady_s``. The variant's figure is all processes' rows over the slowest one's window
(:func:`bench.fair.data_parallel_rate`).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass

from bench.fair import BenchError, TorchVariant, check_window, data_parallel_rate, shard
from bench.spawned import start_with_threads

#: Seconds a process may take to import torch and load the model before the run is abandoned.
START_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class LoopSettings:
    model: str
    device: str
    dtype: str
    pool_rows: int
    warmup: int
    steady_s: float

    def __post_init__(self) -> None:
        check_window(self.steady_s)
        if self.warmup < 0:
            raise BenchError(f"--warmup must be >= 0, got {self.warmup}")


@dataclass(frozen=True)
class LoopResult:
    rows_per_s: float
    load_s: float  # slowest process: spawn to model loaded
    per_process: tuple[tuple[int, float], ...]


def _process(settings: LoopSettings, variant: TorchVariant, index: int, barrier, queue) -> None:
    started = time.perf_counter()
    try:
        import torch
        from transformers.utils import logging as hf_logging

        from bench.reference_model import reference_for
        from bench.rows import make_rows
        from ray_jobs.model.checkpoint import open_checkpoint

        hf_logging.disable_progress_bar()
        torch.set_num_threads(variant.threads)
        ckpt = open_checkpoint(settings.model)
        model = reference_for(ckpt, device=settings.device, dtype=settings.dtype)
        rows = make_rows(ckpt, settings.pool_rows)
        mine = shard(settings.pool_rows, variant.procs, index)
        if len(mine) < variant.batch:
            raise BenchError(f"shard of {len(mine)} rows is smaller than batch {variant.batch}; raise --pool-rows")
        cols = {k: rows[k][mine.start : mine.stop] for k in ("input_ids", "attention_mask", "pixels")}
        starts = list(range(0, len(mine) - variant.batch + 1, variant.batch))
        cuda = settings.device.startswith("cuda")

        def run(k: int) -> int:
            lo = starts[k % len(starts)]
            sl = slice(lo, lo + variant.batch)
            model.embed(cols["input_ids"][sl], cols["attention_mask"][sl], cols["pixels"][sl])
            if cuda:
                torch.cuda.synchronize()
            return variant.batch

        for k in range(settings.warmup):
            run(k)
        load_s = time.perf_counter() - started
        barrier.wait(timeout=START_TIMEOUT_S)
        t0 = time.perf_counter()
        done, k = 0, settings.warmup
        while True:
            done += run(k)
            k += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= settings.steady_s:
                break
        queue.put((index, done, elapsed, load_s, None))
    except BaseException as exc:  # reported to the parent, which fails the variant with it
        barrier.abort()
        queue.put((index, 0, 0.0, 0.0, f"{type(exc).__name__}: {exc}"))


def run_variant(settings: LoopSettings, variant: TorchVariant) -> LoopResult:
    """Run *variant* in fresh processes and return its aggregate steady-state rows/s."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(variant.procs)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_process, args=(settings, variant, i, barrier, queue)) for i in range(variant.procs)]
    start_with_threads(procs, variant.threads)
    deadline = START_TIMEOUT_S + settings.steady_s * 4 + 60
    results, errors = [], []
    try:
        for _ in procs:
            index, rows, seconds, load_s, error = queue.get(timeout=deadline)
            (errors if error else results).append((index, error) if error else (rows, seconds, load_s))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise BenchError(f"{variant.name}: " + "; ".join(f"process {i}: {e}" for i, e in sorted(errors)))
    per_process = tuple((rows, seconds) for rows, seconds, _ in results)
    return LoopResult(data_parallel_rate(per_process), max(load for *_, load in results), per_process)
