"""The Iceberg side of garbage collection: which snapshots of an output's tables expire, and
which files the retained ones reference.

A snapshot expires once it has not been the table's current state for the retention period:
the time that counts is when the next snapshot of the table's history replaced it, not when it
was written. So every moment within the retention stays readable by time travel (a table
registered once a month keeps last month's snapshot until a month after the newer one). The
current snapshot and the heads of branches and tags never expire.

Files are compared as storage keys (:func:`file_key`): the path inside the filesystem, so
``file:///out/x.parquet`` and ``/out/x.parquet`` are one file, and so are ``s3://b/k`` and
``s3a://b/k``.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

from ray_jobs import storage

log = logging.getLogger(__name__)


def file_key(uri: str) -> str:
    """The path of *uri* inside its filesystem: how gc compares files."""
    return storage.filesystem_for(uri)[1].rstrip("/")


def under(key: str, root_key: str) -> bool:
    return key == root_key or key.startswith(root_key + "/")


def expiring_snapshots(metadata, cutoff_ms: int) -> list[int]:
    """Ids of the snapshots of *metadata* that have not been current since before *cutoff_ms*.

    A snapshot in the table's history was current until the next entry of that history; one
    not in it (left by a rollback) counts from its own timestamp. The current snapshot and
    every branch or tag head are kept."""
    protected = {ref.snapshot_id for ref in metadata.refs.values()}
    if metadata.current_snapshot_id is not None:
        protected.add(metadata.current_snapshot_id)
    replaced_at: dict[int, int] = {}
    history = list(metadata.snapshot_log)
    for entry, following in itertools.pairwise(history):
        replaced_at[entry.snapshot_id] = max(replaced_at.get(entry.snapshot_id, 0), following.timestamp_ms)
    for entry in history[-1:]:  # the last entry is (or was) current: it was replaced by nothing yet
        replaced_at[entry.snapshot_id] = max(replaced_at.get(entry.snapshot_id, 0), 2**63 - 1)
    out = []
    for snapshot in metadata.snapshots:
        if snapshot.snapshot_id in protected:
            continue
        if replaced_at.get(snapshot.snapshot_id, snapshot.timestamp_ms) < cutoff_ms:
            out.append(snapshot.snapshot_id)
    return sorted(out)


@dataclass
class TableFiles:
    """The files a catalog's tables reference, read snapshot by snapshot (manifests cached)."""

    catalog: object
    _manifests: dict[str, frozenset[str]] = field(default_factory=dict)
    _snapshots: dict[tuple[str, int], frozenset[str]] = field(default_factory=dict)

    def tables(self) -> list[str]:
        """Every table of every namespace of the catalog (nested namespaces too): a table
        outside ``embeddings`` that registered this output's files protects them as well."""
        from pyiceberg.exceptions import NoSuchNamespaceError

        out: list[str] = []
        pending = [tuple(ns) for ns in self.catalog.list_namespaces()]
        while pending:
            ns = pending.pop()
            try:
                out += [".".join(ident) for ident in self.catalog.list_tables(ns)]
                pending += [tuple(child) for child in self.catalog.list_namespaces(ns) if tuple(child) != ns]
            except NoSuchNamespaceError:  # dropped since it was listed
                continue
        return sorted(set(out))

    def load(self, ident: str):
        from pyiceberg.exceptions import NoSuchTableError

        try:
            return self.catalog.load_table(ident)
        except NoSuchTableError:  # dropped or renamed since it was listed
            return None

    def snapshot_files(self, table, snapshot) -> frozenset[str]:
        """Keys of every file *snapshot* of *table* references (data and delete files)."""
        cache_key = (table.metadata.table_uuid.hex, snapshot.snapshot_id)
        if cache_key not in self._snapshots:
            keys: set[str] = set()
            for manifest in snapshot.manifests(table.io):
                if manifest.manifest_path not in self._manifests:
                    entries = manifest.fetch_manifest_entry(table.io, discard_deleted=True)
                    self._manifests[manifest.manifest_path] = frozenset(
                        file_key(e.data_file.file_path) for e in entries
                    )
                keys |= self._manifests[manifest.manifest_path]
            self._snapshots[cache_key] = frozenset(keys)
        return self._snapshots[cache_key]

    def referenced(self, table, skip: set[int] | frozenset[int] = frozenset()) -> set[str]:
        """Keys of the files any snapshot of *table* but those in *skip* references."""
        out: set[str] = set()
        for snapshot in table.metadata.snapshots:
            if snapshot.snapshot_id not in skip:
                out |= self.snapshot_files(table, snapshot)
        return out


def belongs_to(table, files: set[str], root_key: str) -> bool:
    """Whether *table* is one of the output's: its location or one of its files is under it."""
    return under(file_key(table.location()), root_key) or any(under(k, root_key) for k in files)


def expire(table, snapshot_ids: list[int], tries: int = 3):
    """Expire *snapshot_ids* of *table* in one commit; the table as it is afterwards. A commit
    that lands first is not an error: the table is reloaded and the expiry applied to it."""
    from pyiceberg.exceptions import CommitFailedException

    for attempt in range(tries):
        try:
            table.maintenance.expire_snapshots().by_ids(snapshot_ids).commit()
            return table.refresh()
        except CommitFailedException as exc:
            if attempt == tries - 1:
                raise
            log.warning("table %s changed while expiring snapshots (%s); trying again", table.name(), exc)
            table = table.refresh()
            alive = {s.snapshot_id for s in table.metadata.snapshots}
            snapshot_ids = [s for s in snapshot_ids if s in alive]
            if not snapshot_ids:
                return table
    return table
