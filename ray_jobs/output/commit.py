"""Commit a partition: seal an attempt's files with the ``_SUCCESS`` marker.

Protocol (docs/architecture.md, "The commit protocol"):

1. An attempt takes a fresh id and writes a lease (:class:`ray_jobs.output.lease.Attempt`),
   refreshed while it runs. Nothing under the partition is deleted to make room.
2. Ray Data write tasks (:mod:`ray_jobs.job.datasink`) each write their rows with a
   :class:`~ray_jobs.output.parts.PartFileWriter` under the attempt's directory.
3. On the driver, :func:`commit_attempt` checks that every input row is accounted for,
   rejects ids seen in two tasks, checks every file's size in storage, and creates the marker
   only if absent (:func:`ray_jobs.storage.create_exclusive`). The marker names the attempt
   and lists its files. An attempt that finds a valid marker already there has lost: it
   removes its own directory and raises :class:`~ray_jobs.errors.CommitConflict`.
   ``--force`` replaces a valid marker atomically after copying it to ``_history/``.
4. Attempts that never committed are removed by their own process when they fail or lose,
   and by any later attempt once their lease is stale
   (:func:`ray_jobs.output.lease.clean_dead_attempts`). Files of an attempt named by the
   current marker or by one in ``_history/`` are never deleted (Iceberg snapshots may
   reference them).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import logging
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_jobs import storage
from ray_jobs.contract.layout import HISTORY_DIR, REJECTS_SCHEMA, SUCCESS_FILE, join_uri
from ray_jobs.contract.marker import CommitMarker, marker_problems
from ray_jobs.errors import CommitConflict, OutputError
from ray_jobs.output.lease import Attempt
from ray_jobs.output.markers import listed_sizes, read_marker_or_refuse
from ray_jobs.output.parts import TaskResult, WrittenFile, write_parquet

log = logging.getLogger(__name__)


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _cross_task_duplicates(attempt: Attempt, results: list[TaskResult]) -> tuple[list[TaskResult], list[str]]:
    """Ids embedded by two write tasks: keep the first, rewrite the other files without them.

    The driver holds 8 bytes per embedded row for this check (hashes, not embeddings); only
    files holding a duplicate are read back, one at a time."""
    files = [f for r in results for f in r.files]
    if not files:
        return results, []
    hashes = [np.frombuffer(f.id_hashes, dtype=np.uint64) for f in files]
    values, counts = np.unique(np.concatenate(hashes), return_counts=True)
    dup_hashes = values[counts > 1]
    if not len(dup_hashes):
        return results, []
    fs, part_path = storage.filesystem_for(attempt.partition_uri)
    seen: set[str] = set()
    dropped: list[str] = []
    for f, h in zip(files, hashes, strict=True):
        suspicious = np.isin(h, dup_hashes)
        if not suspicious.any():
            continue
        with fs.open(f"{part_path}/{f.path}", "rb") as fh:
            table = pq.read_table(fh)
        ids = table["id"].to_pylist()
        keep = np.ones(len(ids), dtype=bool)
        for r in np.flatnonzero(suspicious):
            if ids[r] in seen:
                keep[r] = False
                dropped.append(ids[r])
            seen.add(ids[r])
        if keep.all():
            continue
        kept = table.filter(pa.array(keep))
        old, f.rows = f.path, kept.num_rows
        if kept.num_rows:  # the file is this uncommitted attempt's own: rewrite it under a new name
            f.path = old.removesuffix(".parquet") + "-dedup.parquet"
            folder, name = posixpath.split(f.path)
            f.bytes = write_parquet(fs, f"{part_path}/{folder}", folder, name, kept, kept.schema).bytes
        fs.rm(f"{part_path}/{old}")
    for r in results:
        r.files = [f for f in r.files if f.rows]
    return results, dropped


def _write_duplicate_rejects(attempt: Attempt, dropped: list[str]) -> WrittenFile:
    """The rejects file of the ids :func:`_cross_task_duplicates` dropped, in the attempt's directory."""
    fs, path = storage.filesystem_for(attempt.uri)
    columns = {
        "id": dropped,
        "stage": ["sink"] * len(dropped),
        "reason": ["duplicate id: already embedded earlier in this partition"] * len(dropped),
    }
    name = "rejects-dedup.parquet"
    return write_parquet(fs, path, posixpath.basename(path), name, columns, REJECTS_SCHEMA)


