import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.counting_fs import CountingFileSystem
from bench.counting_fs import register as register_counting_fs
from ray_jobs import storage
from ray_jobs.config.settings import Partitioning
from ray_jobs.errors import ManifestError, PlanError, UsageError
from ray_jobs.planning.manifest import IMAGE_BYTES_METADATA_KEY
from ray_jobs.planning.plan import load_plan, make_plan, run_plan


def write_manifest(root, n_files=5, groups=(30, 20, 10), *, start=0, text_type=None, extra=False, hint=False):
    text_type = text_type or pa.string()
    os.makedirs(root, exist_ok=True)
    row = start
    for f in range(n_files):
        tables = []
        for g in groups:
            cols = {
                "id": pa.array([f"r{row + i}" for i in range(g)], pa.string()),
                "text": pa.array(["t"] * g, text_type),
                "image_uri": pa.array([f"/img/{row + i}.jpg" for i in range(g)], pa.string()),
                "image_bytes": pa.array([1000 * (1 + (row + i) % 3) for i in range(g)], pa.int64()),
            }
            if extra:
                cols["extra"] = pa.array([1.0] * g)
            tables.append(pa.table(cols))
            row += g
        table = pa.concat_tables(tables)
        if hint:
            sums = [sum(t["image_bytes"].to_pylist()) for t in tables]
            table = table.replace_schema_metadata({IMAGE_BYTES_METADATA_KEY: json.dumps(sums)})
        with pq.ParquetWriter(os.path.join(root, f"part-{start:03d}-{f:03d}.parquet"), table.schema) as w:
            for t in tables:
                w.write_table(t.cast(table.schema), row_group_size=len(t))
    return str(root)


def _all_units(plan):
    return [(f.file, rg) for p in plan.partitions for f in p.fragments for rg in f.row_groups]


def test_every_row_group_lands_in_exactly_one_partition(tmp_path):
    m = write_manifest(tmp_path / "m")
    plan, groups = make_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=45))
    units = _all_units(plan)
    assert groups == 15 and len(units) == len(set(units)) == 15
    assert sorted(units) == [(f, g) for f in range(5) for g in range(3)]
    assert plan.rows == sum(p.rows for p in plan.partitions) == 300
    assert [p.index for p in plan.partitions] == list(range(len(plan.partitions)))


@pytest.mark.parametrize("target", [25, 45, 60, 100, 1000])
def test_partition_sizes_are_within_one_row_group_of_the_target(tmp_path, target):
    m = write_manifest(tmp_path / "m")
    plan, _ = make_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=target))
    sizes = {(0, 0): 30, (0, 1): 20, (0, 2): 10}
    order = [(f, g) for f in range(5) for g in range(3)]
    pos = 0
    for p in plan.partitions:
        pos += sum(len(f.row_groups) for f in p.fragments)
        if p is plan.partitions[-1]:
            assert p.rows <= max(target, 30)
            continue
        next_rg = sizes[(0, order[pos][1])]
        assert p.rows <= target or (len(p.fragments) == 1 and len(p.fragments[0].row_groups) == 1)
        assert p.rows + next_rg > target, "a partition closes only when the next row group would not fit"


def test_byte_balancing_uses_footer_statistics_or_hints(tmp_path):
    stats = write_manifest(tmp_path / "stats", n_files=2)
    hinted = write_manifest(tmp_path / "hint", n_files=2, hint=True)
    p_stats, _ = make_plan(stats, str(tmp_path / "o"), Partitioning(partition_bytes=60_000))
    p_hint, _ = make_plan(hinted, str(tmp_path / "o"), Partitioning(partition_bytes=60_000))
    assert p_stats.partitions[0].bytes == 30 * (1000 + 3000) / 2  # rows x mean of min/max
    exact = sum(1000 * (1 + i % 3) for i in range(30))
    assert p_hint.partitions[0].bytes == exact
    assert all(p.bytes <= 60_000 for p in p_hint.partitions[:-1])


