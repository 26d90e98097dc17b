"""Iceberg registration: committed partitions are written with the real sink (no Ray needed)."""

import pytest
from pyiceberg.catalog.sql import SqlCatalog

from ray_jobs.config.settings import Partitioning
from ray_jobs.contract.ids import default_dataset_name
from ray_jobs.errors import OutputError
from ray_jobs.output.catalog import open_catalog, register_plan, table_identifier
from ray_jobs.planning.plan import run_plan
from tests.ray_jobs.output.test_validate import MODEL, OUT_KEY, _commit
from tests.ray_jobs.planning.test_plan import write_manifest


def _plan(tmp_path, rows=50, run_id="r1", **kw):
    m = write_manifest(tmp_path / "m", n_files=2, **kw)
    return run_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=rows), run_id=run_id).plan


def _table(uri, tmp_path, plan):
    ident = table_identifier(MODEL, default_dataset_name(plan.manifest_uri), OUT_KEY)
    return open_catalog(uri, str(tmp_path / "out" / "warehouse")).load_table(ident)


def test_register_holds_exactly_the_committed_rows_and_rerun_adds_nothing(tmp_path):
    plan = _plan(tmp_path)
    for i in range(len(plan.partitions)):
        _commit(plan, i, rejected=2)
    uri = f"sqlite:///{tmp_path}/catalog.db"
    first = register_plan(plan, MODEL, uri, run_id="manual__1")
    dataset = default_dataset_name(plan.manifest_uri)
    assert dataset.startswith("m_") and first.new_snapshot
    assert first.table == f"embeddings.{dataset}__tiny_0123456789__{OUT_KEY}"
    table = _table(uri, tmp_path, plan)
    assert len(table.metadata.metadata_log) == 1, "created with its properties in one commit, then one snapshot"
    assert table.properties["embeddings.dataset"] == dataset and "schema.name-mapping.default" in table.properties
    assert table.scan().to_arrow().num_rows == 120 - 2 * len(plan.partitions) == first.rows
    summary = table.current_snapshot().summary
    assert summary["embeddings.plan_id"] == plan.plan_id and summary["airflow.run_id"] == "manual__1"
    assert summary["embeddings.model_id"] == MODEL and summary["embeddings.rows_rejected"] == str(
        2 * len(plan.partitions)
    )

    again = register_plan(plan, MODEL, uri, run_id="manual__2")
    assert not again.new_snapshot and again.snapshot_id == first.snapshot_id
    assert len(_table(uri, tmp_path, plan).snapshots()) == 1


def test_a_new_plan_replaces_the_table_content_and_the_old_one_stays_reachable(tmp_path):
    uri = f"sqlite:///{tmp_path}/catalog.db"
    plan1 = _plan(tmp_path)
    for i in range(len(plan1.partitions)):
        _commit(plan1, i)
    first = register_plan(plan1, MODEL, uri, run_id="night-1")
    write_manifest(tmp_path / "m", n_files=1, start=1000)  # tonight's manifest has one more file
    plan2 = run_plan(str(tmp_path / "m"), str(tmp_path / "out"), Partitioning(partition_rows=50), run_id="r2").plan
    assert plan2.plan_id != plan1.plan_id
    for p in plan2.partitions:
        if not p.kept:
            _commit(plan2, p.index)
    second = register_plan(plan2, MODEL, uri, run_id="night-2")
    assert second.table == first.table, "the same manifest location is the same dataset"
    assert (second.rows_added, second.rows_removed, second.files_removed) == (60, 0, 0)
    table = _table(uri, tmp_path, plan2)
    assert table.scan().to_arrow().num_rows == 180 == second.rows
    assert table.scan(snapshot_id=first.snapshot_id).to_arrow().num_rows == 120


def _commit_all(plan):
    for i in range(len(plan.partitions)):
        _commit(plan, i)
    return plan


def test_a_run_over_another_manifest_never_removes_this_manifests_rows(tmp_path):
    uri = f"sqlite:///{tmp_path}/catalog.db"
    products = _commit_all(_plan(tmp_path))
    first = register_plan(products, MODEL, uri, run_id="products-1")
    m2 = write_manifest(tmp_path / "other" / "m", n_files=1, start=5000)
    other = _commit_all(run_plan(m2, str(tmp_path / "out"), Partitioning(partition_rows=50), run_id="o1").plan)
    second = register_plan(other, MODEL, uri, run_id="other-1")
    assert second.table != first.table
    table = _table(uri, tmp_path, products)
    assert table.current_snapshot().snapshot_id == first.snapshot_id
    assert table.scan().to_arrow().num_rows == 120
    named = register_plan(other, MODEL, uri, run_id="other-2", dataset="Other Shop")
    assert named.table == f"embeddings.other_shop__tiny_0123456789__{OUT_KEY}" and named.rows == 60


