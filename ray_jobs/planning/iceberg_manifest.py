"""A manifest that is an Apache Iceberg table: ``iceberg://<namespace>.<table>``.

The table is opened through a pyiceberg catalog (a SQLAlchemy URL, or ``pyiceberg:<name>``
for a catalog configured the pyiceberg way: REST, Glue, Hive) and read at its current
snapshot. Each live data file of that snapshot is one manifest file, exactly as a Parquet
file of a directory manifest is:

* its URI is the data file's path (a local ``file://`` path becomes the plain absolute path);
* its version is empty: Iceberg never rewrites a data file in place (a rewrite or compaction
  writes a new path), so the path and the size name the content. The job checks the size
  before it reads, as for any manifest file;
* its row count is the table's own ``record_count``; rows per row group come from the file's
  Parquet footer (one or two range reads, the same reader and schema check as any manifest
  file), and a footer that disagrees with ``record_count`` is refused.

So sticky planning needs nothing special: a night's delta is the data files that differ
between the snapshot the last plan read and the current one. Appended files are new work,
files a rewrite or compaction replaced are retired, the rest is kept.

A snapshot whose data files have live delete files (position deletes, deletion vectors or
equality deletes, as merge-on-read writers produce) is refused, naming the table, the
snapshot and how to rewrite it: the job reads whole row groups and would embed rows the table
no longer has. Data files in another format than Parquet are refused likewise.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ray_jobs import storage
from ray_jobs.errors import ManifestError
from ray_jobs.planning.manifest import DEFAULT_TAIL_BYTES, ManifestFile, read_footer

#: the scheme of a manifest that is an Iceberg table
TABLE_SCHEME = "iceberg://"
#: a SQL catalog's name (its rows in ``iceberg_tables`` carry it) when none is given: pyiceberg's default
DEFAULT_SQL_CATALOG_NAME = "default"
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def is_table_uri(uri: str) -> bool:
    return uri.startswith(TABLE_SCHEME)


def table_identifier(uri: str) -> tuple[str, ...]:
    """``iceberg://ns.sub.table`` -> ``("ns", "sub", "table")``: at least a namespace and a
    table, each part letters, digits, ``_`` or ``-``."""
    name = uri.removeprefix(TABLE_SCHEME).rstrip("/")
    parts = tuple(name.split("."))
    if len(parts) < 2 or not all(_PART.match(p) for p in parts):
        raise ManifestError(
            f"manifest {uri}: an Iceberg table manifest is iceberg://<namespace>.<table> "
            "(letters, digits, _ and - in each part)"
        )
    return parts


@dataclass(frozen=True)
class ManifestCatalog:
    """The catalog of manifest tables. ``uri`` may hold a password: it is used only to open
    the catalog, and never shown."""

    #: a SQLAlchemy URL, or ``pyiceberg:<name>`` for a catalog configured the pyiceberg way
    uri: str
    #: a SQL catalog's name (None: ``default``); ignored for ``pyiceberg:<name>``
    name: str | None = None

    def __repr__(self) -> str:
        return f"ManifestCatalog(name={self.name!r})"


@dataclass(frozen=True)
class TableSnapshot:
    """The manifest files of one snapshot of a manifest table."""

    table: str
    snapshot_id: int
    sequence_number: int
    files: list[ManifestFile]

    def note(self, previous_snapshot_id: int | None = None) -> str:
        """What the plan says about its input table."""
        line = (
            f"manifest table {self.table} at snapshot {self.snapshot_id} "
            f"(sequence number {self.sequence_number}, {len(self.files)} data files)"
        )
        if previous_snapshot_id is None:
            return line
        if previous_snapshot_id == self.snapshot_id:
            return f"{line}: the snapshot the previous plan read"
        return f"{line}: the delta is the data files that differ from snapshot {previous_snapshot_id}"


def open_manifest_catalog(catalog: ManifestCatalog):
    """The pyiceberg catalog holding manifest tables: ``pyiceberg:<name>`` or a SQLAlchemy URL
    (a SQL catalog keeps the tables of several catalogs apart by name: ``catalog.name``, default
    ``default``). Reading needs no warehouse; S3 settings come from the ``AWS_*`` environment
    as for the output catalog."""
    catalog_uri = catalog.uri
    if catalog_uri.startswith("pyiceberg:"):
        from pyiceberg.catalog import load_catalog

        return load_catalog(catalog_uri.removeprefix("pyiceberg:"))
    if "://" not in catalog_uri:
        raise ManifestError(
            f"manifest catalog {catalog_uri[:40]!r} is not a SQLAlchemy URL (e.g. sqlite:////path/catalog.db) "
            "or pyiceberg:<name>"
        )
    from pyiceberg.catalog.sql import SqlCatalog

    from ray_jobs.output.catalog import _io_properties

    if catalog_uri.startswith("sqlite:///"):
        path = catalog_uri.removeprefix("sqlite:///")
        if path != ":memory:" and not os.path.isfile(path):
            raise ManifestError(f"manifest catalog {catalog_uri}: no SQLite database at {path}")
    return SqlCatalog(catalog.name or DEFAULT_SQL_CATALOG_NAME, uri=catalog_uri, **_io_properties())


def _local_or_uri(path: str) -> str:
    """A data file path as the rest of the pipeline names files: local ones as plain paths."""
    if path.startswith("file://"):
        return os.path.abspath(path[len("file://") :])
    if path.startswith("file:/"):
        return os.path.abspath(path[len("file:") :])
    return path


def _delete_refusal(name: str, snapshot_id: int, deletes: list) -> ManifestError:
    from pyiceberg.manifest import DataFileContent

    kinds = Counter("equality" if d.content == DataFileContent.EQUALITY_DELETES else "position" for d in deletes)
    counted = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    return ManifestError(
        f"manifest table {name} snapshot {snapshot_id} has {len(deletes)} delete files ({counted}), "
        f"e.g. {deletes[0].file_path}: the embed jobs read whole row groups and would embed rows the table "
        "has deleted. Rewrite the table so that no delete file remains, e.g. in Spark "
        f"CALL <catalog>.system.rewrite_data_files(table => '{name}', options => "
        "map('delete-file-threshold', '1', 'remove-dangling-deletes', 'true')), or have its writers delete "
        "copy-on-write (write.delete.mode, write.update.mode, write.merge.mode = copy-on-write); then run again"
    )


def read_table_manifest(
    uri: str,
    catalog: ManifestCatalog | None,
    *,
    threads: int = 64,
    tail_bytes: int = DEFAULT_TAIL_BYTES,
    byte_statistics: bool = True,
) -> TableSnapshot:
    """The manifest files of the current snapshot of table *uri*, in path order."""
    parts = table_identifier(uri)
    name = ".".join(parts)
    if catalog is None or not catalog.uri:
        raise ManifestError(
            f"manifest {uri} is an Iceberg table: name its catalog (--manifest-catalog-uri; in the DAG, "
            "the manifest_conn_id param)"
        )
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError
    from pyiceberg.manifest import DataFileContent, FileFormat

    opened = open_manifest_catalog(catalog)
    try:
        table = opened.load_table(parts)
    except (NoSuchTableError, NoSuchNamespaceError) as exc:
        raise ManifestError(
            f"manifest table {name} does not exist in catalog {opened.name!r}: {exc} (a SQL catalog's name is "
            "--manifest-catalog-name; in the DAG, extra.catalog_name of the manifest_conn_id connection)"
        ) from exc
    snapshot = table.current_snapshot()
    if snapshot is None:
        raise ManifestError(f"manifest table {name} has no snapshot: it holds no data files")
    manifests = snapshot.manifests(table.io)
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(manifests)))) as pool:
        entries = [e for found in pool.map(lambda m: m.fetch_manifest_entry(table.io), manifests) for e in found]
    data, deletes = {}, []
    for entry in entries:
        f = entry.data_file
        if f.content != DataFileContent.DATA:
            deletes.append(f)
        else:
            data[f.file_path] = f
    if deletes:
        raise _delete_refusal(name, snapshot.snapshot_id, deletes)
    other = [f for f in data.values() if f.file_format != FileFormat.PARQUET]
    if other:
        raise ManifestError(
            f"manifest table {name} snapshot {snapshot.snapshot_id}: data file {other[0].file_path} is "
            f"{other[0].file_format.value}, and {len(other) - 1} more are not Parquet; the embed jobs read "
            "Parquet row groups: rewrite the table as Parquet (write.format.default=parquet)"
        )
    if not data:
        raise ManifestError(f"manifest table {name} snapshot {snapshot.snapshot_id} holds no data files")
    listed = sorted(((_local_or_uri(path), f) for path, f in data.items()), key=lambda item: item[0])
    local = not storage.is_remote(listed[0][0])

    def footer(item) -> ManifestFile:
        path, f = item
        found = read_footer(path, f.file_size_in_bytes, tail_bytes, byte_statistics)
        if found.rows != f.record_count:
            raise ManifestError(
                f"manifest table {name} snapshot {snapshot.snapshot_id}: data file {path} holds {found.rows} rows "
                f"by its Parquet footer, {f.record_count} by the table's metadata"
            )
        return found

    with ThreadPoolExecutor(max_workers=max(1, min(4 if local else threads, len(listed)))) as pool:
        files = list(pool.map(footer, listed))
    return TableSnapshot(name, snapshot.snapshot_id, snapshot.sequence_number or 0, files)
