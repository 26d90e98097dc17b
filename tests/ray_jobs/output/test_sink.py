"""The commit protocol without Ray: part files per write task, attempt-scoped, conditional commit."""

import json
import os
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_jobs import storage
from ray_jobs.contract import HISTORY_DIR, LEASE_FILE, SUCCESS_FILE, CommitMarker
from ray_jobs.errors import CommitConflict, OutputError
from ray_jobs.job.datasink import EmbeddingDatasink
from ray_jobs.output.sink import (
    Attempt,
    PartFileWriter,
    clean_dead_attempts,
    commit_attempt,
    committed_marker,
    read_marker,
)

META = {"model_id": "m", "plan_id": "p", "partition": 0}


def _batch(ids, ok=None, dim=4, value=1.0):
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


def write_tasks(attempt, tasks, rows_per_file=3, dim=4):
    """What Ray Data's write tasks do: one PartFileWriter per task, its batches in order."""
    results = []
    for task, batches in enumerate(tasks):
        writer = PartFileWriter(attempt.uri, task, dim, dim, rows_per_file)
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


def _ids(partition_uri, marker):
    return pq.read_table(marker.data_uris(partition_uri))["id"].to_pylist()


def test_rolls_files_per_task_under_the_attempt_and_commits_last(tmp_path):
    part = str(tmp_path / "p")
    marker = commit_batches(part, [[_batch(["a", "b", "c", "d"], ok=[True, False, True, True]), _batch(["e", "f"])]], 6)
    prefix = f"attempt={marker.attempt}/"
    assert [f.path for f in marker.files] == [prefix + "part-00000-000.parquet", prefix + "part-00000-001.parquet"]
    assert [f.rows for f in marker.files] == [3, 2]
    assert [f.path for f in marker.rejects] == [prefix + "rejects-00000.parquet"]
    assert (marker.rows_ok, marker.rows_rejected) == (5, 1) and marker.reconciles()
    assert marker.rejects_by_reason == {"missing object": 1}
    assert _ids(part, marker) == ["a", "c", "d", "e", "f"]
    for f in marker.listed:
        assert os.path.getsize(os.path.join(part, f.path)) == f.bytes
    assert committed_marker(part, "m") == marker == read_marker(part)
    assert committed_marker(part, "other-model") is None


def test_duplicate_ids_within_and_across_tasks_and_non_finite_rows_are_rejected(tmp_path):
    part = str(tmp_path / "p")
    bad = _batch(["a", "c"])
    bad["image_embedding"][1, 0] = np.nan
    tasks = [[_batch(["a", "b"]), bad], [_batch(["x", "b", "y"])], [_batch(["z"])]]
    marker = commit_batches(part, tasks, 8, rows_per_file=2)
    assert marker.rows_ok == 5 and marker.rows_rejected == 3 and marker.reconciles()
    assert marker.rejects_by_reason == {"duplicate id": 2, "non-finite embedding": 1}
    ids = _ids(part, marker)
    assert sorted(ids) == ["a", "b", "x", "y", "z"], "each id exactly once"
    rejects = pq.read_table(marker.rejects_uris(part)).to_pylist()
    assert sorted(r["id"] for r in rejects) == ["a", "b", "c"]
    assert committed_marker(part, "m") == marker


def test_lost_rows_are_never_committed(tmp_path):
    part = str(tmp_path / "p")
    with pytest.raises(OutputError, match="3 rows in but 2 reached the sink"):
        commit_batches(part, [[_batch(["a", "b"])]], 3)
    assert read_marker(part) is None


def test_second_attempt_loses_cleanly_and_the_first_commit_stays_intact(tmp_path):
    part = str(tmp_path / "p")
    first = commit_batches(part, [[_batch(["a", "b"])]], 2)
    before = storage.sizes_under(part)
    with Attempt(part) as attempt:
        sink = EmbeddingDatasink(attempt, rows_in=2, text_dim=4, image_dim=4, rows_per_file=3, commit_meta=META)
        results = write_tasks(attempt, [[_batch(["a", "b"], value=2.0)]])
        assert os.path.isdir(attempt.uri)
        assert sink.complete(results) is None
    assert isinstance(sink.conflict, CommitConflict) and first.attempt in str(sink.conflict)
    assert not os.path.exists(attempt.uri), "the loser removes its own files"
    assert read_marker(part) == first and committed_marker(part, "m") == first
    assert storage.sizes_under(part) == before


def test_force_swaps_the_marker_and_keeps_the_old_files_forever(tmp_path):
    part = str(tmp_path / "p")
    first = commit_batches(part, [[_batch(["a", "b"])]], 2)
    second = commit_batches(part, [[_batch(["a", "b"], value=2.0)]], 2, force=True)
    assert second.attempt != first.attempt and second.supersedes == first.attempt
    assert read_marker(part) == second
    with open(os.path.join(part, HISTORY_DIR, f"{first.attempt}.json")) as fh:
        assert CommitMarker.from_json(fh.read()) == first
    assert clean_dead_attempts(part, ttl_s=0) == []
    for f in first.listed:  # a snapshot that referenced them stays readable
        assert os.path.getsize(os.path.join(part, f.path)) == f.bytes


def test_without_force_a_broken_marker_is_replaced_but_its_files_are_kept(tmp_path):
    part = str(tmp_path / "p")
    first = commit_batches(part, [[_batch(["a", "b"])]], 2, rows_per_file=1)
    os.remove(os.path.join(part, first.files[0].path))
    assert committed_marker(part, "m") is None
    second = commit_batches(part, [[_batch(["a", "b"])]], 2)
    assert read_marker(part) == second and second.supersedes == first.attempt
    assert clean_dead_attempts(part, ttl_s=0) == []
    assert os.path.getsize(os.path.join(part, first.files[1].path)) == first.files[1].bytes


