"""Tokenisation: the ``tokenizers``-only path gives transformers' ids, token for token, and is
used only where transformers would run the serialised pipeline as it stands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bench.hf_presets import BUILDERS, build_clip
from ray_jobs.errors import ModelError
from ray_jobs.model.checkpoint import open_checkpoint
from ray_jobs.model.text_ops import (
    _CLASS_OVERRIDDEN_MODEL_TYPES,
    JsonTokenizer,
    TextProcessing,
    json_tokenizer_problem,
)

TEXTS = [
    "a red cat on the river",
    "",
    "dog",
    "  two   small boats near a bridge at night under the moon, " + "again " * 40,
    "Ünïcödé café naïve",
    "日本語のテキスト 中文",
    "[CLS] [SEP] [PAD] <pad> </s> <s> <|endoftext|>",
    "tab\there\nnewline\r\n",
    "x" * 300,
    "EMOJI 🙂 👍🏽",
    "UPPER lower MiXeD",
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory, demo_checkpoint) -> dict[str, str]:
    """Every checkpoint family the tests build, by name: the directory its tokenizer is in."""
    dirs = {"twin-tower-tiny": open_checkpoint(demo_checkpoint).text_processing.tokenizer_dir}
    for name, build in BUILDERS.items():
        dirs[name] = build(str(tmp_path_factory.mktemp(name.replace("_", "-")) / "model"), seed=1)
    return dirs


def _auto(tokenizer_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_every_family_encodes_as_transformers_does_and_only_eligible_ones_skip_transformers(tokenizer_dirs):
    eligible = set()
    for name, path in tokenizer_dirs.items():
        auto = _auto(path)
        mine = TextProcessing(path, 16).load_tokenizer()
        if json_tokenizer_problem(path) is None:
            eligible.add(name)
            assert isinstance(mine, JsonTokenizer), name
        else:
            assert not isinstance(mine, JsonTokenizer), name
        for max_length in (4, 16, 64):
            for pad in (False, True):
                text = TextProcessing(path, max_length, pad)
                want_ids, want_mask = text.encode(auto, TEXTS)
                ids, mask = text.encode(mine, TEXTS)
                assert ids.dtype == want_ids.dtype == np.int64
                np.testing.assert_array_equal(ids, want_ids, err_msg=f"{name} max_length={max_length} pad={pad}")
                np.testing.assert_array_equal(mask, want_mask, err_msg=f"{name} max_length={max_length} pad={pad}")
    # the generic backend's families use it; classes with their own code, and siglip2 (transformers
    # builds its own class whatever the config says), go through transformers
    assert {"twin-tower-tiny", "siglip", "dual-bert-vit", "dual-roberta-siglip"} <= eligible
    assert not {"clip", "chinese_clip", "siglip2"} & eligible


def test_the_vendored_overridden_model_types_cover_the_installed_transformers():
    from transformers.models.auto.tokenization_auto import MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS

    missing = set(MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS) - _CLASS_OVERRIDDEN_MODEL_TYPES
    assert not missing, f"add to text_ops._CLASS_OVERRIDDEN_MODEL_TYPES: {sorted(missing)}"


def _variant(src: str, dst, edit_config=None, edit_json=None) -> str:
    shutil.copytree(src, dst)
    for name, edit in (("tokenizer_config.json", edit_config), ("tokenizer.json", edit_json)):
        if edit is not None:
            path = os.path.join(dst, name)
            with open(path) as fh:
                data = json.load(fh)
            edit(data)
            with open(path, "w") as fh:
                json.dump(data, fh)
    return str(dst)


@pytest.mark.parametrize(
    "edit_config, edit_json, why",
    [
        (lambda c: c.update(add_bos_token=True), None, "sets add_bos_token"),
        (lambda c: c.update(do_lower_case=False), None, "sets do_lower_case"),
        (lambda c: c.update(auto_map={"AutoTokenizer": ["x.Tok", None]}), None, "sets auto_map"),
        (lambda c: c.update(tokenizer_class="BertTokenizer"), None, "tokenizer class BertTokenizer"),
        (lambda c: c.update(mask_token="<new-mask>"), None, "special tokens not in tokenizer.json: mask_token"),
        (
            lambda c: c.update(added_tokens_decoder={"999": {"content": "<extra>", "special": True}}),
            None,
            "added_tokens_decoder holds tokens not in tokenizer.json",
        ),
        (None, lambda j: j.update(post_processor=None), "no post-processor"),
        (
            None,
            lambda j: j.update(
                truncation={"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
            ),
            "fixes its own truncation",
        ),
        (lambda c: c.pop("pad_token"), None, "no pad token"),
    ],
)
def test_a_config_transformers_would_act_on_goes_through_transformers(
    tokenizer_dirs, tmp_path, edit_config, edit_json, why
):
    path = _variant(tokenizer_dirs["twin-tower-tiny"], tmp_path / "tok", edit_config, edit_json)
    assert why in json_tokenizer_problem(path)
    with pytest.raises(ModelError, match="cannot stand in"):
        JsonTokenizer.load(path)


def test_a_model_type_transformers_overrides_goes_through_transformers(tokenizer_dirs, tmp_path):
    path = _variant(tokenizer_dirs["twin-tower-tiny"], tmp_path / "tok")
    with open(os.path.join(path, "config.json")) as fh:
        config = json.load(fh)
    config["model_type"] = "siglip2"
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh)
    assert "model_type siglip2" in json_tokenizer_problem(path)


def test_a_checkpoint_without_tokenizer_json_goes_through_transformers(tmp_path):
    assert json_tokenizer_problem(str(tmp_path)) == "no tokenizer.json"


def test_a_preprocessing_actor_starts_without_transformers_or_torch(demo_checkpoint, tmp_path):
    """The constructor of the CPU pool's actor, in a fresh interpreter: neither library is imported."""
    code = (
        "import sys; from ray_jobs.job.preprocess import Preprocessor; "
        f"p = Preprocessor({demo_checkpoint!r}); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr[-2000:]


def test_a_clip_checkpoint_still_starts_and_encodes_through_transformers(tmp_path):
    path = build_clip(str(tmp_path / "clip"), seed=3)
    text = open_checkpoint(path).text_processing
    assert "CLIPTokenizer" in json_tokenizer_problem(text.tokenizer_dir)
    ids, mask = text.encode(text.load_tokenizer(), ["a cat", "a much longer caption about a cat"])
    assert ids.shape == mask.shape and mask[0].sum() < mask[1].sum()
