"""A manifest that is an Iceberg table (``iceberg://<namespace>.<table>``), in a real pyiceberg
SQLite catalog with a local warehouse: the plan lists the current snapshot's data files, a
second night plans only the data files that differ, and delete files are refused."""

import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_jobs import storage
from ray_jobs.cli import main
from ray_jobs.config.settings import Partitioning
from ray_jobs.contract.plan import Plan
from ray_jobs.errors import ManifestError
from ray_jobs.job.datasource import FragmentRef, read_fragment
from ray_jobs.planning.iceberg_manifest import ManifestCatalog, read_table_manifest, table_identifier
from ray_jobs.planning.manifest import read_manifest
from ray_jobs.planning.plan import load_plan, run_plan

TABLE = "manifests.products"
URI = f"iceberg://{TABLE}"
CATALOG_NAME = "lake"  # a SQL catalog's name: its tables are listed under it
GROUP_ROWS = 10


def _rows(start: int, n: int) -> pa.Table:
    return pa.table(
        {
            "id": pa.array([f"r{i}" for i in range(start, start + n)], pa.string()),
            "text": pa.array([f"text {i}" for i in range(start, start + n)], pa.string()),
            "image_uri": pa.array([f"/img/{i}.jpg" for i in range(start, start + n)], pa.string()),
            "image_bytes": pa.array([1000 + i for i in range(start, start + n)], pa.int64()),
        }
    )


@pytest.fixture()
def catalog(tmp_path):
    """A SQLite catalog (its URI) with the manifest table, written by pyiceberg in two
    appends (two snapshots), row groups of 10 rows."""
    from pyiceberg.catalog.sql import SqlCatalog

    uri = f"sqlite:///{tmp_path}/catalog.db"
    cat = SqlCatalog(CATALOG_NAME, uri=uri, warehouse=f"file://{tmp_path}/warehouse")
    cat.create_namespace("manifests")
    table = cat.create_table(
        TABLE, schema=_rows(0, 1).schema, properties={"write.parquet.row-group-limit": str(GROUP_ROWS)}
    )
    table.append(_rows(0, 30))
    table.append(_rows(30, 25))
    return uri


def _table(catalog_uri):
    from pyiceberg.catalog.sql import SqlCatalog

    return SqlCatalog(CATALOG_NAME, uri=catalog_uri).load_table(TABLE)


def _plan(tmp_path, catalog_uri, run_id, rows=20) -> Plan:
    settings = Partitioning(partition_rows=rows)
    return run_plan(
        URI, str(tmp_path / "out"), settings, run_id=run_id, manifest_catalog=ManifestCatalog(catalog_uri, CATALOG_NAME)
    ).plan


