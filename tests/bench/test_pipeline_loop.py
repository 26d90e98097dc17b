"""The pipeline benchmark's source: many short read tasks, so Ray Data's backpressure bounds it."""

from __future__ import annotations

from bench.pipeline_loop import SOURCE_BATCHES_PER_TASK, source_tasks


def test_the_source_is_short_tasks_that_cover_every_batch_once():
    tasks = source_tasks(10, per_task=4)
    assert tasks == [(0, 4), (4, 4), (8, 2)]
    covered = [b for first, count in source_tasks(1001) for b in range(first, first + count)]
    assert covered == list(range(1001))
    assert max(count for _, count in source_tasks(1001)) == SOURCE_BATCHES_PER_TASK


def test_no_batches_no_tasks():
    assert source_tasks(0) == []
