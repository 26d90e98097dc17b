"""An attempt at a partition: its id, its directory and its lease, and the cleanup of
attempts that died without committing.

An attempt writes a lease, ``attempt=<id>/_ATTEMPT``, as its first file and a thread
refreshes it while the attempt runs. Attempts that never committed are removed by their
own process when they fail or lose, and by any later attempt once their lease is stale.
Files of an attempt named by the current marker or by one in ``_history/`` are never
deleted (Iceberg snapshots may reference them).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time

from ray_jobs import storage
from ray_jobs.contract.layout import (
    ATTEMPT_PREFIX,
    HISTORY_DIR,
    LEASE_FILE,
    SUCCESS_FILE,
    attempt_dir_name,
    join_uri,
    new_attempt_id,
)
from ray_jobs.errors import OutputError
from ray_jobs.output.markers import read_marker

log = logging.getLogger(__name__)

#: An attempt refreshes its lease this often; one silent for LEASE_TTL_S is dead.
HEARTBEAT_S = 30.0
LEASE_TTL_S = 600.0


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


def lease_heartbeat(attempt_uri: str) -> float | None:
    """When the lease of the attempt at *attempt_uri* was last refreshed (epoch seconds); None
    when it has no readable lease (not written yet, or never will be)."""
    try:
        return float(json.loads(storage.read_text(join_uri(attempt_uri, LEASE_FILE)))["heartbeat_at"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def last_heartbeat(attempt_uri: str) -> float:
    """:func:`lease_heartbeat`, 0.0 when there is no readable lease. An attempt silent for
    longer than :data:`LEASE_TTL_S` is dead."""
    beat = lease_heartbeat(attempt_uri)
    return 0.0 if beat is None else beat


def clean_dead_attempts(partition_uri: str, keep: str | None = None, ttl_s: float = LEASE_TTL_S) -> list[str]:
    """Remove attempts that never committed and whose lease is stale; return their ids.

    An attempt with no readable lease may be writing it right now (its directory exists a
    moment before the lease does): it is judged by its newest file, and is dead only once
    that is older than *ttl_s*, the rule ``gc`` applies too."""
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
        beat = lease_heartbeat(uri)
        if time.time() - (storage.last_modified(uri) if beat is None else beat) > ttl_s:
            storage.remove_tree(uri)
            removed.append(attempt)
    if removed:
        log.info("partition %s: removed dead uncommitted attempts %s", partition_uri, removed)
    return removed
