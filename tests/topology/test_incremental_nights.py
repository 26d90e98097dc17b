"""Two nights in the topology users deploy: runs for two logical dates, created through the
REST API and scheduled by the separate scheduler process, with the manifest changed between
them (a file deleted, a file of new rows added). The second night embeds only the change, and
its table equals a from-scratch run over the new manifest."""

from __future__ import annotations

import datetime as dt
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.topology.airflow_stack import DAG_ID
from tests.topology.test_real_topology import _conf, _report

pytestmark = pytest.mark.integration


def _table(output, catalog_result):
    from ray_jobs.output.catalog import open_catalog

    catalog = open_catalog(f"sqlite:///{output}/iceberg_catalog.db", f"{output}/warehouse")
    table = catalog.load_table(catalog_result["table"])
    return table.scan(snapshot_id=catalog_result["snapshot_id"]).to_arrow().sort_by("id")


def _night(stack, conf, logical_date):
    r = stack.api("POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": logical_date, "conf": conf})
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    state = stack.wait_run(run_id, timeout=900)
    assert state == "success", (stack.task_instances(run_id), stack.log_tail("scheduler"))
    return run_id


def _night_of(days_ago: int, hour: int = 1) -> str:
    """A logical date a month back: other modules of the shared stack trigger yesterday's night."""
    day = dt.datetime.now(dt.UTC) - dt.timedelta(days=days_ago)
    return day.replace(hour=hour, minute=0, second=0, microsecond=0).isoformat()


def test_the_second_night_embeds_only_the_change_and_its_table_equals_a_full_run(stack, demo_assets, tmp_path):
    manifest = tmp_path / "manifest"
    shutil.copytree(demo_assets.manifest, manifest)
    files = sorted(manifest.iterdir())
    output = tmp_path / "out"
    conf = {**_conf(demo_assets, output, partition_rows=60), "manifest_uri": str(manifest)}  # a partition per file

    night1 = _night(stack, conf, _night_of(31))
    first = _report(str(output), night1)
    assert first["valid"] and first["rows_in"] == 120 and first["night"]["kept_rows"] == 0

    # the night's upstream change: the last file deleted, a file of 40 new rows added
    os.remove(files[-1])
    new = pq.read_table(files[0]).slice(0, 40)
    new = new.set_column(0, "id", pa.array([f"new-{i:03d}" for i in range(40)], pa.string()))
    pq.write_table(new, manifest / "part-added.parquet", row_group_size=16)

    night2 = _night(stack, conf, _night_of(30))
    planned = stack.xcom(night2, "plan", "return_value")
    second = _report(str(output), night2)
    n = second["night"]
    assert n["previous_run_id"] and n["new_rows"] == 40 and n["kept_rows"] == 60 and n["removed_rows"] > 0, n
    embeds = [t for t in stack.task_instances(night2) if t["task_id"] == "embed"]
    assert len(embeds) == len(planned["todo"]) < planned["partitions"], "only the new work ran"
    log = stack.task_log(night2, "report")
    assert "night: embedded 40 new or changed rows, kept 60, removed" in log, log[-2000:]

    fresh_out = tmp_path / "fresh"
    fresh = _night(stack, {**conf, "output_uri": str(fresh_out)}, _night_of(30, hour=2))
    catalog2 = stack.xcom(night2, "catalog", "return_value")
    catalog_fresh = stack.xcom(fresh, "catalog", "return_value")
    incremental, scratch = _table(output, catalog2), _table(fresh_out, catalog_fresh)
    assert incremental["id"].to_pylist() == scratch["id"].to_pylist()
    assert len(set(incremental["id"].to_pylist())) == incremental.num_rows == 100 - second["rows_rejected"]
    for column in ("text_embedding", "image_embedding"):
        a = np.stack(incremental[column].to_numpy(zero_copy_only=False))
        b = np.stack(scratch[column].to_numpy(zero_copy_only=False))
        assert np.abs(a - b).max() <= 1e-5, column
    assert catalog2["rows_added"] > 0 and catalog2["rows_removed"] > 0