def test_same_manifest_and_settings_give_the_same_plan(tmp_path):
    m = write_manifest(tmp_path / "m")
    a, _ = make_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=45))
    b, _ = make_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=45))
    c, _ = make_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=46))
    assert a.plan_id == b.plan_id and a.partitions == b.partitions and a.files == b.files
    assert c.plan_id != a.plan_id
    write_manifest(tmp_path / "m", n_files=1, start=900)  # a new file changes the fingerprint
    d, _ = make_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=45))
    assert d.plan_id != a.plan_id and d.manifest_fingerprint != a.manifest_fingerprint


def _rewrite_same_shape(src, dst):
    """Rewrite a manifest file with other text of the same length, row group by row group."""
    pf = pq.ParquetFile(src)
    groups = [pf.read_row_group(i) for i in range(pf.num_row_groups)]
    with pq.ParquetWriter(dst, pf.schema_arrow) as writer:
        for g in groups:
            writer.write_table(g.set_column(1, "text", pa.array(["T"] * g.num_rows, g.schema.field("text").type)))


def test_a_manifest_rewritten_with_the_same_sizes_and_rows_plans_anew(tmp_path):
    m = write_manifest(tmp_path / "m", n_files=2)
    a, _ = make_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=45))
    first = os.path.join(m, sorted(os.listdir(m))[0])
    _rewrite_same_shape(first, first)
    st = os.stat(first)
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a clock that did not tick
    b, _ = make_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=45))
    assert [(f.size, f.rows) for f in b.files] == [(f.size, f.rows) for f in a.files]
    assert b.files[0].version != a.files[0].version and b.plan_id != a.plan_id


def test_max_partitions_clamp_grows_partitions_and_says_so(tmp_path):
    m = write_manifest(tmp_path / "m", n_files=10)
    plan, _ = make_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=10, max_partitions=7))
    assert len(plan.partitions) <= 7
    assert plan.settings["effective_target"] > 10
    assert any("grew from 10" in n and "--max-partitions 7" in n for n in plan.notes)
    assert sorted(_all_units(plan)) == [(f, g) for f in range(10) for g in range(3)]


def test_schema_violation_names_file_and_column_and_writes_nothing(tmp_path):
    m = write_manifest(tmp_path / "m", n_files=2)
    pq.write_table(pa.table({"id": ["x"], "text": ["t"], "image_uri": [7]}), tmp_path / "m" / "zz-bad.parquet")
    with pytest.raises(ManifestError, match=r"zz-bad\.parquet: column 'image_uri' has type int64, expected string"):
        run_plan(m, str(tmp_path / "out"), Partitioning())
    assert not (tmp_path / "out").exists()


def test_zero_row_files_and_an_empty_manifest(tmp_path):
    m = write_manifest(tmp_path / "m", n_files=1)
    empty = pa.table(
        {"id": pa.array([], pa.string()), "text": pa.array([], pa.string()), "image_uri": pa.array([], pa.string())}
    )
    pq.write_table(empty, tmp_path / "m" / "empty.parquet")
    plan, _ = make_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=100))
    assert plan.rows == 60 and any("zero rows" in n for n in plan.notes)
    (tmp_path / "e").mkdir()
    pq.write_table(empty, tmp_path / "e" / "only.parquet")
    plan, _ = make_plan(str(tmp_path / "e"), str(tmp_path / "out"), Partitioning())
    assert plan.partitions == () and any("no rows" in n for n in plan.notes)
    with pytest.raises(ManifestError, match=r"holds no \.parquet files"):
        make_plan(str(tmp_path / "nothing"), str(tmp_path / "out"), Partitioning())


def test_files_with_different_but_compatible_schemas_plan_together(tmp_path):
    write_manifest(tmp_path / "m", n_files=1)
    write_manifest(tmp_path / "m", n_files=1, start=500, text_type=pa.large_string(), extra=True)
    plan, _ = make_plan(str(tmp_path / "m"), str(tmp_path / "out"), Partitioning(partition_rows=1000))
    assert plan.rows == 120 and len(plan.files) == 2


