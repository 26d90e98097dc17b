"""One pipeline stage of the twin tower: only its layers, only its tensors.

:class:`StageModule` is the torch module of a stage; :class:`ModelStage` is the Ray Data
callable class that wraps it on an actor (numpy batches in and out, hidden states carried
between stages as columns, one bad row isolated instead of failing the batch).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from ray_jobs.errors import TransientFailure
from ray_jobs.model.checkpoint import TwinTowerCheckpoint
from ray_jobs.model.image_ops import pixels_to_tensor, pool, target_size
from ray_jobs.model.safetensors_io import SafetensorsIndex
from ray_jobs.model.stage_spec import StageLayout, StageResources, balanced_spec, parse_spec, resolve
from ray_jobs.model.towers import TowerPieces, num_layers

log = logging.getLogger(__name__)

#: Batch columns that flow between stages.
HIDDEN = {"text": "text_hidden", "image": "image_hidden"}
EMBEDDING = {"text": "text_embedding", "image": "image_embedding"}
INPUTS = {"text": ("input_ids", "attention_mask"), "image": ("pixels",)}


def tower_layer_counts(ckpt: TwinTowerCheckpoint) -> dict[str, int]:
    return {t: num_layers(ckpt.hf_config(t)) for t in ("text", "image")}


def layer_costs(ckpt: TwinTowerCheckpoint) -> dict[str, list[float]]:
    """Rough per-layer FLOPs of each tower at the lengths this checkpoint runs at."""
    costs = {}
    h, w = target_size(ckpt.image_processing)
    for tower in ("text", "image"):
        cfg = ckpt.hf_config(tower)
        if tower == "text":
            seq = ckpt.config.text_max_length
        else:
            seq = (h // cfg.patch_size) * (w // cfg.patch_size) + 1
        hid, inter = cfg.hidden_size, cfg.intermediate_size
        per_layer = seq * (4 * hid * hid + 2 * hid * inter) + 2 * seq * seq * hid
        costs[tower] = [float(per_layer)] * num_layers(cfg)
    return costs


def build_layout(
    ckpt: TwinTowerCheckpoint,
    *,
    num_stages: int | None = None,
    spec: str | None = None,
    defaults: StageResources | None = None,
) -> StageLayout:
    """A validated layout from an explicit *spec* or a balanced split into *num_stages*."""
    counts = tower_layer_counts(ckpt)
    defaults = defaults or StageResources()
    if spec:
        parsed = parse_spec(spec, defaults)
    else:
        parsed = [(ranges, defaults) for ranges in balanced_spec(num_stages or 1, layer_costs(ckpt))]
    return resolve(parsed, counts)


class TowerSegment:
    """Consecutive layers of one tower, plus its embedding and/or head when the stage owns them."""

    def __init__(self, ckpt: TwinTowerCheckpoint, tower: str, start: int, stop: int, embed: bool, head: bool):
        import torch

        cfg = ckpt.hf_config(tower)
        index = SafetensorsIndex(ckpt.tower_uri(tower))
        pieces = TowerPieces(cfg, tower, index.names())
        self.tower, self.config, self.start, self.stop = tower, cfg, start, stop
        self.has_embed, self.has_head = embed, head
        self.pooling = ckpt.config.text_pooling if tower == "text" else ckpt.config.image_pooling
        self.processing = ckpt.image_processing if tower == "image" else {}
        self.modules = torch.nn.ModuleDict()
        self.loaded_keys: list[str] = []
        needed: dict[str, tuple[str, str]] = {}  # checkpoint key -> (module name, local key)

        def add(name: str, path: str) -> None:
            module, keys = pieces.build(path)
            self.modules[name] = module
            for local, ckpt_key in keys.items():
                needed[ckpt_key] = (name, local)

        if embed:
            for n, path in enumerate(pieces.layout.embed):
                add(f"embed{n}", path)
        self.block_names = []
        for layer in range(start, stop):
            path = pieces.layer_path(layer)
            name = "block_" + path.rsplit(".", 1)[1]
            if name not in self.modules:
                add(name, path)
            self.block_names.append(name)
        if head and pieces.layout.final:
            add("final", pieces.layout.final)
        tensors = index.load(needed)
        for ckpt_key, (name, local) in needed.items():
            self._assign(self.modules[name], local, tensors[ckpt_key])
        self.loaded_keys = sorted(needed)
        if head:
            proj = SafetensorsIndex(ckpt.uri, filename="projection.safetensors")
            key = f"{tower}_projection.weight"
            weight = proj.load([key])[key]
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            linear.weight.data.copy_(weight)
            self.modules["projection"] = linear
            self.loaded_keys.append(f"projection.safetensors:{key}")
        self.modules.eval()

    @staticmethod
    def _assign(module, local_key: str, tensor) -> None:
        target = module.get_parameter(local_key) if local_key in dict(module.named_parameters()) else None
        if target is None:
            target = module.get_buffer(local_key)
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(
                f"tensor {local_key}: checkpoint shape {tuple(tensor.shape)} != model {tuple(target.shape)}"
            )
        target.data.copy_(tensor.to(target.dtype))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.modules.parameters())

    def forward(self, cols: Mapping[str, object], device) -> dict[str, object]:
        """Run this segment on torch tensors; returns the columns it produces."""
        import torch

        mask = None
        if self.tower == "text":
            mask = cols["attention_mask"]
        if self.has_embed:
            if self.tower == "text":
                hidden = cols["input_ids"]
                for n in range(sum(1 for k in self.modules if k.startswith("embed"))):
                    hidden = self.modules[f"embed{n}"](hidden)
            else:
                hidden = pixels_to_tensor(cols["pixels"], self.processing, device)
                hidden = self.modules["embed0"](hidden)
        else:
            hidden = cols[HIDDEN[self.tower]]
        attn = None
        if mask is not None:
            from transformers.masking_utils import create_bidirectional_mask

            attn = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)
        for name in self.block_names:
            out = self.modules[name](hidden, attn)
            hidden = out[0] if isinstance(out, tuple) else out
        if not self.has_head:
            return {HIDDEN[self.tower]: hidden}
        if "final" in self.modules:
            hidden = self.modules["final"](hidden)
        pooled = pool(hidden, mask, self.pooling)
        emb = torch.nn.functional.normalize(self.modules["projection"](pooled), dim=-1)
        return {EMBEDDING[self.tower]: emb}


class StageModule:
    """All tower segments of one stage of a layout."""

    def __init__(self, ckpt: TwinTowerCheckpoint, layout: StageLayout, stage_index: int, device: str = "cpu"):
        import torch

        self.stage = layout.stages[stage_index]
        self.device = torch.device(device)
        self.segments = []
        for r in self.stage.ranges:
            seg = TowerSegment(
                ckpt,
                r.tower,
                r.start,
                r.stop,
                layout.owns_embed(self.stage, r.tower),
                layout.owns_head(self.stage, r.tower),
            )
            seg.modules.to(self.device)
            self.segments.append(seg)

    @property
    def loaded_keys(self) -> list[str]:
        return [f"{s.tower}:{k}" for s in self.segments for k in s.loaded_keys]

    def num_parameters(self) -> int:
        return sum(s.num_parameters() for s in self.segments)

    def consumed(self) -> set[str]:
        """Input columns no later stage needs once this stage has run."""
        out = set()
        for s in self.segments:
            if s.has_embed:
                out.add("input_ids" if s.tower == "text" else "pixels")
            if not s.has_embed:
                out.add(HIDDEN[s.tower])
            if s.has_head and s.tower == "text":
                out.add("attention_mask")
        return out

    def run(self, cols: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """numpy in, numpy out, for rows that are all valid."""
        import torch

        with torch.inference_mode():
            tensors = {}
            for k, v in cols.items():
                if isinstance(v, np.ndarray) and v.dtype != object:
                    t = torch.from_numpy(np.ascontiguousarray(v))
                    tensors[k] = t.to(self.device, non_blocking=True) if self.device.type != "cpu" else t
            out = {}
            for seg in self.segments:
                out.update(seg.forward(tensors, self.device))
            return {k: v.detach().to("cpu", torch.float32).numpy() for k, v in out.items()}


def _select(batch: Mapping[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in batch.items()}


class ModelStage:
    """Ray Data callable class for one stage; one instance per actor in the stage's pool."""

    def __init__(self, model_uri: str, layout_spec: str, stage_index: int, num_threads: int | None = None):
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        ckpt = TwinTowerCheckpoint(model_uri)
        layout = resolve(parse_spec(layout_spec), tower_layer_counts(ckpt))
        stage = layout.stages[stage_index]
        device = "cuda" if stage.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.name = stage.name
        self.module = StageModule(ckpt, layout, stage_index, device)
        self.drop = self.module.consumed()
        log.info("%s loaded %d parameters on %s", self.name, self.module.num_parameters(), device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the stage on the batch's valid rows.

        An out-of-memory error halves the rows and tries again, down to one row. Any other
        error is retried row by row: a row that fails alone while others succeed is rejected
        (``model error``); when every row fails alone, the stage itself is broken and the batch
        fails with :class:`~ray_jobs.errors.TransientFailure` (Ray Data retries the task, then
        the job fails): infrastructure faults are never committed as rejects."""
        batch = dict(batch)
        for col in ("ok", "reject_stage", "reject_reason"):  # Arrow-backed arrays are read-only
            batch[col] = np.array(batch[col], copy=True)
        ok = batch["ok"].astype(bool)
        rows = np.flatnonzero(ok)
        n = len(ok)
        try:
            if len(rows):
                try:
                    produced = self._run_halving(batch, rows)
                except Exception as exc:
                    if _is_oom(exc):
                        raise
                    log.warning("%s: batch failed (%s); retrying row by row", self.name, exc)
                    produced, rows = self._row_by_row(batch, rows, exc)
            else:  # nothing valid: shapes from one placeholder row, values discarded
                produced = self.module.run(_select(batch, [0]))
        except TransientFailure:
            raise
        except Exception as exc:
            kind = "out of memory even for one row" if _is_oom(exc) else "failed"
            raise TransientFailure(f"{self.name}: {kind}: {type(exc).__name__}: {exc}"[:500]) from exc
        out = {k: v for k, v in batch.items() if k not in self.drop}
        for col, values in produced.items():
            full = np.zeros((n, *values.shape[1:]), dtype=values.dtype)
            if len(rows):
                full[rows] = values[: len(rows)]
            out[col] = full
        return out

    def _run_halving(self, batch, rows) -> dict[str, np.ndarray]:
        try:
            return self.module.run(_select(batch, rows))
        except Exception as exc:
            if not _is_oom(exc) or len(rows) == 1:
                raise
            _free_device_memory()
            half = len(rows) // 2
            log.warning("%s: out of memory on %d rows (%s); halving", self.name, len(rows), exc)
            first, second = self._run_halving(batch, rows[:half]), self._run_halving(batch, rows[half:])
            return {k: np.concatenate([first[k], second[k]]) for k in first}

    def _row_by_row(self, batch, rows, batch_error: Exception):
        good, results, failed = [], [], []
        for r in rows:
            try:
                results.append(self.module.run(_select(batch, [r])))
                good.append(r)
            except Exception as exc:
                if _is_oom(exc):
                    raise
                failed.append((r, exc))
        if not results:
            raise TransientFailure(
                f"{self.name}: the batch and each of its {len(rows)} rows failed alone, so the stage is at fault, "
                f"not the rows: {type(batch_error).__name__}: {batch_error}"[:500]
            )
        for r, exc in failed:
            batch["ok"][r] = False
            batch["reject_stage"][r] = self.name
            batch["reject_reason"][r] = f"model error: {type(exc).__name__}: {exc}"[:500]
        merged = {k: np.concatenate([r[k] for r in results]) for k in results[0]}
        return merged, np.array(good, dtype=np.int64)


def _is_oom(exc: BaseException) -> bool:
    """A CUDA / CPU allocator out-of-memory error (a property of the batch size, not of a row)."""
    if isinstance(exc, MemoryError):
        return True
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "not enough memory" in msg


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
