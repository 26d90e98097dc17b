#!/usr/bin/env python
"""The model split over worker processes: the project's pipeline vs sequential model parallel.

When the model does not fit one worker, a user splits it over several, each holding only its
own layers. The alternative a user reaches for is **sequential model parallel**, as accelerate's
``device_map`` runs it: one batch at a time through the workers, the hidden states passed from
one to the next, only one worker computing at a time. This bench runs, on the same split, the
same preprocessed rows and the same cores:

- **pipeline**: the project's Ray Data stage pools (``add_model_stages``, one
  :class:`~ray_jobs.model.staged.ModelStage` actor per stage; bench/pipeline_loop.py);
- **torch sequential model parallel**: one spawned process per stage building the same
  ``ModelStage``, chained by queues, one batch in flight (bench/stage_chain.py);
- **torch micro-batch pipeline**: the same processes with a batch per worker in flight and one
  waiting in front of each, so the next batch enters worker 1 while worker 2 computes the previous.

The split is balanced on layer costs measured here, on the bench's own rows (their real text
lengths and image size), one worker's threads, before any timing (``--stages`` gives one
instead). Each worker gets ``cores / workers`` intra-op threads (1 on 2 cores). Each variant runs
a steady state of ``--steady-s`` seconds after ``--warmup`` batches, in ``--reps`` alternating
repetitions (pipeline, sequential, micro-batch, pipeline, ...), each in fresh processes; every
repetition's rows/s is printed, then each variant's median and spread (min-max) and the ratios.

    python bench/pipeline_vs_sequential.py                                   # ALBERT-base + ViT-S/16
    python bench/pipeline_vs_sequential.py --preset tiny
    python bench/pipeline_vs_sequential.py --steady-s 5 --reps 1 --preset tiny   # a smoke run, not a figure

The last line is ``ratio=<pipeline median rows/s / sequential model parallel median rows/s>``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.fair import BenchError, Spread, alternating, ratio
from bench.rows import TINY_PRESETS, build_preset
from ray_jobs.config.settings import DTYPES

PIPELINE = "pipeline (Ray Data stage pools)"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default="albert-base-vit-s16", help="albert-base-vit-s16 | tiny | clip-tiny | clip-vit-b-16"
    )
    parser.add_argument("--model", help="an existing checkpoint (any supported format) instead of a preset")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 tiny, 16 larger")
    parser.add_argument("--workers", type=int, default=2, help="stages: worker processes the model is split over")
    parser.add_argument("--stages", help="an explicit stage spec instead of the measured balanced split")
    parser.add_argument("--steady-s", type=float, default=30.0, help="seconds of steady state per variant and rep")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions")
    parser.add_argument("--warmup", type=int, default=3, help="batches excluded from the steady state")
    parser.add_argument("--pool-rows", type=int, default=None, help="distinct rows cycled (default 8 batches)")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--no-micro-batch", action="store_true", help="leave out the torch micro-batch pipeline")
    return parser.parse_args(argv)


def balanced_layout(ckpt, layer_costs, workers: int, resources):
    """The layout that splits *layer_costs* into *workers* contiguous stages, minimising the
    slowest (the split ``build_layout`` makes from estimated costs), each stage with *resources*."""
    from ray_jobs.model.stage_spec import balanced_spec, resolve

    return resolve([(ranges, resources) for ranges in balanced_spec(workers, layer_costs)], ckpt.layer_counts())


def stage_costs(layout, layer_costs) -> list[float]:
    """Each stage's share of *layer_costs* (the sum over its layers)."""
    return [sum(layer_costs[r.tower][i] for r in st.ranges for i in range(r.start, r.stop)) for st in layout.stages]


def measured_layer_costs(ckpt, rows: dict, batch: int, threads: int, dtype: str, device: str) -> dict:
    """Seconds per batch of every layer of *ckpt* on *rows* (their own text lengths and image size),
    timed with ``python -m ray_jobs tune``'s forward hooks, embedding on the first layer and head on
    the last, as a stage owning them pays."""
    import time

    import torch

    from ray_jobs.model.stage_spec import TOWERS, parse_spec, resolve
    from ray_jobs.model.staged import StageModule
    from ray_jobs.perf.layer_profile import _Timer, watch_layers

    torch.set_num_threads(threads)
    module = StageModule(ckpt, resolve(parse_spec("text,image"), ckpt.layer_counts()), 0, device, dtype)
    timer = _Timer(device == "cuda")
    watch_layers(timer, module)
    cols = {k: rows[k][:batch] for k in ("input_ids", "attention_mask", "pixels")}
    measured = 2
    try:
        module.run(cols)  # warm-up
        timer.reset()
        began = time.perf_counter()
        for _ in range(measured):
            module.run(cols)
        total = (time.perf_counter() - began) / measured
    finally:
        timer.close()
    per_batch = {k: v / measured for k, v in timer.totals.items()}
    other = max(0.0, total - sum(per_batch.values()))
    counts = ckpt.layer_counts()
    costs = {}
    for tower in TOWERS:
        layers = [per_batch.get((tower, i), 0.0) for i in range(counts[tower])]
        layers[0] += per_batch.get((tower, "embed"), 0.0) + other / 2
        layers[-1] += per_batch.get((tower, "head"), 0.0)
        costs[tower] = layers
    return costs


