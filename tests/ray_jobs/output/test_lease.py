"""Attempt leases: refreshed while an attempt runs; dead uncommitted attempts are cleaned up."""

import json
import os
import time

from ray_jobs.contract.layout import LEASE_FILE, SUCCESS_FILE
from ray_jobs.output.lease import Attempt, clean_dead_attempts
from ray_jobs.output.markers import committed_marker
from tests.ray_jobs.output.test_commit import commit_batches, make_batch


def test_dead_uncommitted_attempts_are_cleaned_live_and_committed_ones_are_not(tmp_path):
    part = str(tmp_path / "p")
    committed = commit_batches(part, [[make_batch(["a"])]], 1)
    dead, live = Attempt(part), Attempt(part)
    for attempt, beat in ((dead, time.time() - 3600), (live, time.time())):
        os.makedirs(attempt.uri)
        with open(os.path.join(attempt.uri, LEASE_FILE), "w") as fh:
            json.dump({"attempt": attempt.id, "heartbeat_at": beat}, fh)
        with open(os.path.join(attempt.uri, "part-00000-000.parquet"), "wb") as fh:
            fh.write(b"half written")
    crashed = os.path.join(part, "attempt=crashed-before-its-lease")
    os.makedirs(crashed)
    os.utime(crashed, (time.time() - 3600, time.time() - 3600))
    removed = clean_dead_attempts(part, ttl_s=600)
    assert sorted(removed) == sorted([dead.id, "crashed-before-its-lease"])
    assert os.path.isdir(live.uri) and committed_marker(part, "m") == committed


def test_an_unreadable_marker_blocks_every_cleanup(tmp_path):
    part = str(tmp_path / "p")
    commit_batches(part, [[make_batch(["a"])]], 1)
    stale = Attempt(part)
    os.makedirs(stale.uri)
    with open(os.path.join(part, SUCCESS_FILE), "w") as fh:
        fh.write("garbage")
    assert clean_dead_attempts(part, ttl_s=0) == [] and os.path.isdir(stale.uri)


def test_lease_is_refreshed_while_the_attempt_runs(tmp_path):
    with Attempt(str(tmp_path / "p"), heartbeat_s=0.05) as attempt:
        path = os.path.join(attempt.uri, LEASE_FILE)
        with open(path) as fh:
            first = json.load(fh)["heartbeat_at"]
        time.sleep(0.3)
        with open(path) as fh:
            assert json.load(fh)["heartbeat_at"] > first


def test_an_attempt_still_writing_its_first_lease_is_not_taken_for_dead(tmp_path):
    """Two processes on one partition: the second cleans up while the first has created its
    attempt directory but not yet renamed its lease into place. That attempt is alive."""
    part = str(tmp_path / "p")
    starting = Attempt(part)
    os.makedirs(starting.uri)
    with open(os.path.join(starting.uri, f"{LEASE_FILE}.0a1b2c.tmp"), "w") as fh:
        fh.write("{")
    empty = os.path.join(part, "attempt=just-created")
    os.makedirs(empty)
    assert clean_dead_attempts(part, ttl_s=600) == []
    assert os.path.isdir(starting.uri) and os.path.isdir(empty)
    old = time.time() - 3600
    for path in (os.path.join(starting.uri, f"{LEASE_FILE}.0a1b2c.tmp"), starting.uri, empty):
        os.utime(path, (old, old))
    assert sorted(clean_dead_attempts(part, ttl_s=600)) == sorted([starting.id, "just-created"])
