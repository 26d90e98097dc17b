"""Run one bench side in a fresh spawned process and take its one result from a queue."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

from bench.fair import BenchError


def run_spawned(target, args: tuple, *, timeout_s: float, what: str):
    """Call ``target(*args, started_at, queue)`` in a spawned process; return what it put on the
    queue. A string result is the child's error: raised as :class:`BenchError` naming *what*."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, time.time(), queue))
    proc.start()
    try:
        got = queue.get(timeout=timeout_s)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    if isinstance(got, str):
        raise BenchError(f"{what} failed: {got}")
    return got


def start_with_threads(procs, threads: int) -> None:
    """Start *procs* (spawned processes, not yet started) with ``OMP_NUM_THREADS`` = *threads*,
    which they inherit; this process's own value is put back afterwards."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        for p in procs:
            p.start()
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before
