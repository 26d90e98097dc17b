"""Write one partition's embeddings and rejects, and commit it with ``_SUCCESS``.

Protocol (DESIGN.md, "Output layout"):

1. An attempt takes a fresh id and writes a lease, ``attempt=<id>/_ATTEMPT``, refreshed while
   it runs. Nothing under the partition is deleted to make room.
2. Ray Data write tasks (:mod:`ray_jobs.job.datasink`) each write their rows with a
   :class:`PartFileWriter`: ``attempt=<id>/part-<task>-<n>.parquet`` and
   ``attempt=<id>/rejects-<task>.parquet``. A retried task rewrites its own names.
3. On the driver, :func:`commit_attempt` checks that every input row is accounted for,
   rejects ids seen in two tasks, checks every file's size in storage, and creates the marker
   only if absent (:func:`ray_jobs.storage.create_exclusive`). The marker names the attempt
   and lists its files. An attempt that finds a valid marker already there has lost: it
   removes its own directory and raises :class:`~ray_jobs.errors.CommitConflict`.
   ``--force`` replaces a valid marker atomically after copying it to ``_history/``.
4. Attempts that never committed are removed by their own process when they fail or lose,
   and by any later attempt once their lease is stale. Files of an attempt named by the
   current marker or by one in ``_history/`` are never deleted (Iceberg snapshots may
   reference them).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_jobs import storage
from ray_jobs.contract import (
    ATTEMPT_PREFIX,
    HISTORY_DIR,
    LEASE_FILE,
    REJECTS_SCHEMA,
    SUCCESS_FILE,
    CommitMarker,
    CommittedFile,
    attempt_dir_name,
    embeddings_schema,
    join_uri,
    marker_problems,
    new_attempt_id,
    part_file_name,
    rejects_file_name,
)
from ray_jobs.errors import CommitConflict, OutputError

log = logging.getLogger(__name__)

#: An attempt refreshes its lease this often; one silent for LEASE_TTL_S is dead.
HEARTBEAT_S = 30.0
LEASE_TTL_S = 600.0
#: Rows per Parquet row group inside a part file.
ROW_GROUP_ROWS = 8192


def reason_category(reason: str) -> str:
    """``"missing object: s3://b/k"`` -> ``"missing object"``."""
    return reason.split(":", 1)[0].strip() or "unknown"


# --------------------------------------------------------------------------- reading a commit


def read_marker(partition_uri: str) -> CommitMarker | None:
    uri = join_uri(partition_uri, SUCCESS_FILE)
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        return None
    return CommitMarker.from_json(text, uri)


def read_marker_or_refuse(partition_uri: str) -> CommitMarker | None:
    """The marker for a writer: an unreadable one stops it (it may list files that must stay)."""
    try:
        return read_marker(partition_uri)
    except OutputError as exc:
        raise OutputError(
            f"{exc}; not replacing a marker this version cannot read (the files it lists must stay): "
            "inspect it, and remove it to re-embed the partition"
        ) from exc


def listed_sizes(partition_uri: str, marker: CommitMarker) -> dict[str, int]:
    """Sizes in storage of the files *marker* lists (one listing per directory they are in)."""
    fs, path = storage.filesystem_for(partition_uri)
    out: dict[str, int] = {}
    for parent in sorted({posixpath.dirname(f.path) for f in marker.listed}):
        where = f"{path}/{parent}" if parent else path
        storage.invalidate(fs, where)
        try:
            entries = fs.ls(where, detail=True)
        except FileNotFoundError:
            continue
        for e in entries:
            if e["type"] == "file":
                out[posixpath.join(parent, e["name"].rstrip("/").rsplit("/", 1)[-1])] = e["size"]
    return out


def check_commit(partition_uri: str, **expect) -> tuple[CommitMarker | None, list[str]]:
    """The partition's marker and why it cannot be trusted (no problems: it is committed).

    *expect* goes to :func:`ray_jobs.contract.marker_problems` (model_id, plan_id, partition,
    rows_planned, embed_dim)."""
    try:
        marker = read_marker(partition_uri)
    except OutputError as exc:
        return None, [str(exc)]
    if marker is None:
        return None, [f"missing: no {SUCCESS_FILE}"]
    return marker, marker_problems(marker, listed_sizes(partition_uri, marker), **expect)


def committed_marker(partition_uri: str, model_id: str) -> CommitMarker | None:
    """The marker if the partition is committed, reconciles and all its files are intact."""
    marker, problems = check_commit(partition_uri, model_id=model_id)
    if problems:
        if marker is not None or not problems[0].startswith("missing:"):
            log.warning("partition %s is not validly committed (%s); it will be redone", partition_uri, problems[0])
        return None
    return marker


# --------------------------------------------------------------------------- attempts


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Attempt:
    """One try at a partition: its id, its directory and its lease (refreshed by a thread)."""

    def __init__(self, partition_uri: str, attempt_id: str | None = None, heartbeat_s: float = HEARTBEAT_S):
        self.partition_uri = partition_uri
        self.id = attempt_id or new_attempt_id()
        self.uri = join_uri(partition_uri, attempt_dir_name(self.id))
        self.heartbeat_s = heartbeat_s
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write_lease(self) -> None:
        lease = {
            "attempt": self.id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "heartbeat_at": time.time(),
        }
        storage.replace_text(join_uri(self.uri, LEASE_FILE), json.dumps(lease))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write_lease()
            except OSError as exc:  # a missed beat is not fatal; a long silence makes us look dead
                log.warning("attempt %s: lease refresh failed: %s", self.id, exc)

    def __enter__(self) -> Attempt:
        self._write_lease()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.id}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop_heartbeat()

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def discard(self) -> None:
        """Stop the lease and remove this attempt's files, unless a marker names it (then they
        are committed). An unreadable marker leaves them to a later cleanup."""
        self._stop_heartbeat()
        protected = protected_attempts(self.partition_uri)
        if protected is None or self.id in protected:
            return
        storage.remove_tree(self.uri)


def protected_attempts(partition_uri: str) -> set[str] | None:
    """Attempts whose files must never be deleted: the current marker's and every one in
    ``_history/``. None when the current marker is unreadable (then nothing may be deleted)."""
    try:
        marker = read_marker(partition_uri)
    except OutputError:
        return None
    keep = {marker.attempt} if marker is not None else set()
    for uri in storage.list_files(join_uri(partition_uri, HISTORY_DIR)):
        keep.add(posixpath.basename(uri).removesuffix(".json"))
    return keep


def clean_dead_attempts(partition_uri: str, keep: str | None = None, ttl_s: float = LEASE_TTL_S) -> list[str]:
    """Remove attempts that never committed and whose lease is stale; return their ids."""
    protected = protected_attempts(partition_uri)
    if protected is None:
        log.warning("partition %s: unreadable %s; not cleaning up any attempt", partition_uri, SUCCESS_FILE)
        return []
    removed = []
    for name in storage.list_dirs(partition_uri):
        attempt = name.removeprefix(ATTEMPT_PREFIX)
        if attempt in (name, keep) or attempt in protected:
            continue
        uri = join_uri(partition_uri, name)
        try:
            beat = float(json.loads(storage.read_text(join_uri(uri, LEASE_FILE)))["heartbeat_at"])
        except FileNotFoundError:
            beat = 0.0  # the lease is an attempt's first file: none left means it died starting
        except (ValueError, KeyError, TypeError):
            beat = 0.0
        if time.time() - beat > ttl_s:
            storage.remove_tree(uri)
            removed.append(attempt)
    if removed:
        log.info("partition %s: removed dead uncommitted attempts %s", partition_uri, removed)
    return removed


# --------------------------------------------------------------------------- write tasks


@dataclass
class WrittenFile:
    path: str  # relative to the partition directory
    rows: int
    bytes: int
    id_hashes: bytes = b""  # uint64 hashes of the file's ids, in row order (duplicate check)

    def committed(self) -> CommittedFile:
        return CommittedFile(self.path, self.rows, self.bytes)


@dataclass
class TaskResult:
    """What one write task reports to the driver: small, whatever the partition's size."""

    files: list[WrittenFile] = field(default_factory=list)
    rejects: list[WrittenFile] = field(default_factory=list)
    rows_seen: int = 0
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    first_block_at: float | None = None


