"""The same job against a real S3 endpoint (moto's server mode on loopback) through s3fs."""

import pyarrow.parquet as pq
import pytest

from ray_jobs import storage
from ray_jobs.contract.layout import LEASE_FILE, SUCCESS_FILE
from ray_jobs.demo.assets import write_demo_assets
from ray_jobs.job.config import EmbedConfig
from ray_jobs.job.embed import prepare, run_prepared
from ray_jobs.model.checkpoint import TwinTowerCheckpoint, open_checkpoint
from ray_jobs.output.markers import read_marker

pytestmark = pytest.mark.integration


def test_manifest_images_model_and_output_all_on_s3(ray_session, s3_bucket, demo_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_JOBS_CACHE_DIR", str(tmp_path / "cache"))
    assets = write_demo_assets(f"{s3_bucket}/demo", rows=40, bad_images=6, files=2, row_group_rows=8)
    assert assets.manifest.startswith("s3://") and assets.model.startswith("s3://")
    fs, path = storage.filesystem_for(assets.manifest)
    uris = pq.read_table(path, filesystem=storage.arrow_filesystem(fs))
    assert all(u.startswith("s3://embeddings-test/demo/images/") for u in uris["image_uri"].to_pylist())

    cfg = EmbedConfig.of(
        manifest_uri=assets.manifest,
        output_uri=f"{s3_bucket}/out",
        model_uri=assets.model,
        batch_size=8,
        num_stages=2,
        preprocess_pool=(1, 1),
    )
    job = prepare(cfg)
    assert job.partition_uri.startswith("s3://embeddings-test/out/embeddings/model=")
    # the id comes from metadata only (configs, tokenizer, safetensors headers, sizes, S3 ETags)
    assert job.model_id == open_checkpoint(assets.model).model_id
    assert job.model_id.split("-")[0] == TwinTowerCheckpoint(demo_checkpoint).model_id.split("-")[0]
    result = run_prepared(job)
    assert (result.rows_in, result.rows_ok, result.rows_rejected) == (40, 34, 6)

    marker = read_marker(job.partition_uri)
    assert marker.reconciles() and marker.rejects_by_reason["missing object"] == 1
    sizes = storage.sizes_under(job.partition_uri)
    assert set(sizes) == {SUCCESS_FILE, f"attempt={marker.attempt}/{LEASE_FILE}", *(f.path for f in marker.listed)}
    for f in marker.listed:
        assert sizes[f.path] == f.bytes

    assert run_prepared(prepare(cfg)).skipped
