"""Hugging Face checkpoints through the whole partition job on a real local Ray: CLIP (rows
padded to the longest text of each batch, float32 equal to ``get_*_features``, bfloat16 hidden
states between stages) and SigLIP 2 (variable patch grids travelling with the rows)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.hf_presets import build_clip
from bench.reference_model import reference_for
from ray_jobs.job.config import EmbedConfig
from ray_jobs.job.embed import prepare, run_prepared
from ray_jobs.job.preprocess import Preprocessor
from ray_jobs.model.checkpoint import open_checkpoint
from ray_jobs.output.markers import read_marker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return build_clip(str(tmp_path_factory.mktemp("clip") / "clip-tiny"), seed=3)


def _embeddings(partition_uri: str) -> dict[str, dict[str, np.ndarray]]:
    marker = read_marker(partition_uri)
    assert marker.reconciles()
    got = pq.read_table([os.path.join(partition_uri, f.path) for f in marker.files]).to_pydict()
    return {
        rid: {c: np.array(got[c][n], dtype=np.float32) for c in ("text_embedding", "image_embedding")}
        for n, rid in enumerate(got["id"])
    }


def test_clip_job_equals_get_features_in_fp32_and_is_close_in_bf16(ray_session, demo_assets, clip_dir, tmp_path):
    base = dict(
        manifest_uri=demo_assets.manifest,
        output_uri=str(tmp_path),
        model_uri=clip_dir,
        batch_size=16,
        preprocess_pool=(1, 1),
        stages="text:0-1,image:0-1|text:2-2,image:2-3",
    )
    fp32_job = prepare(EmbedConfig.of(**base))
    result = run_prepared(fp32_job)
    assert result.rows_ok == demo_assets.rows - sum(demo_assets.broken.values())
    fp32 = _embeddings(fp32_job.partition_uri)

    manifest = pq.read_table(demo_assets.manifest).slice(0, 40).to_pydict()
    pre = Preprocessor(clip_dir)({k: np.array(v, dtype=object) for k, v in manifest.items()})
    ok = pre["ok"]
    ref = reference_for(open_checkpoint(clip_dir)).embed(
        pre["input_ids"][ok], pre["attention_mask"][ok], pre["pixels"][ok]
    )
    for j, rid in enumerate(pre["id"][ok]):
        for col in ("text_embedding", "image_embedding"):
            assert np.abs(fp32[rid][col] - ref[col][j]).max() < 1e-4, (rid, col)

    bf16_cfg = {**base, "dtype": "bfloat16", "output_uri": str(tmp_path / "bf16"), "model_id": fp32_job.model_id}
    bf16_job = prepare(EmbedConfig.of(**bf16_cfg))
    run_prepared(bf16_job)
    bf16 = _embeddings(bf16_job.partition_uri)
    assert set(bf16) == set(fp32)
    for rid in fp32:
        for col in ("text_embedding", "image_embedding"):
            assert float(fp32[rid][col] @ bf16[rid][col]) >= 0.99, (rid, col)


def test_siglip2_job_carries_patch_grids_between_stages(ray_session, demo_assets, tmp_path_factory, tmp_path):
    """SigLIP 2's variable patch grids (``spatial_shapes``) travel with the rows through Ray Data."""
    from bench.hf_presets import build_siglip2

    path = build_siglip2(str(tmp_path_factory.mktemp("siglip2") / "siglip2-tiny"), seed=3)
    job = prepare(
        EmbedConfig.of(
            manifest_uri=demo_assets.manifest,
            output_uri=str(tmp_path),
            model_uri=path,
            batch_size=16,
            preprocess_pool=(1, 1),
            stages="text,image:0-1|image:2-3",
        )
    )
    run_prepared(job)
    got = _embeddings(job.partition_uri)
    manifest = pq.read_table(demo_assets.manifest).slice(0, 40).to_pydict()
    pre = Preprocessor(path)({k: np.array(v, dtype=object) for k, v in manifest.items()})
    ok = pre["ok"]
    assert len({tuple(g) for g in pre["spatial_shapes"][ok]}) > 1, "the demo images give several patch grids"
    ref = reference_for(open_checkpoint(path)).embed(
        pre["input_ids"][ok], pre["attention_mask"][ok], pre["pixels"][ok], pre["spatial_shapes"][ok]
    )
    for j, rid in enumerate(pre["id"][ok]):
        for col in ("text_embedding", "image_embedding"):
            assert np.abs(got[rid][col] - ref[col][j]).max() < 1e-4, (rid, col)
