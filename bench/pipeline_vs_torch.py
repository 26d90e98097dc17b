#!/usr/bin/env python
"""Staged Ray Data pipeline vs the best bare-PyTorch alternative over the same unsplit model, rows and cores.

Both sides get the same preprocessed rows (token ids, attention masks, uint8 pixels). The
bare-torch side is the best of the alternatives a user has on the same hardware
(:func:`bench.fair.torch_variants`): on CPU one process with N threads, and N processes with
one thread each on 1/N of the rows (data parallel, started together, synchronised after
model load; aggregate = all rows over the slowest process's time); on CUDA the single-card
loop at a few batch sizes. Each side runs a steady state of ``--steady-s`` seconds after its
warm-up batches, in ``--reps`` alternating repetitions (pipeline, torch, pipeline, torch ...);
each variant's median and spread (min-max) is printed. On a CUDA machine the stages share
the GPUs (fractional GPUs on one card, or one GPU each when there are enough).

    python bench/pipeline_vs_torch.py                                # tiny demo model
    python bench/pipeline_vs_torch.py --preset albert-base-vit-s16   # ALBERT-base + ViT-S/16 @ 224 px
    python bench/pipeline_vs_torch.py --preset clip-vit-b-16 --dtype bfloat16
    python bench/pipeline_vs_torch.py --steady-s 3 --reps 1          # a smoke run, not a figure

The last line is ``ratio=<pipeline median rows/s / best torch variant's median rows/s>``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.fair import Spread, alternating, best_variant, ratio, torch_variants
from bench.rows import TINY_PRESETS, build_preset
from ray_jobs.config.settings import DTYPES


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers >= 1, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="tiny | albert-base-vit-s16 | clip-tiny | clip-vit-b-16")
    parser.add_argument("--model", help="an existing checkpoint (any supported format) instead of a preset")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 tiny, 16 larger")
    parser.add_argument(
        "--torch-batch-sizes",
        type=_ints,
        default=(),
        help="CUDA: batch sizes the single-card loop tries (default: the batch size, 2x and 4x)",
    )
    parser.add_argument("--num-stages", type=int, default=2)
    parser.add_argument("--stages", help="explicit stage spec instead of --num-stages")
    parser.add_argument("--steady-s", type=float, default=30.0, help="seconds of steady state per side and rep")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions (pipeline, torch, ...)")
    parser.add_argument("--warmup", type=int, default=3, help="batches excluded from the steady state")
    parser.add_argument("--pool-rows", type=int, default=None, help="distinct rows cycled (default 1024 tiny, 128)")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from bench.pipeline_loop import PipelineSettings, run_pipeline
    from bench.torch_loop import LoopSettings, run_variant
    from ray_jobs.model.checkpoint import open_checkpoint
    from ray_jobs.model.stage_spec import StageResources
    from ray_jobs.model.staged import build_layout

    tiny = args.preset in TINY_PRESETS and not args.model
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
    variants = torch_variants(args.cores, batch, cuda=bool(gpus), batches=args.torch_batch_sizes)
    pool_rows = args.pool_rows or max(1024 if tiny else 128, max(v.procs * v.batch for v in variants) * 2)

    print(
        f"model={ckpt.name} ({ckpt.format}) dtype={args.dtype} batch={batch} device={device} cores={args.cores} "
        f"gpus={gpus} steady={args.steady_s:g}s reps={args.reps} warmup={args.warmup} batches pool={pool_rows} rows"
    )
    print(f"stages={layout.spec()}")
    print(f"torch variants: {', '.join(v.name for v in variants)}", flush=True)

    pipe = PipelineSettings(
        ckpt.uri, layout, args.dtype, batch, pool_rows, args.warmup, args.steady_s, args.cores, gpus
    )
    loop = LoopSettings(ckpt.uri, device, args.dtype, pool_rows, args.warmup, args.steady_s)
    pipeline_rates: list[float] = []
    torch_rates: dict[str, list[float]] = {v.name: [] for v in variants}
    for rep, side in alternating(args.reps):
        if side == "pipeline":
            p = run_pipeline(pipe)
            pipeline_rates.append(p.rows_per_s)
            print(
                f"rep {rep} pipeline: steady {p.rows_per_s:9.2f} rows/s  first batch {p.first_batch_s:.1f}s "
                f"(includes starting the stage actors)",
                flush=True,
            )
            continue
        for v in variants:
            t = run_variant(loop, v)
            torch_rates[v.name].append(t.rows_per_s)
            print(f"rep {rep} {v.name}: steady {t.rows_per_s:9.2f} rows/s  start+load {t.load_s:.1f}s", flush=True)

    print("summary (steady state, rows/s):")
    for name, values in torch_rates.items():
        print(f"  {name:28s} {Spread.of(values).text()}")
    best_name, best = best_variant(torch_rates)
    pipeline = Spread.of(pipeline_rates)
    print(f"  {'pipeline':28s} {pipeline.text()}")
    print(f"best torch: {best_name}")
    print(f"ratio={ratio(pipeline.median, best.median):.3f}")


if __name__ == "__main__":
    main()
