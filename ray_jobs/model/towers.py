"""How each supported Hugging Face architecture splits into embed / layer / head pieces.

A tower runs as ``embed -> layer[0] -> ... -> layer[L-1] -> head``; every piece is a real
Hugging Face module of the architecture (so a checkpoint runs through the same code as the
library's own model), built empty of other layers and filled with only its own tensors.
The head is a short list of steps (apply a module, or pool the sequence) that reproduces the
model's own ``pooler_output`` / ``get_*_features``. Adding an architecture is one
:class:`TowerParts` entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_jobs.errors import ModelError

POOLINGS = ("cls", "mean", "last", "eos")
ATTENTIONS = ("bidirectional", "causal", "none", "patches")  # patches: mask from SigLIP 2's patch grid


@dataclass(frozen=True)
class Step:
    """One head step: ``apply`` a module (path relative to the tower), ``apply_masked`` (the module also
    takes the 2-D attention mask), or ``pool`` the sequence."""

    op: str
    arg: str

    def __post_init__(self) -> None:
        if self.op not in ("apply", "apply_masked", "pool"):
            raise ValueError(f"head step op must be apply, apply_masked or pool, got {self.op!r}")
        if self.op == "pool" and self.arg not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.arg!r}")


def apply(path: str) -> Step:
    return Step("apply", path)


def apply_masked(path: str) -> Step:
    return Step("apply_masked", path)


def pool(how: str) -> Step:
    return Step("pool", how)


@dataclass(frozen=True)
class TowerParts:
    """Module paths of one architecture, relative to its base model (``AutoModel.from_config``)."""

    modality: str  # "text" | "image"
    embed: tuple[str, ...]  # modules applied in order to the raw input
    layers: str  # the ModuleList of transformer layers (or ALBERT's layer groups)
    pooled: tuple[Step, ...]  # steps from the last layer's output to the model's pooler_output
    attention: str = "bidirectional"  # how the text attention mask is built
    shared_groups: bool = False  # ALBERT: layer i uses group int(i / (L / G))

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")


_BERT_LIKE = TowerParts("text", ("embeddings",), "encoder.layer", (apply("pooler"),))

#: Base models (as ``AutoModel`` builds them from the tower's config), by ``model_type``.
PARTS: dict[str, TowerParts] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "albert": TowerParts(
        "text",
        ("embeddings", "encoder.embedding_hidden_mapping_in"),
        "encoder.albert_layer_groups",
        (pool("cls"), apply("pooler"), apply("pooler_activation")),
        shared_groups=True,
    ),
    "clip_text_model": TowerParts(
        "text", ("embeddings",), "encoder.layers", (apply("final_layer_norm"), pool("eos")), attention="causal"
    ),
    "siglip_text_model": TowerParts(
        "text",
        ("embeddings",),
        "encoder.layers",
        (apply("final_layer_norm"), pool("last"), apply("head")),
        attention="none",
    ),
    # ChineseCLIPModel builds its text model without a pooler and takes the [CLS] state
    "chinese_clip_text_model": TowerParts("text", ("embeddings",), "encoder.layer", (pool("cls"),)),
    "vit": TowerParts("image", ("embeddings",), "layers", (apply("layernorm"), apply("pooler"))),
    "clip_vision_model": TowerParts(
        "image", ("embeddings", "pre_layrnorm"), "encoder.layers", (pool("cls"), apply("post_layernorm"))
    ),
    "chinese_clip_vision_model": TowerParts(
        "image", ("embeddings", "pre_layrnorm"), "encoder.layers", (pool("cls"), apply("post_layernorm"))
    ),
    "siglip_vision_model": TowerParts(
        "image", ("embeddings",), "encoder.layers", (apply("post_layernorm"), apply("head"))
    ),
    "siglip2_text_model": TowerParts(
        "text", ("embeddings",), "encoder.layers", (apply("final_layer_norm"), pool("last"), apply("head"))
    ),
    # NaFlex: patches of a variable grid (spatial_shapes), padded and masked; the pooling head takes the mask
    "siglip2_vision_model": TowerParts(
        "image",
        ("embeddings",),
        "encoder.layers",
        (apply("post_layernorm"), apply_masked("head")),
        attention="patches",
    ),
}


def parts_for(config, tower: str, supported: tuple[str, ...] | None = None) -> TowerParts:
    parts = PARTS.get(config.model_type)
    names = supported or tuple(sorted(k for k, v in PARTS.items() if v.modality == tower))
    if parts is None or parts.modality != tower or config.model_type not in names:
        raise ModelError(
            f"{tower} tower: architecture {config.model_type!r} is not supported; supported: {list(names)}"
        )
    return parts


def num_layers(config) -> int:
    return int(config.num_hidden_layers)


def module_index(config, parts: TowerParts, layer: int) -> int:
    """Index into ``parts.layers`` that runs transformer layer *layer*."""
    if not parts.shared_groups:
        return layer
    groups = int(config.num_hidden_groups)
    return int(layer / (config.num_hidden_layers / groups))


def layer_paths(config, parts: TowerParts, prefix: str = "") -> tuple[str, ...]:
    return tuple(f"{prefix}{parts.layers}.{module_index(config, parts, i)}" for i in range(num_layers(config)))


def get_module(module, dotted: str):
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def import_modelling_libraries() -> None:
    """Import torch and transformers' shared modelling code (what every tower needs), so a
    stage actor can tell library import time from model load time."""
    import torch  # noqa: F401
    import transformers.modeling_utils  # noqa: F401


def meta_model(config, **kwargs):
    """The full model on the meta device: structure and parameter names, no memory."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        try:
            return AutoModel.from_config(config, **kwargs)
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
                    "re-save it with this transformers version: AutoModel.from_pretrained(d).save_pretrained(d2)"
                )
        else:
            new = key
        if new in wanted:
            out[new] = key
    return out
