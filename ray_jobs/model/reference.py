"""The unsplit twin tower, built with ``transformers.AutoModel`` exactly as a user would.

It is the yardstick: the staged pipeline must reproduce its output to float tolerance,
and the benchmark's bare PyTorch loop runs it.
"""

from __future__ import annotations

import numpy as np

from ray_jobs.model.checkpoint import TwinTowerCheckpoint
from ray_jobs.model.image_ops import pixels_to_tensor, pool
from ray_jobs.model.safetensors_io import SafetensorsIndex


class TwinTowerReference:
    def __init__(self, ckpt: TwinTowerCheckpoint, device: str = "cpu"):
        import torch
        from transformers import AutoModel

        self.ckpt = ckpt
        self.device = torch.device(device)
        self.towers = {}
        for tower in ("text", "image"):
            cfg = ckpt.hf_config(tower)
            self.towers[tower] = (
                AutoModel.from_pretrained(ckpt.tower_local_dir(tower), config=cfg, add_pooling_layer=False)
                .to(self.device)
                .eval()
            )
        proj = SafetensorsIndex(ckpt.uri, filename="projection.safetensors").load(
            ["text_projection.weight", "image_projection.weight"]
        )
        self.proj = {t: proj[f"{t}_projection.weight"].to(self.device) for t in ("text", "image")}

    def num_parameters(self) -> int:
        return sum(p.numel() for m in self.towers.values() for p in m.parameters()) + sum(
            w.numel() for w in self.proj.values()
        )

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray, pixels: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            ids = torch.from_numpy(input_ids).to(self.device)
            mask = torch.from_numpy(attention_mask).to(self.device)
            text_h = self.towers["text"](input_ids=ids, attention_mask=mask).last_hidden_state
            text = pool(text_h, mask, self.ckpt.config.text_pooling) @ self.proj["text"].T
            px = pixels_to_tensor(pixels, self.ckpt.image_processing, self.device)
            image_h = self.towers["image"](pixel_values=px).last_hidden_state
            image = pool(image_h, None, self.ckpt.config.image_pooling) @ self.proj["image"].T
            return {
                "text_embedding": torch.nn.functional.normalize(text, dim=-1).cpu().numpy(),
                "image_embedding": torch.nn.functional.normalize(image, dim=-1).cpu().numpy(),
            }
