"""The commit protocol without Ray: attempt-scoped files, conditional commit, ``--force`` and history.

The helpers here (:func:`commit_batches` and friends) write partitions with the real part-file
writer and commit them; other output tests use them too."""

import os
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_jobs import storage
from ray_jobs.contract.layout import HISTORY_DIR, SUCCESS_FILE
from ray_jobs.contract.marker import CommitMarker
from ray_jobs.errors import CommitConflict, OutputError
from ray_jobs.job.datasink import EmbeddingDatasink
from ray_jobs.output.commit import commit_attempt
from ray_jobs.output.lease import Attempt, clean_dead_attempts
from ray_jobs.output.markers import committed_marker, read_marker
from ray_jobs.output.parts import PartFileWriter

META = {"model_id": "m", "plan_id": "p", "partition": 0}


def make_batch(ids, ok=None, dim=4, value=1.0):
    n = len(ids)
    ok = np.ones(n, dtype=bool) if ok is None else np.array(ok)
    emb = np.full((n, dim), value, dtype=np.float32) / np.sqrt(dim)
    return {
        "id": np.array(ids, dtype=object),
        "ok": ok,
        "reject_stage": np.array(["" if o else "fetch" for o in ok], dtype=object),
        "reject_reason": np.array(["" if o else "missing object: x" for o in ok], dtype=object),
        "text_embedding": emb,
        "image_embedding": emb.copy(),
    }


def write_tasks(attempt, tasks, rows_per_file=3, dim=4, row_group_rows=8192):
    """What Ray Data's write tasks do: one PartFileWriter per task, its batches in order."""
    results = []
    for task, batches in enumerate(tasks):
        writer = PartFileWriter(attempt.uri, task, dim, dim, rows_per_file, row_group_rows)
        for batch in batches:
            writer.add(batch)
        results.append(writer.finish())
    return results


def commit_batches(partition_uri, tasks, rows_in, rows_per_file=3, dim=4, force=False, **meta):
    """Write *tasks* (a list of batch lists, one per write task) as one attempt and commit it."""
    with Attempt(partition_uri) as attempt:
        results = write_tasks(attempt, tasks, rows_per_file, dim)
        return commit_attempt(
            attempt, results, rows_in=rows_in, text_dim=dim, image_dim=dim, force=force, **{**META, **meta}
        )


def committed_ids(partition_uri, marker):
    return pq.read_table(marker.data_uris(partition_uri))["id"].to_pylist()


def test_duplicate_ids_within_and_across_tasks_and_non_finite_rows_are_rejected(tmp_path):
    part = str(tmp_path / "p")
    bad = make_batch(["a", "c"])
    bad["image_embedding"][1, 0] = np.nan
    tasks = [[make_batch(["a", "b"]), bad], [make_batch(["x", "b", "y"])], [make_batch(["z"])]]
    marker = commit_batches(part, tasks, 8, rows_per_file=2)
    assert marker.rows_ok == 5 and marker.rows_rejected == 3 and marker.reconciles()
    assert marker.rejects_by_reason == {"duplicate id": 2, "non-finite embedding": 1}
    ids = committed_ids(part, marker)
    assert sorted(ids) == ["a", "b", "x", "y", "z"], "each id exactly once"
    rejects = pq.read_table(marker.rejects_uris(part)).to_pylist()
    assert sorted(r["id"] for r in rejects) == ["a", "b", "c"]
    assert committed_marker(part, "m") == marker


def test_lost_rows_are_never_committed(tmp_path):
    part = str(tmp_path / "p")
    with pytest.raises(OutputError, match="3 rows in but 2 reached the sink"):
        commit_batches(part, [[make_batch(["a", "b"])]], 3)
    assert read_marker(part) is None


def test_second_attempt_loses_cleanly_and_the_first_commit_stays_intact(tmp_path):
    part = str(tmp_path / "p")
    first = commit_batches(part, [[make_batch(["a", "b"])]], 2)
    before = storage.sizes_under(part)
    with Attempt(part) as attempt:
        sink = EmbeddingDatasink(
            attempt, rows_in=2, text_dim=4, image_dim=4, rows_per_file=3, row_group_rows=2, commit_meta=META
        )
        results = write_tasks(attempt, [[make_batch(["a", "b"], value=2.0)]])
        assert os.path.isdir(attempt.uri)
        assert sink.complete(results) is None
    assert isinstance(sink.conflict, CommitConflict) and first.attempt in str(sink.conflict)
    assert not os.path.exists(attempt.uri), "the loser removes its own files"
    assert read_marker(part) == first and committed_marker(part, "m") == first
    assert storage.sizes_under(part) == before