def test_dead_uncommitted_attempts_are_cleaned_live_and_committed_ones_are_not(tmp_path):
    part = str(tmp_path / "p")
    committed = commit_batches(part, [[_batch(["a"])]], 1)
    dead, live = Attempt(part), Attempt(part)
    for attempt, beat in ((dead, time.time() - 3600), (live, time.time())):
        os.makedirs(attempt.uri)
        with open(os.path.join(attempt.uri, LEASE_FILE), "w") as fh:
            json.dump({"attempt": attempt.id, "heartbeat_at": beat}, fh)
        with open(os.path.join(attempt.uri, "part-00000-000.parquet"), "wb") as fh:
            fh.write(b"half written")
    os.makedirs(os.path.join(part, "attempt=crashed-before-its-lease"))
    removed = clean_dead_attempts(part, ttl_s=600)
    assert sorted(removed) == sorted([dead.id, "crashed-before-its-lease"])
    assert os.path.isdir(live.uri) and committed_marker(part, "m") == committed


def test_an_unreadable_marker_blocks_every_cleanup(tmp_path):
    part = str(tmp_path / "p")
    commit_batches(part, [[_batch(["a"])]], 1)
    stale = Attempt(part)
    os.makedirs(stale.uri)
    with open(os.path.join(part, SUCCESS_FILE), "w") as fh:
        fh.write("garbage")
    assert clean_dead_attempts(part, ttl_s=0) == [] and os.path.isdir(stale.uri)


def test_a_deleted_or_changed_file_uncommits(tmp_path):
    part = str(tmp_path / "p")
    marker = commit_batches(part, [[_batch(["a", "b"])]], 2)
    with open(os.path.join(part, marker.files[0].path), "ab") as fh:
        fh.write(b"x")
    assert committed_marker(part, "m") is None
    os.remove(os.path.join(part, marker.files[0].path))
    assert committed_marker(part, "m") is None
    with open(os.path.join(part, SUCCESS_FILE), "w") as fh:
        fh.write("garbage")
    assert committed_marker(part, "m") is None


def test_lease_is_refreshed_while_the_attempt_runs(tmp_path):
    with Attempt(str(tmp_path / "p"), heartbeat_s=0.05) as attempt:
        path = os.path.join(attempt.uri, LEASE_FILE)
        with open(path) as fh:
            first = json.load(fh)["heartbeat_at"]
        time.sleep(0.3)
        with open(path) as fh:
            assert json.load(fh)["heartbeat_at"] > first


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


def test_version_1_markers_stay_readable():
    v1 = {
        "format": "multimodal-embeddings-commit/1",
        **META,
        "rows_in": 3,
        "rows_ok": 2,
        "rows_rejected": 1,
        "text_dim": 4,
        "image_dim": 4,
        "files": [{"path": "part-00000.parquet", "rows": 2, "bytes": 10}],
        "rejects": {"path": "rejects.parquet", "rows": 1, "bytes": 5},
    }
    marker = CommitMarker.from_json(json.dumps(v1))
    assert marker.reconciles() and marker.attempt == "" and [f.path for f in marker.rejects] == ["rejects.parquet"]


def test_a_marker_this_version_cannot_read_is_never_replaced(tmp_path):
    part = str(tmp_path / "p")
    os.makedirs(part)
    with open(os.path.join(part, SUCCESS_FILE), "w") as fh:
        fh.write('{"format": "multimodal-embeddings-commit/9"}')
    with pytest.raises(OutputError, match="not replacing a marker this version cannot read"):
        commit_batches(part, [[_batch(["a"])]], 1, force=True)
    with open(os.path.join(part, SUCCESS_FILE)) as fh:
        assert "commit/9" in fh.read()


class _Ctx:
    task_idx = 3


def _block(batch):
    import pyarrow as pa
    from ray.data._internal.tensor_extensions.arrow import ArrowTensorArray

    cols = {k: v for k, v in batch.items() if not k.endswith("_embedding")}
    table = pa.table({k: pa.array(list(v)) for k, v in cols.items()})
    for k in ("text_embedding", "image_embedding"):
        table = table.append_column(k, ArrowTensorArray.from_numpy(batch[k]))
    return table


def test_a_write_task_turns_blocks_into_files_and_a_storage_hiccup_into_a_retry(tmp_path, monkeypatch):
    from ray_jobs.errors import TransientFailure

    part = str(tmp_path / "p")
    with Attempt(part) as attempt:
        sink = EmbeddingDatasink(attempt, rows_in=3, text_dim=4, image_dim=4, rows_per_file=10, commit_meta=META)
        assert sink.min_rows_per_write == 10
        result = sink.write(iter([_block(_batch(["a", "b", "c"], ok=[True, True, False]))]), _Ctx())
        assert [f.path for f in result.files] == [f"attempt={attempt.id}/part-00003-000.parquet"]
        assert result.rows_seen == 3 and result.rejects_by_reason == {"missing object": 1}

        def flaky(*args, **kwargs):
            raise OSError(5, "connection reset while uploading")

        monkeypatch.setattr(pq.ParquetWriter, "write_table", flaky)
        with pytest.raises(TransientFailure, match="connection reset"):
            sink.write(iter([_block(_batch(["d"]))]), _Ctx())
