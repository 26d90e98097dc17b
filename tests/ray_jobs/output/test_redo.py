"""Redo: which committed partitions a run embeds again."""

import pytest

from ray_jobs.config.settings import Partitioning
from ray_jobs.output.markers import read_marker
from ray_jobs.output.redo import parse_partitions, partitions_to_redo
from ray_jobs.planning.plan import run_plan
from tests.ray_jobs.output.test_validate import MODEL, OUT_KEY, _commit
from tests.ray_jobs.planning.test_plan import write_manifest


def test_partition_lists_and_ranges():
    assert parse_partitions("3, 7,10-12") == {3, 7, 10, 11, 12}
    assert parse_partitions("0") == {0}
    with pytest.raises(ValueError, match="'x' is not a partition index"):
        parse_partitions("1,x")
    with pytest.raises(ValueError, match="runs backwards"):
        parse_partitions("5-3")


def test_named_partitions_and_reject_reasons_pick_only_committed_work(tmp_path):
    plan = run_plan(
        write_manifest(tmp_path / "m", n_files=4), str(tmp_path / "out"), Partitioning(partition_rows=60)
    ).plan
    _commit(plan, 0)
    _commit(plan, 1, rejected=3)  # "not an image" rejects
    _commit(plan, 2)
    committed = {i: read_marker(plan.work_uri(i, MODEL, OUT_KEY)) for i in range(3)}
    assert partitions_to_redo(plan, committed, "0,3", None) == [0], "3 is not committed: it runs anyway"
    assert partitions_to_redo(plan, committed, None, "not an image") == [1]
    assert partitions_to_redo(plan, committed, "2", "access denied, not an image") == [1, 2]
    assert partitions_to_redo(plan, committed, None, None) == []
    with pytest.raises(ValueError, match=r"partitions 0\.\.3, not \[9\]"):
        partitions_to_redo(plan, committed, "9", None)