def commit_attempt(
    attempt: Attempt,
    results: list[TaskResult],
    *,
    rows_in: int,
    text_dim: int,
    image_dim: int,
    force: bool = False,
    pipeline_started_at: float | None = None,
    **meta,
) -> CommitMarker:
    """Seal the partition with *attempt*'s files; raise CommitConflict if another attempt won."""
    rows_seen = sum(r.rows_seen for r in results)
    if rows_seen != rows_in:
        raise OutputError(f"partition {attempt.partition_uri}: {rows_in} rows in but {rows_seen} reached the sink")
    results, dropped = _cross_task_duplicates(attempt, results)
    by_reason = collections.Counter()
    for r in results:
        by_reason.update(r.rejects_by_reason)
    rejects = [f for r in results for f in r.rejects]
    if dropped:
        rejects.append(_write_duplicate_rejects(attempt, dropped))
        by_reason["duplicate id"] += len(dropped)
    files = [f for r in results for f in r.files]
    rows_ok, rows_rejected = sum(f.rows for f in files), sum(f.rows for f in rejects)
    if rows_ok + rows_rejected != rows_in:
        raise OutputError(
            f"partition {attempt.partition_uri}: {rows_in} rows in but {rows_ok} embedded + {rows_rejected} "
            "rejected; not committing"
        )
    firsts = [r.first_block_at for r in results if r.first_block_at is not None]
    timings = dict(meta.pop("timings", {}))
    if firsts and pipeline_started_at is not None:
        timings["time_to_first_batch_s"] = round(min(firsts) - pipeline_started_at, 3)
    marker = CommitMarker(
        rows_in=rows_in,
        rows_ok=rows_ok,
        rows_rejected=rows_rejected,
        text_dim=text_dim,
        image_dim=image_dim,
        files=tuple(sorted((f.committed() for f in files), key=lambda c: c.path)),
        rejects=tuple(sorted((f.committed() for f in rejects), key=lambda c: c.path)),
        attempt=attempt.id,
        rejects_by_reason=dict(sorted(by_reason.items())),
        timings=timings,
        committed_at=_now_iso(),
        **meta,
    )
    problems = marker_problems(marker, listed_sizes(attempt.partition_uri, marker))
    if problems:
        raise OutputError(f"partition {attempt.partition_uri}: not committing: {'; '.join(problems[:5])}")
    return publish_marker(attempt, marker, force=force)


#: The object that every attempt under one output folder probes conditional writes with.
COMMIT_PROBE_FILE = "_COMMIT_PROBE"


def commit_probe_uri(partition_uri: str) -> str:
    """The probe object: beside the partitions (never inside one), one deterministic name."""
    return join_uri(posixpath.dirname(partition_uri.rstrip("/")), COMMIT_PROBE_FILE)


def check_commit_store(partition_uri: str) -> bool:
    """Whether the store holding *partition_uri* honours ``If-None-Match: *`` (asked once per
    store and process: :func:`ray_jobs.storage.probe_conditional_create`). A store that ignores
    it commits through the claim protocol; said once, at job start."""
    honoured = storage.probe_conditional_create(commit_probe_uri(partition_uri))
    if not honoured and storage.is_remote(partition_uri):
        log.warning(
            "the output store of %s does not refuse a conditional PUT of an existing object (If-None-Match: *): "
            "markers are created through claims (claim, list, check, put) instead",
            partition_uri,
        )
    return honoured


def publish_marker(attempt: Attempt, marker: CommitMarker, force: bool = False) -> CommitMarker:
    """Create ``_SUCCESS`` if absent; replace it only under *force* or when the files it lists
    are gone, after keeping it in ``_history/`` (its files stay protected forever)."""
    uri = join_uri(attempt.partition_uri, SUCCESS_FILE)
    storage.probe_conditional_create(commit_probe_uri(attempt.partition_uri))  # known since job start
    current = None
    for _ in range(2):  # a marker removed by hand between our two calls: try again once
        if storage.create_exclusive(uri, marker.to_json()):
            return marker
        current = read_marker_or_refuse(attempt.partition_uri)
        if current is not None:
            break
    if current is None:
        raise OutputError(f"partition {attempt.partition_uri}: {SUCCESS_FILE} keeps appearing and vanishing")
    if current.attempt == attempt.id:
        return current  # our own write, reported as a conflict by a retried request
    problems = marker_problems(current, listed_sizes(attempt.partition_uri, current), model_id=marker.model_id)
    if not problems and not force:
        raise CommitConflict(
            f"partition {attempt.partition_uri} was committed by attempt {current.attempt} first; "
            f"attempt {attempt.id} discarded its files"
        )
    history = join_uri(attempt.partition_uri, HISTORY_DIR, f"{current.attempt or 'unnamed'}.json")
    storage.replace_text(history, current.to_json())
    marker = dataclasses.replace(marker, supersedes=current.attempt)
    why = problems[0] if problems else "--force"
    log.warning("partition %s: replacing the marker (%s)", attempt.partition_uri, why)
    storage.replace_text(uri, marker.to_json())
    return marker