def _hash_ids(ids: pa.Array) -> np.ndarray:
    """64-bit hashes of *ids* (stable across processes, unlike ``hash()``)."""
    digests = b"".join(hashlib.blake2b(v.encode(), digest_size=8).digest() for v in ids.to_pylist())
    return np.frombuffer(digests, dtype=np.uint64)


@dataclass
class _OpenFile:
    """The part file a writer is filling."""

    name: str
    handle: object
    writer: pq.ParquetWriter
    rows: int = 0
    hashes: list[np.ndarray] = field(default_factory=list)


class PartFileWriter:
    """Streams one write task's batches into part files of at most *rows_per_file* rows."""

    def __init__(self, attempt_uri: str, task: int, text_dim: int, image_dim: int, rows_per_file: int):
        if rows_per_file <= 0:
            raise ValueError("rows_per_file must be positive")
        self.fs, self.path = storage.filesystem_for(attempt_uri)
        self.rel = posixpath.basename(self.path)  # attempt=<id>
        self.task, self.rows_per_file = task, rows_per_file
        self.text_dim, self.image_dim = text_dim, image_dim
        self.schema = embeddings_schema(text_dim, image_dim)
        self.result = TaskResult()
        self.rejects: dict[str, list[str]] = {"id": [], "stage": [], "reason": []}
        self.seen: set[str] = set()
        self._buf: list[pa.RecordBatch] = []
        self._buf_rows = 0
        self._file: _OpenFile | None = None

    def _reject(self, row_id: str, stage: str, reason: str) -> None:
        self.rejects["id"].append(row_id)
        self.rejects["stage"].append(stage)
        self.rejects["reason"].append(reason)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        if self.result.first_block_at is None:
            self.result.first_block_at = time.time()
        ids = batch["id"]
        n = len(ids)
        ok = np.asarray(batch["ok"], dtype=bool).copy()
        self.result.rows_seen += n
        text = np.asarray(batch.get("text_embedding", np.zeros((n, self.text_dim))), dtype=np.float32)
        image = np.asarray(batch.get("image_embedding", np.zeros((n, self.image_dim))), dtype=np.float32)
        finite = np.isfinite(text).all(axis=1) & np.isfinite(image).all(axis=1)
        for r in range(n):
            row_id = str(ids[r])
            if not ok[r]:
                self._reject(row_id, str(batch["reject_stage"][r]), str(batch["reject_reason"][r]))
            elif row_id in self.seen:
                ok[r] = False
                self._reject(row_id, "sink", "duplicate id: already embedded earlier in this partition")
            elif not finite[r]:
                ok[r] = False
                self._reject(row_id, "sink", "non-finite embedding: NaN or Inf in model output")
            else:
                self.seen.add(row_id)
        keep = np.flatnonzero(ok)
        if len(keep) == 0:
            return
        rb = pa.RecordBatch.from_arrays(
            [
                pa.array([str(i) for i in ids[keep]], pa.string()),
                pa.FixedSizeListArray.from_arrays(pa.array(text[keep].reshape(-1)), self.text_dim),
                pa.FixedSizeListArray.from_arrays(pa.array(image[keep].reshape(-1)), self.image_dim),
            ],
            schema=self.schema,
        )
        self._buf.append(rb)
        self._buf_rows += rb.num_rows
        self._drain(final=False)

    def _drain(self, final: bool) -> None:
        """Write buffered rows as row groups, rolling to a new file at rows_per_file."""
        while self._buf_rows and (final or self._buf_rows >= ROW_GROUP_ROWS or self._room() <= self._buf_rows):
            table = pa.Table.from_batches(self._buf, schema=self.schema)
            take = min(self._room(), ROW_GROUP_ROWS, table.num_rows)
            self._write_rows(table.slice(0, take))
            rest = table.slice(take)
            self._buf, self._buf_rows = rest.to_batches(), rest.num_rows
            if self._file is not None and self._file.rows >= self.rows_per_file:
                self._close_file()

    def _room(self) -> int:
        return self.rows_per_file - (self._file.rows if self._file is not None else 0)

    def _write_rows(self, table: pa.Table) -> None:
        if self._file is None:
            name = part_file_name(self.task, len(self.result.files))
            handle = self.fs.open(f"{self.path}/{name}", "wb")
            self._file = _OpenFile(name, handle, pq.ParquetWriter(handle, self.schema, compression="zstd"))
        self._file.writer.write_table(table, row_group_size=table.num_rows)
        self._file.rows += table.num_rows
        self._file.hashes.append(_hash_ids(table["id"].combine_chunks()))

    def _close_file(self) -> None:
        f, self._file = self._file, None
        f.writer.close()
        size = f.handle.tell()
        f.handle.close()
        hashes = np.concatenate(f.hashes).astype(np.uint64).tobytes()
        self.result.files.append(WrittenFile(f"{self.rel}/{f.name}", f.rows, size, hashes))

    def abort(self) -> None:
        """Drop a half-written part file (on S3: abort its multipart upload instead of completing it)."""
        f, self._file = self._file, None
        if f is None:
            return
        try:
            f.writer.close()  # before the handle, or the writer's finaliser writes to a closed file
        except Exception as exc:
            log.debug("closing the writer of %s: %s", f.name, exc)
        try:
            if isinstance(self.fs, storage.LocalFileSystem):
                f.handle.close()  # the attempt's directory goes as a whole
            else:
                f.handle.discard()
        except Exception as exc:  # best effort on a path that is failing anyway
            log.warning("could not drop half-written %s: %s", f.name, exc)

    def finish(self) -> TaskResult:
        """Flush, write this task's rejects file (if it has rejects), return what was written."""
        self._drain(final=True)
        if self._file is not None:
            self._close_file()
        if self.rejects["id"]:
            name = rejects_file_name(self.task)
            self.result.rejects.append(_write_table(self.fs, self.path, self.rel, name, self.rejects, REJECTS_SCHEMA))
        self.result.rejects_by_reason = dict(collections.Counter(reason_category(r) for r in self.rejects["reason"]))
        return self.result


