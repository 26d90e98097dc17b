"""The whole partition job on a real local Ray: accounting, equality, idempotency, crash recovery."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_jobs.contract import SUCCESS_FILE
from ray_jobs.embed_job import EmbedConfig, prepare, run_prepared
from ray_jobs.sink import PartitionSink, read_marker

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
    return EmbedConfig(**{**base, **over})


def _files(partition_uri):
    return {name: os.path.getsize(os.path.join(partition_uri, name)) for name in sorted(os.listdir(partition_uri))}


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
    assert [f.rows for f in marker.files] == [50, 50, 8]
    rejects = pq.read_table(os.path.join(job.partition_uri, "rejects.parquet")).to_pylist()
    assert all(r["reason"] and r["stage"] in ("fetch", "decode") for r in rejects)
    assert set(marker.rejects_by_reason) == {
        "missing object",
        "empty object",
        "truncated image",
        "not an image",
        "decompression bomb",
        "undecodable image",
    }
    parts = pq.read_table([os.path.join(job.partition_uri, f.path) for f in marker.files])
    ids = parts["id"].to_pylist() + [r["id"] for r in rejects]
    assert sorted(ids) == [f"row-{n:06d}" for n in range(120)], "each input row exactly once"
    rejected = {r["id"] for r in rejects}
    expected_order = [f"row-{n:06d}" for n in range(120) if f"row-{n:06d}" not in rejected]
    assert parts["id"].to_pylist() == expected_order, "part files keep manifest order: re-runs write the same files"
    for col in ("text_embedding", "image_embedding"):
        emb = np.stack(parts[col].to_numpy(zero_copy_only=False))
        assert emb.shape == (108, 32) and np.isfinite(emb).all()
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert marker.stages.count("|") == 2 and marker.timings["wall_s"] > 0


def test_pipeline_output_equals_the_unsplit_model(first_run, demo_assets):
    """Rows through Ray Data and three stages == the same rows through AutoModel in one process."""
    from ray_jobs.model.checkpoint import TwinTowerCheckpoint
    from ray_jobs.model.reference import TwinTowerReference
    from ray_jobs.preprocess import Preprocessor

    job, _ = first_run
    manifest = pq.read_table(demo_assets.manifest).slice(0, 40).to_pydict()
    pre = Preprocessor(demo_assets.model)({k: np.array(v, dtype=object) for k, v in manifest.items()})
    ok = pre["ok"]
    ref = TwinTowerReference(TwinTowerCheckpoint(demo_assets.model)).embed(
        pre["input_ids"][ok], pre["attention_mask"][ok], pre["pixels"][ok]
    )
    marker = read_marker(job.partition_uri)
    got = pq.read_table([os.path.join(job.partition_uri, f.path) for f in marker.files]).to_pydict()
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


def test_crash_before_commit_is_cleaned_up_by_the_next_run(ray_session, demo_assets, tmp_path, monkeypatch):
    """First attempt dies after writing part files but before _SUCCESS; the retry replaces it."""
    cfg = _cfg(demo_assets, tmp_path, num_stages=2)
    job = prepare(cfg)
    real_commit = PartitionSink.commit

    def crash(self, rows_in, **meta):
        self._flush()
        raise RuntimeError("worker node lost")

    monkeypatch.setattr(PartitionSink, "commit", crash)
    with pytest.raises(RuntimeError, match="worker node lost"):
        run_prepared(job)
    leftovers = _files(job.partition_uri)
    assert SUCCESS_FILE not in leftovers and "part-00000.parquet" in leftovers
    with open(os.path.join(job.partition_uri, "part-00099.parquet"), "wb") as fh:
        fh.write(b"debris from an older attempt")

    monkeypatch.setattr(PartitionSink, "commit", real_commit)
    result = run_prepared(job)
    assert not result.skipped
    names = sorted(_files(job.partition_uri))
    assert names == ["_SUCCESS", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet", "rejects.parquet"]
    assert read_marker(job.partition_uri).reconciles()


def test_plan_partition_embeds_exactly_its_row_groups(ray_session, demo_assets, tmp_path):
    from ray_jobs.planning import PlanSettings, run_plan
    from ray_jobs.validate import validate_plan

    planned = run_plan(demo_assets.manifest, str(tmp_path), PlanSettings(partition_rows=40), run_id="r").plan
    part = planned.partitions[1]
    expected_ids = []
    for frag in part.fragments:
        pf = pq.ParquetFile(planned.files[frag.file].uri)
        for rg in frag.row_groups:
            expected_ids += pf.read_row_group(rg, columns=["id"])["id"].to_pylist()
    job = prepare(
        EmbedConfig(
            output_uri=None,
            model_uri=demo_assets.model,
            plan_uri=f"{tmp_path}/runs/r/plan.json",
            partition=1,
            num_stages=2,
            batch_size=16,
            preprocess_pool=(1, 1),
        )
    )
    assert job.partition_uri.endswith(f"plan={planned.plan_id}/partition=00001")
    result = run_prepared(job)
    assert result.rows_in == part.rows == len(expected_ids)
    marker = read_marker(job.partition_uri)
    got = pq.read_table([os.path.join(job.partition_uri, f.path) for f in marker.files])["id"].to_pylist()
    rejected = pq.read_table(os.path.join(job.partition_uri, "rejects.parquet"))["id"].to_pylist()
    assert sorted(got + rejected) == sorted(expected_ids)
    report = validate_plan(planned, job.model_id, job.embed_dim)
    assert [c.index for c in report.checks if c.ok] == [1]


def test_plan_form_refuses_a_manifest_changed_since_planning(demo_assets, tmp_path):
    import shutil

    from ray_jobs.errors import ManifestError
    from ray_jobs.planning import PlanSettings, run_plan

    manifest = tmp_path / "manifest"
    shutil.copytree(demo_assets.manifest, manifest)
    run_plan(str(manifest), str(tmp_path), PlanSettings(partition_rows=40), run_id="r")
    first = sorted(manifest.iterdir())[0]
    table = pq.read_table(first)
    pq.write_table(table.slice(0, 10), first)
    cfg = EmbedConfig(
        output_uri=None, model_uri=demo_assets.model, plan_uri=f"{tmp_path}/runs/r/plan.json", partition=0
    )
    with pytest.raises(ManifestError, match="changed since planning"):
        prepare(cfg)
