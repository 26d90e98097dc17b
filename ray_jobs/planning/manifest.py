"""Find a manifest's Parquet files and read their footers (never a data page).

A footer is read with at most two range reads: a speculative tail read (``tail_bytes``,
enough for the footer of a typical manifest file) and, only when the footer is larger, one
exact read of the rest. The schema is checked in every file (errors name the file and the
column); row counts, sizes and ``image_bytes`` estimates feed planning and the fingerprint.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import posixpath
import struct
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import _parquet  # private: public pq.ParquetFile is 4-7% slower here and refuses non-UTF-8 column names

from ray_jobs import storage
from ray_jobs.contract.ids import FileFingerprint, manifest_fingerprint
from ray_jobs.contract.manifest_schema import check_manifest_schema
from ray_jobs.errors import ManifestError

if TYPE_CHECKING:
    from ray_jobs.planning.iceberg_manifest import ManifestCatalog

#: Footer key-value entry a manifest writer may set: JSON list of per-row-group sums of ``image_bytes``.
IMAGE_BYTES_METADATA_KEY = b"embeddings.image_bytes_per_row_group"
DEFAULT_TAIL_BYTES = 8 * 1024
_PROCESS_POOL_MIN_FILES = 2000


@dataclass(frozen=True)
class ManifestFile:
    uri: str
    size: int
    rows: int
    row_group_rows: tuple[int, ...]
    #: estimated image bytes per row group, None where the footer gives no hint
    row_group_bytes: tuple[int | None, ...] = ()
    #: ETag / version id / mtime from the listing (see :func:`ray_jobs.storage.version_of`)
    version: str = ""

    def fingerprint(self) -> FileFingerprint:
        return FileFingerprint(self.uri, self.size, self.rows, self.version)


def _is_data_file(path: str) -> bool:
    name = posixpath.basename(path)
    return name.endswith(".parquet") and not name.startswith(("_", "."))


def _walk_local(root: str) -> list[tuple[str, int, str]]:
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            if _is_data_file(name):
                full = os.path.join(dirpath, name)
                st = os.stat(full)
                out.append((full, st.st_size, storage.local_version(full, st)))
    return out


def list_manifest(uri: str) -> list[tuple[str, int, str]]:
    """``(uri, size, version)`` of every Parquet file of the manifest, sorted by path.

    The version (ETag / version id on object stores, mtime locally) comes with the listing
    at no extra request; it makes the fingerprint change when a file is rewritten in place."""
    try:
        fs, path = storage.filesystem_for(uri)
        if type(fs) is storage.LocalFileSystem:
            found = [(path, *storage.stat_file(path))] if os.path.isfile(path) else _walk_local(path)
        elif fs.isfile(path):
            info = fs.info(path)
            found = [(storage.to_uri(fs, path), info["size"], storage.version_of(info))]
        else:
            found = [
                (storage.to_uri(fs, p), info["size"], storage.version_of(info))
                for p, info in fs.find(path, detail=True).items()
            ]
    except (FileNotFoundError, PermissionError, OSError, ValueError, TypeError) as exc:
        raise ManifestError(f"manifest {uri} is not readable: {exc}") from exc
    files = sorted(f for f in found if _is_data_file(f[0]))
    if not files:
        raise ManifestError(f"manifest {uri} does not exist or holds no .parquet files")
    return files


def read_footer_metadata(uri: str, size: int, tail_bytes: int = DEFAULT_TAIL_BYTES) -> pq.FileMetaData:
    """The file's Parquet metadata, reading only its tail."""
    if size < 12:
        raise ManifestError(f"manifest file {uri} is not a readable Parquet file: only {size} bytes")
    # no read-ahead: exactly the bytes asked for (plain open() for local paths: no fsspec overhead)
    if "://" in uri:
        fs, path = storage.filesystem_for(uri)
        opened = fs.open(path, "rb", cache_type="none")
    else:
        opened = open(uri, "rb")  # noqa: SIM115
    with opened as fh:
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
        reader = _parquet.ParquetReader()
        reader.open(pa.BufferReader(b"PAR1" + footer + tail[-8:]))
        return reader.metadata
    except (OSError, ValueError) as exc:
        raise ManifestError(f"manifest file {uri} is not a readable Parquet file: {exc}") from exc


