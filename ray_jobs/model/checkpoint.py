"""Opening a checkpoint, from a local directory or an ``s3://`` prefix, whatever its format.

Two formats load as they are (:func:`open_checkpoint` tells them apart):

* **Hugging Face dual encoders** saved with ``save_pretrained`` (``config.json`` whose
  ``model_type`` is ``clip``, ``siglip``, ``siglip2``, ``chinese_clip`` or ``vision-text-dual-encoder``), with
  their tokenizer and image-processor files beside them: see :mod:`ray_jobs.model.hf_dual`.
* **The twin tower** (``twin_tower.json``)::

    twin_tower.json            name, embed_dim, poolings, text max length, tower sub-dirs
    projection.safetensors     text_projection.weight [D, H_text], image_projection.weight [D, H_image]
    text/                      a Hugging Face text encoder: config.json, model.safetensors, tokenizer files
    image/                     a Hugging Face ViT encoder: config.json, model.safetensors,
                               preprocessor_config.json

The machinery both share (the local cache of small files, the :class:`Checkpoint` base) is
:mod:`ray_jobs.model.checkpoint_base`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property

from ray_jobs import storage
from ray_jobs.contract.layout import join_uri
from ray_jobs.errors import ModelError
from ray_jobs.model.checkpoint_base import Checkpoint, declared_positive_int, sync_small_files
from ray_jobs.model.hf_dual import FAMILIES, HFDualCheckpoint
from ray_jobs.model.image_ops import ImageProcessing, load_image_processing
from ray_jobs.model.keys import safe_relpath
from ray_jobs.model.text_ops import TextProcessing

MANIFEST_FILE = "twin_tower.json"
PROJECTION_FILE = "projection.safetensors"
_POOLINGS = ("mean", "cls")


@dataclass(frozen=True)
class TwinTowerConfig:
    """``twin_tower.json``: how the two towers form one embedding model."""

    name: str
    embed_dim: int
    text_dir: str = "text"
    image_dir: str = "image"
    text_pooling: str = "mean"
    image_pooling: str = "cls"
    text_max_length: int = 64

    def __post_init__(self) -> None:
        if self.embed_dim <= 0:
            raise ModelError(f"{MANIFEST_FILE}: embed_dim must be positive, got {self.embed_dim}")
        for key in ("text_pooling", "image_pooling"):
            if getattr(self, key) not in _POOLINGS:
                raise ModelError(f"{MANIFEST_FILE}: {key} must be one of {_POOLINGS}, got {getattr(self, key)!r}")
        if self.text_max_length <= 1:
            raise ModelError(f"{MANIFEST_FILE}: text_max_length must be > 1, got {self.text_max_length}")
        for key in ("text_dir", "image_dir"):
            safe_relpath(getattr(self, key), MANIFEST_FILE, key)

    @classmethod
    def from_json(cls, text: str, source: str) -> TwinTowerConfig:
        try:
            data = json.loads(text)
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ModelError(f"{source}: invalid twin-tower config: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


class TwinTowerCheckpoint(Checkpoint):
    """The project's own format: two Hugging Face towers and a projection file."""

    format = "twin-tower"

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        manifest = os.path.join(self.local_dir, MANIFEST_FILE)
        if not os.path.exists(manifest):
            raise ModelError(f"model {uri}: {MANIFEST_FILE} is missing; is this a twin-tower checkpoint?")
        with open(manifest) as fh:
            self.config = TwinTowerConfig.from_json(fh.read(), manifest)
        for sub in (self.config.text_dir, self.config.image_dir):
            if not os.path.exists(os.path.join(self.local_dir, sub, "config.json")):
                raise ModelError(f"model {uri}: tower directory {sub}/ has no config.json")
        if not os.path.exists(os.path.join(self.local_dir, self.config.image_dir, "preprocessor_config.json")):
            raise ModelError(f"model {uri}: {self.config.image_dir}/preprocessor_config.json is missing")

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    # -- locations
    def tower_uri(self, tower: str) -> str:
        return join_uri(self.uri, self.tower_subdir(tower))

    def tower_local_dir(self, tower: str) -> str:
        return os.path.join(self.local_dir, self.tower_subdir(tower))

    def tower_subdir(self, tower: str) -> str:
        return {"text": self.config.text_dir, "image": self.config.image_dir}[tower]

    @property
    def projection_uri(self) -> str:
        return join_uri(self.uri, PROJECTION_FILE)

    @cached_property
    def _tower_configs(self) -> dict[str, dict]:
        """Each tower's ``config.json`` as written, read once."""
        out = {}
        for tower in ("text", "image"):
            with open(os.path.join(self.tower_local_dir(tower), "config.json")) as fh:
                out[tower] = json.load(fh)
        return out

    def _declared_layer_counts(self) -> dict[str, int] | None:
        counts = {tower: declared_positive_int(cfg, "num_hidden_layers") for tower, cfg in self._tower_configs.items()}
        return None if None in counts.values() else counts

    def _declared_layer_costs(self) -> dict[str, list[float]] | None:
        from ray_jobs.model.tower_def import layer_flops, vit_seq_len

        out = {}
        for tower, cfg in self._tower_configs.items():
            keys = ("num_hidden_layers", "hidden_size", "intermediate_size")
            keys += ("image_size", "patch_size") if tower == "image" else ()
            if not all(declared_positive_int(cfg, k) for k in keys):
                return None  # a figure left to the config class's default
            seq = vit_seq_len(cfg["image_size"], cfg["patch_size"]) if tower == "image" else self.config.text_max_length
            out[tower] = [layer_flops(cfg["hidden_size"], cfg["intermediate_size"], seq)] * cfg["num_hidden_layers"]
        return out

    def hf_config(self, tower: str):
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(self.tower_local_dir(tower))
        cfg._attn_implementation = "sdpa"
        return cfg

    @cached_property
    def text_processing(self) -> TextProcessing:
        return TextProcessing(self.tower_local_dir("text"), self.config.text_max_length)

    @cached_property
    def image_processing(self) -> ImageProcessing:
        return load_image_processing(self.tower_local_dir("image"))

    def _build_tower(self, tower: str):
        from ray_jobs.model.twin_tower import build_twin_tower

        return build_twin_tower(self, tower)


