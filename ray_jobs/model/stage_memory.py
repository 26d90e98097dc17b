"""What a stage holds in memory: its layers' weights in the chosen dtype, and an estimate of its
activations at the batch size. Read from the towers' meta-device modules (shapes only: no
weight is loaded), so it works for any checkpoint format the towers describe.

The activation estimate is the peak inside one transformer layer in inference (no autograd):
the layer's input and output hidden states, query/key/value, the MLP's intermediate tensor and
one attention-score matrix per head, ``batch x dtype bytes x (seq x (4 x hidden + intermediate)
+ heads x seq^2)``, plus, for every tower the stage runs, the hidden state it keeps (``batch x
seq x hidden``) and, where it owns the image embedding, the pixels as float32. Real peaks depend
on the attention kernel; the estimate errs on the high side (a kernel that fuses attention never
holds the score matrix).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ray_jobs.model.stage_spec import TOWERS

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def module_bytes(module, dtype_bytes: int) -> int:
    """Bytes of *module*'s parameters and buffers once cast to a float dtype of *dtype_bytes*
    (integer buffers keep their own size); works on meta-device modules."""
    total = 0
    for t in (*module.parameters(), *module.buffers()):
        size = dtype_bytes if t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total


@dataclass(frozen=True)
class TowerMemory:
    """One tower's weight bytes by piece and the figures its activations scale with."""

    tower: str
    embed_bytes: int
    layer_paths: tuple[str, ...]  # one per layer; a shared layer repeats its path
    path_bytes: Mapping[str, int]
    head_bytes: int
    hidden: int
    intermediate: int
    heads: int
    seq_len: int  # tokens per row at the checkpoint's input size (text: its max length)
    input_elems: int = 0  # per row, converted to float32 by the stage owning the embedding (pixels)

    @property
    def num_layers(self) -> int:
        return len(self.layer_paths)

    def weights(self, first: int, last: int) -> int:
        """Bytes of layers *first* .. *last* (a shared module once), with the embedding and head
        when the range starts at layer 0 or ends at the last layer."""
        out = sum(self.path_bytes[p] for p in set(self.layer_paths[first : last + 1]))
        if first == 0:
            out += self.embed_bytes
        if last == self.num_layers - 1:
            out += self.head_bytes
        return out

    def layer_peak(self, batch: int, seq: float, dtype_bytes: int) -> float:
        return batch * dtype_bytes * (seq * (4 * self.hidden + self.intermediate) + self.heads * seq * seq)

    def state(self, batch: int, seq: float, dtype_bytes: int) -> float:
        return batch * dtype_bytes * seq * self.hidden


def _tower_memory(spec, dtype_bytes: int) -> TowerMemory:
    from ray_jobs.model.towers import get_module

    cfg = spec.config
    paths = {*spec.embed, *spec.layers, *spec.head_paths}
    sizes = {p: module_bytes(get_module(spec.meta, p), dtype_bytes) for p in paths}
    hidden = int(cfg.hidden_size)
    input_elems = 0
    if spec.tower == "image":
        size = int(getattr(cfg, "image_size", 0) or 0)
        channels = int(getattr(cfg, "num_channels", 3) or 3)
        input_elems = size * size * channels
    return TowerMemory(
        tower=spec.tower,
        embed_bytes=sum(sizes[p] for p in spec.embed),
        layer_paths=tuple(spec.layers),
        path_bytes={p: sizes[p] for p in spec.layers},
        head_bytes=sum(sizes[p] for p in spec.head_paths),
        hidden=hidden,
        intermediate=int(getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden),
        heads=int(getattr(cfg, "num_attention_heads", 1) or 1),
        seq_len=int(spec.seq_len),
        input_elems=input_elems,
    )


