"""One pipeline stage of the model (any supported checkpoint format): only its layers, only its tensors.

:class:`StageModule` is the torch module of a stage; :class:`ModelStage` is the Ray Data
callable class that wraps it on an actor (numpy batches in and out, hidden states carried
between stages as columns, one bad row isolated instead of failing the batch).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from ray_jobs.errors import TransientFailure
from ray_jobs.model.checkpoint import open_checkpoint
from ray_jobs.model.checkpoint_base import Checkpoint
from ray_jobs.model.image_ops import pixels_to_tensor
from ray_jobs.model.precision import check_device, from_numpy, to_numpy, torch_dtype
from ray_jobs.model.stage_spec import StageLayout, StageResources, balanced_spec, parse_spec, resolve

log = logging.getLogger(__name__)

#: Batch columns that flow between stages.
HIDDEN = {"text": "text_hidden", "image": "image_hidden"}
EMBEDDING = {"text": "text_embedding", "image": "image_embedding"}
INPUTS = {"text": ("input_ids", "attention_mask"), "image": ("pixels",)}


def build_layout(
    ckpt: Checkpoint,
    *,
    num_stages: int | None = None,
    spec: str | None = None,
    defaults: StageResources | None = None,
) -> StageLayout:
    """A validated layout from an explicit *spec* or a balanced split into *num_stages*."""
    counts = ckpt.layer_counts()
    defaults = defaults or StageResources()
    if spec:
        parsed = parse_spec(spec, defaults)
    else:
        parsed = [(ranges, defaults) for ranges in balanced_spec(num_stages or 1, ckpt.layer_costs())]
    return resolve(parsed, counts)


def _dense(values: np.ndarray) -> np.ndarray:
    """A column Ray Data handed over as variable-shaped (rows padded to different lengths in
    different blocks) -> one array, right-padded with zeros (masked out: attention mask 0)."""
    if values.dtype != object or not len(values) or not isinstance(values[0], np.ndarray):
        return values
    shape = tuple(max(v.shape[d] for v in values) for d in range(values[0].ndim))
    out = np.zeros((len(values), *shape), dtype=values[0].dtype)
    for i, v in enumerate(values):
        out[(i, *(slice(0, s) for s in v.shape))] = v
    return out


class TowerSegment:
    """Consecutive layers of one tower, plus its embedding and/or head when the stage owns them."""

    def __init__(self, ckpt: Checkpoint, tower: str, start: int, stop: int, embed: bool, head: bool, dtype=None):
        import torch

        spec = ckpt.tower(tower)
        self.spec, self.tower, self.config, self.start, self.stop = spec, tower, spec.config, start, stop
        self.has_embed, self.has_head = embed, head
        self.dtype = dtype or torch.float32
        self.processing = ckpt.image_processing if tower == "image" and embed else None
        self.modules = torch.nn.ModuleDict()
        self.names: dict[str, str] = {}  # module path -> name in self.modules
        indexes: dict[int, object] = {}
        needed: dict[int, dict[str, list[tuple[str, str]]]] = {}  # file index -> tensor -> [(module, local key)]

        def add(path: str) -> str:
            if path in self.names:
                return self.names[path]
            name = f"m{len(self.names)}"
            module, keys = spec.build(path, self.dtype)
            self.modules[name] = module
            self.names[path] = name
            for local, (index, ckpt_key) in keys.items():
                indexes[id(index)] = index
                needed.setdefault(id(index), {}).setdefault(ckpt_key, []).append((name, local))
            return name

        self.embed_names = [add(p) for p in spec.embed] if embed else []
        self.block_names = [add(spec.layers[i]) for i in range(start, stop)]
        self.head_names = [add(p) for p in spec.head_paths] if head else []
        self.loaded_keys: list[str] = []
        for key_id, keys in needed.items():
            index = indexes[key_id]
            tensors = index.load(keys)
            for key, targets in keys.items():
                for name, local in targets:
                    self._assign(self.modules[name], local, tensors[key])
                self.loaded_keys.append(index.label(key))
        self.loaded_keys.sort()
        self.modules.to(self.dtype).eval()

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

        spec = self.spec
        mask = cols.get("attention_mask") if self.tower == "text" else None
        patches = self.tower == "image" and spec.attention == "patches"
        if patches:  # SigLIP 2: which of the padded patches are real follows from each row's grid
            shapes = cols["spatial_shapes"]
            n = cols["pixels"].shape[1] if self.has_embed else cols[HIDDEN["image"]].shape[1]
            mask = spec.patch_mask(shapes, n)
        if self.has_embed:
            if self.tower == "text":
                hidden = self.modules[self.embed_names[0]](input_ids=cols["input_ids"])
            elif patches:  # padding patches are zeros after normalisation, as the processor pads them
                pixels = pixels_to_tensor(cols["pixels"], self.processing, device, self.dtype)
                pixels = pixels * mask[..., None].to(pixels.dtype)
                hidden = self.modules[self.embed_names[0]](pixels, shapes)
            else:
                pixels = pixels_to_tensor(cols["pixels"], self.processing, device, self.dtype)
                hidden = self.modules[self.embed_names[0]](pixels)
            for name in self.embed_names[1:]:
                hidden = self.modules[name](hidden)
        else:
            hidden = cols[HIDDEN[self.tower]]
        attn = spec.attention_mask(hidden, mask) if self.block_names else None
        for name in self.block_names:
            out = self.modules[name](hidden, attn, **spec.layer_kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        if not self.has_head:
            return {HIDDEN[self.tower]: hidden}
        names = iter(self.head_names)
        for step in spec.head:
            if step.op == "pool":
                hidden = spec.pool(hidden, step.arg, mask, cols.get("input_ids"))
            else:
                args = (hidden, mask) if step.op == "apply_masked" else (hidden,)
                out = self.modules[next(names)](*args)
                hidden = out[0] if isinstance(out, tuple) else out
        emb = torch.nn.functional.normalize(hidden.float(), dim=-1)
        return {EMBEDDING[self.tower]: emb}


class StageModule:
    """All tower segments of one stage of a layout."""

    def __init__(
        self, ckpt: Checkpoint, layout: StageLayout, stage_index: int, device: str = "cpu", dtype: str = "float32"
    ):
        import torch

        check_device(dtype, device)
        self.stage = layout.stages[stage_index]
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        self.segments = []
        for r in self.stage.ranges:
            seg = TowerSegment(
                ckpt,
                r.tower,
                r.start,
                r.stop,
                layout.owns_embed(self.stage, r.tower),
                layout.owns_head(self.stage, r.tower),
                dtype=self.dtype,
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
            if s.has_embed and s.tower == "image":
                out.add("pixels")
            if s.tower == "text" and s.has_embed and (s.has_head or not s.spec.needs_input_ids_at_head):
                out.add("input_ids")
            if not s.has_embed:
                out.add(HIDDEN[s.tower])
            if s.has_head and s.tower == "text":
                out.update(("attention_mask", "input_ids"))
            if s.has_head and s.tower == "image":
                out.add("spatial_shapes")
        return out

    def run(self, cols: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """numpy in, numpy out, for rows that are all valid."""
        import torch

        with torch.inference_mode():
            tensors = {}
            for k, v in cols.items():
                v = _dense(v) if isinstance(v, np.ndarray) else v
                if not isinstance(v, np.ndarray) or v.dtype == object:
                    continue
                t = from_numpy(v, self.dtype) if k in HIDDEN.values() else torch.from_numpy(np.ascontiguousarray(v))
                tensors[k] = t.to(self.device, non_blocking=True) if self.device.type != "cpu" else t
            out = {}
            for seg in self.segments:
                out.update(seg.forward(tensors, self.device))
            return {k: to_numpy(v) for k, v in out.items()}


def _select(batch: Mapping[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in batch.items()}


def neutral_row(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One well-formed input row of *batch*'s shapes that holds none of its rows' data: token 0
    at every position, all attended; black pixels; zero hidden states; and for a patch-grid
    tower (SigLIP 2) a 1 x 1 grid (a rejected row carries ``(0, 0)``, which the model refuses).

    A stage runs it where it needs a row it knows is valid: for the output shapes of a batch
    without one valid row, and to tell a broken stage from rows that each break it."""
    out: dict[str, np.ndarray] = {}
    for k, v in batch.items():
        first = _dense(v)[:1]
        if first.dtype == object:
            out[k] = np.full(1, "", dtype=object)
        elif k in ("attention_mask", "spatial_shapes"):
            out[k] = np.ones_like(first)
        else:
            out[k] = np.zeros_like(first)
    return out


