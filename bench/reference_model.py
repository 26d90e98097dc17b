"""The unsplit model, built with ``transformers`` exactly as a user would.

It is the yardstick: the staged pipeline must reproduce its output to float tolerance,
and the benchmark's bare PyTorch loop runs it. For a Hugging Face dual encoder the features
are the model's own ``get_text_features`` / ``get_image_features``.
"""

from __future__ import annotations

import numpy as np

from ray_jobs.model.checkpoint import TwinTowerCheckpoint
from ray_jobs.model.checkpoint_base import Checkpoint
from ray_jobs.model.image_ops import pixels_to_tensor
from ray_jobs.model.precision import check_device, torch_dtype
from ray_jobs.model.safetensors_io import SafetensorsIndex


def _normalise(x):
    import torch

    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy()


class TwinTowerReference:
    def __init__(self, ckpt: TwinTowerCheckpoint, device: str = "cpu", dtype: str = "float32"):
        import torch
        from transformers import AutoModel

        check_device(dtype, device)
        self.ckpt = ckpt
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        self.towers = {}
        for tower in ("text", "image"):
            cfg = ckpt.hf_config(tower)
            self.towers[tower] = (
                AutoModel.from_pretrained(ckpt.tower_local_dir(tower), config=cfg, add_pooling_layer=False)
                .to(self.device, self.dtype)
                .eval()
            )
        proj = SafetensorsIndex(ckpt.uri, filename="projection.safetensors").load(
            ["text_projection.weight", "image_projection.weight"]
        )
        self.proj = {t: proj[f"{t}_projection.weight"].to(self.device, self.dtype) for t in ("text", "image")}

    def num_parameters(self) -> int:
        return sum(p.numel() for m in self.towers.values() for p in m.parameters()) + sum(
            w.numel() for w in self.proj.values()
        )

    def _pool(self, hidden, mask, how):
        if how == "cls":
            return hidden[:, 0]
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray, pixels: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        cfg = self.ckpt.config
        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(self.device)
            mask = torch.from_numpy(attention_mask).to(self.device)
            text_h = self.towers["text"](input_ids=ids, attention_mask=mask).last_hidden_state
            text = self._pool(text_h, mask, cfg.text_pooling) @ self.proj["text"].T
            px = pixels_to_tensor(pixels, self.ckpt.image_processing, self.device, self.dtype)
            image_h = self.towers["image"](pixel_values=px).last_hidden_state
            image = self._pool(image_h, None, cfg.image_pooling) @ self.proj["image"].T
            return {"text_embedding": _normalise(text), "image_embedding": _normalise(image)}


class HFDualReference:
    """``AutoModel.from_pretrained`` of a local dual-encoder checkpoint and its ``get_*_features``."""

    def __init__(self, ckpt, device: str = "cpu", dtype: str = "float32"):
        import torch
        from transformers import AutoModel

        check_device(dtype, device)
        self.ckpt = ckpt
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        self.model = AutoModel.from_pretrained(ckpt.local_dir, dtype=self.dtype).to(self.device).eval()
        self.uses_mask = ckpt.tower("text").attention != "none"

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def text_features(self, input_ids, attention_mask):
        import torch

        ids = torch.as_tensor(input_ids, device=self.device)
        kwargs = {"attention_mask": torch.as_tensor(attention_mask, device=self.device)} if self.uses_mask else {}
        return self.model.get_text_features(input_ids=ids, **kwargs).pooler_output

    def image_features(self, pixel_values, spatial_shapes=None):
        if spatial_shapes is None:
            return self.model.get_image_features(pixel_values=pixel_values).pooler_output
        # SigLIP 2: the processor's outputs for patches padded to max_num_patches
        from ray_jobs.model.tower_def import TowerDef

        mask = TowerDef.patch_mask(spatial_shapes, pixel_values.shape[1])
        pixel_values = pixel_values * mask[..., None].to(pixel_values.dtype)
        return self.model.get_image_features(
            pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=spatial_shapes
        ).pooler_output

    def embed(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        pixels: np.ndarray,
        spatial_shapes: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            text = self.text_features(input_ids, attention_mask)
            px = pixels_to_tensor(pixels, self.ckpt.image_processing, self.device, self.dtype)
            shapes = None if spatial_shapes is None else torch.as_tensor(spatial_shapes, device=self.device)
            image = self.image_features(px, shapes)
            return {"text_embedding": _normalise(text), "image_embedding": _normalise(image)}


def reference_for(ckpt: Checkpoint, device: str = "cpu", dtype: str = "float32"):
    """The unsplit reference model of *ckpt*, whatever its format."""
    if isinstance(ckpt, TwinTowerCheckpoint):
        return TwinTowerReference(ckpt, device, dtype)
    return HFDualReference(ckpt, device, dtype)