def test_force_swaps_the_marker_and_keeps_the_old_files_forever(tmp_path):
    part = str(tmp_path / "p")
    first = commit_batches(part, [[make_batch(["a", "b"])]], 2)
    second = commit_batches(part, [[make_batch(["a", "b"], value=2.0)]], 2, force=True)
    assert second.attempt != first.attempt and second.supersedes == first.attempt
    assert read_marker(part) == second
    with open(os.path.join(part, HISTORY_DIR, f"{first.attempt}.json")) as fh:
        assert CommitMarker.from_json(fh.read()) == first
    assert clean_dead_attempts(part, ttl_s=0) == []
    for f in first.listed:  # a snapshot that referenced them stays readable
        assert os.path.getsize(os.path.join(part, f.path)) == f.bytes


def test_without_force_a_broken_marker_is_replaced_but_its_files_are_kept(tmp_path):
    part = str(tmp_path / "p")
    first = commit_batches(part, [[make_batch(["a", "b"])]], 2, rows_per_file=1)
    os.remove(os.path.join(part, first.files[0].path))
    assert committed_marker(part, "m") is None
    second = commit_batches(part, [[make_batch(["a", "b"])]], 2)
    assert read_marker(part) == second and second.supersedes == first.attempt
    assert clean_dead_attempts(part, ttl_s=0) == []
    assert os.path.getsize(os.path.join(part, first.files[1].path)) == first.files[1].bytes


def test_a_marker_this_version_cannot_read_is_never_replaced(tmp_path):
    part = str(tmp_path / "p")
    os.makedirs(part)
    with open(os.path.join(part, SUCCESS_FILE), "w") as fh:
        fh.write('{"format": "multimodal-embeddings-commit/9"}')
    with pytest.raises(OutputError, match="not replacing a marker this version cannot read"):
        commit_batches(part, [[make_batch(["a"])]], 1, force=True)
    with open(os.path.join(part, SUCCESS_FILE)) as fh:
        assert "commit/9" in fh.read()


def test_create_exclusive_has_exactly_one_winner_locally(tmp_path):
    uri = str(tmp_path / "d" / SUCCESS_FILE)
    wins, barrier = [], threading.Barrier(16)

    def race(n):
        barrier.wait()
        if storage.create_exclusive(uri, f"writer {n}"):
            wins.append(n)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and storage.read_text(uri) == f"writer {wins[0]}"
    assert os.listdir(tmp_path / "d") == [SUCCESS_FILE], "no temporary file left behind"


@pytest.mark.integration
def test_create_exclusive_on_s3_uses_a_conditional_put(s3_bucket, monkeypatch):
    uri = f"{s3_bucket}/excl/{time.time_ns()}/{SUCCESS_FILE}"
    assert storage.create_exclusive(uri, "first")
    assert not storage.create_exclusive(uri, "second")
    assert storage.read_text(uri) == "first"
    monkeypatch.setenv("RAY_JOBS_S3_CONDITIONAL_WRITES", "0")  # the documented fallback
    other = uri + ".fallback"
    assert storage.create_exclusive(other, "first") and not storage.create_exclusive(other, "second")
    assert storage.read_text(other) == "first"


# ----------------------------------------------------------------------------- stores without conditional writes


def test_the_claim_protocol_has_exactly_one_winner_among_racing_writers(tmp_path):
    """The fallback itself, on a filesystem as consistent as S3 (the local one, through fsspec)."""
    from fsspec.implementations.local import LocalFileSystem

    fs, path = LocalFileSystem(), str(tmp_path / "p" / SUCCESS_FILE)
    fs.makedirs(str(tmp_path / "p" / storage.CLAIMS_DIR), exist_ok=True)
    wins, barrier = [], threading.Barrier(8)

    def race(n):
        barrier.wait()
        if storage._create_by_claim(fs, path, f"writer {n}".encode()):
            wins.append(n)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and storage.read_text(path) == f"writer {wins[0]}"
    assert os.listdir(tmp_path / "p" / storage.CLAIMS_DIR) == [], "every claim was released"


