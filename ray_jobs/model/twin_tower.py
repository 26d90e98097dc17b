"""The twin-tower format's towers as :class:`~ray_jobs.model.tower_def.TowerDef`.

Each tower is a Hugging Face base model (``AutoModel`` without its pooler) followed by the
tower's final norm (ViT's ``layernorm``), the pooling named in ``twin_tower.json`` and the
linear projection stored in ``projection.safetensors``.
"""

from __future__ import annotations

from ray_jobs.model.safetensors_io import SafetensorsIndex
from ray_jobs.model.tower_def import TowerDef, vit_seq_len
from ray_jobs.model.towers import apply, checkpoint_key_map, layer_paths, meta_model, parts_for, pool

TEXT_ARCHS = ("albert", "bert", "roberta", "xlm-roberta")
IMAGE_ARCHS = ("vit",)


def build_twin_tower(ckpt, tower: str) -> TowerDef:
    import torch

    cfg = ckpt.hf_config(tower)
    parts = parts_for(cfg, tower, TEXT_ARCHS if tower == "text" else IMAGE_ARCHS)
    index = SafetensorsIndex(ckpt.tower_uri(tower))
    proj_index = SafetensorsIndex(ckpt.uri, filename="projection.safetensors")
    proj_key = f"{tower}_projection.weight"
    if proj_key not in proj_index.entries:
        from ray_jobs.errors import ModelError

        raise ModelError(f"model {ckpt.uri}: projection.safetensors has no {proj_key}")
    out_dim, in_dim = proj_index.entries[proj_key].shape

    base = meta_model(cfg, add_pooling_layer=False)
    container = torch.nn.Module()
    container.add_module("tower", base)
    with torch.device("meta"):
        container.add_module("projection", torch.nn.Linear(in_dim, out_dim, bias=False))
    sources = {f"tower.{k}": (index, v) for k, v in checkpoint_key_map(base, index.names()).items()}
    sources["projection.weight"] = (proj_index, proj_key)

    head = []
    if tower == "image":
        head.append(apply("tower.layernorm"))
        seq = vit_seq_len(cfg.image_size, cfg.patch_size)
        how = ckpt.config.image_pooling
    else:
        seq = ckpt.config.text_max_length
        how = ckpt.config.text_pooling
    head += [pool(how), apply("projection")]
    return TowerDef(
        tower=tower,
        config=cfg,
        meta=container,
        sources=sources,
        embed=tuple(f"tower.{p}" for p in parts.embed),
        layers=layer_paths(cfg, parts, "tower."),
        head=tuple(head),
        attention=parts.attention,
        seq_len=seq,
    )
