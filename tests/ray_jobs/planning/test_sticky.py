"""Sticky plans: a night's plan keeps the partitions of unchanged files and plans only the change."""

import json
import os
import time

import pytest

from ray_jobs.config.settings import Partitioning
from ray_jobs.contract.ids import default_dataset_name
from ray_jobs.contract.layout import lineage_uri
from ray_jobs.errors import PlanError
from ray_jobs.planning.plan import load_plan, run_plan
from tests.ray_jobs.planning.test_plan import write_manifest

ROWS = Partitioning(partition_rows=60)  # one 60-row file per partition: groups (30, 20, 10)


def _night(tmp_path, run_id, **kw):
    return run_plan(str(tmp_path / "m"), str(tmp_path / "out"), ROWS, run_id=run_id, **kw)


def _files(plan, partition):
    return {plan.files[f.file].uri.rsplit("/", 1)[-1] for f in partition.fragments}


def _rewrite(path):
    """The same rows written again: same size and row count, a new version (mtime)."""
    with open(path, "rb") as fh:
        data = fh.read()
    time.sleep(0.01)
    with open(path, "wb") as fh:
        fh.write(data)
    os.utime(path, ns=(time.time_ns(), time.time_ns()))


def test_an_unchanged_manifest_keeps_every_partition(tmp_path):
    write_manifest(tmp_path / "m", n_files=4)
    first = _night(tmp_path, "n1").plan
    second = _night(tmp_path, "n2").plan
    assert first.previous_run_id == "" and second.previous_run_id == "n1"
    assert [p.key for p in second.partitions] == [p.key for p in first.partitions]
    assert all(p.kept for p in second.partitions) and not second.retired
    assert second.kept_rows == second.rows == 240


def test_appended_rewritten_and_deleted_files(tmp_path):
    write_manifest(tmp_path / "m", n_files=4)
    first = _night(tmp_path, "n1").plan
    assert len(first.partitions) == 4 and all(len(_files(first, p)) == 1 for p in first.partitions)
    write_manifest(tmp_path / "m", n_files=1, start=900)  # appended
    _rewrite(tmp_path / "m" / "part-000-001.parquet")
    os.remove(tmp_path / "m" / "part-000-002.parquet")
    result = _night(tmp_path, "n2")
    second = result.plan
    kept = [p for p in second.partitions if p.kept]
    new = [p for p in second.partitions if not p.kept]
    assert {frozenset(_files(second, p)) for p in kept} == {
        frozenset({"part-000-000.parquet"}),
        frozenset({"part-000-003.parquet"}),
    }
    assert {k.key for k in kept} <= {p.key for p in first.partitions}
    assert {frozenset(_files(second, p)) for p in new} == {
        frozenset({"part-000-001.parquet"}),
        frozenset({"part-900-000.parquet"}),
    }
    assert not {p.key for p in new} & {p.key for p in first.partitions}, "a rewritten file is new work"
    retired = {r.files for r in second.retired}
    assert len(second.retired) == 2 and second.retired_rows == 120
    assert any(f[0].endswith("part-000-001.parquet") for f in retired)
    assert any(f[0].endswith("part-000-002.parquet") for f in retired)
    assert [p.index for p in second.partitions] == list(range(4)), "kept first, then new; indices dense"
    assert "kept 2 partitions (120 rows), 2 new (120 rows), retired 2 (120 rows)" in result.summary()


def test_a_retired_partitions_unchanged_neighbours_are_replanned(tmp_path):
    write_manifest(tmp_path / "m", n_files=4)
    first = run_plan(str(tmp_path / "m"), str(tmp_path / "out"), Partitioning(partition_rows=120), run_id="n1").plan
    assert [len(_files(first, p)) for p in first.partitions] == [2, 2]
    os.remove(tmp_path / "m" / "part-000-000.parquet")
    second = run_plan(str(tmp_path / "m"), str(tmp_path / "out"), Partitioning(partition_rows=120), run_id="n2").plan
    assert [p.kept for p in second.partitions] == [True, False]
    assert _files(second, second.partitions[1]) == {"part-000-001.parquet"}
    assert second.rows == 180 and second.retired_rows == 120


def test_partition_size_never_invalidates_committed_work(tmp_path):
    write_manifest(tmp_path / "m", n_files=3)
    first = _night(tmp_path, "n1").plan
    write_manifest(tmp_path / "m", n_files=2, start=900)
    second = run_plan(str(tmp_path / "m"), str(tmp_path / "out"), Partitioning(partition_rows=200), run_id="n2").plan
    assert [p.key for p in second.partitions if p.kept] == [p.key for p in first.partitions]
    assert [p.rows for p in second.partitions if not p.kept] == [120], "new work packed at the new size"


def test_a_retried_plan_step_continues_what_its_first_try_continued(tmp_path):
    write_manifest(tmp_path / "m", n_files=2)
    _night(tmp_path, "n1")
    write_manifest(tmp_path / "m", n_files=1, start=900)
    second = _night(tmp_path, "n2")
    again = _night(tmp_path, "n2")
    assert again.reused and again.plan == second.plan and again.plan.previous_run_id == "n1"
    with open(lineage_uri(str(tmp_path / "out"), default_dataset_name(str(tmp_path / "m")))) as fh:
        pointer = json.load(fh)
    assert pointer["run_id"] == "n2" and load_plan(pointer["plan_uri"]) == second.plan


