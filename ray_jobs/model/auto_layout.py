"""The stage layout a run uses, and why: ``num_stages: auto`` decides it from memory and the data.

* An explicit stage spec, or an integer ``num_stages`` (the layers balanced into K stages by
  the checkpoint's cost estimate), is used as given.
* ``auto``: if the whole model fits one stage actor's memory (its weights in the run's dtype
  plus the activations of one batch, :mod:`ray_jobs.model.stage_memory`), the job runs one
  stage holding every layer, its actor pool (``stage_pool``) being the replicas: data
  parallel. Otherwise it uses the fewest stages whose every stage fits, the layers split to
  minimise the slowest stage, each layer priced at the data's shapes (:mod:`ray_jobs.perf.data_sample`:
  captions padded to a batch's longest, not to the tokenizer's maximum).
* The memory a stage may hold is ``max_stage_memory`` when set; else, for GPU stages, the
  visible GPU's memory times the stage's GPUs (less :data:`GPU_RESERVE` for the CUDA context
  and the allocator), or :data:`DEFAULT_GPU_STAGE_MEMORY` where no GPU is visible; for CPU
  stages :data:`DEFAULT_CPU_STAGE_MEMORY`.

``check_inputs`` decides once per run and passes the spec to every job as ``--auto-stages``;
a job may then rebalance it from the run's committed partitions (:mod:`ray_jobs.perf.rebalance`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ray_jobs.errors import StageSpecError
from ray_jobs.model.stage_memory import ModelMemory, WholeModelMemory, format_bytes
from ray_jobs.model.stage_spec import (
    TOWERS,
    StageLayout,
    balanced_spec,
    default_resources,
    parse_spec,
    resolve,
    stage_ranges,
)

#: What a CPU stage actor may hold when ``max_stage_memory`` is not set: a modest worker's share
#: (a 4-CPU, 16 GiB pod runs a few actors beside the object store).
DEFAULT_CPU_STAGE_MEMORY = 4 * 1024**3
#: What a GPU stage may hold where no GPU is visible to the decision (the smallest common data-
#: centre GPU, 16 GiB); set ``max_stage_memory`` for the GPUs the cluster really has.
DEFAULT_GPU_STAGE_MEMORY = 16 * 1024**3
#: Share of a GPU's memory kept for the CUDA context and the caching allocator.
GPU_RESERVE = 0.1


def visible_gpu() -> tuple[str, int] | None:
    """Name and total bytes of the first CUDA device this process sees, or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, int(props.total_memory)


def memory_limit(settings, gpu: Callable[[], tuple[str, int] | None] = visible_gpu) -> tuple[int, str]:
    """Bytes one stage actor may hold, and where that figure comes from (*settings*: the
    :class:`~ray_jobs.config.settings.StageSettings`)."""
    if settings.max_stage_memory is not None:
        return settings.max_stage_memory_bytes, f"max_stage_memory {settings.max_stage_memory}"
    if settings.stage_num_gpus > 0:
        share = min(1.0, settings.stage_num_gpus)
        seen = gpu()
        if seen is not None:
            name, total = seen
            usable = int(total * share * (1 - GPU_RESERVE))
            return usable, f"GPU {name} {format_bytes(total)} x {share:g} gpus, less {GPU_RESERVE:.0%} reserve"
        usable = int(DEFAULT_GPU_STAGE_MEMORY * share)
        return usable, f"{format_bytes(DEFAULT_GPU_STAGE_MEMORY)} per GPU assumed (no GPU visible here)"
    return DEFAULT_CPU_STAGE_MEMORY, f"default for CPU stages {format_bytes(DEFAULT_CPU_STAGE_MEMORY)}"


def layer_costs_at(memory: ModelMemory, seq: Mapping[str, float]) -> dict[str, list[float]]:
    """Rough FLOPs per row of each layer at *seq* tokens per tower (the data's shapes)."""
    from ray_jobs.model.tower_def import layer_flops

    out = {}
    for tower in TOWERS:
        m = memory.towers[tower]
        out[tower] = [layer_flops(m.hidden, m.intermediate, seq.get(tower, m.seq_len))] * m.num_layers
    return out


