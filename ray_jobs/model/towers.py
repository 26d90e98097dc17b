"""How each supported Hugging Face architecture splits into embed / layer / final pieces.

A tower is run as ``embed -> layer[0] -> ... -> layer[L-1] -> final``; each piece is a
real Hugging Face module of the architecture (so a real checkpoint runs through the same
code as the library's own ``AutoModel``), built empty of other layers and filled with only
its own tensors. Adding an architecture is one :class:`TowerLayout` entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_jobs.errors import ModelError


@dataclass(frozen=True)
class TowerLayout:
    """Module paths (as in ``AutoModel.from_config(cfg).state_dict()``) of one architecture."""

    modality: str  # "text" | "image"
    embed: tuple[str, ...]  # modules applied in order to the raw input
    layers: str  # the ModuleList of transformer layers (or ALBERT's layer groups)
    final: str | None = None  # norm applied after the last layer, if any
    shared_groups: bool = False  # ALBERT: layer i uses group int(i / (L / G))


LAYOUTS: dict[str, TowerLayout] = {
    "albert": TowerLayout(
        "text", ("embeddings", "encoder.embedding_hidden_mapping_in"), "encoder.albert_layer_groups", shared_groups=True
    ),
    "bert": TowerLayout("text", ("embeddings",), "encoder.layer"),
    "roberta": TowerLayout("text", ("embeddings",), "encoder.layer"),
    "vit": TowerLayout("image", ("embeddings",), "layers", final="layernorm"),
}


def layout_for(config, tower: str) -> TowerLayout:
    layout = LAYOUTS.get(config.model_type)
    if layout is None or layout.modality != tower:
        supported = sorted(k for k, v in LAYOUTS.items() if v.modality == tower)
        raise ModelError(f"{tower} tower: architecture {config.model_type!r} is not supported; supported: {supported}")
    return layout


def num_layers(config) -> int:
    return int(config.num_hidden_layers)


def module_index(config, layout: TowerLayout, layer: int) -> int:
    """Index into ``layout.layers`` that runs transformer layer *layer*."""
    if not layout.shared_groups:
        return layer
    groups = int(config.num_hidden_groups)
    return int(layer / (config.num_hidden_layers / groups))


def _get(module, dotted: str):
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def meta_model(config):
    """The full tower on the meta device: structure and parameter names, no memory."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        try:
            return AutoModel.from_config(config, add_pooling_layer=False)
        except TypeError:
            return AutoModel.from_config(config)


def checkpoint_key_map(meta, checkpoint_keys: list[str]) -> dict[str, str]:
    """Map module state-dict keys to the checkpoint's tensor names.

    Checkpoints keep the names they were saved with; newer ``transformers`` releases rename
    modules and translate at load time. We apply the library's own renamings to the
    checkpoint's names (header only), so a stage can ask for exactly the tensors it needs.
    """
    wanted = set(meta.state_dict().keys())
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(meta)
    except ImportError:  # an older transformers: names on disk are module names
        transforms, WeightConverter, WeightRenaming = [], (), ()
        rename_source_key = None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_sd = dict.fromkeys(wanted, True)
    out: dict[str, str] = {}
    for key in checkpoint_keys:
        if rename_source_key is not None:
            new, conv = rename_source_key(key, renamings, converters, meta.base_model_prefix, meta_sd)
            if conv is not None:
                raise ModelError(
                    f"{meta.config.model_type} checkpoint tensor {key!r} needs a tensor conversion on load; "
                    "re-save the tower with this transformers version: "
                    "AutoModel.from_pretrained(d).save_pretrained(d2)"
                )
        else:
            new = key
        if new in wanted:
            out[new] = key
    return out


class TowerPieces:
    """Builds the real modules of one tower's pieces and names the tensors each needs."""

    def __init__(self, config, tower: str, checkpoint_keys: list[str]) -> None:
        self.config = config
        self.tower = tower
        self.layout = layout_for(config, tower)
        self.meta = meta_model(config)
        self.key_map = checkpoint_key_map(self.meta, checkpoint_keys)

    @property
    def num_layers(self) -> int:
        return num_layers(self.config)

    def _fresh(self, path: str):
        """A real (CPU) module with the same class and shape as the meta module at *path*."""
        import copy

        import torch

        template = _get(self.meta, path)
        try:
            kwargs = {"layer_idx": 0} if "layer_idx" in type(template).__init__.__code__.co_varnames else {}
            return type(template)(self.config, **kwargs)
        except TypeError:
            # plain torch modules (LayerNorm, Linear) take shapes, not a config;
            # they have no non-persistent buffers, so materialising the meta copy is exact.
            module = copy.deepcopy(template).to_empty(device=torch.device("cpu"))
            if any(m._non_persistent_buffers_set for m in module.modules()):
                raise ModelError(f"cannot rebuild {path} of {self.config.model_type}") from None
            return module

    def build(self, path: str):
        """The module at *path* and the checkpoint tensors (module key -> checkpoint key) it needs."""
        module = self._fresh(path)
        needed = {}
        for local_key in module.state_dict():
            full = f"{path}.{local_key}"
            if full not in self.key_map:
                raise ModelError(f"{self.tower} tower ({self.config.model_type}): checkpoint has no tensor for {full}")
            needed[local_key] = self.key_map[full]
        return module, needed

    def layer_path(self, layer: int) -> str:
        return f"{self.layout.layers}.{module_index(self.config, self.layout, layer)}"
