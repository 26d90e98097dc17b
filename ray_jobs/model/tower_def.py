"""One tower of a checkpoint, ready to be cut into pipeline pieces.

A :class:`TowerDef` names the modules of a tower (embedding, layers, head steps) inside a
meta-device model, the checkpoint tensor behind every parameter, and how the tower masks
attention and pools. Any checkpoint format (the twin tower, Hugging Face dual encoders)
describes its towers this way; :mod:`ray_jobs.model.staged` runs them without knowing which.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ray_jobs.errors import ModelError
from ray_jobs.model.safetensors_io import SafetensorsIndex
from ray_jobs.model.towers import ATTENTIONS, Step, get_module


def layer_flops(hidden: int, intermediate: int, seq_len: int) -> float:
    """Rough FLOPs of one transformer layer on one row of *seq_len* tokens."""
    return float(seq_len * (4 * hidden * hidden + 2 * hidden * intermediate) + 2 * seq_len * seq_len * hidden)


def vit_seq_len(image_size: int, patch_size: int) -> int:
    """Tokens a ViT layer sees: one per patch plus the class token."""
    return (int(image_size) // int(patch_size)) ** 2 + 1


@dataclass(frozen=True)
class TowerDef:
    """Everything a stage needs to build and run its share of one tower."""

    tower: str  # "text" | "image"
    config: Any  # the tower's Hugging Face config (sub-config of a dual model)
    meta: Any  # a meta-device module holding every piece at the paths below
    sources: Mapping[str, tuple[SafetensorsIndex, str]]  # module state key -> (file index, tensor name)
    embed: tuple[str, ...]
    layers: tuple[str, ...]  # one path per transformer layer (repeats for shared layers)
    head: tuple[Step, ...]
    attention: str = "bidirectional"
    eos_token_id: int | None = None  # for ``pool('eos')``
    seq_len: int = 1  # tokens per row at the checkpoint's input size (for cost estimates)
    layer_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tower not in ("text", "image"):
            raise ValueError(f"tower must be text or image, got {self.tower!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if not self.layers:
            raise ModelError(f"{self.tower} tower has no layers")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def head_paths(self) -> tuple[str, ...]:
        return tuple(s.arg for s in self.head if s.op != "pool")

    @property
    def needs_input_ids_at_head(self) -> bool:
        return any(s.op == "pool" and s.arg == "eos" for s in self.head)

    def layer_cost(self) -> float:
        """Rough FLOPs of one layer on one row."""
        hid = int(self.config.hidden_size)
        return layer_flops(hid, int(getattr(self.config, "intermediate_size", 4 * hid)), self.seq_len)

    # -- building pieces
    def _fresh(self, path: str, dtype=None):
        """A real (CPU) module with the same class and shape as the meta module at *path*.

        Without non-persistent buffers (every layer, norm, projection, pooling head) the meta copy
        is materialised uninitialised, directly in *dtype*, and every tensor is then loaded: no
        random init, no float32 copy of a bf16 stage. A module with non-persistent buffers
        (embeddings' position ids) is built from the tower's config, so they hold their real values."""
        import torch

        template = get_module(self.meta, path)
        if not any(m._non_persistent_buffers_set for m in template.modules()):
            module = copy.deepcopy(template)
            if dtype is not None:
                module = module.to(dtype)
            return module.to_empty(device=torch.device("cpu"))
        init = type(template).__init__
        varnames = getattr(getattr(init, "__code__", None), "co_varnames", ())
        if "config" not in varnames:
            raise ModelError(f"cannot rebuild {path} of {self.config.model_type}")
        kwargs = {"layer_idx": 0} if "layer_idx" in varnames else {}
        module = type(template)(self.config, **kwargs)
        return module if dtype is None else module.to(dtype)

    def build(self, path: str, dtype=None):
        """The module at *path* (in *dtype*) and the tensors it needs: ``{local key: (index, tensor name)}``."""
        module = self._fresh(path, dtype)
        needed = {}
        for local_key in module.state_dict():
            full = f"{path}.{local_key}"
            if full not in self.sources:
                raise ModelError(f"{self.tower} tower ({self.config.model_type}): checkpoint has no tensor for {full}")
            needed[local_key] = self.sources[full]
        return module, needed

    # -- running pieces
    def attention_mask(self, hidden, mask):
        """The 4-D mask the layers take, built exactly as the Hugging Face model builds it."""
        if self.attention == "none" or mask is None or (self.tower == "image" and self.attention != "patches"):
            return None
        if self.attention == "causal":
            from transformers.masking_utils import create_causal_mask

            return create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask, cache=None)
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)

    @staticmethod
    def patch_mask(spatial_shapes, num_patches: int):
        """``(B, num_patches)`` int mask of the real patches of each row (the first rows x cols)."""
        import torch

        counts = spatial_shapes.prod(dim=-1, keepdim=True)
        return (torch.arange(num_patches, device=spatial_shapes.device)[None, :] < counts).to(torch.int64)

    def pool(self, hidden, how: str, mask, input_ids):
        import torch

        if how == "cls":
            return hidden[:, 0]
        if how == "last":
            return hidden[:, -1]
        if how == "eos":
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            ids = input_ids.to(dtype=torch.int, device=hidden.device)
            if self.eos_token_id == 2:  # legacy CLIP configs: the end-of-text token has the highest id
                return hidden[rows, ids.argmax(dim=-1)]
            return hidden[rows, (ids == self.eos_token_id).int().argmax(dim=-1)]
        if mask is None:
            return hidden.mean(dim=1)
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
