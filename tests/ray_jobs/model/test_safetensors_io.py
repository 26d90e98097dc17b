import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ray_jobs.errors import ModelError
from ray_jobs.model.safetensors_io import SafetensorsIndex


def test_reads_only_the_named_tensors_exactly(tmp_path):
    tensors = {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.ones(5, dtype=torch.bfloat16),
        "c": torch.tensor([1, 2, 3], dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    index = SafetensorsIndex(str(tmp_path))
    assert index.names() == ["a", "b", "c", "empty"]
    got = index.load(["b", "c", "empty"])
    assert set(got) == {"b", "c", "empty"}
    for k, v in got.items():
        assert torch.equal(v, tensors[k]) and v.dtype == tensors[k].dtype
    assert index.nbytes(["a"]) == 48


def test_sharded_checkpoints_resolve_through_the_index(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"y": torch.zeros(3)}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}})
    )
    got = SafetensorsIndex(str(tmp_path)).load(["y"])
    assert torch.equal(got["y"], load_file(tmp_path / "model-00002-of-00002.safetensors")["y"])


def test_missing_weights_and_tensors_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match=r"no model\.safetensors"):
        SafetensorsIndex(str(tmp_path))
    save_file({"x": torch.ones(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match=r"lacks tensors \['nope'\]"):
        SafetensorsIndex(str(tmp_path)).load(["nope"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\xff" * 8 + b"junk")
    with pytest.raises(ModelError, match=r"not a safetensors file"):
        SafetensorsIndex(str(tmp_path / "bad"))
