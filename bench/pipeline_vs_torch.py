#!/usr/bin/env python
"""Staged Ray Data pipeline vs a bare PyTorch loop over the same unsplit model, rows and cores.

Both sides get the same preprocessed rows (token ids, attention masks, uint8 pixels) and the
same batch size, so the ratio measures what splitting the model into Ray Data stages costs
(or gains). Warm-up batches are excluded from the steady-state figures; time to first batch
is reported separately. On a CUDA machine the stages share the GPUs (fractional GPUs on one
card, or one GPU each when there are enough) and the torch loop runs on cuda:0.

    python bench/pipeline_vs_torch.py                                # tiny demo model
    python bench/pipeline_vs_torch.py --preset albert-base-vit-s16   # ALBERT-base + ViT-S/16 @ 224 px

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
    import random

    from transformers import AutoTokenizer

    from ray_jobs.model.demo_checkpoint import caption
    from ray_jobs.model.image_ops import target_size

    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(ckpt.tower_local_dir("text"))
    texts = [caption(rng) for _ in range(n)]
    enc = tok(texts, padding="max_length", truncation=True, max_length=ckpt.config.text_max_length, return_tensors="np")
    h, w = target_size(ckpt.image_processing)
    pixels = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    return {
        "id": np.array([f"row-{i:06d}" for i in range(n)], dtype=object),
        "ok": np.ones(n, dtype=bool),
        "reject_stage": np.full(n, "", dtype=object),
        "reject_reason": np.full(n, "", dtype=object),
        "input_ids": enc["input_ids"].astype(np.int64),
        "attention_mask": enc["attention_mask"].astype(np.int64),
        "pixels": pixels,
    }


def steady(times: list[float], sizes: list[int], warmup: int) -> float:
    """Rows/s between the end of warm-up batch *warmup* and the last batch."""
    if len(times) <= warmup + 1:
        raise SystemExit(f"need more than {warmup + 1} batches; raise --rows")
    return sum(sizes[warmup + 1 :]) / (times[-1] - times[warmup])


def bench_torch(ckpt, rows, batch: int, warmup: int, device: str, threads: int) -> dict:
    import torch

    from ray_jobs.model.reference import TwinTowerReference

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = TwinTowerReference(ckpt, device=device)
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


def bench_pipeline(ckpt, layout, rows, batch: int, warmup: int) -> dict:
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
    ds = add_model_stages(ds, layout, ckpt.uri, batch)
    times, sizes = [], []
    start = time.perf_counter()
    for b in ds.iter_batches(batch_size=batch, batch_format="numpy", prefetch_batches=2):
        times.append(time.perf_counter())
        sizes.append(len(b["id"]))
    assert sum(sizes) == n, f"pipeline returned {sum(sizes)} of {n} rows"
    return {"rows_per_s": steady(times, sizes, warmup), "first_batch_s": times[0] - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="tiny | albert-base-vit-s16")
    parser.add_argument("--model", help="an existing twin-tower checkpoint instead of a preset")
    parser.add_argument("--rows", type=int, default=None, help="rows per side (default: 2048 tiny, 192 larger)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 tiny, 16 larger")
    parser.add_argument("--num-stages", type=int, default=2)
    parser.add_argument("--stages", help="explicit stage spec instead of --num-stages")
    parser.add_argument("--warmup", type=int, default=3, help="batches excluded from steady state")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import ray
    import torch

    from ray_jobs.model.checkpoint import TwinTowerCheckpoint
    from ray_jobs.model.demo_checkpoint import build_demo_checkpoint
    from ray_jobs.model.stage_spec import StageResources
    from ray_jobs.model.staged import build_layout

    tiny = args.preset == "tiny" and not args.model
    rows_n = args.rows or (2048 if tiny else 192)
    batch = args.batch_size or (64 if tiny else 16)
    path = args.model or build_demo_checkpoint(tempfile.mkdtemp(prefix="bench-ckpt-"), preset=args.preset)
    ckpt = TwinTowerCheckpoint(path)
    gpus = torch.cuda.device_count()
    k = len(args.stages.split("|")) if args.stages else args.num_stages
    if gpus:
        per_stage = StageResources(num_cpus=1, num_gpus=1.0 if gpus >= k else round(1.0 / k, 3))
    else:
        per_stage = StageResources(num_cpus=max(1, args.cores // k), num_gpus=0)
    layout = build_layout(ckpt, num_stages=None if args.stages else k, spec=args.stages, defaults=per_stage)
    device = "cuda" if gpus else "cpu"
    rows = make_rows(ckpt, rows_n)

    print(f"model={ckpt.config.name} rows={rows_n} batch={batch} device={device} cores={args.cores} gpus={gpus}")
    print(f"stages={layout.spec()}")
    t = bench_torch(ckpt, rows, batch, args.warmup, device, args.cores)
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
        p = bench_pipeline(ckpt, layout, rows, batch, args.warmup)
    finally:
        ray.shutdown()
    print(
        f"pipeline: steady {p['rows_per_s']:9.1f} rows/s   first batch {p['first_batch_s']:.2f}s "
        "(includes starting the stage actors)"
    )
    print(f"ratio={p['rows_per_s'] / t['rows_per_s']:.3f}")


if __name__ == "__main__":
    main()
