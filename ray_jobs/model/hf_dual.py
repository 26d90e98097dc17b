"""Hugging Face dual encoders as they are saved by ``save_pretrained``.

Supported (``config.json`` ``model_type``):

==========================  ========================================  ===============================
family                      text tower -> feature                     image tower -> feature
==========================  ========================================  ===============================
``clip``                    CLIP text, final norm, end-of-text token,  CLIP ViT, [CLS], post norm,
                            ``text_projection``                        ``visual_projection``
``siglip``                  SigLIP text, final norm, last token,       SigLIP ViT, post norm,
                            ``head``                                   attention-pooling ``head``
``siglip2``                 as SigLIP (with its attention mask)        NaFlex patches (variable grid,
                                                                       masked), post norm, masked head
``chinese_clip``            BERT, [CLS], ``text_projection``           CLIP-style ViT, ``visual_projection``
``vision-text-dual-encoder`` BERT / ALBERT / RoBERTa / XLM-R pooler,    ViT / CLIP / SigLIP vision pooler,
                            ``text_projection``                        ``visual_projection``
==========================  ========================================  ===============================

The features are exactly what the model's own ``get_text_features`` / ``get_image_features``
return (the job L2-normalises them). Every piece is a module of the real model class, built
from the checkpoint's own config, filled with only its own tensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property

from ray_jobs.errors import ModelError
from ray_jobs.model.checkpoint_base import Checkpoint, declared_positive_int
from ray_jobs.model.image_ops import ImageProcessing, has_image_processor, load_image_processing
from ray_jobs.model.safetensors_io import SafetensorsIndex
from ray_jobs.model.text_ops import TextProcessing, tokenizer_max_length
from ray_jobs.model.tower_def import TowerDef
from ray_jobs.model.towers import Step, apply, checkpoint_key_map, layer_paths, meta_model, parts_for


@dataclass(frozen=True)
class Family:
    """Where the towers of one dual-encoder class live and which architectures they may be."""

    text_prefix: str
    image_prefix: str
    text_archs: tuple[str, ...]
    image_archs: tuple[str, ...]
    text_projection: str | None  # module applied to the text tower's pooled output
    image_projection: str | None
    pad_to_max_length: bool = False  # the text tower reads a fixed position, so padding must be to max length

    def embed_dim(self, config) -> int:
        if self.text_projection:
            return int(config.projection_dim)
        return int(config.vision_config.hidden_size)


FAMILIES: dict[str, Family] = {
    "clip": Family(
        "text_model.",
        "vision_model.",
        ("clip_text_model",),
        ("clip_vision_model",),
        "text_projection",
        "visual_projection",
    ),
    "siglip": Family(
        "text_model.", "vision_model.", ("siglip_text_model",), ("siglip_vision_model",), None, None, True
    ),
    "siglip2": Family(
        "text_model.", "vision_model.", ("siglip2_text_model",), ("siglip2_vision_model",), None, None, True
    ),
    "chinese_clip": Family(
        "text_model.",
        "vision_model.",
        ("chinese_clip_text_model",),
        ("chinese_clip_vision_model",),
        "text_projection",
        "visual_projection",
    ),
    "vision-text-dual-encoder": Family(
        "text_model.",
        "vision_model.",
        ("bert", "albert", "roberta", "xlm-roberta"),
        ("vit", "clip_vision_model", "siglip_vision_model"),
        "text_projection",
        "visual_projection",
    ),
}


class HFDualCheckpoint(Checkpoint):
    """A ``CLIPModel`` / ``SiglipModel`` / ``ChineseCLIPModel`` / ``VisionTextDualEncoderModel`` directory."""

    format = "hf-dual"

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        path = os.path.join(self.local_dir, "config.json")
        if not os.path.exists(path):
            raise ModelError(f"model {uri}: config.json is missing")
        with open(path) as fh:
            self._config_json = json.load(fh)
        self.model_type = self._config_json.get("model_type")
        if self.model_type not in FAMILIES:
            raise ModelError(f"model {uri}: model_type {self.model_type!r} is not one of {sorted(FAMILIES)}")
        self.family = FAMILIES[self.model_type]
        if not has_image_processor(self.local_dir):
            raise ModelError(
                f"model {uri}: no image processor config (preprocessor_config.json, or processor_config.json with "
                "an image_processor entry): save the model's processor beside it"
            )
        has_tokenizer = any(
            os.path.exists(os.path.join(self.local_dir, f))
            for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")
        )
        if not has_tokenizer:
            raise ModelError(
                f"model {uri}: no tokenizer files (tokenizer.json / tokenizer_config.json) beside the model"
            )

    def _declared_layer_counts(self) -> dict[str, int] | None:
        counts = {
            tower: declared_positive_int(self._config_json.get(key) or {}, "num_hidden_layers")
            for tower, key in (("text", "text_config"), ("image", "vision_config"))
        }
        return None if None in counts.values() else counts

    @cached_property
    def hf_config(self):
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(self.local_dir)
        for sub in (cfg, cfg.text_config, cfg.vision_config):
            sub._attn_implementation = "sdpa"
        return cfg

    @cached_property
    def weights(self) -> SafetensorsIndex:
        return SafetensorsIndex(self.uri)

    @cached_property
    def _meta(self):
        return meta_model(self.hf_config)

    @cached_property
    def _sources(self) -> dict:
        index = self.weights
        return {k: (index, v) for k, v in checkpoint_key_map(self._meta, index.names()).items()}

    @property
    def embed_dim(self) -> int:
        """As the config JSON states it where it does (no transformers import: see
        :meth:`Checkpoint.layer_counts`), else from the full config; the two always agree."""
        if self.family.text_projection:
            config, key = self._config_json, "projection_dim"
        else:
            config, key = self._config_json.get("vision_config") or {}, "hidden_size"
        return declared_positive_int(config, key) or self.family.embed_dim(self.hf_config)

    def declared_text_positions(self) -> int | None:
        """The text tower's usable positions where ``config.json`` states all it takes (no
        transformers import, so a preprocessing actor starts without it), else None."""
        text = self._config_json.get("text_config")
        limit = declared_positive_int(text or {}, "max_position_embeddings")
        model_type = text.get("model_type") if isinstance(text, dict) else None
        if limit is None or not isinstance(model_type, str):
            return None
        if model_type in ("roberta", "xlm-roberta"):  # positions start after the padding index
            pad = text.get("pad_token_id")
            if not isinstance(pad, int) or isinstance(pad, bool):
                return None
            limit -= pad + 1
        return limit

    def config_text_positions(self) -> int:
        """The text tower's usable positions as transformers' config classes read them."""
        tcfg = self.hf_config.text_config
        limit = int(tcfg.max_position_embeddings)
        if tcfg.model_type in ("roberta", "xlm-roberta"):  # positions start after the padding index
            limit -= int(tcfg.pad_token_id or 0) + 1
        return limit

    @cached_property
    def text_processing(self) -> TextProcessing:
        limit = self.declared_text_positions() or self.config_text_positions()
        return TextProcessing(
            self.local_dir,
            tokenizer_max_length(self.local_dir, limit, limit),
            pad_to_max_length=self.family.pad_to_max_length,
        )

    @cached_property
    def image_processing(self) -> ImageProcessing:
        return load_image_processing(self.local_dir)

    def _build_tower(self, tower: str) -> TowerDef:
        cfg = self.hf_config
        fam = self.family
        if tower == "text":
            sub, prefix, archs, projection = cfg.text_config, fam.text_prefix, fam.text_archs, fam.text_projection
        else:
            sub, prefix, archs, projection = cfg.vision_config, fam.image_prefix, fam.image_archs, fam.image_projection
        parts = parts_for(sub, tower, archs)
        if sub.model_type.startswith("siglip") and tower == "image" and not getattr(sub, "vision_use_head", True):
            raise ModelError(f"model {self.uri}: a SigLIP vision tower without its pooling head has no image features")
        head = tuple(s if s.op == "pool" else Step(s.op, prefix + s.arg) for s in parts.pooled) + (
            (apply(projection),) if projection else ()
        )
        if tower == "text":
            seq = self.text_processing.max_length
            layer_kwargs = {"is_causal": True} if parts.attention == "causal" else {}
        else:
            if sub.model_type == "siglip2_vision_model":
                seq = self.image_processing.pixel_shape[0]
            else:
                seq = (int(sub.image_size) // int(sub.patch_size)) ** 2 + (
                    0 if sub.model_type.startswith("siglip") else 1
                )
            layer_kwargs = {}
        return TowerDef(
            tower=tower,
            config=sub,
            meta=self._meta,
            sources=self._sources,
            embed=tuple(prefix + p for p in parts.embed),
            layers=layer_paths(sub, parts, prefix),
            head=head,
            attention=parts.attention,
            eos_token_id=getattr(sub, "eos_token_id", None),
            seq_len=seq,
            layer_kwargs=layer_kwargs,
        )