@dataclass(frozen=True)
class ModelMemory:
    """The model's memory figures in one dtype; stages are lists of ``(tower, first, last)``."""

    towers: Mapping[str, TowerMemory]
    dtype: str

    @classmethod
    def of(cls, ckpt, dtype: str) -> ModelMemory:
        b = DTYPE_BYTES[dtype]
        return cls({t: _tower_memory(ckpt.tower(t), b) for t in TOWERS}, dtype)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def whole(self) -> list[tuple[str, int, int]]:
        return [(t, 0, m.num_layers - 1) for t, m in self.towers.items()]

    def weights(self, ranges: Sequence[tuple[str, int, int]]) -> int:
        return sum(self.towers[t].weights(a, b) for t, a, b in ranges)

    def activations(self, ranges: Sequence[tuple[str, int, int]], batch: int, seq: Mapping[str, float]) -> int:
        b = self.dtype_bytes
        peak = kept = 0.0
        for tower, first, _ in ranges:
            m = self.towers[tower]
            s = seq.get(tower, m.seq_len)
            peak = max(peak, m.layer_peak(batch, s, b))
            kept += m.state(batch, s, b)
            if first == 0:
                kept += batch * m.input_elems * 4
        return int(peak + kept)

    def stage_bytes(self, ranges: Sequence[tuple[str, int, int]], batch: int, seq: Mapping[str, float]) -> int:
        return self.weights(ranges) + self.activations(ranges, batch, seq)


def format_bytes(n: float) -> str:
    """``1.5 GiB``, ``300.0 MiB``, ``12.0 KiB``, ``512 B``."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_ELEMENT_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _json_figures(cfg: dict, tower: str, text_len: int) -> tuple[int, int, int, int, int, int] | None:
    """``(layers, hidden, intermediate, heads, seq_len, input_elems)`` where the config states them all."""
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
    if tower == "image":
        keys += ("image_size", "patch_size")
    if not all(isinstance(cfg.get(k), int) and cfg[k] > 0 for k in keys):
        return None
    if tower == "image":
        size, channels = cfg["image_size"], int(cfg.get("num_channels", 3) or 3)
        seq, elems = (size // cfg["patch_size"]) ** 2 + 1, size * size * channels
    else:
        seq, elems = text_len, 0
    layers, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    return layers, hidden, cfg["intermediate_size"], heads, seq, elems


@dataclass(frozen=True)
class WholeModelMemory:
    """The whole model's weight bytes (from the safetensors headers) and a :class:`ModelMemory`
    whose towers carry only the figures activations scale with: enough to tell whether the
    model fits one stage without importing torch. Where it does not, :meth:`ModelMemory.of`
    gives the per-layer bytes a split needs."""

    weights: int
    memory: ModelMemory

    @classmethod
    def of(cls, ckpt, dtype: str) -> WholeModelMemory | None:
        """From a twin-tower checkpoint's tower configs and weight headers; None for a format
        (or a config) that does not state every figure in its JSON."""
        import json
        import os

        from ray_jobs.model.safetensors_io import SafetensorsIndex

        if not hasattr(ckpt, "tower_local_dir"):
            return None
        b = DTYPE_BYTES[dtype]
        towers = {}
        for tower in TOWERS:
            with open(os.path.join(ckpt.tower_local_dir(tower), "config.json")) as fh:
                figures = _json_figures(json.load(fh), tower, ckpt.text_processing.max_length)
            if figures is None:
                return None
            n, hidden, inter, heads, seq, elems = figures
            names = tuple(f"layer{i}" for i in range(n))
            towers[tower] = TowerMemory(tower, 0, names, dict.fromkeys(names, 0), 0, hidden, inter, heads, seq, elems)
        indices = [SafetensorsIndex(ckpt.tower_uri(t)) for t in TOWERS]
        indices.append(SafetensorsIndex(ckpt.uri, os.path.basename(ckpt.projection_uri)))
        weights = 0
        for index in indices:
            for entry in index.entries.values():
                count = 1
                for d in entry.shape:
                    count *= d
                weights += count * (b if entry.dtype in _FLOAT_DTYPES else _ELEMENT_BYTES.get(entry.dtype, 4))
        return cls(weights, ModelMemory(towers, dtype))
