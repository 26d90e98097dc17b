"""Opening checkpoints: format detection, the metadata-only model id, and untrusted object keys."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import fsspec
import pytest

from bench.counting_fs import CountingFileSystem
from bench.hf_presets import build_clip, build_dual_encoder
from ray_jobs.errors import ModelError
from ray_jobs.model.checkpoint import TwinTowerCheckpoint, describe_checkpoint, open_checkpoint
from ray_jobs.model.hf_dual import HFDualCheckpoint
from ray_jobs.model.model_id import compute_model_id


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return build_clip(str(tmp_path_factory.mktemp("clip") / "clip-tiny"), seed=2)


def test_each_format_is_recognised_as_it_is_saved(clip_dir, demo_checkpoint, tmp_path):
    assert isinstance(open_checkpoint(clip_dir), HFDualCheckpoint)
    assert isinstance(open_checkpoint(demo_checkpoint), TwinTowerCheckpoint)
    dual = build_dual_encoder(str(tmp_path / "dual"), variant="bert-vit")
    info = describe_checkpoint(dual)
    assert info["format"] == "hf-dual" and info["embed_dim"] == 16 and info["layers"] == {"text": 3, "image": 4}
    assert re.fullmatch(r"dual-[0-9a-f]{10}", info["model_id"]), "directory name plus metadata hash"


def test_unsupported_or_empty_directories_say_what_is_supported(tmp_path, clip_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"neither twin_tower.json .* nor config.json"):
        open_checkpoint(str(tmp_path / "empty"))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(
        ModelError, match=r"model_type 'bert' is not a supported dual encoder; supported: \['chinese_clip'"
    ):
        open_checkpoint(str(bert))
    no_proc = tmp_path / "no-processor"
    shutil.copytree(clip_dir, no_proc)
    os.remove(no_proc / "processor_config.json")
    with pytest.raises(ModelError, match=r"no image processor config \(preprocessor_config\.json"):
        open_checkpoint(str(no_proc))


def test_model_id_is_stable_and_follows_configs_tokenizer_and_tensor_layout(clip_dir, tmp_path):
    first = open_checkpoint(clip_dir).model_id
    assert first == open_checkpoint(clip_dir).model_id and first.startswith("clip_tiny-")
    copy = tmp_path / "clip-tiny"
    shutil.copytree(clip_dir, copy)
    assert open_checkpoint(str(copy)).model_id == first, "a copy under the same name is the same model"
    cfg = json.loads((copy / "processor_config.json").read_text())
    cfg["image_processor"]["crop_size"] = {"height": 30, "width": 30}
    (copy / "processor_config.json").write_text(json.dumps(cfg))
    assert open_checkpoint(str(copy)).model_id != first, "other preprocessing, other embeddings"
    shutil.copytree(clip_dir, copy, dirs_exist_ok=True)
    with open(copy / "model.safetensors", "ab") as fh:  # same header, bigger file
        fh.write(b"\0" * 8)
    assert open_checkpoint(str(copy)).model_id != first


def _sparse_safetensors(path, gib: int = 4) -> int:
    """A safetensors file whose header describes *gib* GiB of float32 tensors, stored sparse."""
    n_tensors = 64
    per = gib * (1 << 30) // n_tensors // 4
    header, offset = {}, 0
    for i in range(n_tensors):
        header[f"layers.{i}.weight"] = {"dtype": "F32", "shape": [per], "data_offsets": [offset, offset + per * 4]}
        offset += per * 4
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset


def test_model_id_of_a_multi_gb_checkpoint_reads_under_1mb_in_under_1s(clip_dir, tmp_path):
    big = tmp_path / "big-model"
    shutil.copytree(clip_dir, big)
    size = _sparse_safetensors(big / "model-00002-of-00002.safetensors")
    assert size > 4 * (1 << 30) and os.path.getsize(big / "model-00002-of-00002.safetensors") == size
    fsspec.register_implementation("counting", CountingFileSystem, clobber=True)
    CountingFileSystem.reset()
    start = time.perf_counter()
    model_id = compute_model_id(f"counting://{big}", "big-model")
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, elapsed
    assert CountingFileSystem.bytes_read < 1 << 20, CountingFileSystem.bytes_read
    assert model_id == compute_model_id(str(big), "big-model"), "the same bytes whichever way they are read"


def test_layer_counts_come_from_the_config_json_or_else_from_the_built_towers(demo_checkpoint, tmp_path):
    ckpt = open_checkpoint(demo_checkpoint)
    assert (
        ckpt._declared_layer_counts()
        == {t: ckpt.tower(t).num_layers for t in ("text", "image")}
        == {
            "text": 4,
            "image": 6,
        }
    )
    # a config that leaves the depth to its class's default: only transformers knows it
    copy = shutil.copytree(demo_checkpoint, tmp_path / "model")
    path = copy / "text" / "config.json"
    config = json.loads(path.read_text())
    del config["num_hidden_layers"]
    path.write_text(json.dumps(config))
    ckpt = open_checkpoint(str(copy))
    assert ckpt._declared_layer_counts() is None
    assert ckpt.layer_counts() == {"text": 12, "image": 6}, "AlbertConfig's default depth, via the built tower"


def test_layer_costs_come_from_the_config_json_or_else_from_the_built_towers(demo_checkpoint, tmp_path):
    """What check_inputs balances the stages on, without importing torch where the JSON says it all."""
    ckpt = open_checkpoint(demo_checkpoint)
    built = {t: [ckpt.tower(t).layer_cost()] * ckpt.tower(t).num_layers for t in ("text", "image")}
    assert ckpt._declared_layer_costs() == built and ckpt.layer_costs() == built
    copy = shutil.copytree(demo_checkpoint, tmp_path / "model")
    path = copy / "image" / "config.json"
    config = json.loads(path.read_text())
    del config["intermediate_size"]  # ViTConfig's default (3072) applies, not 4 x hidden
    path.write_text(json.dumps(config))
    ckpt = open_checkpoint(str(copy))
    assert ckpt._declared_layer_costs() is None
    assert ckpt.layer_costs()["image"] == [ckpt.tower("image").layer_cost()] * 6


def test_a_partition_driver_with_a_resolved_stage_spec_imports_no_torch(demo_assets, tmp_path):
    """What the DAG runs: check_inputs resolves the stages once; each job's driver then lays
    them out from config.json alone (torch and transformers cost seconds of every driver's start)."""
    code = (
        "import sys\n"
        "from ray_jobs.job.config import EmbedConfig\nfrom ray_jobs.job.embed import prepare\n"
        f"job = prepare(EmbedConfig.of(output_uri={str(tmp_path)!r}, model_uri={demo_assets.model!r}, "
        f"manifest_uri={demo_assets.manifest!r}, stages='text:0-3|image:0-5'))\n"
        "assert job.layout.spec().startswith('text:0-3@'), job.layout.spec()\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_embed_dim_and_model_id_reach_the_prepared_job(clip_dir, demo_assets, tmp_path):
    from ray_jobs.job.config import EmbedConfig
    from ray_jobs.job.embed import prepare

    job = prepare(EmbedConfig.of(output_uri=str(tmp_path), model_uri=clip_dir, manifest_uri=demo_assets.manifest))
    assert job.embed_dim == 16 and job.model_id == open_checkpoint(clip_dir).model_id
    given = prepare(
        EmbedConfig.of(
            output_uri=str(tmp_path),
            model_uri=clip_dir,
            manifest_uri=demo_assets.manifest,
            model_id="run_model-0123456789",
        )
    )
    assert given.model_id == "run_model-0123456789" and "model=run_model-0123456789" in given.partition_uri


@pytest.mark.integration
def test_sync_refuses_object_keys_that_leave_the_cache(s3_bucket, clip_dir, tmp_path, monkeypatch):
    """moto stores keys with ``..``; syncing one must not write outside the cache dir."""
    import boto3

    monkeypatch.setenv("RAY_JOBS_CACHE_DIR", str(tmp_path / "cache"))
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    prefix = "evil-model"
    for name in os.listdir(clip_dir):
        s3.upload_file(os.path.join(clip_dir, name), "embeddings-test", f"{prefix}/{name}")
    target = tmp_path / "escaped.txt"
    depth = "/".join([".."] * 12)
    s3.put_object(Bucket="embeddings-test", Key=f"{prefix}/{depth}{target}", Body=b"pwned")
    with pytest.raises(ModelError, match=r"refusing object key .*\.\./"):
        open_checkpoint(f"{s3_bucket}/{prefix}")
    assert not target.exists()
    assert not any(p.name == "escaped.txt" for p in tmp_path.rglob("*"))
    s3.put_object(Bucket="embeddings-test", Key=f"{prefix}2/config.json", Body=b"{}")
    s3.put_object(Bucket="embeddings-test", Key=f"{prefix}2/sub\\..\\..\\x.json", Body=b"{}")
    with pytest.raises(ModelError, match="refusing object key"):
        open_checkpoint(f"{s3_bucket}/{prefix}2")


@pytest.mark.integration
def test_a_clip_checkpoint_on_s3_loads_and_embeds_like_the_local_copy(s3_bucket, clip_dir, tmp_path, monkeypatch):
    import boto3
    import numpy as np

    from ray_jobs.model.staged import StageModule, build_layout

    monkeypatch.setenv("RAY_JOBS_CACHE_DIR", str(tmp_path / "cache"))
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for name in os.listdir(clip_dir):
        s3.upload_file(os.path.join(clip_dir, name), "embeddings-test", f"clip-tiny/{name}")
    remote = open_checkpoint(f"{s3_bucket}/clip-tiny")
    local = open_checkpoint(clip_dir)
    assert isinstance(remote, HFDualCheckpoint) and remote.uri.startswith("s3://")
    assert not os.path.exists(os.path.join(remote.local_dir, "model.safetensors")), "weights are read in place"
    assert remote.model_id.startswith("clip_tiny-")
    assert remote.model_id != local.model_id, "S3 ETags are part of the id"
    rng = np.random.default_rng(0)
    cols = {
        "input_ids": np.array([[0, 5, 9, 1], [0, 7, 1, 1]], dtype=np.int64),
        "attention_mask": np.array([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=np.int64),
        "pixels": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
    }
    outs = []
    for ckpt in (remote, local):
        layout = build_layout(ckpt, num_stages=1)
        outs.append(StageModule(ckpt, layout, 0).run(cols))
    for key in ("text_embedding", "image_embedding"):
        np.testing.assert_array_equal(outs[0][key], outs[1][key])


def _text(path: str) -> str:
    with open(path) as fh:
        return fh.read()


@pytest.mark.integration
def test_cached_small_files_follow_the_object_versions(s3_bucket, clip_dir, tmp_path, monkeypatch):
    """A config rewritten on S3 with the same size is fetched again; a deleted file leaves the cache."""
    import boto3

    from ray_jobs.model.checkpoint_base import sync_small_files

    monkeypatch.setenv("RAY_JOBS_CACHE_DIR", str(tmp_path / "cache"))
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for name in os.listdir(clip_dir):
        s3.upload_file(os.path.join(clip_dir, name), "embeddings-test", f"versions/{name}")
    s3.put_object(Bucket="embeddings-test", Key="versions/notes.txt", Body=b"aaaa")
    local = sync_small_files(f"{s3_bucket}/versions")
    assert _text(os.path.join(local, "notes.txt")) == "aaaa"
    assert not os.path.exists(os.path.join(local, "model.safetensors")), "weights stay where they are"
    s3.put_object(Bucket="embeddings-test", Key="versions/notes.txt", Body=b"bbbb")
    assert _text(os.path.join(sync_small_files(f"{s3_bucket}/versions"), "notes.txt")) == "bbbb"
    s3.delete_object(Bucket="embeddings-test", Key="versions/notes.txt")
    assert not os.path.exists(os.path.join(sync_small_files(f"{s3_bucket}/versions"), "notes.txt"))