def source_rows(batch: int, warmup: int, steady_s: float, slowest_stage_s: float, margin: float = 3.0) -> int:
    """Rows the pipeline's source tiles: *margin* times what the steady window can take at the
    slowest stage's measured pace, plus the warm-up batches and a few in flight. A source sized
    for hours would fill the object store with batches the run never reaches."""
    if slowest_stage_s <= 0 or steady_s <= 0:
        raise BenchError(f"need a stage time and a steady window > 0, got {slowest_stage_s} and {steady_s}")
    return batch * (int(margin * steady_s / slowest_stage_s) + warmup + 8)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from bench.pipeline_loop import PipelineSettings, run_pipeline
    from bench.rows import make_rows
    from bench.stage_chain import ChainSettings, ChainVariant, ideal_speedup, micro_batch_depth, run_chain
    from ray_jobs.model.checkpoint import open_checkpoint
    from ray_jobs.model.stage_spec import StageResources, parse_spec, resolve

    if args.workers < 2:
        raise BenchError(f"--workers must be >= 2 to split the model, got {args.workers}")
    tiny = args.preset in TINY_PRESETS and not args.model
    batch = args.batch_size or (64 if tiny else 16)
    pool_rows = args.pool_rows or batch * 8
    path = args.model or build_preset(args.preset)
    ckpt = open_checkpoint(path)
    gpus = torch.cuda.device_count()
    device = "cuda" if gpus else "cpu"
    threads = max(1, args.cores // args.workers)
    per_stage = StageResources(
        num_cpus=threads, num_gpus=(1.0 if gpus >= args.workers else round(1.0 / args.workers, 3)) if gpus else 0.0
    )
    if args.stages:
        costs, layout = None, resolve(parse_spec(args.stages, per_stage), ckpt.layer_counts())
    else:
        costs = measured_layer_costs(ckpt, make_rows(ckpt, batch), batch, threads, args.dtype, device)
        layout = balanced_layout(ckpt, costs, args.workers, per_stage)
    workers = len(layout.stages)
    torch.set_num_threads(threads)

    print(
        f"model={ckpt.name} ({ckpt.format}) dtype={args.dtype} batch={batch} device={device} cores={args.cores} "
        f"gpus={gpus} workers={workers} x {threads} thread(s) steady={args.steady_s:g}s reps={args.reps} "
        f"warmup={args.warmup} batches pool={pool_rows} rows"
    )
    print(f"stages={layout.spec()}")
    if costs:
        per_stage_s = stage_costs(layout, costs)
        print(
            "measured seconds per batch by stage (one worker's threads, these rows): "
            + ", ".join(f"{c:.3f}" for c in per_stage_s)
            + f"; a perfect pipeline would gain {ideal_speedup(per_stage_s):.2f}x over one batch at a time"
        )

    chains = [ChainVariant(1)] + ([] if args.no_micro_batch else [ChainVariant(micro_batch_depth(workers))])
    names = [PIPELINE] + [c.name for c in chains]
    print(f"variants: {', '.join(names)}", flush=True)
    bounded = {"max_rows": source_rows(batch, args.warmup, args.steady_s, max(per_stage_s))} if costs else {}
    pipe = PipelineSettings(
        ckpt.uri, layout, args.dtype, batch, pool_rows, args.warmup, args.steady_s, args.cores, gpus, **bounded
    )
    chain = ChainSettings(
        ckpt.uri, layout.spec(), workers, threads, args.dtype, batch, pool_rows, args.warmup, args.steady_s
    )
    rates: dict[str, list[float]] = {n: [] for n in names}
    by_name = {c.name: c for c in chains}
    for rep, name in alternating(args.reps, names):
        if name == PIPELINE:
            p = run_pipeline(pipe)
            rates[name].append(p.rows_per_s)
            print(
                f"rep {rep} {name}: steady {p.rows_per_s:9.2f} rows/s  first batch {p.first_batch_s:.1f}s "
                f"(includes starting the stage actors)",
                flush=True,
            )
            continue
        c = run_chain(chain, by_name[name])
        rates[name].append(c.rows_per_s)
        print(
            f"rep {rep} {name}: steady {c.rows_per_s:9.2f} rows/s  start+load {c.load_s:.1f}s  "
            f"busy s/batch by worker {', '.join(f'{s:.3f}' for s in c.stage_seconds)}",
            flush=True,
        )

    print("summary (steady state, rows/s):")
    spreads = {n: Spread.of(v) for n, v in rates.items()}
    for n, s in spreads.items():
        print(f"  {n:44s} {s.text()}")
    sequential = spreads[chains[0].name]
    for n in names:
        if n != chains[0].name:
            print(f"{n} / sequential model parallel: {ratio(spreads[n].median, sequential.median):.3f}")
    if len(chains) > 1:
        print(f"pipeline / micro-batch pipeline: {ratio(spreads[PIPELINE].median, spreads[chains[1].name].median):.3f}")
    print(f"ratio={ratio(spreads[PIPELINE].median, sequential.median):.3f}")


if __name__ == "__main__":
    main()