def test_a_claim_left_by_a_writer_that_died_stops_the_commit_naming_it(tmp_path):
    from fsspec.implementations.local import LocalFileSystem

    fs, path = LocalFileSystem(), str(tmp_path / "p" / SUCCESS_FILE)
    fs.makedirs(str(tmp_path / "p" / storage.CLAIMS_DIR))
    fs.pipe_file(str(tmp_path / "p" / storage.CLAIMS_DIR / f"{SUCCESS_FILE}.dead"), b"")
    with pytest.raises(OutputError, match=r"_SUCCESS.dead\) has been pending for 0.3s .* delete the claim"):
        storage._create_by_claim(fs, path, b"x", pending_s=0.3)
    assert not os.path.exists(path)


def test_a_claim_long_older_than_the_writers_own_is_removed_and_the_commit_goes_on(tmp_path, caplog):
    """A writer that died inside the protocol (a few requests long) left its claim: one dated by
    the store more than CLAIM_STALE_S before the new writer's own is removed, not waited for."""
    from fsspec.implementations.local import LocalFileSystem

    fs, path = LocalFileSystem(), str(tmp_path / "p" / SUCCESS_FILE)
    fs.makedirs(str(tmp_path / "p" / storage.CLAIMS_DIR))
    dead = tmp_path / "p" / storage.CLAIMS_DIR / f"{SUCCESS_FILE}.dead"
    dead.write_bytes(b"")
    old = time.time() - storage.CLAIM_STALE_S - 60
    os.utime(dead, (old, old))
    assert storage._create_by_claim(fs, path, b"x", pending_s=0.3)
    assert storage.read_text(path) == "x" and os.listdir(dead.parent) == []
    assert "left by a writer that died mid-commit" in caplog.text


@pytest.fixture
def ignoring_store(s3_server, monkeypatch):
    """The S3 server behind a proxy that drops ``If-None-Match``: a store that accepts a
    conditional PUT and ignores it (a stand-in for older MinIO or Ceph RGW, which cannot run here)."""
    from tests.s3_faults import FaultProxy

    with FaultProxy(s3_server, match="/none/", strip_request_headers=("If-None-Match",)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        storage._remote_fs.cache_clear()
        yield proxy
    storage._remote_fs.cache_clear()


@pytest.mark.integration
def test_the_probe_tells_a_store_that_honours_if_none_match_from_one_that_ignores_it(s3_bucket, s3_server, monkeypatch):
    from ray_jobs.output.commit import check_commit_store, commit_probe_uri
    from tests.s3_faults import FaultProxy

    part = f"{s3_bucket}/probe/{time.time_ns()}/partition=00000"
    assert commit_probe_uri(part) == f"{part.rsplit('/', 1)[0]}/_COMMIT_PROBE"
    assert check_commit_store(part), "moto honours the header"
    with FaultProxy(s3_server, match="/none/", strip_request_headers=("If-None-Match",)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        storage._remote_fs.cache_clear()
        assert not check_commit_store(part)
        assert proxy.stripped == [("PUT", f"/{commit_probe_uri(part).removeprefix('s3://')}")] * 2
    storage._remote_fs.cache_clear()
    assert not storage.exists(part), "the probe writes nothing into a partition"


@pytest.mark.integration
def test_through_a_store_that_ignores_if_none_match_exactly_one_writer_reports_success(s3_bucket, ignoring_store):
    part = f"{s3_bucket}/race/{time.time_ns()}/partition=00000"
    from ray_jobs.output.commit import check_commit_store

    assert not check_commit_store(part)
    uri = f"{part}/{SUCCESS_FILE}"
    wins, barrier = [], threading.Barrier(6)

    def race(n):
        barrier.wait()
        if storage.create_exclusive(uri, f"writer {n}"):
            wins.append(n)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and storage.read_text(uri) == f"writer {wins[0]}", wins
    assert ignoring_store.stripped, "the writers went through the proxy that drops the header"
    assert storage.sizes_under(part) == {SUCCESS_FILE: len(f"writer {wins[0]}")}, "no claim left behind"


@pytest.mark.integration
def test_a_late_attempt_cannot_replace_a_marker_through_a_store_that_ignores_if_none_match(s3_bucket, ignoring_store):
    part = f"{s3_bucket}/zombie/{time.time_ns()}/partition=00000"
    first = commit_batches(part, [[make_batch(["a", "b"])]], 2)
    with pytest.raises(CommitConflict, match=f"committed by attempt {first.attempt} first"):
        commit_batches(part, [[make_batch(["a", "b"], value=2.0)]], 2)
    assert read_marker(part) == first and committed_marker(part, "m") == first
