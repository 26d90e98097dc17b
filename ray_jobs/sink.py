"""Write one partition's embeddings and rejects, and commit it with ``_SUCCESS``.

Protocol (DESIGN.md, "Output layout"): an attempt first clears the partition's slot (what a
crashed attempt left is invisible to readers, who trust only ``_SUCCESS``, and is removed
here), writes ``part-NNNNN.parquet`` files with deterministic names and ``rejects.parquet``,
checks that every input row is accounted for, and writes the marker last.
"""

from __future__ import annotations

import collections
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_jobs import storage
from ray_jobs.contract import (
    REJECTS_FILE,
    REJECTS_SCHEMA,
    SUCCESS_FILE,
    CommitMarker,
    CommittedFile,
    embeddings_schema,
    join_uri,
    part_file_name,
)
from ray_jobs.errors import OutputError

log = logging.getLogger(__name__)


def reason_category(reason: str) -> str:
    """``"missing object: s3://b/k"`` -> ``"missing object"``."""
    return reason.split(":", 1)[0].strip() or "unknown"


def read_marker(partition_uri: str) -> CommitMarker | None:
    uri = join_uri(partition_uri, SUCCESS_FILE)
    if not storage.exists(uri):
        return None
    return CommitMarker.from_json(storage.read_text(uri), uri)


def committed_marker(partition_uri: str, model_id: str) -> CommitMarker | None:
    """The marker if the partition is committed, reconciles and all its files are intact."""
    try:
        marker = read_marker(partition_uri)
    except OutputError as exc:
        log.warning("ignoring unreadable commit marker: %s", exc)
        return None
    if marker is None or marker.model_id != model_id or not marker.reconciles():
        return None
    fs, path = storage.filesystem_for(partition_uri)
    sizes = {e["name"].rsplit("/", 1)[-1]: e["size"] for e in fs.ls(path, detail=True)}
    for f in (*marker.files, marker.rejects):
        if sizes.get(f.path) != f.bytes:
            log.warning("committed file %s is missing or changed size; partition will be redone", f.path)
            return None
    return marker


class PartitionSink:
    """Streams result batches into part files; ``commit`` seals the partition."""

    def __init__(self, partition_uri: str, text_dim: int, image_dim: int, rows_per_file: int = 100_000):
        if rows_per_file <= 0:
            raise ValueError("rows_per_file must be positive")
        self.uri = partition_uri
        self.schema = embeddings_schema(text_dim, image_dim)
        self.text_dim, self.image_dim = text_dim, image_dim
        self.rows_per_file = rows_per_file
        self.fs, self.path = storage.filesystem_for(partition_uri)
        self.files: list[CommittedFile] = []
        self.rejects: dict[str, list[str]] = {"id": [], "stage": [], "reason": []}
        self.seen_ids: set[str] = set()
        self.rows_seen = 0
        self._buf: list[pa.RecordBatch] = []
        self._buf_rows = 0

    def begin(self) -> None:
        """Remove whatever an earlier, uncommitted attempt left in this slot."""
        storage.remove_tree(self.uri)
        self.fs.makedirs(self.path, exist_ok=True)

    def _reject(self, row_id: str, stage: str, reason: str) -> None:
        self.rejects["id"].append(row_id)
        self.rejects["stage"].append(stage)
        self.rejects["reason"].append(reason)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        ids = batch["id"]
        ok = np.asarray(batch["ok"], dtype=bool).copy()
        self.rows_seen += len(ids)
        text = np.asarray(batch.get("text_embedding", np.zeros((len(ids), self.text_dim))), dtype=np.float32)
        image = np.asarray(batch.get("image_embedding", np.zeros((len(ids), self.image_dim))), dtype=np.float32)
        finite = np.isfinite(text).all(axis=1) & np.isfinite(image).all(axis=1)
        for r, row_id in enumerate(ids):
            row_id = str(row_id)
            if not ok[r]:
                self._reject(row_id, str(batch["reject_stage"][r]), str(batch["reject_reason"][r]))
            elif row_id in self.seen_ids:
                ok[r] = False
                self._reject(row_id, "sink", "duplicate id: already embedded earlier in this partition")
            elif not finite[r]:
                ok[r] = False
                self._reject(row_id, "sink", "non-finite embedding: NaN or Inf in model output")
            if ok[r]:
                self.seen_ids.add(row_id)
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
        while self._buf_rows >= self.rows_per_file:
            self._flush(self.rows_per_file)

    def _flush(self, limit: int | None = None) -> None:
        if not self._buf_rows:
            return
        table = pa.Table.from_batches(self._buf, schema=self.schema)
        take = table.num_rows if limit is None else min(limit, table.num_rows)
        head, rest = table.slice(0, take), table.slice(take)
        name = part_file_name(len(self.files))
        self._write(name, head)
        self.files.append(CommittedFile(name, head.num_rows, self.fs.size(f"{self.path}/{name}")))
        self._buf = rest.to_batches()
        self._buf_rows = rest.num_rows

    def _write(self, name: str, table: pa.Table) -> None:
        with self.fs.open(f"{self.path}/{name}", "wb") as fh:
            pq.write_table(table, fh, compression="zstd")

    def commit(self, rows_in: int, **meta) -> CommitMarker:
        """Flush, write rejects, check the counts, and write ``_SUCCESS`` last."""
        self._flush()
        rejects = pa.table(self.rejects, schema=REJECTS_SCHEMA)
        self._write(REJECTS_FILE, rejects)
        rows_ok = sum(f.rows for f in self.files)
        if self.rows_seen != rows_in or rows_ok + rejects.num_rows != rows_in:
            raise OutputError(
                f"partition {self.uri}: {rows_in} rows in but {rows_ok} embedded + {rejects.num_rows} rejected "
                f"({self.rows_seen} seen); not committing"
            )
        by_reason = collections.Counter(reason_category(r) for r in self.rejects["reason"])
        marker = CommitMarker(
            rows_in=rows_in,
            rows_ok=rows_ok,
            rows_rejected=rejects.num_rows,
            text_dim=self.text_dim,
            image_dim=self.image_dim,
            files=tuple(self.files),
            rejects=CommittedFile(REJECTS_FILE, rejects.num_rows, self.fs.size(f"{self.path}/{REJECTS_FILE}")),
            rejects_by_reason=dict(sorted(by_reason.items())),
            **meta,
        )
        storage.write_text(join_uri(self.uri, SUCCESS_FILE), marker.to_json())
        return marker