def _write_table(fs, dir_path: str, rel: str, name: str, columns, schema: pa.Schema) -> WrittenFile:
    table = pa.table(columns, schema=schema) if isinstance(columns, dict) else columns
    with fs.open(f"{dir_path}/{name}", "wb") as fh:
        pq.write_table(table, fh, compression="zstd")
        size = fh.tell()
    return WrittenFile(f"{rel}/{name}", table.num_rows, size)


# --------------------------------------------------------------------------- commit


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
            f.bytes = _write_table(fs, f"{part_path}/{folder}", folder, name, kept, kept.schema).bytes
        fs.rm(f"{part_path}/{old}")
    for r in results:
        r.files = [f for f in r.files if f.rows]
    return results, dropped


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
        fs, path = storage.filesystem_for(attempt.uri)
        columns = {
            "id": dropped,
            "stage": ["sink"] * len(dropped),
            "reason": ["duplicate id: already embedded earlier in this partition"] * len(dropped),
        }
        name = "rejects-dedup.parquet"
        rejects.append(_write_table(fs, path, posixpath.basename(path), name, columns, REJECTS_SCHEMA))
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


def publish_marker(attempt: Attempt, marker: CommitMarker, force: bool = False) -> CommitMarker:
    """Create ``_SUCCESS`` if absent; replace it only under *force* or when the files it lists
    are gone, after keeping it in ``_history/`` (its files stay protected forever)."""
    uri = join_uri(attempt.partition_uri, SUCCESS_FILE)
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
