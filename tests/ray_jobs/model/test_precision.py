"""--dtype: validated up front; bfloat16 hidden states travel as their exact bits."""

import numpy as np
import pytest
import torch

from ray_jobs.errors import ModelError, UsageError
from ray_jobs.job.config import EmbedConfig
from ray_jobs.job.embed import prepare
from ray_jobs.model.precision import check_device, from_numpy, to_numpy


def test_bfloat16_round_trips_through_numpy_bit_for_bit():
    t = torch.randn(3, 5, 7).to(torch.bfloat16)
    arr = to_numpy(t)
    assert arr.dtype == np.int16 and arr.nbytes == t.numel() * 2
    assert torch.equal(from_numpy(arr, torch.bfloat16), t)
    assert torch.equal(from_numpy(to_numpy(t.float()), torch.float32), t.float())


def test_unknown_dtype_and_float16_without_cuda_are_refused(demo_assets, tmp_path):
    base = dict(manifest_uri=demo_assets.manifest, output_uri=str(tmp_path), model_uri=demo_assets.model)
    with pytest.raises(UsageError, match="dtype: must be one of float32, bfloat16, float16"):
        EmbedConfig.of(**base, dtype="int8")
    with pytest.raises(UsageError, match="float16 needs CUDA, but stage1, stage2 has no GPU"):
        prepare(EmbedConfig.of(**base, dtype="float16", num_stages=2))
    with pytest.raises(ModelError, match="float16 needs a CUDA device"):
        check_device("float16", "cpu")
    check_device("float16", "cuda:0")
    with pytest.raises(UsageError, match="--model-id must look like"):
        EmbedConfig.of(**base, model_id="../etc")


def test_cli_passes_dtype_and_model_id(monkeypatch, demo_assets, tmp_path):
    from ray_jobs import cli

    seen = {}

    def fake_run(cfg):
        seen["cfg"] = cfg
        raise UsageError("stop here")

    monkeypatch.setattr("ray_jobs.job.embed.run_embed", fake_run)
    argv = ["embed", "--manifest", demo_assets.manifest, "--output", str(tmp_path), "--model", demo_assets.model]
    assert cli.main([*argv, "--dtype", "bfloat16", "--model-id", "tiny_albert_vit-0123456789"]) == 2
    assert seen["cfg"].stage.dtype == "bfloat16" and seen["cfg"].model_id == "tiny_albert_vit-0123456789"
    assert cli.main([*argv, "--dtype", "float64"]) == 2


def test_model_id_command_prints_the_id(demo_assets, capsys, tmp_path):
    import json

    from ray_jobs import cli
    from ray_jobs.model.checkpoint import open_checkpoint

    out = tmp_path / "id.json"
    assert cli.main(["model-id", "--model", demo_assets.model, "--summary-json", str(out)]) == 0
    expected = open_checkpoint(demo_assets.model).model_id
    assert f"model-id: {expected} format=twin-tower embed_dim=32" in capsys.readouterr().out
    assert json.loads(out.read_text())["model_id"] == expected


def test_model_stage_actors_chain_in_bfloat16_with_a_rejected_row(tmp_path):
    """The Ray Data callable classes themselves (no Ray): bf16 hidden states between two stage
    actors, a row rejected upstream passes through untouched, embeddings come out float32."""
    from bench.hf_presets import build_clip
    from bench.reference_model import reference_for
    from ray_jobs.model.checkpoint import open_checkpoint
    from ray_jobs.model.staged import ModelStage, build_layout

    path = build_clip(str(tmp_path / "clip"), seed=4)
    ckpt = open_checkpoint(path)
    tok = ckpt.text_processing
    ids, mask = tok.encode(tok.load_tokenizer(), ["a red cat", "dog", "", "blue boat on the river"])
    pixels = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    batch = {
        "id": np.array(["a", "b", "c", "d"], dtype=object),
        "ok": np.array([True, True, False, True]),
        "reject_stage": np.array(["", "", "decode", ""], dtype=object),
        "reject_reason": np.array(["", "", "not an image", ""], dtype=object),
        "input_ids": ids,
        "attention_mask": mask,
        "pixels": pixels,
    }
    spec = build_layout(ckpt, num_stages=2).spec()
    mid = ModelStage(path, spec, 0, dtype="bfloat16")(batch)
    assert any(k.endswith("_hidden") and v.dtype == np.int16 for k, v in mid.items())
    out = ModelStage(path, spec, 1, dtype="bfloat16")(mid)
    assert out["ok"].tolist() == [True, True, False, True] and out["reject_reason"][2] == "not an image"
    assert out["text_embedding"].dtype == np.float32 and not out["text_embedding"][2].any()
    ref = reference_for(ckpt).embed(ids[[0, 1, 3]], mask[[0, 1, 3]], pixels[[0, 1, 3]])
    for key in ("text_embedding", "image_embedding"):
        assert ((out[key][[0, 1, 3]] * ref[key]).sum(axis=1) >= 0.99).all()