def open_checkpoint(uri: str) -> Checkpoint:
    """Open the checkpoint at *uri* in whichever supported format it is."""
    if storage.is_remote(uri):
        local = sync_small_files(uri)
    else:
        local = storage.filesystem_for(uri)[1]
        if not os.path.isdir(local):
            raise ModelError(f"model directory {uri} does not exist")
    if os.path.exists(os.path.join(local, MANIFEST_FILE)):
        return TwinTowerCheckpoint(uri)
    config = os.path.join(local, "config.json")
    if os.path.exists(config):
        with open(config) as fh:
            try:
                model_type = json.load(fh).get("model_type")
            except json.JSONDecodeError as exc:
                raise ModelError(f"model {uri}: config.json is not JSON: {exc}") from exc
        if model_type in FAMILIES:
            return HFDualCheckpoint(uri)
        raise ModelError(
            f"model {uri}: model_type {model_type!r} is not a supported dual encoder; "
            f"supported: {sorted(FAMILIES)} or a twin-tower checkpoint ({MANIFEST_FILE})"
        )
    raise ModelError(
        f"model {uri}: neither {MANIFEST_FILE} (twin tower) nor config.json (Hugging Face dual encoder: "
        f"{', '.join(sorted(FAMILIES))}) found"
    )


def describe_checkpoint(uri: str) -> dict:
    """What ``check_inputs`` needs once per run: the model id (metadata only), format, embedding
    size and layer counts, after checking the checkpoint opens and its towers are supported."""
    ckpt = open_checkpoint(uri)
    return {
        "model_uri": ckpt.uri,
        "model_id": ckpt.model_id,
        "format": ckpt.format,
        "embed_dim": ckpt.embed_dim,
        "layers": ckpt.layer_counts(),
    }