class ModelStage:
    """Ray Data callable class for one stage; one instance per actor in the stage's pool."""

    def __init__(
        self,
        model_uri: str,
        layout_spec: str,
        stage_index: int,
        num_threads: int | None = None,
        dtype: str = "float32",
        startup_scope: str = "",
    ):
        from ray_jobs.job.startup import ActorTimer

        timer = ActorTimer(f"stage{stage_index}", startup_scope)
        import torch

        from ray_jobs.model.towers import import_modelling_libraries

        import_modelling_libraries()  # counted as actor start, not model load
        if num_threads:
            torch.set_num_threads(num_threads)
        ckpt = open_checkpoint(model_uri)
        layout = resolve(parse_spec(layout_spec), ckpt.layer_counts())
        stage = layout.stages[stage_index]
        device = "cuda" if stage.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.name = stage.name
        with timer.model_load():
            self.module = StageModule(ckpt, layout, stage_index, device, dtype)
        self.drop = self.module.consumed()
        self.startup = timer.done()
        log.info("%s loaded %d parameters on %s", self.name, self.module.num_parameters(), device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the stage on the batch's valid rows.

        An out-of-memory error halves the rows and tries again, down to one row. Any other
        error is retried row by row. Rows that fail alone are rejected (``model error``) only
        once the stage has shown it works: some row of the batch succeeded, and a
        :func:`neutral_row` succeeds after the failures (so one bad row is a reject even when it
        is the batch's only valid row). When the neutral row fails too, the stage itself is
        broken and the batch fails with :class:`~ray_jobs.errors.TransientFailure` (Ray Data
        retries the task, then the job fails): infrastructure faults are never committed as rejects."""
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
            else:  # nothing valid: the output's shapes from a neutral row, its values discarded
                produced = self.module.run(neutral_row(batch))
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
        if failed:  # the rows' fault only if the stage works now, on a row known to be valid
            try:
                neutral = self.module.run(neutral_row(batch))
            except Exception as exc:
                if _is_oom(exc):
                    raise
                raise TransientFailure(
                    f"{self.name}: {len(failed)} of the batch's {len(rows)} rows failed alone and so did a neutral "
                    f"row, so the stage is at fault, not the rows: {type(batch_error).__name__}: {batch_error}"[:500]
                ) from exc
        for r, exc in failed:
            batch["ok"][r] = False
            batch["reject_stage"][r] = self.name
            batch["reject_reason"][r] = f"model error: {type(exc).__name__}: {exc}"[:500]
        if not results:  # every row was bad: the output's shapes from the neutral row
            return neutral, np.array([], dtype=np.int64)
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
