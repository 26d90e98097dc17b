"""Bench processes start with the intra-op thread count they are told, and the parent's own
setting is left as it was."""

import multiprocessing as mp
import os

from bench.spawned import start_with_threads


def _report_threads(queue) -> None:
    queue.put(os.environ.get("OMP_NUM_THREADS"))


def test_spawned_processes_inherit_the_thread_count_and_the_parent_keeps_its_own(monkeypatch):
    ctx = mp.get_context("spawn")
    for parent in (None, "7"):
        if parent is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", parent)
        queue = ctx.Queue()
        procs = [ctx.Process(target=_report_threads, args=(queue,)) for _ in range(2)]
        start_with_threads(procs, 3)
        seen = [queue.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert seen == ["3", "3"]
        assert os.environ.get("OMP_NUM_THREADS") == parent
