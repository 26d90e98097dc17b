"""Part files: what one Ray Data write task writes under its attempt's directory.

Each write task (:mod:`ray_jobs.job.datasink`) streams its batches through a
:class:`PartFileWriter` into ``attempt=<id>/part-<task>-<n>.parquet`` files and, if it
rejected rows, one ``attempt=<id>/rejects-<task>.parquet``, and reports a small
:class:`TaskResult` to the driver. A retried task rewrites its own names.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import posixpath
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_jobs import storage
from ray_jobs.contract.layout import REJECTS_SCHEMA, embeddings_schema, part_file_name, rejects_file_name
from ray_jobs.contract.marker import CommittedFile

log = logging.getLogger(__name__)


def reason_category(reason: str) -> str:
    """``"missing object: s3://b/k"`` -> ``"missing object"``."""
    return reason.split(":", 1)[0].strip() or "unknown"


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
    """Streams one write task's batches into part files of at most *rows_per_file* rows, in
    row groups of at most *row_group_rows*."""

    def __init__(
        self, attempt_uri: str, task: int, text_dim: int, image_dim: int, rows_per_file: int, row_group_rows: int
    ):
        if rows_per_file <= 0 or row_group_rows <= 0:
            raise ValueError("rows_per_file and row_group_rows must be positive")
        self.fs, self.path = storage.filesystem_for(attempt_uri)
        self.rel = posixpath.basename(self.path)  # attempt=<id>
        self.task, self.rows_per_file, self.row_group_rows = task, rows_per_file, row_group_rows
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
        while self._buf_rows and (final or self._buf_rows >= self.row_group_rows or self._room() <= self._buf_rows):
            table = pa.Table.from_batches(self._buf, schema=self.schema)
            take = min(self._room(), self.row_group_rows, table.num_rows)
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
            self.result.rejects.append(write_parquet(self.fs, self.path, self.rel, name, self.rejects, REJECTS_SCHEMA))
        self.result.rejects_by_reason = dict(collections.Counter(reason_category(r) for r in self.rejects["reason"]))
        return self.result


def write_parquet(fs, dir_path: str, rel: str, name: str, columns, schema: pa.Schema) -> WrittenFile:
    """Write *columns* (a dict of lists or a table) to ``{dir_path}/{name}``; the file is
    reported as ``{rel}/{name}``, relative to the partition directory."""
    table = pa.table(columns, schema=schema) if isinstance(columns, dict) else columns
    with fs.open(f"{dir_path}/{name}", "wb") as fh:
        pq.write_table(table, fh, compression="zstd")
        size = fh.tell()
    return WrittenFile(f"{rel}/{name}", table.num_rows, size)
