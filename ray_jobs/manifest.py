"""Find a manifest's Parquet files and read their footers (never a data page).

A footer is read with at most two range reads: a speculative tail read (``tail_bytes``,
enough for the footer of a typical manifest file) and, only when the footer is larger, one
exact read of the rest. The schema is checked in every file (errors name the file and the
column); row counts, sizes and ``image_bytes`` estimates feed planning and the fingerprint.
"""

from __future__ import annotations

import json
import posixpath
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from ray_jobs import storage
from ray_jobs.contract import FileFingerprint, check_manifest_schema, manifest_fingerprint
from ray_jobs.errors import ManifestError

#: Footer key-value entry a manifest writer may set: JSON list of per-row-group sums of ``image_bytes``.
IMAGE_BYTES_METADATA_KEY = b"embeddings.image_bytes_per_row_group"
DEFAULT_TAIL_BYTES = 16 * 1024


@dataclass(frozen=True)
class ManifestFile:
    uri: str
    size: int
    rows: int
    row_group_rows: tuple[int, ...]
    #: estimated image bytes per row group, None where the footer gives no hint
    row_group_bytes: tuple[int | None, ...] = ()

    def fingerprint(self) -> FileFingerprint:
        return FileFingerprint(self.uri, self.size, self.rows)


def _is_data_file(path: str) -> bool:
    name = posixpath.basename(path)
    return name.endswith(".parquet") and not name.startswith(("_", "."))


def list_manifest(uri: str) -> list[tuple[str, int]]:
    """``(uri, size)`` of every Parquet file of the manifest, sorted by path."""
    try:
        fs, path = storage.filesystem_for(uri)
        if fs.isfile(path):
            return [(storage.to_uri(fs, path), fs.size(path))]
        found = fs.find(path, detail=True)
    except (FileNotFoundError, PermissionError, OSError, ValueError) as exc:
        raise ManifestError(f"manifest {uri} is not readable: {exc}") from exc
    files = sorted((storage.to_uri(fs, p), info["size"]) for p, info in found.items() if _is_data_file(p))
    if not files:
        raise ManifestError(f"manifest {uri} does not exist or holds no .parquet files")
    return files


def read_footer_metadata(uri: str, size: int, tail_bytes: int = DEFAULT_TAIL_BYTES) -> pq.FileMetaData:
    """The file's Parquet metadata, reading only its tail."""
    fs, path = storage.filesystem_for(uri)
    if size < 12:
        raise ManifestError(f"manifest file {uri} is not a readable Parquet file: only {size} bytes")
    with fs.open(path, "rb", cache_type="none") as fh:  # no read-ahead: exactly the bytes asked for
        take = min(size, max(8, tail_bytes))
        fh.seek(size - take)
        tail = fh.read(take)
        if tail[-4:] != b"PAR1":
            raise ManifestError(f"manifest file {uri} is not a readable Parquet file: no PAR1 magic at its end")
        (footer_len,) = struct.unpack("<I", tail[-8:-4])
        if footer_len + 12 > size:
            raise ManifestError(f"manifest file {uri} is not a readable Parquet file: footer length {footer_len}")
        if footer_len + 8 > len(tail):
            fh.seek(size - 8 - footer_len)
            footer = fh.read(footer_len - (len(tail) - 8)) + tail[:-8]
        else:
            footer = tail[-8 - footer_len : -8]
    try:
        return pq.read_metadata(pa.BufferReader(b"PAR1" + footer + tail[-8:]))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"manifest file {uri} is not a readable Parquet file: {exc}") from exc


def _row_group_bytes(meta: pq.FileMetaData) -> tuple[int | None, ...]:
    """Per-row-group image bytes: exact from footer metadata, else mean of min/max statistics."""
    kv = meta.metadata or {}
    if IMAGE_BYTES_METADATA_KEY in kv:
        try:
            values = json.loads(kv[IMAGE_BYTES_METADATA_KEY])
            if len(values) == meta.num_row_groups:
                return tuple(int(v) for v in values)
        except (ValueError, TypeError):
            pass
    names = meta.schema.names
    if "image_bytes" not in names:
        return (None,) * meta.num_row_groups
    col = names.index("image_bytes")
    out = []
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        stats = rg.column(col).statistics
        if stats is not None and stats.has_min_max:
            out.append(int(rg.num_rows * (int(stats.min) + int(stats.max)) / 2))
        else:
            out.append(None)
    return tuple(out)


def read_footer(uri: str, size: int, tail_bytes: int = DEFAULT_TAIL_BYTES) -> ManifestFile:
    try:
        meta = read_footer_metadata(uri, size, tail_bytes)
    except FileNotFoundError as exc:
        raise ManifestError(f"manifest file {uri} disappeared while reading: {exc}") from exc
    check_manifest_schema(meta.schema.to_arrow_schema(), uri)
    groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return ManifestFile(uri, size, meta.num_rows, groups, _row_group_bytes(meta))


def read_manifest(uri: str, threads: int = 64, tail_bytes: int = DEFAULT_TAIL_BYTES) -> list[ManifestFile]:
    """Footers of every file of the manifest, schema-checked, in path order."""
    listing = list_manifest(uri)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(listing)))) as pool:
        return list(pool.map(lambda f: read_footer(f[0], f[1], tail_bytes), listing))


def fingerprint(files: list[ManifestFile]) -> str:
    return manifest_fingerprint(f.fingerprint() for f in files)
