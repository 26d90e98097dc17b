"""The partition job: pre-flight, then one attempt that runs the pipeline into the sink and
commits the partition with ``_SUCCESS`` (a committed partition is skipped)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ray_jobs.job.config import EmbedConfig, PreparedJob
from ray_jobs.job.pipeline import admitted, execute
from ray_jobs.job.preflight import prepare
from ray_jobs.job.ray_start import ensure_ray


@dataclass(frozen=True)
class EmbedResult:
    partition_uri: str
    skipped: bool
    rows_in: int
    rows_ok: int
    rows_rejected: int
    wall_s: float
    rows_per_s: float
    time_to_first_batch_s: float | None
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    attempt: str = ""
    #: start-up figures of the committing attempt (:mod:`ray_jobs.job.startup`), from its marker
    startup: dict[str, float] = field(default_factory=dict)
    #: another attempt committed the partition while this one ran; this one discarded its files
    lost_race: bool = False

    @classmethod
    def from_marker(
        cls,
        uri: str,
        marker,
        *,
        skipped: bool,
        wall_s: float = 0.0,
        first_batch_s: float | None = None,
        lost_race: bool = False,
    ):
        return cls(
            partition_uri=uri,
            skipped=skipped,
            attempt=marker.attempt,
            lost_race=lost_race,
            rows_in=marker.rows_in,
            rows_ok=marker.rows_ok,
            rows_rejected=marker.rows_rejected,
            wall_s=wall_s,
            rows_per_s=marker.rows_in / wall_s if wall_s > 0 else 0.0,
            time_to_first_batch_s=first_batch_s,
            rejects_by_reason=dict(marker.rejects_by_reason),
            startup={k: v for k, v in marker.timings.items() if k.startswith("startup_")},
        )

    def summary(self) -> str:
        if self.lost_race:
            head = "committed by another attempt while this one ran; this attempt discarded its files"
        else:
            head = "already committed, skipped" if self.skipped else "committed"
        line = (
            f"embed: {head}: rows_in={self.rows_in} rows_ok={self.rows_ok} rows_rejected={self.rows_rejected} "
            f"rows/s={self.rows_per_s:.1f} wall={self.wall_s:.1f}s attempt={self.attempt} output={self.partition_uri}"
        )
        if self.startup and not self.skipped:
            figures = " ".join(f"{k.removeprefix('startup_')}={v:.1f}" for k, v in self.startup.items())
            line += f"\nembed: start-up: {figures}"
            if self.time_to_first_batch_s is not None:
                line += f" first_batch_s={self.time_to_first_batch_s:.1f}"
        if self.rejects_by_reason:
            line += "\nembed: rejects by reason: " + ", ".join(f"{k}={v}" for k, v in self.rejects_by_reason.items())
        return line


def run_prepared(job: PreparedJob) -> EmbedResult:
    from ray_jobs.job.datasink import EmbeddingDatasink
    from ray_jobs.output.commit import check_commit_store
    from ray_jobs.output.lease import Attempt, clean_dead_attempts
    from ray_jobs.output.markers import committed_marker, read_marker_or_refuse

    start = time.perf_counter()
    read_marker_or_refuse(job.partition_uri)  # fail now, not after the whole pipeline ran
    expect = {"work_key": job.work_key, "output_key": job.output_key} if job.work_key else {}
    if not job.config.force:
        marker = committed_marker(job.partition_uri, job.model_id, **expect)
        if marker is not None:
            return EmbedResult.from_marker(job.partition_uri, marker, skipped=True)
    check_commit_store(job.partition_uri)  # how the marker will be created, known before any work
    with Attempt(job.partition_uri) as attempt:
        clean_dead_attempts(job.partition_uri, keep=attempt.id)
        sink = EmbeddingDatasink(
            attempt,
            rows_in=job.rows_in,
            text_dim=job.embed_dim,
            image_dim=job.embed_dim,
            rows_per_file=job.config.job.rows_per_file,
            row_group_rows=job.config.job.row_group_rows,
            force=job.config.force,
            commit_meta={
                "model_id": job.model_id,
                "plan_id": job.plan_id,
                "partition": job.partition,
                "work_key": job.work_key,
                "output_key": job.output_key,
                "stages": job.layout.spec(),
            },
        )
        try:
            if job.rows_in:
                ensure_ray(job)
                waiting = time.time()
                with admitted(job) as (admitted_job, remote_args):
                    sink.admission_wait_s = time.time() - waiting
                    execute(admitted_job, sink, remote_args)
            else:  # an empty manifest commits an empty partition without starting Ray
                sink.complete([])
        except BaseException:
            attempt.discard()
            raise
    wall = time.perf_counter() - start
    if sink.conflict is not None:
        winner = committed_marker(job.partition_uri, job.model_id, **expect)
        if winner is None:
            raise sink.conflict
        return EmbedResult.from_marker(job.partition_uri, winner, skipped=True, lost_race=True)
    clean_dead_attempts(job.partition_uri, keep=attempt.id)
    marker = sink.marker
    first = marker.timings.get("time_to_first_batch_s")
    return EmbedResult.from_marker(job.partition_uri, marker, skipped=False, wall_s=wall, first_batch_s=first)


def run_embed(cfg: EmbedConfig) -> EmbedResult:
    return run_prepared(prepare(cfg))