def test_the_plan_lists_the_current_snapshots_data_files(tmp_path, catalog):
    table = _table(catalog)
    live = {t.file.file_path: t.file for t in table.scan().plan_files()}
    plan = _plan(tmp_path, catalog, "night-1")

    assert len(plan.files) == len(live) == 2
    assert plan.manifest_uri == URI and plan.manifest_snapshot_id == table.current_snapshot().snapshot_id
    by_path = {f"file://{f.uri}": f for f in plan.files}
    assert set(by_path) == set(live)  # plain local paths of the table's own data files
    for path, f in by_path.items():
        assert f.rows == live[path].record_count and f.size == live[path].file_size_in_bytes
        assert f.version == ""  # data files are immutable: the path and the size name the content
        assert f.row_groups == -(-f.rows // GROUP_ROWS)  # row groups from the footer
    assert plan.rows == 55
    assert any(f"manifest table {TABLE} at snapshot {plan.manifest_snapshot_id}" in n for n in plan.notes)
    reread = load_plan(f"{tmp_path}/out/runs/night-1/plan.json")
    assert reread.manifest_snapshot_id == plan.manifest_snapshot_id


def test_the_job_reads_planned_row_groups_of_the_data_files(tmp_path, catalog):
    """What the embed job's pre-flight and read task do with each planned file: its size as
    planned, its row groups by index (ids exactly the table's)."""
    plan = _plan(tmp_path, catalog, "night-1")
    ids = []
    for part in plan.partitions:
        for fr in part.fragments:
            planned = plan.files[fr.file]
            assert storage.stat_file(planned.uri)[0] == planned.size
            ids += [
                i for t in read_fragment(FragmentRef(planned.uri, fr.row_groups, fr.rows)) for i in t["id"].to_pylist()
            ]
    assert sorted(ids) == sorted(_table(catalog).scan().to_arrow()["id"].to_pylist())


def test_night_two_after_an_append_keeps_night_ones_partitions_and_plans_only_the_new_file(tmp_path, catalog):
    first = _plan(tmp_path, catalog, "night-1")
    table = _table(catalog)
    table.append(_rows(55, 12))
    second = _plan(tmp_path, catalog, "night-2")

    kept = [p for p in second.partitions if p.kept]
    new = [p for p in second.partitions if not p.kept]
    assert [p.key for p in kept] == [p.key for p in first.partitions] and not second.retired
    new_files = {second.files[fr.file].uri for p in new for fr in p.fragments}
    assert new_files == {f.uri for f in second.files} - {f.uri for f in first.files} and len(new_files) == 1
    assert sum(p.rows for p in new) == 12 and second.kept_rows == first.rows == 55
    assert second.previous_run_id == "night-1"
    assert second.manifest_snapshot_id == table.current_snapshot().snapshot_id != first.manifest_snapshot_id
    assert any(f"differ from snapshot {first.manifest_snapshot_id}" in n for n in second.notes)


def test_a_rewritten_data_file_retires_its_work_and_only_the_rewrite_is_planned(tmp_path, catalog):
    """pyiceberg deletes copy-on-write: the data file holding r5 is replaced by a new one."""
    from pyiceberg.expressions import EqualTo

    first = _plan(tmp_path, catalog, "night-1")
    _table(catalog).delete(EqualTo("id", "r5"))
    second = _plan(tmp_path, catalog, "night-2")

    gone = {f.uri for f in first.files} - {f.uri for f in second.files}
    (rewritten,) = {f.uri for f in second.files} - {f.uri for f in first.files}
    assert len(gone) == 1 and second.retired and all(set(r.files) & gone for r in second.retired)
    untouched = [p.key for p in first.partitions if not {first.files[fr.file].uri for fr in p.fragments} & gone]
    assert [p.key for p in second.partitions if p.kept] == untouched
    new = [p for p in second.partitions if not p.kept]
    assert sum(fr.rows for p in new for fr in p.fragments if second.files[fr.file].uri == rewritten) == 29
    assert second.rows == 54 and second.kept_rows + sum(p.rows for p in new) == 54


def _add_position_delete(catalog_uri, data_path: str) -> None:
    """Commit one position delete file (row 0 of *data_path*) in a delete manifest, as a
    merge-on-read writer (Spark, Flink) does: pyiceberg itself writes no delete files (its
    deletes are copy-on-write), so this stand-in writes the file and the manifest by hand."""
    from pyiceberg.manifest import (
        DataFile,
        DataFileContent,
        FileFormat,
        ManifestContent,
        ManifestEntry,
        ManifestEntryStatus,
        ManifestWriterV2,
    )
    from pyiceberg.typedef import Record

    class DeleteManifestWriter(ManifestWriterV2):
        def content(self):
            return ManifestContent.DELETES

        @property
        def _meta(self):
            return {**super()._meta, "content": "deletes"}

    table = _table(catalog_uri)
    location = f"{table.location()}/data/{uuid.uuid4()}-deletes.parquet"
    pq.write_table(
        pa.table({"file_path": pa.array([data_path]), "pos": pa.array([0], pa.int64())}), location[len("file://") :]
    )
    deletes = DataFile.from_args(
        content=DataFileContent.POSITION_DELETES,
        file_path=location,
        file_format=FileFormat.PARQUET,
        partition=Record(),
        record_count=1,
        file_size_in_bytes=os.path.getsize(location[len("file://") :]),
    )
    with table.transaction() as tx, tx.update_snapshot().fast_append() as append:
        out = table.io.new_output(f"{table.location()}/metadata/{uuid.uuid4()}-deletes-m0.avro")
        with DeleteManifestWriter(table.spec(), table.schema(), out, append._snapshot_id, "deflate") as writer:
            writer.add(ManifestEntry.from_args(status=ManifestEntryStatus.ADDED, data_file=deletes))
        manifest = writer.to_manifest_file()
        append._process_manifests = lambda manifests: [*manifests, manifest]


def test_a_table_with_delete_files_is_refused_naming_table_snapshot_and_the_fix(tmp_path, catalog):
    table = _table(catalog)
    data_path = sorted(t.file.file_path for t in table.scan().plan_files())[0]
    _add_position_delete(catalog, data_path)
    table = _table(catalog)
    assert len(table.scan().to_arrow()) == 54  # the delete is real: readers of the table skip the row
    snapshot = table.current_snapshot().snapshot_id

    with pytest.raises(ManifestError) as err:
        _plan(tmp_path, catalog, "night-1")
    message = str(err.value)
    assert f"manifest table {TABLE} snapshot {snapshot}" in message and "1 delete files (1 position)" in message
    assert "rewrite_data_files" in message and "copy-on-write" in message
    assert not os.path.exists(tmp_path / "out" / "runs" / "night-1" / "plan.json")


def test_bad_table_uris_and_catalogs_are_refused_by_name(tmp_path, catalog):
    with pytest.raises(ManifestError, match="--manifest-catalog-uri"):
        read_manifest(URI)
    with pytest.raises(ManifestError, match=r"manifests\.absent does not exist in catalog 'lake'"):
        read_manifest("iceberg://manifests.absent", catalog=ManifestCatalog(catalog, CATALOG_NAME))
    with pytest.raises(ManifestError, match=r"catalog 'default'.*--manifest-catalog-name"):
        read_manifest(URI, catalog=ManifestCatalog(catalog))
    with pytest.raises(ManifestError, match=r"iceberg://<namespace>\.<table>"):
        table_identifier("iceberg://products")
    with pytest.raises(ManifestError, match=r"iceberg://<namespace>\.<table>"):
        table_identifier("iceberg://a/../b.c")
    with pytest.raises(ManifestError, match="no SQLite database"):
        read_manifest(URI, catalog=ManifestCatalog(f"sqlite:///{tmp_path}/absent.db"))
    assert table_identifier("iceberg://a.b.c/") == ("a", "b", "c")


def test_a_data_file_with_another_schema_is_refused_naming_it(tmp_path):
    from pyiceberg.catalog.sql import SqlCatalog

    uri = f"sqlite:///{tmp_path}/catalog.db"
    cat = SqlCatalog(CATALOG_NAME, uri=uri, warehouse=f"file://{tmp_path}/warehouse")
    cat.create_namespace("manifests")
    cat.create_table(TABLE, schema=_rows(0, 1).drop_columns(["image_uri"]).schema).append(
        _rows(0, 5).drop_columns(["image_uri"])
    )
    with pytest.raises(ManifestError, match="required column 'image_uri'"):
        read_table_manifest(URI, ManifestCatalog(uri, CATALOG_NAME))


def test_the_plan_command_takes_the_catalog_flag(tmp_path, catalog, capsys):
    out = str(tmp_path / "out")
    flags = ["--manifest-catalog-uri", catalog, "--manifest-catalog-name", CATALOG_NAME]
    rc = main(["plan", "--manifest", URI, *flags, "--output", out, "--run-id", "r1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "files=2" in printed and f"manifest table {TABLE}" in printed
    assert main(["plan", "--manifest", URI, "--output", out, "--run-id", "r2"]) == 2


def _demo_table(tmp_path, demo_assets) -> str:
    """The demo manifest's rows as an Iceberg table (row groups of 16 rows); its catalog URI."""
    from pyiceberg.catalog.sql import SqlCatalog

    files = [p for p in storage.list_files(demo_assets.manifest) if p.endswith(".parquet")]
    rows = pa.concat_tables(pq.read_table(p) for p in files)
    uri = f"sqlite:///{tmp_path}/catalog.db"
    cat = SqlCatalog(CATALOG_NAME, uri=uri, warehouse=f"file://{tmp_path}/warehouse")
    cat.create_namespace("manifests")
    table = cat.create_table(TABLE, schema=rows.schema, properties={"write.parquet.row-group-limit": "16"})
    table.append(rows.slice(0, 70))
    table.append(rows.slice(70))
    return uri


def _embed_config(demo_assets, plan_uri, partition):
    from ray_jobs.job.config import EmbedConfig

    return EmbedConfig.of(
        output_uri=None,
        model_uri=demo_assets.model,
        plan_uri=plan_uri,
        partition=partition,
        batch_size=16,
        preprocess_pool=(1, 1),
    )


def test_the_jobs_pre_flight_accepts_the_planned_data_files(demo_assets, tmp_path):
    """The embed job's own pre-flight (sizes and versions of the planned files, the model),
    without Ray, on every partition of a plan made from the table."""
    from ray_jobs.job.embed import prepare

    catalog_uri = _demo_table(tmp_path, demo_assets)
    plan = run_plan(
        URI,
        str(tmp_path / "out"),
        Partitioning(partition_rows=40),
        run_id="r",
        manifest_catalog=ManifestCatalog(catalog_uri, CATALOG_NAME),
    ).plan
    assert plan.rows == demo_assets.rows
    for part in plan.partitions:
        job = prepare(_embed_config(demo_assets, f"{tmp_path}/out/runs/r/plan.json", part.index))
        assert job.partition_uri.endswith(f"work={part.key}") and sum(f.rows for f in job.fragments) == part.rows


@pytest.mark.integration
def test_a_partition_planned_from_the_table_embeds_exactly_its_rows(ray_session, demo_assets, tmp_path):
    from ray_jobs.job.embed import prepare, run_prepared
    from ray_jobs.output.markers import read_marker
    from ray_jobs.output.validate import validate_plan

    catalog_uri = _demo_table(tmp_path, demo_assets)
    plan = run_plan(
        URI,
        str(tmp_path / "out"),
        Partitioning(partition_rows=40),
        run_id="r",
        manifest_catalog=ManifestCatalog(catalog_uri, CATALOG_NAME),
    ).plan
    part = plan.partitions[1]
    expected = [
        i
        for fr in part.fragments
        for t in read_fragment(FragmentRef(plan.files[fr.file].uri, fr.row_groups, fr.rows))
        for i in t["id"].to_pylist()
    ]
    job = prepare(_embed_config(demo_assets, f"{tmp_path}/out/runs/r/plan.json", 1))
    result = run_prepared(job)
    assert result.rows_in == part.rows == len(expected)
    marker = read_marker(job.partition_uri)
    got = pq.read_table(marker.data_uris(job.partition_uri))["id"].to_pylist()
    rejected = pq.read_table(marker.rejects_uris(job.partition_uri))["id"].to_pylist()
    assert sorted(got + rejected) == sorted(expected)
    report = validate_plan(plan, job.model_id, job.embed_dim)
    assert [c.index for c in report.checks if c.ok] == [1]
