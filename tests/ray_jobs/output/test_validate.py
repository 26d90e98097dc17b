"""validate: committed partitions are written here with the real sink (no Ray needed)."""

import os

import numpy as np
import pytest

from ray_jobs.cli import main
from ray_jobs.config.settings import Partitioning
from ray_jobs.errors import PlanError
from ray_jobs.output.markers import read_marker
from ray_jobs.output.validate import resolve_model_id, validate_plan
from ray_jobs.planning.plan import run_plan
from tests.ray_jobs.output.test_commit import commit_batches
from tests.ray_jobs.planning.test_plan import write_manifest

MODEL = "tiny-0123456789"
OUT_KEY = "0a1b2c3d4e"  # the output identity the committed work is written for


def _commit(plan, index, rows=None, rejected=0, model_id=MODEL):
    rows = plan.partitions[index].rows if rows is None else rows
    ok = np.arange(rows) >= rejected
    emb = np.full((rows, 4), 0.5, dtype=np.float32)
    batch = {
        "id": np.array([f"p{index}-{i}" for i in range(rows)], dtype=object),
        "ok": ok,
        "reject_stage": np.array(["" if o else "decode" for o in ok], dtype=object),
        "reject_reason": np.array(["" if o else "not an image: x" for o in ok], dtype=object),
        "text_embedding": emb,
        "image_embedding": emb,
    }
    uri = plan.work_uri(index, model_id, OUT_KEY)
    return commit_batches(
        uri,
        [[batch]],
        rows,
        rows_per_file=40,
        force=True,
        model_id=model_id,
        plan_id=plan.plan_id,
        partition=index,
        work_key=plan.partitions[index].key,
        output_key=OUT_KEY,
    )


@pytest.fixture
def plan(tmp_path):
    m = write_manifest(tmp_path / "m", n_files=2)
    return run_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=50), run_id="r").plan


def test_all_committed_is_ok(plan):
    for i in range(len(plan.partitions)):
        _commit(plan, i, rejected=1)
    report = validate_plan(plan, MODEL, embed_dim=4)
    assert report.ok and report.rows_in == 120 and report.rows_rejected == len(plan.partitions)
    assert "validate: OK" in report.table()
    assert not validate_plan(plan, MODEL, embed_dim=4, max_reject_rate=0.01).ok


def test_missing_partition(plan):
    _commit(plan, 0)
    report = validate_plan(plan, MODEL)
    assert not report.ok and [c.index for c in report.failed] == list(range(1, len(plan.partitions)))
    assert report.failed[0].problems == ("missing: no _SUCCESS",)


def test_count_mismatch_with_the_plan(plan):
    for i in range(len(plan.partitions)):
        _commit(plan, i, rows=plan.partitions[i].rows - (1 if i == 1 else 0))
    report = validate_plan(plan, MODEL)
    assert [c.index for c in report.failed] == [1]
    assert "rows_in" in report.failed[0].problems[0] and "!= planned" in report.failed[0].problems[0]


def test_deleted_or_changed_listed_file_and_wrong_dims(plan):
    for i in range(len(plan.partitions)):
        _commit(plan, i, rejected=1)
    part = plan.work_uri(0, MODEL, OUT_KEY)
    marker = read_marker(part)
    os.remove(os.path.join(part, marker.files[0].path))
    with open(os.path.join(part, marker.rejects[0].path), "ab") as fh:
        fh.write(b"x")
    report = validate_plan(plan, MODEL, embed_dim=8)
    assert any(f"{marker.files[0].path} is missing" in p for p in report.failed[0].problems)
    assert any(
        f"{marker.rejects[0].path} has {marker.rejects[0].bytes + 1} bytes" in p for p in report.failed[0].problems
    )
    assert all(any("dims 4/4 != model's 8" in p for p in c.problems) for c in report.checks)


def test_model_id_found_when_only_one_model_wrote_the_plan(plan):
    _commit(plan, 0)
    assert resolve_model_id(plan, None) == (MODEL, None)
    _commit(plan, 0, model_id="other-model")
    with pytest.raises(PlanError, match="pass --model"):
        resolve_model_id(plan, None)


def test_cli_exit_codes(plan, capsys, tmp_path):
    plan_uri = os.path.join(plan.output_uri, "runs", "r", "plan.json")
    for i in range(len(plan.partitions)):
        _commit(plan, i)
    assert main(["validate", "--plan", plan_uri]) == 0
    os.remove(os.path.join(plan.work_uri(1, MODEL, OUT_KEY), "_SUCCESS"))
    assert main(["validate", "--plan", plan_uri, "--summary-json", str(tmp_path / "v.json")]) == 1
    out = capsys.readouterr()
    assert "FAIL: missing: no _SUCCESS" in out.out and "partition 00001: missing" in out.err
    assert main(["validate", "--plan", str(tmp_path / "nope.json")]) == 2


def test_validate_report_and_catalog_from_the_cli(plan, capsys, tmp_path):
    import json

    plan_uri = os.path.join(plan.output_uri, "runs", "r", "plan.json")
    for i in range(len(plan.partitions)):
        _commit(plan, i, rejected=1)
    catalog = ["--catalog-uri", f"sqlite:///{tmp_path}/cat.db", "--dataset", "Products"]
    rc = main(["validate", "--plan", plan_uri, "--report", *catalog])
    out = capsys.readouterr().out
    assert rc == 0 and "catalog: registered" in out and "report: OK" in out
    run_dir = os.path.join(plan.output_uri, "runs", "r")
    with open(os.path.join(run_dir, "report.json")) as fh:
        report = json.load(fh)
    assert report["rows_in"] == 120 and report["rows_rejected"] == len(plan.partitions)
    assert report["rejects_by_reason"] == {"not an image": len(plan.partitions)}
    assert report["catalog"]["table"] == f"embeddings.products__tiny_0123456789__{OUT_KEY}"
    assert {p["attempt"] for p in report["partitions"]} and all(p["attempt"] for p in report["partitions"])
    with open(os.path.join(run_dir, "report.md")) as fh:
        md = fh.read()
    assert md.startswith("# Embedding run `r`") and "| not an image |" in md


def test_an_id_in_two_files_or_twice_in_one_fails_validation_naming_the_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    m = write_manifest(tmp_path / "m", n_files=2)
    first, second = sorted(os.listdir(m))
    t = pq.read_table(os.path.join(m, second))
    ids = t["id"].to_pylist()
    ids[5] = "r0"  # the first file's first id
    ids[7] = ids[6]  # twice in the second file
    pq.write_table(t.set_column(0, "id", pa.array(ids, pa.string())), os.path.join(m, second), row_group_size=30)
    plan = run_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=50), run_id="r").plan
    for i in range(len(plan.partitions)):
        _commit(plan, i)
    report = validate_plan(plan, MODEL, embed_dim=4)
    assert not report.ok and not report.failed, "every partition is committed; the manifest is what is wrong"
    problems = "\n".join(report.problems())
    assert f"duplicate id 'r0': in {os.path.join(m, first)} and in {os.path.join(m, second)}" in problems
    assert f"duplicate id '{ids[6]}': 2 times in {os.path.join(m, second)}" in problems
