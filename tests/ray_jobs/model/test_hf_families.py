"""Hugging Face dual encoders load as they are and embed exactly as the model's own
``get_text_features`` / ``get_image_features`` with the family's own processor.

Every checkpoint is a tiny seeded random model built with transformers' own classes and saved
with ``save_pretrained`` (see :mod:`bench.hf_presets`); the reference side loads it with
``AutoModel`` / ``AutoTokenizer`` / ``AutoImageProcessor`` exactly as a user would.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench.hf_presets import BUILDERS
from ray_jobs.job.preprocess import Preprocessor, decode_image
from ray_jobs.model.checkpoint import open_checkpoint
from ray_jobs.model.image_ops import pixels_to_tensor
from ray_jobs.model.staged import StageModule, build_layout

FAMILIES = sorted(BUILDERS)
TEXTS = ["a red cat on the river", "", "dog", "two small boats near a bridge at night under the moon", "snow"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = BUILDERS[name](str(tmp_path_factory.mktemp(name.replace("_", "-")) / "model"), seed=1)
        return built[name]

    return get


def _image_files(directory) -> list[str]:
    """Odd sizes and aspect ratios, every common mode, JPEG and PNG."""
    rng = np.random.default_rng(7)
    specs = [
        ("rgb.jpg", "RGB", (37, 23), "JPEG"),
        ("tall_gray.png", "L", (29, 61), "PNG"),
        ("rgba.png", "RGBA", (50, 41), "PNG"),
        ("palette.png", "P", (33, 33), "PNG"),
        ("cmyk.jpg", "CMYK", (71, 45), "JPEG"),
    ]
    paths = []
    for name, mode, (w, h), fmt in specs:
        bands = len(Image.new(mode, (1, 1)).getbands())
        data = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
        # smooth gradients plus noise, so resampling filters matter
        data = (data // 4 + np.linspace(0, 190, w, dtype=np.uint8)[None, :, None]).astype(np.uint8)
        if mode == "P":
            img = Image.fromarray(data[..., 0], "L").convert("P")
            img.info["transparency"] = 3
        elif bands == 1:
            img = Image.fromarray(data[..., 0], mode)
        else:
            img = Image.fromarray(data, mode)
        path = directory / name
        img.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        paths.append(str(path))
    return paths


def _hf_reference(path: str, texts: list[str], image_paths: list[str], ckpt, dtype=None):
    """Features as the Hugging Face classes compute them, L2-normalised."""
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(path, **({"dtype": dtype} if dtype else {})).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = AutoImageProcessor.from_pretrained(path)
    siglip = ckpt.text_processing.pad_to_max_length
    enc = tokenizer(
        texts,
        padding="max_length" if siglip else True,
        truncation=True,
        max_length=ckpt.text_processing.max_length,
        return_tensors="pt",
    )
    uses_mask = ckpt.tower("text").attention != "none"  # SigLIP's text tower attends to padding too
    text_kwargs = dict(enc) if uses_mask else {"input_ids": enc["input_ids"]}
    image_kwargs = dict(processor(images=[Image.open(p) for p in image_paths], return_tensors="pt"))
    image_kwargs["pixel_values"] = image_kwargs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        text = model.get_text_features(**text_kwargs).pooler_output
        image = model.get_image_features(**image_kwargs).pooler_output
    norm = torch.nn.functional.normalize
    return {
        "text_embedding": norm(text.float(), dim=-1).numpy(),
        "image_embedding": norm(image.float(), dim=-1).numpy(),
    }


def _preprocess(path: str, texts: list[str], image_paths: list[str]) -> dict[str, np.ndarray]:
    n = len(texts)
    out = Preprocessor(path)(
        {
            "id": np.array([f"r{i}" for i in range(n)], dtype=object),
            "text": np.array(texts, dtype=object),
            "image_uri": np.array(image_paths, dtype=object),
        }
    )
    assert out["ok"].all(), list(out["reject_reason"])
    return out


MODEL_INPUTS = ("input_ids", "attention_mask", "pixels", "spatial_shapes")


def _run_staged(ckpt, layout, cols, dtype="float32"):
    cols = {k: cols[k] for k in MODEL_INPUTS if k in cols}
    stages = [StageModule(ckpt, layout, i, dtype=dtype) for i in range(len(layout.stages))]
    for stage in stages:
        out = stage.run(cols)
        cols = {**{k: v for k, v in cols.items() if k not in stage.consumed()}, **out}
    return cols, stages


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_counts_and_embed_dim_read_from_the_json_equal_the_full_configs(family, checkpoints):
    """A partition job's driver reads these from config.json alone (no transformers import)."""
    ckpt = open_checkpoint(checkpoints(family))
    declared = ckpt._declared_layer_counts()
    assert declared is not None, "save_pretrained writes num_hidden_layers of both towers"
    assert declared == {t: ckpt.tower(t).num_layers for t in ("text", "image")}
    assert ckpt.embed_dim == ckpt.family.embed_dim(ckpt.hf_config)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_positions_read_from_the_json_equal_the_full_config(family, checkpoints):
    """A preprocessing actor reads the text length from config.json alone (no transformers import)."""
    ckpt = open_checkpoint(checkpoints(family))
    assert ckpt.declared_text_positions() is not None, "save_pretrained writes the text config whole"
    assert ckpt.declared_text_positions() == ckpt.config_text_positions()