def _row_group_bytes(meta: pq.FileMetaData, use_statistics: bool) -> tuple[int | None, ...]:
    """Per-row-group image bytes: exact from footer metadata, else (when asked: it costs a
    few microseconds per row group) rows x the mean of the ``image_bytes`` min/max statistics."""
    kv = meta.metadata or {}
    if IMAGE_BYTES_METADATA_KEY in kv:
        try:
            values = json.loads(kv[IMAGE_BYTES_METADATA_KEY])
            if len(values) == meta.num_row_groups:
                return tuple(int(v) for v in values)
        except (ValueError, TypeError):
            pass
    names = meta.schema.names
    if not use_statistics or "image_bytes" not in names:
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


_last_valid_schema: list = [None]  # manifests repeat one schema: skip re-checking an identical one


def _check_schema_cached(schema: pq.ParquetSchema, uri: str) -> None:
    last = _last_valid_schema[0]
    if last is not None and schema.equals(last):
        return
    check_manifest_schema(schema.to_arrow_schema(), uri)
    _last_valid_schema[0] = schema


def read_footer(
    uri: str, size: int, tail_bytes: int = DEFAULT_TAIL_BYTES, byte_statistics: bool = True, version: str = ""
) -> ManifestFile:
    try:
        meta = read_footer_metadata(uri, size, tail_bytes)
    except FileNotFoundError as exc:
        raise ManifestError(f"manifest file {uri} disappeared while reading: {exc}") from exc
    _check_schema_cached(meta.schema, uri)
    groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return ManifestFile(uri, size, meta.num_rows, groups, _row_group_bytes(meta, byte_statistics), version)


def _read_chunk(chunk: list[tuple[str, int, str]], tail_bytes: int, byte_statistics: bool) -> list[ManifestFile]:
    return [read_footer(u, s, tail_bytes, byte_statistics, v) for u, s, v in chunk]


def read_manifest(
    uri: str,
    threads: int = 64,
    tail_bytes: int = DEFAULT_TAIL_BYTES,
    byte_statistics: bool = True,
    catalog: ManifestCatalog | None = None,
) -> list[ManifestFile]:
    """Footers of every file of the manifest, schema-checked, in path order.

    Remote footers are latency-bound: many threads overlap the requests. Local footers are
    CPU-bound (parsing holds the GIL): a large local manifest is parsed by one forked
    process per core instead. An ``iceberg://<namespace>.<table>`` manifest is the current
    snapshot's data files of that table in *catalog*
    (:mod:`ray_jobs.planning.iceberg_manifest`).
    """
    from ray_jobs.planning.iceberg_manifest import is_table_uri, read_table_manifest

    if is_table_uri(uri):
        return read_table_manifest(
            uri, catalog, threads=threads, tail_bytes=tail_bytes, byte_statistics=byte_statistics
        ).files
    listing = list_manifest(uri)
    local = not storage.is_remote(uri)
    cores = os.cpu_count() or 1
    if local and len(listing) >= _PROCESS_POOL_MIN_FILES and cores > 1:
        step = -(-len(listing) // (cores * 4))
        chunks = [listing[i : i + step] for i in range(0, len(listing), step)]
        try:
            ctx = multiprocessing.get_context("fork")
        except ValueError:
            ctx = None
        if ctx is not None:
            with ProcessPoolExecutor(max_workers=cores, mp_context=ctx) as pool:
                parts = pool.map(_read_chunk, chunks, [tail_bytes] * len(chunks), [byte_statistics] * len(chunks))
                return [f for part in parts for f in part]
    workers = max(1, min(threads if not local else 4, len(listing)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda f: read_footer(f[0], f[1], tail_bytes, byte_statistics, f[2]), listing))


def fingerprint(files: list[ManifestFile]) -> str:
    return manifest_fingerprint(f.fingerprint() for f in files)