def test_fresh_and_other_datasets_do_not_continue(tmp_path):
    write_manifest(tmp_path / "m", n_files=2)
    _night(tmp_path, "n1")
    assert _night(tmp_path, "n2", fresh=True).plan.previous_run_id == ""
    assert _night(tmp_path, "n3", dataset="other").plan.previous_run_id == ""
    assert _night(tmp_path, "n4", dataset="other").plan.previous_run_id == "n3"


def test_a_previous_format_1_plan_is_planned_anew(tmp_path):
    write_manifest(tmp_path / "m", n_files=2)
    first = _night(tmp_path, "n1")
    with open(first.uri) as fh:
        data = json.load(fh)
    data["format"] = "multimodal-embeddings-plan/1"
    for p in data["partitions"]:
        del p["key"], p["kept"]
    for key in ("previous_run_id", "previous_plan_id", "retired"):
        del data[key]
    with open(first.uri, "w") as fh:
        json.dump(data, fh)
    legacy = load_plan(first.uri)
    assert not legacy.keyed and legacy.work_uri(0, "m1", "k").endswith(f"plan={legacy.plan_id}/partition=00000")
    second = _night(tmp_path, "n2")
    assert not any(p.kept for p in second.plan.partitions) and "predates content-keyed work" in second.summary()


def test_a_broken_lineage_pointer_is_a_clear_error(tmp_path):
    write_manifest(tmp_path / "m", n_files=1)
    _night(tmp_path, "n1")
    with open(lineage_uri(str(tmp_path / "out"), default_dataset_name(str(tmp_path / "m"))), "w") as fh:
        fh.write("{not json")
    with pytest.raises(PlanError, match=r"_lineage.*not valid JSON"):
        _night(tmp_path, "n2")


def test_a_plan_at_max_partitions_keeps_everything_when_nothing_changed(tmp_path):
    write_manifest(tmp_path / "m", n_files=4)
    full = Partitioning(partition_rows=60, max_partitions=4)
    first = run_plan(str(tmp_path / "m"), str(tmp_path / "out"), full, run_id="n1").plan
    assert len(first.partitions) == 4
    second = run_plan(str(tmp_path / "m"), str(tmp_path / "out"), full, run_id="n2").plan
    assert all(p.kept for p in second.partitions) and not second.retired, "no change: nothing repacked"
    write_manifest(tmp_path / "m", n_files=1, start=900)
    third = run_plan(str(tmp_path / "m"), str(tmp_path / "out"), full, run_id="n3")
    assert not any(p.kept for p in third.plan.partitions) and len(third.plan.partitions) <= 4
    assert "leave no room within max_partitions 4" in third.summary()


def test_a_retried_plan_step_restores_a_lineage_pointer_its_first_try_did_not_write(tmp_path):
    write_manifest(tmp_path / "m", n_files=2)
    _night(tmp_path, "n1")
    write_manifest(tmp_path / "m", n_files=1, start=900)
    second = _night(tmp_path, "n2")
    pointer = lineage_uri(str(tmp_path / "out"), default_dataset_name(str(tmp_path / "m")))
    with open(pointer, "w") as fh:  # as if the first try died between plan.json and the pointer
        json.dump({"run_id": "n1", "plan_uri": str(tmp_path / "out" / "runs" / "n1" / "plan.json")}, fh)
    assert _night(tmp_path, "n2").reused
    with open(pointer) as fh:
        assert json.load(fh)["run_id"] == "n2"
    third = _night(tmp_path, "n3")
    assert third.plan.previous_run_id == "n2" and all(p.kept for p in third.plan.partitions)
    _night(tmp_path, "n2")  # an older run's retry never moves the lineage back
    with open(pointer) as fh:
        assert json.load(fh)["run_id"] == "n3"
    assert second.plan.previous_run_id == "n1"


def test_a_manifest_that_lost_most_of_its_rows_fails_the_plan_unless_allowed(tmp_path):
    """The table follows the manifest: an export that failed upstream and left one file of four
    (or none) would remove three quarters of the table. The plan refuses, naming the numbers
    and both ways out; ``max_row_loss`` 1 (or ``--fresh``) lets it through."""
    write_manifest(tmp_path / "m", n_files=4)
    _night(tmp_path, "n1")
    for name in ("part-000-001.parquet", "part-000-002.parquet", "part-000-003.parquet"):
        os.remove(tmp_path / "m" / name)
    with pytest.raises(PlanError, match=r"has 60 rows, 75% fewer than the 240 of the last plan \(run n1\)"):
        _night(tmp_path, "n2")
    assert os.path.isdir(tmp_path / "out" / "runs" / "n1")
    assert not os.path.exists(tmp_path / "out" / "runs" / "n2"), "nothing written for the refused night"
    lenient = Partitioning(partition_rows=60, max_row_loss=1.0)
    allowed = run_plan(str(tmp_path / "m"), str(tmp_path / "out"), lenient, run_id="n2").plan
    assert allowed.rows == 60 and allowed.retired_rows == 180
    # a loss within the bound plans as before: 60 of 240 rows lost is 25%
    write_manifest(tmp_path / "m", n_files=3, start=500)
    assert _night(tmp_path, "n3").plan.rows == 240
