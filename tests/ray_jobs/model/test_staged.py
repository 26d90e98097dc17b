"""The staged pipeline must equal the unsplit Hugging Face model, stage by stage on CPU."""

import json
import os
import shutil

import numpy as np
import pytest

from bench.reference_model import TwinTowerReference
from ray_jobs.model.checkpoint import TwinTowerCheckpoint
from ray_jobs.model.safetensors_io import SafetensorsIndex
from ray_jobs.model.staged import ModelStage, StageModule, build_layout


def _inputs(ckpt, n=5, seed=0):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt.tower_local_dir("text"))
    texts = ["a red cat on the river", "", "dog", "two small boats near a bridge at night", "snow"][:n]
    enc = tok(texts, padding="max_length", truncation=True, max_length=ckpt.config.text_max_length, return_tensors="np")
    h, w = ckpt.image_processing.size
    px = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64), px


def _run_staged(ckpt, layout, ids, mask, px):
    cols = {"input_ids": ids, "attention_mask": mask, "pixels": px}
    stages = [StageModule(ckpt, layout, i) for i in range(len(layout.stages))]
    for stage in stages:
        out = stage.run(cols)
        cols = {**{k: v for k, v in cols.items() if k not in stage.consumed()}, **out}
    return cols, stages


@pytest.mark.parametrize("k", [1, 2, 3])
def test_staged_output_equals_unsplit_model(demo_checkpoint, k):
    ckpt = TwinTowerCheckpoint(demo_checkpoint)
    ids, mask, px = _inputs(ckpt)
    ref = TwinTowerReference(ckpt).embed(ids, mask, px)
    cols, _ = _run_staged(ckpt, build_layout(ckpt, num_stages=k), ids, mask, px)
    assert set(cols) == {"text_embedding", "image_embedding"}, "hidden states and inputs are dropped once used"
    for key in ("text_embedding", "image_embedding"):
        assert np.abs(cols[key] - ref[key]).max() < 1e-4
        np.testing.assert_allclose(np.linalg.norm(cols[key], axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("k", [2, 3])
def test_each_stage_holds_only_its_share_of_parameters(demo_checkpoint, k):
    ckpt = TwinTowerCheckpoint(demo_checkpoint)
    total = TwinTowerReference(ckpt).num_parameters()
    layout = build_layout(ckpt, num_stages=k)
    stages = [StageModule(ckpt, layout, i) for i in range(k)]
    counts = [s.num_parameters() for s in stages]
    assert sum(counts) == total
    assert all(0 < c < total for c in counts)
    keys = [set(s.loaded_keys) for s in stages]
    assert sum(len(x) for x in keys) == len(set().union(*keys)), "no tensor is loaded by two stages"
    every = {f"text:{key}" for key in SafetensorsIndex(ckpt.tower_uri("text")).names()}
    every |= {f"image:{key}" for key in SafetensorsIndex(ckpt.tower_uri("image")).names()}
    every |= {f"{t}:projection.safetensors:{t}_projection.weight" for t in ("text", "image")}
    assert set().union(*keys) == every
    # the last stage reads only the image layers it runs (and the embedding only if it owns layer 0)
    last = stages[-1]
    first_layer = last.stage.range_for("image").start
    assert all(key.startswith("image:") for key in last.loaded_keys)
    assert any(f"layer.{first_layer}." in key for key in last.loaded_keys)
    assert not any(f"layer.{i}." in key for i in range(first_layer) for key in last.loaded_keys)
    assert any("embeddings" in key for key in last.loaded_keys) == (first_layer == 0)


def test_reference_deployment_layout_stage1_text_then_two_vit_halves(demo_checkpoint):
    ckpt = TwinTowerCheckpoint(demo_checkpoint)
    layout = build_layout(ckpt, spec="text|image:0-2|image:3-5")
    ids, mask, px = _inputs(ckpt)
    ref = TwinTowerReference(ckpt).embed(ids, mask, px)
    cols, stages = _run_staged(ckpt, layout, ids, mask, px)
    assert np.abs(cols["image_embedding"] - ref["image_embedding"]).max() < 1e-4
    assert {k.split(":")[0] for k in stages[0].loaded_keys} == {"text"}


def _vocab(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, "text", "tokenizer.json")) as fh:
        return json.load(fh)["model"]["vocab"]


def _variant(tmp_path, demo_checkpoint, text_config: dict) -> str:
    """A copy of the demo checkpoint whose text tower is another architecture (random, seeded)."""
    import torch
    from transformers import AutoConfig, AutoModel

    out = tmp_path / "variant"
    shutil.copytree(demo_checkpoint, out)
    text = out / "text"
    for f in ("config.json", "model.safetensors"):
        os.remove(text / f)
    cfg = AutoConfig.for_model(**text_config)
    torch.manual_seed(3)
    AutoModel.from_config(cfg, add_pooling_layer=False).save_pretrained(text)
    return str(out)


def test_bert_text_tower_runs_through_the_same_code(tmp_path, demo_checkpoint):
    vocab = _vocab(demo_checkpoint)
    path = _variant(
        tmp_path,
        demo_checkpoint,
        dict(
            model_type="bert",
            vocab_size=len(vocab),
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=64,
        ),
    )
    ckpt = TwinTowerCheckpoint(path)
    ids, mask, px = _inputs(ckpt)
    ref = TwinTowerReference(ckpt).embed(ids, mask, px)
    cols, _ = _run_staged(ckpt, build_layout(ckpt, spec="text:0-1|text:2-2,image:0-2|image:3-5"), ids, mask, px)
    assert np.abs(cols["text_embedding"] - ref["text_embedding"]).max() < 1e-4


def test_albert_with_shared_layer_weights_splits_correctly(tmp_path, demo_checkpoint):
    """Real ALBERT shares one layer group across all layers: each text stage loads that group."""
    vocab = _vocab(demo_checkpoint)
    path = _variant(
        tmp_path,
        demo_checkpoint,
        dict(
            model_type="albert",
            vocab_size=len(vocab),
            embedding_size=16,
            hidden_size=64,
            num_hidden_layers=6,
            num_hidden_groups=1,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=64,
        ),
    )
    ckpt = TwinTowerCheckpoint(path)
    ids, mask, px = _inputs(ckpt)
    ref = TwinTowerReference(ckpt).embed(ids, mask, px)
    cols, stages = _run_staged(ckpt, build_layout(ckpt, spec="text:0-2|text:3-5,image"), ids, mask, px)
    assert np.abs(cols["text_embedding"] - ref["text_embedding"]).max() < 1e-4
    shared = [k for k in stages[1].loaded_keys if "albert_layer_groups.0" in k]
    assert shared and set(shared) <= set(stages[0].loaded_keys)


def _batch(ids, mask, px):
    n = len(ids)
    return {
        "id": np.array([f"r{i}" for i in range(n)], dtype=object),
        "ok": np.ones(n, dtype=bool),
        "reject_stage": np.full(n, "", dtype=object),
        "reject_reason": np.full(n, "", dtype=object),
        "input_ids": ids,
        "attention_mask": mask,
        "pixels": px,
    }


def test_model_stage_isolates_a_row_that_breaks_the_model(demo_checkpoint):
    """A token id outside the vocabulary fails the embedding lookup for that row only."""
    ckpt = TwinTowerCheckpoint(demo_checkpoint)
    ids, mask, px = _inputs(ckpt)
    ids[2, 1] = 10_000_000
    layout = build_layout(ckpt, num_stages=1)
    stage = ModelStage(demo_checkpoint, layout.spec(), 0)
    out = stage(_batch(ids, mask, px))
    assert out["ok"].tolist() == [True, True, False, True, True]
    assert out["reject_stage"][2] == "stage1" and out["reject_reason"][2].startswith("model error:")
    assert np.all(out["text_embedding"][2] == 0) and np.isfinite(out["text_embedding"]).all()
    ref = TwinTowerReference(ckpt).embed(ids[[0, 1, 3, 4]], mask[[0, 1, 3, 4]], px[[0, 1, 3, 4]])
    assert np.abs(out["text_embedding"][[0, 1, 3, 4]] - ref["text_embedding"]).max() < 1e-4


def test_model_stage_passes_rejected_rows_through_untouched(demo_checkpoint):
    ckpt = TwinTowerCheckpoint(demo_checkpoint)
    ids, mask, px = _inputs(ckpt, n=3)
    batch = _batch(ids, mask, px)
    batch["ok"][:] = False
    batch["reject_stage"][:] = "fetch"
    batch["reject_reason"][:] = "missing object: x"
    layout = build_layout(ckpt, num_stages=2)
    out = ModelStage(demo_checkpoint, layout.spec(), 0)(batch)
    assert out["ok"].tolist() == [False] * 3 and list(out["reject_reason"]) == ["missing object: x"] * 3
    assert out["text_embedding"].shape == (3, ckpt.config.embed_dim) and not out["text_embedding"].any()
    assert "pixels" in out, "the image tower's input travels on to the next stage"


def test_twin_tower_in_bfloat16_is_close_to_float32(demo_checkpoint):
    ckpt = TwinTowerCheckpoint(demo_checkpoint)
    ids, mask, px = _inputs(ckpt)
    layout = build_layout(ckpt, num_stages=3)
    cols = {"input_ids": ids, "attention_mask": mask, "pixels": px}
    outs = {}
    for dtype in ("float32", "bfloat16"):
        c = dict(cols)
        for i in range(3):
            stage = StageModule(ckpt, layout, i, dtype=dtype)
            c = {**{k: v for k, v in c.items() if k not in stage.consumed()}, **stage.run(c)}
        outs[dtype] = c
    for key in ("text_embedding", "image_embedding"):
        assert outs["bfloat16"][key].dtype == np.float32
        assert (outs["float32"][key] * outs["bfloat16"][key]).sum(axis=1).min() >= 0.99
