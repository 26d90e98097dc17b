"""The whole partition job on a real local Ray: accounting, equality, idempotency, crash recovery."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_jobs import storage
from ray_jobs.contract.layout import LEASE_FILE, SUCCESS_FILE
from ray_jobs.job.config import EmbedConfig
from ray_jobs.job.embed import prepare, run_prepared
from ray_jobs.output.markers import read_marker

pytestmark = pytest.mark.integration


def _cfg(assets, output, **over):
    base = dict(
        manifest_uri=assets.manifest,
        output_uri=str(output),
        model_uri=assets.model,
        batch_size=16,
        rows_per_file=50,
        preprocess_pool=(1, 1),
    )
    return EmbedConfig.of(**{**base, **over})


def _files(partition_uri):
    return storage.sizes_under(partition_uri)


@pytest.fixture(scope="module")
def first_run(ray_session, demo_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    job = prepare(_cfg(demo_assets, out, stages="text:0-1|text:2-3,image:0-1|image:2-5"))
    result = run_prepared(job)
    return job, result


def test_every_row_is_embedded_or_rejected_with_a_reason(first_run, demo_assets):
    job, result = first_run
    assert not result.skipped and result.rows_in == demo_assets.rows == 120
    marker = read_marker(job.partition_uri)
    assert marker.reconciles() and marker.rows_rejected == sum(demo_assets.broken.values()) == 12
    assert sum(f.rows for f in marker.files) == 108 and all(0 < f.rows <= 50 for f in marker.files)
    assert all(f.path.startswith(f"attempt={marker.attempt}/part-") for f in marker.files)
    rejects = pq.read_table(marker.rejects_uris(job.partition_uri)).to_pylist()
    assert all(r["reason"] and r["stage"] in ("fetch", "decode") for r in rejects)
    assert set(marker.rejects_by_reason) == {
        "missing object",
        "empty object",
        "truncated image",
        "not an image",
        "decompression bomb",
        "undecodable image",
    }
    parts = pq.read_table(marker.data_uris(job.partition_uri))
    ids = parts["id"].to_pylist() + [r["id"] for r in rejects]
    assert sorted(ids) == [f"row-{n:06d}" for n in range(120)], "each input row exactly once"
    assert sorted(_files(job.partition_uri)) == sorted(
        [SUCCESS_FILE, f"attempt={marker.attempt}/{LEASE_FILE}", *(f.path for f in marker.listed)]
    ), "nothing but the committed attempt is left"
    for col in ("text_embedding", "image_embedding"):
        emb = np.stack(parts[col].to_numpy(zero_copy_only=False))
        assert emb.shape == (108, 32) and np.isfinite(emb).all()
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert marker.stages.count("|") == 2 and marker.timings["wall_s"] > 0


def test_the_marker_records_every_operators_statistics(first_run, demo_assets):
    """Stage balance (docs/performance.md): Ray Data's per-operator stats of the real run are in the marker.
    (Before the --force test below, which replaces the marker.)"""
    job, _ = first_run
    marker = read_marker(job.partition_uri)
    names = [s.name for s in marker.stage_stats]
    assert names == ["read", "preprocess", "stage1", "stage2", "stage3", "write"]
    by = {s.name: s for s in marker.stage_stats}
    assert by["read"].rows == by["preprocess"].rows == demo_assets.rows
    for name in ("stage1", "stage2", "stage3"):
        st = by[name]
        assert st.operator == "MapBatches(ModelStage)" and st.rows == demo_assets.rows
        assert st.busy_s > 0 and st.tasks > 0 and st.actors == 1 and st.rows_per_busy_s > 0
    assert [by[n].layers for n in ("stage1", "stage2", "stage3")] == ["text:0-1", "text:2-3,image:0-1", "image:2-5"]
    assert by["preprocess"].actors == 1 and by["preprocess"].layers == ""


def test_pipeline_output_equals_the_unsplit_model(first_run, demo_assets):
    """Rows through Ray Data and three stages == the same rows through AutoModel in one process."""
    from bench.reference_model import TwinTowerReference
    from ray_jobs.job.preprocess import Preprocessor
    from ray_jobs.model.checkpoint import TwinTowerCheckpoint

    job, _ = first_run
    manifest = pq.read_table(demo_assets.manifest).slice(0, 40).to_pydict()
    pre = Preprocessor(demo_assets.model)({k: np.array(v, dtype=object) for k, v in manifest.items()})
    ok = pre["ok"]
    ref = TwinTowerReference(TwinTowerCheckpoint(demo_assets.model)).embed(
        pre["input_ids"][ok], pre["attention_mask"][ok], pre["pixels"][ok]
    )
    marker = read_marker(job.partition_uri)
    got = pq.read_table(marker.data_uris(job.partition_uri)).to_pydict()
    row = {i: n for n, i in enumerate(got["id"])}
    for j, rid in enumerate(pre["id"][ok]):
        for col in ("text_embedding", "image_embedding"):
            assert np.abs(np.array(got[col][row[rid]]) - ref[col][j]).max() < 1e-4


def test_rerun_of_a_committed_partition_skips_and_changes_nothing(first_run, demo_assets):
    job, _ = first_run
    before = _files(job.partition_uri)
    marker_before = read_marker(job.partition_uri)
    again = run_prepared(prepare(_cfg(demo_assets, job.config.output_uri, num_stages=2)))
    assert again.skipped and again.partition_uri == job.partition_uri
    assert _files(job.partition_uri) == before and read_marker(job.partition_uri) == marker_before


def test_force_re_embeds_into_a_new_attempt_and_keeps_the_old_files(first_run, demo_assets):
    job, _ = first_run
    old = read_marker(job.partition_uri)
    forced = run_prepared(prepare(_cfg(demo_assets, job.config.output_uri, num_stages=1, force=True)))
    new = read_marker(job.partition_uri)
    assert not forced.skipped and new.attempt == forced.attempt != old.attempt and new.supersedes == old.attempt
    sizes = _files(job.partition_uri)
    assert all(sizes[f.path] == f.bytes for f in (*old.listed, *new.listed)), "snapshots of the old files stay readable"
    assert pq.read_table(old.data_uris(job.partition_uri)).num_rows == old.rows_ok


def test_a_failed_attempt_removes_its_files_and_a_dead_one_is_cleaned_up(
    ray_session, demo_assets, tmp_path, monkeypatch
):
    """The first attempt dies in its commit; a crashed attempt from an earlier run lies around."""
    import ray_jobs.job.datasink

    cfg = _cfg(demo_assets, tmp_path, num_stages=2)
    job = prepare(cfg)
    crashed = os.path.join(job.partition_uri, "attempt=20200101T000000Z-deadbeef")
    os.makedirs(crashed)
    with open(os.path.join(crashed, LEASE_FILE), "w") as fh:
        fh.write('{"attempt": "20200101T000000Z-deadbeef", "heartbeat_at": 0}')
    with open(os.path.join(crashed, "part-00000-000.parquet"), "wb") as fh:
        fh.write(b"debris from an older attempt")

    def crash(*args, **kwargs):
        raise RuntimeError("driver lost its connection while committing")

    monkeypatch.setattr(ray_jobs.job.datasink, "commit_attempt", crash)
    with pytest.raises(RuntimeError, match="lost its connection"):
        run_prepared(job)
    assert sorted(_files(job.partition_uri)) == [], "the failed attempt removed itself, the dead one too"

    monkeypatch.undo()
    result = run_prepared(job)
    marker = read_marker(job.partition_uri)
    assert not result.skipped and marker.reconciles() and marker.attempt == result.attempt
    assert sorted(_files(job.partition_uri)) == sorted(
        [SUCCESS_FILE, f"attempt={marker.attempt}/{LEASE_FILE}", *(f.path for f in marker.listed)]
    )


def test_plan_partition_embeds_exactly_its_row_groups(ray_session, demo_assets, tmp_path):
    from ray_jobs.config.settings import Partitioning
    from ray_jobs.output.validate import validate_plan
    from ray_jobs.planning.plan import run_plan

    planned = run_plan(demo_assets.manifest, str(tmp_path), Partitioning(partition_rows=40), run_id="r").plan
    part = planned.partitions[1]
    expected_ids = []
    for frag in part.fragments:
        pf = pq.ParquetFile(planned.files[frag.file].uri)
        for rg in frag.row_groups:
            expected_ids += pf.read_row_group(rg, columns=["id"])["id"].to_pylist()
    job = prepare(
        EmbedConfig.of(
            output_uri=None,
            model_uri=demo_assets.model,
            plan_uri=f"{tmp_path}/runs/r/plan.json",
            partition=1,
            num_stages=2,
            batch_size=16,
            preprocess_pool=(1, 1),
        )
    )
    assert job.partition_uri.endswith(f"out={job.output_key}/work={part.key}")
    result = run_prepared(job)
    assert result.rows_in == part.rows == len(expected_ids)
    marker = read_marker(job.partition_uri)
    got = pq.read_table(marker.data_uris(job.partition_uri))["id"].to_pylist()
    rejected = pq.read_table(marker.rejects_uris(job.partition_uri))["id"].to_pylist()
    assert sorted(got + rejected) == sorted(expected_ids)
    report = validate_plan(planned, job.model_id, job.embed_dim)
    assert [c.index for c in report.checks if c.ok] == [1]


def test_plan_form_refuses_a_manifest_changed_since_planning(demo_assets, tmp_path):
    import shutil

    from ray_jobs.config.settings import Partitioning
    from ray_jobs.errors import ManifestError
    from ray_jobs.planning.plan import run_plan

    manifest = tmp_path / "manifest"
    shutil.copytree(demo_assets.manifest, manifest)
    run_plan(str(manifest), str(tmp_path), Partitioning(partition_rows=40), run_id="r")
    first = sorted(manifest.iterdir())[0]
    cfg = EmbedConfig.of(
        output_uri=None, model_uri=demo_assets.model, plan_uri=f"{tmp_path}/runs/r/plan.json", partition=0
    )
    st = os.stat(first)
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # rewritten, same size
    with pytest.raises(ManifestError, match="changed since planning"):
        prepare(cfg)
    table = pq.read_table(first)
    pq.write_table(table.slice(0, 10), first)
    with pytest.raises(ManifestError, match="changed since planning"):
        prepare(cfg)
    os.remove(first)
    with pytest.raises(ManifestError, match=r"part-00000.parquet no longer exists .*next night's plan retires"):
        prepare(cfg)
