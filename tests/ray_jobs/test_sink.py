import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_jobs import storage
from ray_jobs.errors import OutputError
from ray_jobs.sink import PartitionSink, committed_marker, read_marker


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


def _sink(path, rows_per_file=3):
    sink = PartitionSink(str(path), 4, 4, rows_per_file=rows_per_file)
    sink.begin()
    return sink


def test_rolls_files_and_commits_last(tmp_path):
    sink = _sink(tmp_path / "p")
    sink.add(_batch(["a", "b", "c", "d"], ok=[True, False, True, True]))
    sink.add(_batch(["e", "f"]))
    marker = sink.commit(rows_in=6, model_id="m", plan_id="p", partition=0)
    assert [f.path for f in marker.files] == ["part-00000.parquet", "part-00001.parquet"]
    assert [f.rows for f in marker.files] == [3, 2]
    assert (marker.rows_ok, marker.rows_rejected) == (5, 1) and marker.reconciles()
    assert marker.rejects_by_reason == {"missing object": 1}
    assert pq.read_table(tmp_path / "p" / "part-00000.parquet")["id"].to_pylist() == ["a", "c", "d"]
    assert committed_marker(str(tmp_path / "p"), "m") == marker
    assert committed_marker(str(tmp_path / "p"), "other-model") is None


def test_duplicate_ids_and_non_finite_rows_are_rejected(tmp_path):
    sink = _sink(tmp_path / "p")
    sink.add(_batch(["a", "b"]))
    bad = _batch(["a", "c"])
    bad["image_embedding"][1, 0] = np.nan
    sink.add(bad)
    marker = sink.commit(rows_in=4, model_id="m", plan_id="p", partition=0)
    assert marker.rows_ok == 2
    assert marker.rejects_by_reason == {"duplicate id": 1, "non-finite embedding": 1}


def test_lost_rows_are_never_committed(tmp_path):
    sink = _sink(tmp_path / "p")
    sink.add(_batch(["a", "b"]))
    with pytest.raises(OutputError, match="3 rows in but 2 embedded"):
        sink.commit(rows_in=3, model_id="m", plan_id="p", partition=0)
    assert read_marker(str(tmp_path / "p")) is None


def test_begin_clears_a_crashed_attempt(tmp_path):
    part = tmp_path / "p"
    part.mkdir()
    (part / "part-00007.parquet").write_bytes(b"half written")
    (part / "stray.tmp").write_bytes(b"x")
    sink = _sink(part)
    sink.add(_batch(["a"]))
    sink.commit(rows_in=1, model_id="m", plan_id="p", partition=0)
    assert sorted(p.name for p in part.iterdir()) == ["_SUCCESS", "part-00000.parquet", "rejects.parquet"]


def test_a_deleted_or_changed_file_uncommits(tmp_path):
    sink = _sink(tmp_path / "p")
    sink.add(_batch(["a", "b"]))
    sink.commit(rows_in=2, model_id="m", plan_id="p", partition=0)
    storage.remove_tree(str(tmp_path / "p" / "part-00000.parquet"))
    assert committed_marker(str(tmp_path / "p"), "m") is None
    (tmp_path / "p" / "_SUCCESS").write_text("garbage")
    assert committed_marker(str(tmp_path / "p"), "m") is None