def test_uncommitted_partitions_are_refused(tmp_path):
    plan = _plan(tmp_path)
    _commit(plan, 0)
    with pytest.raises(OutputError, match="partition 00001 is not committed"):
        register_plan(plan, MODEL, f"sqlite:///{tmp_path}/catalog.db", run_id="r")


def test_catalog_uri_must_be_a_url(tmp_path):
    from ray_jobs.errors import UsageError

    with pytest.raises(UsageError, match="not a SQLAlchemy URL"):
        open_catalog("catalog.db", str(tmp_path))
    assert isinstance(open_catalog(f"sqlite:///{tmp_path}/c.db", str(tmp_path / "wh")), SqlCatalog)


@pytest.mark.integration
def test_warehouse_and_data_on_s3(s3_bucket, tmp_path):
    from ray_jobs import storage

    local = write_manifest(tmp_path / "m", n_files=2)
    plan = run_plan(local, f"{s3_bucket}/ice/out", Partitioning(partition_rows=50), run_id="r").plan
    for i in range(len(plan.partitions)):
        _commit(plan, i)
    uri = f"sqlite:///{tmp_path}/catalog.db"
    result = register_plan(plan, MODEL, uri, run_id="r", warehouse=f"{s3_bucket}/ice/warehouse")
    ident = table_identifier(MODEL, default_dataset_name(plan.manifest_uri), OUT_KEY)
    table = open_catalog(uri, f"{s3_bucket}/ice/warehouse").load_table(ident)
    assert table.metadata_location.startswith("s3://embeddings-test/ice/warehouse/")
    assert table.scan().to_arrow().num_rows == 120 == result.rows
    assert storage.exists(table.metadata_location)


def test_the_table_follows_the_manifest_one_snapshot_a_night(tmp_path):
    """Night 2 rewrites one file and deletes another: its snapshot removes exactly the retired
    work's files and adds the new work's, and the table then holds what a from-scratch plan
    of tonight's manifest would (each id once)."""
    import os
    import time

    uri = f"sqlite:///{tmp_path}/catalog.db"
    m = write_manifest(tmp_path / "m", n_files=3)
    plan1 = _commit_all(run_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=60), run_id="n1").plan)
    first = register_plan(plan1, MODEL, uri, run_id="night-1")
    rewritten = tmp_path / "m" / "part-000-001.parquet"
    data = rewritten.read_bytes()
    rewritten.write_bytes(data)
    os.utime(rewritten, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    os.remove(tmp_path / "m" / "part-000-002.parquet")
    plan2 = run_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=60), run_id="n2").plan
    assert [p.kept for p in plan2.partitions] == [True, False] and plan2.retired_rows == 120
    _commit(plan2, 1)
    second = register_plan(plan2, MODEL, uri, run_id="night-2")
    assert (second.rows_added, second.rows_removed, second.files_added, second.files_removed) == (60, 120, 2, 4)
    table = _table(uri, tmp_path, plan2)
    ids = table.scan().to_arrow().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 120
    summary = table.current_snapshot().summary
    assert summary["embeddings.rows_removed"] == "120" and summary["embeddings.rows_added"] == "60"
    assert summary["embeddings.manifest_fingerprint"] == plan2.manifest_fingerprint
    assert table.scan(snapshot_id=first.snapshot_id).to_arrow().num_rows == 180, "last night by time travel"
    fresh = run_plan(m, str(tmp_path / "fresh"), Partitioning(partition_rows=60), run_id="f", fresh=True).plan
    assert sorted(p.key for p in fresh.partitions) == sorted(p.key for p in plan2.partitions)


def test_a_table_named_before_output_identities_is_renamed_with_its_history(tmp_path):
    uri = f"sqlite:///{tmp_path}/catalog.db"
    plan = _commit_all(_plan(tmp_path))
    dataset = default_dataset_name(plan.manifest_uri)
    catalog = open_catalog(uri, str(tmp_path / "out" / "warehouse"))
    legacy_ident = table_identifier(MODEL, dataset)
    first = register_plan(plan, MODEL, uri, run_id="r", dataset=dataset)
    catalog.rename_table(first.table, legacy_ident)  # the name registrations gave before output identities
    registered = register_plan(plan, MODEL, uri, run_id="r2", dataset=dataset)
    assert registered.table == table_identifier(MODEL, dataset, OUT_KEY) and not registered.new_snapshot
    assert not catalog.table_exists(legacy_ident)
    assert len(catalog.load_table(registered.table).snapshots()) == 1