def test_a_text_config_missing_its_positions_is_read_by_transformers(checkpoints):
    ckpt = open_checkpoint(checkpoints("dual-roberta-siglip"))
    del ckpt._config_json["text_config"]["pad_token_id"]
    assert ckpt.declared_text_positions() is None
    assert ckpt.text_processing.max_length <= ckpt.config_text_positions()


@pytest.mark.parametrize("family", FAMILIES)
def test_pixels_equal_the_hf_processor_within_one_grey_level(family, checkpoints, tmp_path):
    from transformers import AutoImageProcessor

    path = checkpoints(family)
    processing = open_checkpoint(path).image_processing
    processor = AutoImageProcessor.from_pretrained(path)
    one_level = (1 / 255) / min(processing.image_std) + 1e-6
    for image_path in _image_files(tmp_path):
        with open(image_path, "rb") as fh:
            pixels, grid = decode_image(fh.read(), processing, 10**7)
        ours = pixels_to_tensor(pixels[None], processing).numpy()
        hf = processor(images=Image.open(image_path), return_tensors="np")
        theirs = hf["pixel_values"]
        if processing.patches:  # SigLIP 2: same patch grid; padding patches are masked out, compare the real ones
            assert tuple(hf["spatial_shapes"][0]) == grid
            ours, theirs = ours[:, : grid[0] * grid[1]], theirs[:, : grid[0] * grid[1]]
        assert ours.shape == theirs.shape, image_path
        assert np.abs(ours - theirs).max() <= one_level, image_path


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_staged_equals_get_features_with_the_family_processor(family, k, checkpoints, tmp_path):
    path = checkpoints(family)
    ckpt = open_checkpoint(path)
    images = _image_files(tmp_path)
    ref = _hf_reference(path, TEXTS, images, ckpt)
    cols = _preprocess(path, TEXTS, images)
    if not ckpt.text_processing.pad_to_max_length:
        assert cols["input_ids"].shape[1] < ckpt.text_processing.max_length, "padded to the longest row only"
    out, _ = _run_staged(ckpt, build_layout(ckpt, num_stages=k), cols)
    assert set(out) == {"text_embedding", "image_embedding"}
    for key in ("text_embedding", "image_embedding"):
        assert out[key].shape == (len(TEXTS), ckpt.embed_dim)
        assert np.abs(out[key] - ref[key]).max() < 1e-4, key
        np.testing.assert_allclose(np.linalg.norm(out[key], axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_stage_loads_only_its_own_tensors(family, checkpoints):
    ckpt = open_checkpoint(checkpoints(family))
    layout = build_layout(ckpt, num_stages=3)
    stages = [StageModule(ckpt, layout, i) for i in range(3)]
    keys = [set(s.loaded_keys) for s in stages]
    shared = "albert" in family  # ALBERT's one layer group is every layer's weights
    if not shared:
        assert sum(len(x) for x in keys) == len(set().union(*keys)), "no tensor is loaded by two stages"
    loaded = {k.split(":", 1)[1] for k in set().union(*keys)}
    every = set(ckpt.weights.names())
    unused = every - loaded
    # what no get_*_features reads: the contrastive temperature/bias (and nothing else)
    assert unused <= {"logit_scale", "logit_bias"}, sorted(unused)
    for stage in stages:
        towers = {r.tower for r in stage.stage.ranges}
        assert {k.split(":", 1)[0] for k in stage.loaded_keys} == towers


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_is_close_to_float32(family, checkpoints, tmp_path):
    path = checkpoints(family)
    ckpt = open_checkpoint(path)
    cols = _preprocess(path, TEXTS, _image_files(tmp_path))
    layout = build_layout(ckpt, num_stages=2)
    fp32, _ = _run_staged(ckpt, layout, cols)
    bf16, stages = _run_staged(ckpt, layout, cols, dtype="bfloat16")
    assert all(
        p.dtype.is_floating_point and str(p.dtype) == "torch.bfloat16"
        for p in stages[0].segments[0].modules.parameters()
    )
    for key in ("text_embedding", "image_embedding"):
        assert bf16[key].dtype == np.float32
        cosine = (fp32[key] * bf16[key]).sum(axis=1)
        assert cosine.min() >= 0.99, (key, cosine)


def test_hidden_states_cross_stages_in_bfloat16(checkpoints, tmp_path):
    path = checkpoints("clip")
    ckpt = open_checkpoint(path)
    cols = _preprocess(path, TEXTS, _image_files(tmp_path))
    layout = build_layout(ckpt, spec="text:0-1,image:0-1|text:2-2,image:2-3")
    first = StageModule(ckpt, layout, 0, dtype="bfloat16").run({k: cols[k] for k in MODEL_INPUTS if k in cols})
    assert first["text_hidden"].dtype == np.int16 and first["image_hidden"].dtype == np.int16, (
        "bf16 bits, 2 bytes a value"
    )


def test_float16_on_cpu_is_refused_with_a_clear_error(checkpoints):
    from ray_jobs.errors import ModelError

    ckpt = open_checkpoint(checkpoints("clip"))
    with pytest.raises(ModelError, match="float16 needs a CUDA device"):
        StageModule(ckpt, build_layout(ckpt, num_stages=1), 0, dtype="float16")


def test_rows_padded_to_different_lengths_in_different_blocks(checkpoints, tmp_path):
    """Ray Data may hand a stage one batch made of two blocks padded to different lengths
    (a variable-shaped column); the stage pads them to one length and masks the padding."""
    path = checkpoints("dual-bert-vit")
    ckpt = open_checkpoint(path)
    images = _image_files(tmp_path)[:4]
    a = _preprocess(path, TEXTS[:2], images[:2])
    b = _preprocess(path, TEXTS[3:5], images[2:4])
    assert a["input_ids"].shape[1] != b["input_ids"].shape[1]
    layout = build_layout(ckpt, spec="text:0-1|text:2-2,image")
    stage0 = StageModule(ckpt, layout, 0)
    ha, hb = (stage0.run({k: x[k] for k in ("input_ids", "attention_mask")}) for x in (a, b))

    def ragged(x, y):
        col = np.empty(len(x) + len(y), dtype=object)
        col[:] = [*list(x), *list(y)]
        return col

    merged = {
        "text_hidden": ragged(ha["text_hidden"], hb["text_hidden"]),
        "attention_mask": ragged(a["attention_mask"], b["attention_mask"]),
        "pixels": np.concatenate([a["pixels"], b["pixels"]]),
    }
    out = StageModule(ckpt, layout, 1).run(merged)
    ref = _hf_reference(path, TEXTS[:2] + TEXTS[3:5], images, ckpt)
    assert np.abs(out["text_embedding"] - ref["text_embedding"]).max() < 1e-4


def test_legacy_clip_config_pools_the_highest_token_id(checkpoints, tmp_path):
    """Checkpoints saved before transformers#24773 carry ``eos_token_id: 2`` and pool the token with
    the highest id (end-of-text in the original vocabulary); the staged model follows the same rule."""
    import json
    import shutil

    legacy = tmp_path / "legacy-clip"
    shutil.copytree(checkpoints("clip"), legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    cfg["text_config"]["eos_token_id"] = 2
    (legacy / "config.json").write_text(json.dumps(cfg))
    ckpt = open_checkpoint(str(legacy))
    assert ckpt.tower("text").eos_token_id == 2
    images = _image_files(tmp_path)
    cols = _preprocess(str(legacy), TEXTS, images)
    ref = _hf_reference(str(legacy), TEXTS, images, ckpt)
    out, _ = _run_staged(ckpt, build_layout(ckpt, num_stages=2), cols)
    assert np.abs(out["text_embedding"] - ref["text_embedding"]).max() < 1e-4
    modern = _run_staged(open_checkpoint(checkpoints("clip")), build_layout(ckpt, num_stages=2), cols)[0]
    assert np.abs(out["text_embedding"] - modern["text_embedding"]).max() > 1e-3, "the rule changes which token"


def test_sharded_checkpoint_loads_each_stage_from_its_shards(checkpoints, tmp_path):
    """Big checkpoints are saved in shards (``model.safetensors.index.json``); stages read the shards they need."""
    import os
    import shutil

    from transformers import AutoModel

    src = checkpoints("dual-bert-vit")
    sharded = tmp_path / "sharded"
    AutoModel.from_pretrained(src).save_pretrained(sharded, max_shard_size="20KB")
    for name in os.listdir(src):
        if not name.startswith(("model", "config")):
            shutil.copy(os.path.join(src, name), sharded / name)
    shards = [n for n in os.listdir(sharded) if n.endswith(".safetensors")]
    assert len(shards) > 3 and (sharded / "model.safetensors.index.json").exists()
    ckpt = open_checkpoint(str(sharded))
    images = _image_files(tmp_path)
    ref = _hf_reference(src, TEXTS, images, open_checkpoint(src))
    out, _ = _run_staged(ckpt, build_layout(ckpt, num_stages=3), _preprocess(str(sharded), TEXTS, images))
    for key in ("text_embedding", "image_embedding"):
        assert np.abs(out[key] - ref[key]).max() < 1e-4
