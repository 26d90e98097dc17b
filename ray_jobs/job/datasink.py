"""The partition's Ray Data ``Datasink``: part files are written by write tasks on the workers.

Each write task turns its blocks into part and rejects files under the attempt's directory
(:class:`ray_jobs.output.parts.PartFileWriter`) and returns a small :class:`ray_jobs.output.parts.TaskResult`;
``on_write_complete`` runs on the driver with those results only (never a row of data) and
commits the partition (:func:`ray_jobs.output.commit.commit_attempt`); ``on_write_failed`` removes the
attempt's files. Driver memory does not grow with the partition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import Datasink, WriteResult

from ray_jobs.errors import CommitConflict, TransientFailure
from ray_jobs.job.startup import breakdown, collect, process_started_at
from ray_jobs.output.commit import commit_attempt
from ray_jobs.output.lease import Attempt
from ray_jobs.output.parts import PartFileWriter, TaskResult

log = logging.getLogger(__name__)

#: Errors that say the output location itself is wrong: retrying the task will not help.
_WRONG_OUTPUT = (FileNotFoundError, PermissionError, IsADirectoryError)
#: Columns the sink reads from a block; hidden states and inputs are never converted.
_COLUMNS = ("id", "ok", "reject_stage", "reject_reason", "text_embedding", "image_embedding")


class EmbeddingDatasink(Datasink[TaskResult]):
    """Writes one partition under one attempt and commits it when every task has finished."""

    def __init__(
        self,
        attempt: Attempt,
        *,
        rows_in: int,
        text_dim: int,
        image_dim: int,
        rows_per_file: int,
        row_group_rows: int,
        force: bool = False,
        commit_meta: dict[str, Any] | None = None,
    ):
        self.partition_uri, self.attempt_id, self.attempt_uri = attempt.partition_uri, attempt.id, attempt.uri
        self._attempt = attempt  # driver side only (dropped when pickled for the write tasks)
        self.rows_in, self.text_dim, self.image_dim = rows_in, text_dim, image_dim
        self.rows_per_file, self.row_group_rows, self.force = rows_per_file, row_group_rows, force
        self.commit_meta = dict(commit_meta or {})
        self.started_at = time.time()
        self.pipeline_started_at: float | None = None
        #: start-up figures (driver side; the actors' come from :func:`ray_jobs.job.startup.collect`)
        self.driver_started_at = process_started_at()
        self.admission_wait_s = 0.0
        self.marker = None
        self.conflict: CommitConflict | None = None
        #: driver side only: the executed dataset whose stats go into the marker, and its operators
        self.stats_dataset = None
        self.stats_shapes: tuple = ()
        #: a :class:`ray_jobs.job.progress.RowCounter` actor the write tasks add their rows to (or None)
        self.progress_counter = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_attempt"] = None
        state["stats_dataset"] = None
        return state

    def get_name(self) -> str:
        return "WriteEmbeddings"

    @property
    def min_rows_per_write(self) -> int:
        """Bundle about a file's worth of rows into each write task (not one file per batch)."""
        return self.rows_per_file

    def write(self, blocks: Iterable[Block], ctx) -> TaskResult:
        writer = PartFileWriter(
            self.attempt_uri, ctx.task_idx, self.text_dim, self.image_dim, self.rows_per_file, self.row_group_rows
        )
        try:
            for block in blocks:
                acc = BlockAccessor.for_block(block)
                present = [c for c in _COLUMNS if c in acc.column_names()]
                batch = BlockAccessor.for_block(acc.select(present)).to_batch_format("numpy")
                seen, rejected = writer.result.rows_seen, len(writer.rejects["id"])
                writer.add(batch)
                if self.progress_counter is not None:  # fire and forget: progress never slows the write
                    new_rejected = len(writer.rejects["id"]) - rejected
                    self.progress_counter.add.remote(writer.result.rows_seen - seen - new_rejected, new_rejected)
            return writer.finish()
        except BaseException as exc:
            writer.abort()
            if isinstance(exc, OSError) and not isinstance(exc, _WRONG_OUTPUT):
                raise TransientFailure(f"writing {self.attempt_uri}: {type(exc).__name__}: {exc}") from exc
            raise  # a wrong output location or a bug: retrying will not help

    def complete(self, results: list[TaskResult]):
        """Commit with *results*; a lost race is recorded in ``self.conflict``, not raised."""
        wall = time.time() - self.started_at
        timings = {"wall_s": round(wall, 3), "rows_per_s": round(self.rows_in / wall, 3) if wall > 0 else 0.0}
        if self.pipeline_started_at is not None:
            actors = collect(self.attempt_id)
            t0 = self.pipeline_started_at
            for a in sorted(actors, key=lambda a: a.init_done_at):
                log.info(
                    "start-up of %s (pid %d), seconds after the pipeline's start: process %.1f, "
                    "constructor %.1f-%.1f (model load %.1f)",
                    a.op,
                    a.pid,
                    a.process_started_at - t0,
                    a.init_started_at - t0,
                    a.init_done_at - t0,
                    a.model_load_s,
                )
            startup = breakdown(
                driver_started_at=self.driver_started_at,
                pipeline_started_at=self.pipeline_started_at,
                admission_wait_s=self.admission_wait_s,
                actors=actors,
            )
            if startup.actor_start_s is None:
                log.warning("attempt %s: no actor recorded its start-up (driver figures only)", self.attempt_id)
            timings.update(startup.to_timings())
        stage_stats = ()
        if self.stats_dataset is not None:
            from ray_jobs.perf.stage_stats import stage_stats_of

            stage_stats = stage_stats_of(self.stats_dataset, self.stats_shapes)
        try:
            self.marker = commit_attempt(
                self._attempt,
                results,
                rows_in=self.rows_in,
                text_dim=self.text_dim,
                image_dim=self.image_dim,
                force=self.force,
                pipeline_started_at=self.pipeline_started_at,
                timings=timings,
                stage_stats=stage_stats,
                **self.commit_meta,
            )
        except CommitConflict as exc:
            self._attempt.discard()
            self.conflict = exc
            log.warning("%s", exc)
        return self.marker

    def on_write_complete(self, write_result: WriteResult[TaskResult]) -> None:
        self.complete([r for r in write_result.write_returns if r is not None])

    def on_write_failed(self, error: Exception) -> None:
        log.warning("attempt %s failed (%s); removing its files", self.attempt_id, error)
        try:
            self._attempt.discard()
        except OSError as exc:  # best effort: a later attempt removes it once its lease is stale
            log.warning("attempt %s: cleanup failed: %s", self.attempt_id, exc)
