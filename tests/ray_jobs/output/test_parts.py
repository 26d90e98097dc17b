"""Part files: each write task rolls its rows into files under the attempt's directory."""

import os

from ray_jobs.output.markers import committed_marker, read_marker
from tests.ray_jobs.output.test_commit import commit_batches, committed_ids, make_batch


def test_rolls_files_per_task_under_the_attempt_and_commits_last(tmp_path):
    part = str(tmp_path / "p")
    marker = commit_batches(
        part, [[make_batch(["a", "b", "c", "d"], ok=[True, False, True, True]), make_batch(["e", "f"])]], 6
    )
    prefix = f"attempt={marker.attempt}/"
    assert [f.path for f in marker.files] == [prefix + "part-00000-000.parquet", prefix + "part-00000-001.parquet"]
    assert [f.rows for f in marker.files] == [3, 2]
    assert [f.path for f in marker.rejects] == [prefix + "rejects-00000.parquet"]
    assert (marker.rows_ok, marker.rows_rejected) == (5, 1) and marker.reconciles()
    assert marker.rejects_by_reason == {"missing object": 1}
    assert committed_ids(part, marker) == ["a", "c", "d", "e", "f"]
    for f in marker.listed:
        assert os.path.getsize(os.path.join(part, f.path)) == f.bytes
    assert committed_marker(part, "m") == marker == read_marker(part)
    assert committed_marker(part, "other-model") is None


def test_part_files_are_cut_into_row_groups_of_the_setting(tmp_path):
    import pyarrow.parquet as pq

    from ray_jobs.output.lease import Attempt
    from tests.ray_jobs.output.test_commit import write_tasks

    part = str(tmp_path / "p")
    with Attempt(part) as attempt:
        (result,) = write_tasks(attempt, [[make_batch(list("abcdefg"))]], rows_per_file=5, row_group_rows=2)
    metas = [pq.ParquetFile(os.path.join(part, f.path)).metadata for f in sorted(result.files, key=lambda f: f.path)]
    groups = [[m.row_group(i).num_rows for i in range(m.num_row_groups)] for m in metas]
    assert groups == [[2, 2, 1], [2]], "files of at most 5 rows, row groups of at most 2"
