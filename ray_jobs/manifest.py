"""Find a manifest's Parquet files and read their footers (never a data page).

Used before any Ray work starts: the schema is checked in every file (errors name the file
and the column), and the row counts and sizes give the manifest's fingerprint.
"""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow.parquet as pq

from ray_jobs import storage
from ray_jobs.contract import FileFingerprint, check_manifest_schema, manifest_fingerprint
from ray_jobs.errors import ManifestError


@dataclass(frozen=True)
class ManifestFile:
    uri: str
    size: int
    rows: int
    row_group_rows: tuple[int, ...]

    def fingerprint(self) -> FileFingerprint:
        return FileFingerprint(self.uri, self.size, self.rows)


def _is_data_file(path: str) -> bool:
    name = posixpath.basename(path)
    return name.endswith(".parquet") and not name.startswith(("_", "."))


def list_manifest(uri: str) -> list[tuple[str, int]]:
    """``(uri, size)`` of every Parquet file of the manifest, sorted by path."""
    fs, path = storage.filesystem_for(uri)
    try:
        if fs.isfile(path):
            return [(storage.to_uri(fs, path), fs.size(path))]
        found = fs.find(path, detail=True)
    except (FileNotFoundError, PermissionError, OSError) as exc:
        raise ManifestError(f"manifest {uri} is not readable: {exc}") from exc
    files = sorted((storage.to_uri(fs, p), info["size"]) for p, info in found.items() if _is_data_file(p))
    if not files:
        raise ManifestError(f"manifest {uri} does not exist or holds no .parquet files")
    return files


def read_footer(uri: str, size: int) -> ManifestFile:
    fs, path = storage.filesystem_for(uri)
    try:
        with fs.open(path, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
            schema = meta.schema.to_arrow_schema()
    except (OSError, ValueError) as exc:
        raise ManifestError(f"manifest file {uri} is not a readable Parquet file: {exc}") from exc
    check_manifest_schema(schema, uri)
    groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return ManifestFile(uri, size, meta.num_rows, groups)


def read_manifest(uri: str, threads: int = 32) -> list[ManifestFile]:
    """Footers of every file of the manifest, schema-checked, in path order."""
    listing = list_manifest(uri)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(listing)))) as pool:
        return list(pool.map(lambda f: read_footer(*f), listing))


def fingerprint(files: list[ManifestFile]) -> str:
    return manifest_fingerprint(f.fingerprint() for f in files)