def test_plan_is_written_once_per_run(tmp_path):
    m = write_manifest(tmp_path / "m")
    first = run_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=45), run_id="nightly-1")
    assert first.uri == str(tmp_path / "out" / "runs" / "nightly-1" / "plan.json") and not first.reused
    again = run_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=45), run_id="nightly-1")
    assert again.reused and again.plan == load_plan(first.uri)
    with pytest.raises(PlanError, match="already holds plan"):
        run_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=50), run_id="nightly-1")
    forced = run_plan(m, str(tmp_path / "out"), Partitioning(partition_rows=50), run_id="nightly-1", force=True)
    assert load_plan(first.uri).plan_id == forced.plan.plan_id != first.plan.plan_id


def test_settings_validate_themselves():
    assert Partitioning(partition_rows=1, partition_bytes=1).unit == "bytes", "a byte target overrides rows"
    with pytest.raises(UsageError, match="partition_rows: must be >= 1"):
        Partitioning(partition_rows=0)
    with pytest.raises(UsageError, match="max_partitions: must be >= 1"):
        Partitioning(max_partitions=0)


def test_the_plan_command_refuses_both_targets(capsys):
    from ray_jobs.cli import main

    assert main(["plan", "--manifest", "m", "--output", "o", "--partition-rows", "5", "--partition-bytes", "9"]) == 2
    assert "--partition-rows or --partition-bytes, not both" in capsys.readouterr().err


def test_planning_reads_only_footers(tmp_path):
    """Files of realistic size (about 1 MB, 8 row groups); planning must read a tiny fraction."""
    register_counting_fs()
    root = tmp_path / "m"
    root.mkdir()
    rng_text = [os.urandom(40).hex() for _ in range(2000)]
    for f in range(6):
        t = pa.table(
            {
                "id": [f"{f}-{i}" for i in range(16000)],
                "text": rng_text * 8,
                "image_uri": [f"s3://bucket/images/{f}/{i}.jpg" for i in range(16000)],
            }
        )
        pq.write_table(t, root / f"p{f}.parquet", row_group_size=2000)
    stored = sum(p.stat().st_size for p in root.iterdir())
    CountingFileSystem.reset()
    plan, groups = make_plan(f"counting://{root}", str(tmp_path / "out"), Partitioning(partition_rows=20000))
    assert groups == 48 and plan.rows == 96000
    assert stored > 6_000_000
    assert 0 < CountingFileSystem.bytes_read < 0.01 * stored, (CountingFileSystem.bytes_read, stored)


@pytest.mark.integration
def test_planning_on_s3(s3_bucket, tmp_path):
    local = write_manifest(tmp_path / "m", n_files=3)
    fs, path = storage.filesystem_for(f"{s3_bucket}/plan-test/manifest")
    fs.put(local + "/", path + "/", recursive=True)
    result = run_plan(f"{s3_bucket}/plan-test/manifest", f"{s3_bucket}/plan-test/out", Partitioning(partition_rows=45))
    assert result.uri == f"{s3_bucket}/plan-test/out/runs/plan-{result.plan.plan_id}/plan.json"
    assert storage.exists(result.uri) and result.plan.rows == 180
    assert all(f.uri.startswith("s3://embeddings-test/plan-test/manifest/") for f in result.plan.files)
    local_plan, _ = make_plan(local, str(tmp_path / "o"), Partitioning(partition_rows=45))
    assert [p.rows for p in local_plan.partitions] == [p.rows for p in result.plan.partitions]
    etags = {f.uri: f.version for f in result.plan.files}
    assert all(etags.values()), "the listing's ETag is each file's version"
    first = result.plan.files[0]
    _rewrite_same_shape(os.path.join(local, sorted(os.listdir(local))[0]), str(tmp_path / "x.parquet"))
    fs.put(str(tmp_path / "x.parquet"), first.uri.removeprefix("s3://"))
    again, _ = make_plan(
        f"{s3_bucket}/plan-test/manifest", f"{s3_bucket}/plan-test/out", Partitioning(partition_rows=45)
    )
    assert (again.files[0].size, again.files[0].rows) == (first.size, first.rows)
    assert again.files[0].version != first.version and again.plan_id != result.plan.plan_id
