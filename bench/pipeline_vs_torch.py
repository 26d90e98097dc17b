#!/usr/bin/env python
"""Staged Ray Data pipeline vs a bare PyTorch loop over the same unsplit model, rows and cores.

Both sides get the same preprocessed rows (token ids, attention masks, uint8 pixels) and the
same batch size, so the ratio measures what splitting the model into Ray Data stages costs
(or gains). Warm-up batches are excluded from the steady-state figures; time to first batch
is reported separately. On a CUDA machine the stages share the GPUs (fractional GPUs on one
card, or one GPU each when there are enough) and the torch loop runs on cuda:0.

    python bench/pipeline_vs_torch.py                                # tiny demo model
    python bench/pipeline_vs_torch.py --preset albert-base-vit-s16   # ALBERT-base + ViT-S/16 @ 224 px
    python bench/pipeline_vs_torch.py --preset clip-vit-b-16         # CLIPModel sized like ViT-B/16 @ 224 px
    python bench/pipeline_vs_torch.py --preset clip-vit-b-16 --dtype bfloat16

The last line is ``ratio=<pipeline rows/s ÷ torch rows/s>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_rows(ckpt, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows as the preprocessing actors emit them (the checkpoint's own tokenizer and image size).

    Text is padded to the longest caption of all rows, so every batch has one shape on both sides."""
    import random

    from ray_jobs.model.demo_checkpoint import caption

    rng = random.Random(seed)
    text = ckpt.text_processing
    input_ids, attention_mask = text.encode(text.load_tokenizer(), [caption(rng) for _ in range(n)])
    h, w = ckpt.image_processing.size
    pixels = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    return {
        "id": np.array([f"row-{i:06d}" for i in range(n)], dtype=object),
        "ok": np.ones(n, dtype=bool),
        "reject_stage": np.full(n, "", dtype=object),
        "reject_reason": np.full(n, "", dtype=object),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixels": pixels,
    }


def build_preset(preset: str) -> str:
    """A random-init checkpoint of *preset* in a temp dir (twin-tower presets or a CLIPModel)."""
    from ray_jobs.model.demo_checkpoint import PRESETS, build_demo_checkpoint
    from ray_jobs.model.demo_hf import CLIP_PRESETS, build_clip

    out = tempfile.mkdtemp(prefix="bench-ckpt-")
    if preset in PRESETS:
        return build_demo_checkpoint(out, preset=preset)
    if preset.startswith("clip-") and preset[len("clip-") :] in CLIP_PRESETS:
        return build_clip(os.path.join(out, preset), preset=preset[len("clip-") :])
    raise SystemExit(f"unknown preset {preset!r}: {sorted(PRESETS) + [f'clip-{p}' for p in CLIP_PRESETS]}")


def steady(times: list[float], sizes: list[int], warmup: int) -> float:
    """Rows/s between the end of warm-up batch *warmup* and the last batch."""
    if len(times) <= warmup + 1:
        raise SystemExit(f"need more than {warmup + 1} batches; raise --rows")
    return sum(sizes[warmup + 1 :]) / (times[-1] - times[warmup])


def bench_torch(ckpt, rows, batch: int, warmup: int, device: str, threads: int, dtype: str) -> dict:
    import torch

    from ray_jobs.model.reference import reference_for

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = reference_for(ckpt, device=device, dtype=dtype)
    load = time.perf_counter() - t0
    n = len(rows["id"])
    times, sizes = [], []
    start = time.perf_counter()
    for lo in range(0, n, batch):
        sl = slice(lo, lo + batch)
        model.embed(rows["input_ids"][sl], rows["attention_mask"][sl], rows["pixels"][sl])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        sizes.append(len(rows["id"][sl]))
    return {"rows_per_s": steady(times, sizes, warmup), "first_batch_s": times[0] - start, "load_s": load}


def bench_pipeline(ckpt, layout, rows, batch: int, warmup: int, dtype: str) -> dict:
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    from ray_jobs.embed_job import add_model_stages

    n = len(rows["id"])
    tables = []
    for lo in range(0, n, batch):
        sl = slice(lo, lo + batch)
        cols = {}
        for k, v in rows.items():
            cols[k] = ArrowTensorArray.from_numpy(v[sl]) if v.ndim > 1 else pa.array(list(v[sl]))
        tables.append(pa.table(cols))
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds = ray.data.from_arrow(tables)
    ds = add_model_stages(ds, layout, ckpt.uri, batch, dtype=dtype)
    times, sizes = [], []
    start = time.perf_counter()
    for b in ds.iter_batches(batch_size=batch, batch_format="numpy", prefetch_batches=2):
        times.append(time.perf_counter())
        sizes.append(len(b["id"]))
    assert sum(sizes) == n, f"pipeline returned {sum(sizes)} of {n} rows"
    return {"rows_per_s": steady(times, sizes, warmup), "first_batch_s": times[0] - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="tiny | albert-base-vit-s16 | clip-tiny | clip-vit-b-16")
    parser.add_argument("--model", help="an existing checkpoint (any supported format) instead of a preset")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--rows", type=int, default=None, help="rows per side (default: 2048 tiny, 192 larger)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 tiny, 16 larger")
    parser.add_argument("--num-stages", type=int, default=2)
    parser.add_argument("--stages", help="explicit stage spec instead of --num-stages")
    parser.add_argument("--warmup", type=int, default=3, help="batches excluded from steady state")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import ray
    import torch

    from ray_jobs.model.checkpoint import open_checkpoint
    from ray_jobs.model.stage_spec import StageResources
    from ray_jobs.model.staged import build_layout

    tiny = args.preset in ("tiny", "clip-tiny") and not args.model
    rows_n = args.rows or (2048 if tiny else 192)
    batch = args.batch_size or (64 if tiny else 16)
    path = args.model or build_preset(args.preset)
    ckpt = open_checkpoint(path)
    gpus = torch.cuda.device_count()
    k = len(args.stages.split("|")) if args.stages else args.num_stages
    if gpus:
        per_stage = StageResources(num_cpus=1, num_gpus=1.0 if gpus >= k else round(1.0 / k, 3))
    else:
        per_stage = StageResources(num_cpus=max(1, args.cores // k), num_gpus=0)
    layout = build_layout(ckpt, num_stages=None if args.stages else k, spec=args.stages, defaults=per_stage)
    device = "cuda" if gpus else "cpu"
    rows = make_rows(ckpt, rows_n)

    print(
        f"model={ckpt.name} ({ckpt.format}) dtype={args.dtype} rows={rows_n} batch={batch} device={device} "
        f"cores={args.cores} gpus={gpus}"
    )
    print(f"stages={layout.spec()}")
    t = bench_torch(ckpt, rows, batch, args.warmup, device, args.cores, args.dtype)
    print(
        f"torch:    steady {t['rows_per_s']:9.1f} rows/s   first batch {t['first_batch_s']:.2f}s "
        f"(model load {t['load_s']:.2f}s)",
        flush=True,
    )

    ray.init(
        num_cpus=args.cores,
        num_gpus=gpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}},
    )
    try:
        p = bench_pipeline(ckpt, layout, rows, batch, args.warmup, args.dtype)
    finally:
        ray.shutdown()
    print(
        f"pipeline: steady {p['rows_per_s']:9.1f} rows/s   first batch {p['first_batch_s']:.2f}s "
        "(includes starting the stage actors)"
    )
    print(f"ratio={p['rows_per_s'] / t['rows_per_s']:.3f}")


if __name__ == "__main__":
    main()