def data_layer_costs(ckpt, dtype: str, text_seq: float | None) -> dict[str, list[float]]:
    """Each layer's rough FLOPs with captions of *text_seq* tokens (None: the checkpoint's max
    length): what a measured stage's time is spread over its layers by when rebalancing. A twin
    tower's figures come from its JSON (no torch); other formats' from their towers."""
    light = WholeModelMemory.of(ckpt, dtype)
    memory = light.memory if light is not None else ModelMemory.of(ckpt, dtype)
    return layer_costs_at(memory, {} if text_seq is None else {"text": text_seq})


@dataclass(frozen=True)
class LayoutDecision:
    """The layout and the figures it was chosen from (memory figures only for ``auto``)."""

    layout: StageLayout
    how: str  # "data parallel", "pipeline", "stage spec", "num_stages K", "auto, as resolved for the run"
    reason: str
    batch_size: int
    model_bytes: int | None = None
    activation_bytes: int | None = None
    stage_bytes: tuple[int, ...] = ()
    limit_bytes: int | None = None
    limit_source: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    data_line: str = ""

    @property
    def replicas(self) -> str:
        return ", ".join(f"{s.resources.min_pool}-{s.resources.max_pool}" for s in self.layout.stages)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "how": self.how,
            "reason": self.reason,
            "stages": len(self.layout.stages),
            "replicas": self.replicas,
            "spec": self.layout.spec(),
            "batch_size": self.batch_size,
        }
        if self.model_bytes is not None:
            out.update(
                model_bytes=self.model_bytes,
                activation_bytes=self.activation_bytes,
                stage_bytes=list(self.stage_bytes),
                limit_bytes=self.limit_bytes,
                limit_source=self.limit_source,
            )
        if self.data:
            out["data"] = self.data
        return out

    def lines(self) -> list[str]:
        n = len(self.layout.stages)
        out = [f"layout: {self.how}: {n} stage(s), actor pool(s) {self.replicas}; {self.reason}"]
        if self.model_bytes is not None:
            per_stage = ", ".join(format_bytes(b) for b in self.stage_bytes)
            out.append(
                f"layout inputs: model weights {format_bytes(self.model_bytes)} ({self.layout_dtype}), activations "
                f"~{format_bytes(self.activation_bytes or 0)} at batch {self.batch_size}; a stage may hold "
                f"{format_bytes(self.limit_bytes or 0)} ({self.limit_source}); per stage {per_stage}"
            )
        if self.data_line:
            out.append(f"layout inputs: {self.data_line}")
        out.append(f"layout spec: {self.layout.spec()}")
        return out

    @property
    def layout_dtype(self) -> str:
        return str(self.data.get("dtype", ""))


def _split(layout_ranges, defaults) -> list[tuple[list[tuple], Any]]:
    return [(ranges, defaults) for ranges in layout_ranges]


def decide_layout(ckpt, settings, batch_size: int, shapes=None, gpu=visible_gpu) -> LayoutDecision:
    """The layout of *settings* (a :class:`~ray_jobs.config.settings.StageSettings`) for *ckpt*;
    *shapes* (:class:`~ray_jobs.perf.data_sample.DataShapes`): the data's, for ``auto``."""
    from ray_jobs.model.staged import build_layout

    defaults = default_resources(settings)
    if settings.stages:
        layout = build_layout(ckpt, spec=settings.stages, defaults=defaults)
        return LayoutDecision(layout, "stage spec", "as given", batch_size)
    if not settings.auto:
        layout = build_layout(ckpt, num_stages=int(settings.num_stages), defaults=defaults)
        return LayoutDecision(layout, f"num_stages {settings.num_stages}", "layers balanced as given", batch_size)
    if settings.auto_stages:
        layout = build_layout(ckpt, spec=settings.auto_stages, defaults=defaults)
        return LayoutDecision(layout, "auto, as resolved for the run", "from check_inputs", batch_size)
    return _auto(ckpt, settings, batch_size, shapes, gpu, defaults)


