"""Measure what each layer of each tower costs on this machine (``python -m ray_jobs tune``).

The checkpoint is opened exactly as a stage actor opens it (:func:`~ray_jobs.model.checkpoint.open_checkpoint`,
one :class:`~ray_jobs.model.staged.StageModule` holding every layer), fed batches shaped as the
preprocessing pool shapes them (the checkpoint's own tokenizer and image processor), and timed
module by module with forward hooks after a warm-up. The batch is the data's where a manifest
sample is given (:func:`data_batch`: its captions, padded to the batch's longest as the job pads
them, and its images), else synthetic (:func:`synthetic_batch`: captions at the tokenizer's
maximum length, the worst case). A tower's
embedding is charged to its first layer and its head to its last, as a stage that owns layer 0
runs the embedding (:mod:`ray_jobs.model.stage_spec`); time outside any module (tensor
conversion, normalisation, pooling) is reported apart and charged to the first layers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ray_jobs.errors import UsageError
from ray_jobs.model.precision import check_device, check_dtype
from ray_jobs.model.stage_spec import TOWERS

DEVICES = ("cpu", "cuda")
#: A caption long enough to fill any tokenizer's max length (the worst case the job pads to).
_CAPTION = "a photograph of a red bicycle leaning against a weathered brick wall in the late afternoon sun " * 8


@dataclass(frozen=True)
class ProfileSettings:
    batch_size: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    warmup: int = 2
    batches: int = 5
    threads: int = 1
    image_size: tuple[int, int] = (480, 640)  # height, width of the synthetic source images

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        if self.device not in DEVICES:
            raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        check_device(self.dtype, self.device)
        for key in ("batch_size", "batches", "threads"):
            if getattr(self, key) < 1:
                raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.warmup < 0:
            raise UsageError(f"--warmup must be >= 0, got {self.warmup}")
        if min(self.image_size) < 1:
            raise UsageError(f"image size must be positive, got {self.image_size}")


@dataclass(frozen=True)
class LayerProfile:
    """Seconds per row, measured: each tower's layers, embedding, head, and the rest."""

    model_uri: str
    model_id: str
    embed_dim: int
    settings: ProfileSettings
    layers: dict[str, tuple[float, ...]]
    embed: dict[str, float]
    head: dict[str, float]
    other: float
    #: what the timed batch held: the data sample's source, or ``synthetic``
    data: str = "synthetic"

    def layer_costs(self) -> dict[str, list[float]]:
        """Per layer, with the embedding (and half the unattributed time) on layer 0 and the head on
        the last layer: what a stage owning that layer pays."""
        out = {}
        for tower in TOWERS:
            costs = list(self.layers[tower])
            costs[0] += self.embed[tower] + self.other / 2
            costs[-1] += self.head[tower]
            out[tower] = costs
        return out

    @property
    def seconds_per_row(self) -> float:
        return sum(sum(c) for c in self.layer_costs().values())


def synthetic_batch(ckpt, n: int, image_size: tuple[int, int], seed: int = 0) -> dict[str, np.ndarray]:
    """*n* rows as the preprocessing pool hands them to stage 1 (all valid)."""
    from PIL import Image

    text = ckpt.text_processing
    input_ids, attention_mask = text.encode(text.load_tokenizer(), [_CAPTION] * n)
    processing = ckpt.image_processing
    rng = np.random.default_rng(seed)
    pixels = np.zeros((n, *processing.pixel_shape), dtype=np.uint8)
    grids = np.zeros((n, 2), dtype=np.int64)
    for r in range(n):
        image = Image.fromarray(rng.integers(0, 256, (*image_size, 3), dtype=np.uint8))
        pixels[r], grids[r] = processing.transform(image)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixels": pixels,
        **({"spatial_shapes": grids} if processing.patches else {}),
    }


def data_batch(ckpt, sample, n: int, max_pixels: int = 50_000_000, seed: int = 0) -> dict[str, np.ndarray]:
    """*n* rows drawn (with *seed*) from *sample*'s rows whose image opens, as the preprocessing
    pool hands them to stage 1: captions padded to the batch's longest, images decoded."""
    import random

    from ray_jobs.errors import TransientFailure
    from ray_jobs.job.preprocess import RowRejected, decode_image, fetch_bytes

    processing = ckpt.image_processing
    good = []
    for text, uri in zip(sample.texts, sample.image_uris, strict=True):
        try:
            good.append((text, decode_image(fetch_bytes(uri, 64 * 1024 * 1024, attempts=1), processing, max_pixels)))
        except (RowRejected, TransientFailure, OSError):
            continue
    if not good:
        raise UsageError(f"no sampled row of the manifest has an image that opens ({sample.source})")
    rows = random.Random(seed).choices(good, k=n)
    text = ckpt.text_processing
    input_ids, attention_mask = text.encode(text.load_tokenizer(), [t for t, _ in rows])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixels": np.stack([px for _, (px, _) in rows]),
        **({"spatial_shapes": np.array([g for _, (_, g) in rows], dtype=np.int64)} if processing.patches else {}),
    }