def _auto(ckpt, settings, batch_size: int, shapes, gpu, defaults) -> LayoutDecision:
    limit, source = memory_limit(settings, gpu)
    # a twin tower's JSON and weight headers tell whether it fits, without importing torch
    light = WholeModelMemory.of(ckpt, settings.dtype)
    memory = light.memory if light is not None else ModelMemory.of(ckpt, settings.dtype)
    seq = {t: float(m.seq_len) for t, m in memory.towers.items()}
    data: dict[str, Any] = {"dtype": settings.dtype}
    data_line = ""
    if shapes is not None and shapes.text_tokens:
        seq["text"] = shapes.text_seq(batch_size)
        data.update(shapes.to_dict())
        data_line = shapes.line(batch_size)
    data["tokens_per_row"] = {t: round(s, 1) for t, s in seq.items()}
    counts = ckpt.layer_counts()
    whole = memory.whole()
    weights = light.weights if light is not None else memory.weights(whole)
    acts = memory.activations(whole, batch_size, seq)
    common = dict(
        batch_size=batch_size,
        model_bytes=weights,
        activation_bytes=acts,
        limit_bytes=limit,
        limit_source=source,
        data=data,
        data_line=data_line,
    )
    if weights + acts <= limit:
        layout = resolve(parse_spec("text,image", defaults), counts)
        reason = (
            f"the whole model ({format_bytes(weights + acts)}) fits one stage ({format_bytes(limit)}): "
            f"one stage, its pool {defaults.min_pool}-{defaults.max_pool} the replicas"
        )
        return LayoutDecision(layout, "data parallel", reason, stage_bytes=(weights + acts,), **common)
    if light is not None:  # a split needs each layer's bytes: the towers' meta modules
        memory = ModelMemory.of(ckpt, settings.dtype)
    costs = layer_costs_at(memory, seq)
    sized: dict[tuple[int, int], int] = {}

    def stage_size(lo: int, hi: int) -> int:
        if (lo, hi) not in sized:
            sized[lo, hi] = memory.stage_bytes(stage_ranges(counts, lo, hi), batch_size, seq)
        return sized[lo, hi]

    n = sum(counts.values())
    k = _fewest_stages(n, lambda lo, hi: stage_size(lo, hi) <= limit)
    if k is None:
        biggest = max(stage_size(i, i + 1) for i in range(n))
        raise StageSpecError(
            f"num_stages auto: the model does not fit even one layer per stage: a layer with its activations needs "
            f"{format_bytes(biggest)}, a stage may hold {format_bytes(limit)} ({source}); raise max_stage_memory, "
            "lower batch_size, or use a smaller dtype"
        )
    parsed = balanced_spec(max(2, k), costs, fits=lambda lo, hi: stage_size(lo, hi) <= limit)
    layout = resolve(_split(parsed, defaults), counts)
    per_stage = tuple(
        memory.stage_bytes([(r.tower, r.start, r.stop - 1) for r in s.ranges], batch_size, seq) for s in layout.stages
    )
    reason = (
        f"the whole model ({format_bytes(weights + acts)}) exceeds one stage ({format_bytes(limit)}): "
        f"the fewest stages that fit, balanced on the layers' costs at the data's shapes"
    )
    return LayoutDecision(layout, "pipeline", reason, stage_bytes=per_stage, **common)


def _fewest_stages(n: int, fits: Callable[[int, int], bool]) -> int | None:
    """The fewest contiguous stages of *n* items whose every stage *fits* (None: one item does
    not). A stage's bytes only grow as it takes more layers, so filling each stage as far as it
    fits, in order, uses the fewest."""
    stages, lo = 0, 0
    while lo < n:
        if not fits(lo, lo + 1):
            return None
        hi = lo + 1
        while hi < n and fits(lo, hi + 1):
            hi += 1
        stages, lo = stages + 1, hi
    return stages