class _Timer:
    """Forward hooks that add each labelled module's time to a total (synchronising CUDA).

    One module may stand for several layers (ALBERT shares its layer weights: one module is
    called once per layer, in layer order): its k-th call in a forward is charged to the k-th
    label it was watched under."""

    def __init__(self, cuda: bool):
        import torch

        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.totals: dict[tuple[str, object], float] = {}
        self.labels: dict[int, list[tuple[str, object]]] = {}
        self.calls: dict[int, int] = {}
        self.started: dict[int, float] = {}
        self.handles = []

    def watch(self, module, label: tuple[str, object]) -> None:
        key = id(module)
        if key in self.labels:  # a shared module: one pair of hooks, one more label
            self.labels[key].append(label)
            return
        self.labels[key], self.calls[key] = [label], 0

        def pre(mod, args, kwargs=None):
            self.sync()
            self.started[key] = time.perf_counter()

        def post(mod, args, out):
            self.sync()
            elapsed = time.perf_counter() - self.started.pop(key)
            labels = self.labels[key]
            charged = labels[self.calls[key] % len(labels)]
            self.calls[key] += 1
            self.totals[charged] = self.totals.get(charged, 0.0) + elapsed

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def reset(self) -> None:
        self.totals.clear()
        self.calls = dict.fromkeys(self.calls, 0)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def watch_layers(timer: _Timer, module) -> None:
    """Time every embedding, block and head of *module* (a ``StageModule``) with *timer*,
    labelled ``(tower, "embed" | layer index | "head")``."""
    for seg in module.segments:
        for name in seg.embed_names:
            timer.watch(seg.modules[name], (seg.tower, "embed"))
        for i, name in enumerate(seg.block_names):
            timer.watch(seg.modules[name], (seg.tower, seg.start + i))
        for name in seg.head_names:
            timer.watch(seg.modules[name], (seg.tower, "head"))


def profile_layers(model_uri: str, settings: ProfileSettings, sample=None) -> LayerProfile:
    """Time every layer of *model_uri* on this machine under *settings*, on batches of *sample*
    (a :class:`~ray_jobs.perf.data_sample.DataSample`) or, without one, synthetic batches."""
    import torch

    from ray_jobs.model.checkpoint import open_checkpoint
    from ray_jobs.model.stage_spec import parse_spec, resolve
    from ray_jobs.model.staged import StageModule

    if settings.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible here")
    torch.set_num_threads(settings.threads)
    ckpt = open_checkpoint(model_uri)
    layout = resolve(parse_spec("text,image"), ckpt.layer_counts())
    module = StageModule(ckpt, layout, 0, settings.device, settings.dtype)
    timer = _Timer(settings.device == "cuda")
    watch_layers(timer, module)
    if sample is not None:
        batch = data_batch(ckpt, sample, settings.batch_size)
    else:
        batch = synthetic_batch(ckpt, settings.batch_size, settings.image_size)
    try:
        for _ in range(settings.warmup):
            module.run(batch)
        timer.reset()
        total = 0.0
        for _ in range(settings.batches):
            timer.sync()
            began = time.perf_counter()
            module.run(batch)
            timer.sync()
            total += time.perf_counter() - began
    finally:
        timer.close()
    rows = settings.batches * settings.batch_size
    per_row = {k: v / rows for k, v in timer.totals.items()}
    counts = ckpt.layer_counts()
    layers = {t: tuple(per_row.get((t, i), 0.0) for i in range(counts[t])) for t in TOWERS}
    embed = {t: per_row.get((t, "embed"), 0.0) for t in TOWERS}
    head = {t: per_row.get((t, "head"), 0.0) for t in TOWERS}
    other = max(0.0, total / rows - sum(per_row.values()))
    data = f"manifest sample: {sample.source}" if sample is not None else "synthetic"
    return LayerProfile(ckpt.uri, ckpt.model_id, ckpt.embed_dim, settings, layers, embed, head, other, data)
