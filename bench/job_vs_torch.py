#!/usr/bin/env python
"""The whole partition job, end to end, vs a torch DataLoader feeding the unsplit model, on the same cores.

Both sides read the same manifest of real image files of mixed sizes (JPEG and PNG, generated
by bench/job_assets.py), fetch and decode every image and tokenise every caption with the
project's own functions, embed with the same checkpoint and write Parquet. The job side is
``run_prepared`` (what ``python -m ray_jobs embed`` runs: fetch, decode, tokenise, stages,
sink, commit) on a local Ray; the alternative is a ``DataLoader`` with worker processes and
the reference (unsplit) model, tuned over a small grid of worker counts and torch threads on
``--tune-rows`` rows (each printed), the best then run on all rows, in ``--reps`` alternating
repetitions (job, loader, job, loader ...); each side's median and spread (min-max) is printed.
Every run is a fresh process; end-to-end time runs from its spawn (imports, Ray start, model
load included). With ``--ray running`` the bench starts one local Ray before the repetitions
and every job process connects to it, as each partition job of a night runs on the cluster
``cluster_up`` started: its end to end still runs from the job process's spawn, without the
Ray start. The job runs with its own default layout unless ``--num-stages`` (a number or
``auto``), ``--stages`` or ``--job-setting NAME=VALUE`` say otherwise.

    python bench/job_vs_torch.py                                 # tiny demo model
    python bench/job_vs_torch.py --preset albert-base-vit-s16    # the target: ratio >= 0.9
    python bench/job_vs_torch.py --num-stages auto               # the job's automatic layout
    python bench/job_vs_torch.py --rows 256 --tune-rows 96 --reps 1   # a smoke run, not a figure
    python bench/job_vs_torch.py --ray running                   # jobs on a Ray that is already up

Prints steady-state and end-to-end rows/s of both sides, the job's per-operator busy time,
rows and bytes out (object-store traffic) from Ray Data's stats, and last ``ratio=<job steady
rows/s / best DataLoader steady rows/s>``. ``--stats-out FILE`` keeps Ray Data's full stats.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.fair import Spread, alternating, ratio
from bench.pipeline_vs_torch import _ints
from bench.rows import TINY_PRESETS, build_preset
from ray_jobs.cli import min_max
from ray_jobs.config.settings import DTYPES


def parse_args(argv=None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="tiny | albert-base-vit-s16 | clip-tiny | clip-vit-b-16")
    p.add_argument("--model", help="an existing checkpoint instead of a preset")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--rows", type=int, default=None, help="rows in the manifest (default 3000 tiny, 320 larger)")
    p.add_argument(
        "--tune-rows",
        type=int,
        default=None,
        help="rows per DataLoader tuning run (default rows/4, at least warm-up + 3 batches)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="both sides (default 64 tiny, 16 larger)")
    p.add_argument("--min-side", type=int, default=160, help="smallest image side in pixels")
    p.add_argument("--max-side", type=int, default=1280, help="largest image side in pixels")
    p.add_argument(
        "--num-stages",
        type=_num_stages,
        default=None,
        help="the job's layout: a number of stages or 'auto' (default: the job's own default)",
    )
    p.add_argument("--stages", help="the job's layout as an explicit stage spec (overrides --num-stages)")
    p.add_argument(
        "--job-setting",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other job setting by name (e.g. stage_pool=1-2), repeatable",
    )
    p.add_argument(
        "--preprocess-pool", type=min_max, default=None, help=f"job: MIN-MAX (default 1-{max(2, cores - 1)})"
    )
    p.add_argument("--loader-workers", type=_ints, default=None, help="DataLoader num_workers grid (comma-separated)")
    p.add_argument("--loader-threads", type=_ints, default=None, help="torch intra-op threads grid (comma-separated)")
    p.add_argument(
        "--ray",
        choices=("local", "running"),
        default="local",
        help="local: each job starts its own local Ray; running: jobs connect to one the bench started first",
    )
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions of the final runs (job, loader)")
    p.add_argument("--warmup", type=int, default=3, help="DataLoader batches excluded from its steady state")
    p.add_argument("--assets", help="reuse (or create) the images and manifest in this directory")
    p.add_argument("--stats-out", help="write Ray Data's full stats of the last job run to this file")
    return p.parse_args(argv)


def _num_stages(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of stages or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 stage, got {value}")
    return value


def _setting(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` -> (name, value): a whole number, a number, ``MIN-MAX`` for a pool, else the text."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    name, value = name.strip(), value.strip()
    if name.endswith("_pool"):
        return name, min_max(value)
    for convert in (int, float):
        try:
            return name, convert(value)
        except ValueError:
            pass
    return name, value


def job_layout(num_stages: int | str | None, stages: str | None) -> tuple[tuple[str, object], ...]:
    """The layout settings the job gets: an explicit spec, else a stage count or ``auto``, else none
    (the job's default)."""
    if stages:
        return (("stages", stages),)
    if num_stages is not None:
        return (("num_stages", num_stages),)
    return ()


def _grid(cores: int, cuda: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    workers = tuple(sorted({max(1, cores // 4), max(1, cores // 2), cores} if cores > 2 else {1, cores}))
    threads = (1, 4) if cuda else tuple(sorted({1, cores}))
    return workers, threads


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from bench.job_assets import write_job_assets
    from bench.job_side import JobSettings, run_job, running_cluster
    from bench.loader_side import LoaderSettings, LoaderVariant, run_loader
    from ray_jobs.model.checkpoint import open_checkpoint

    cores = os.cpu_count() or 1
    gpus = torch.cuda.device_count()
    tiny = args.preset in TINY_PRESETS and not args.model
    rows = args.rows or (3000 if tiny else 320)
    batch = args.batch_size or (64 if tiny else 16)
    tune_rows = min(rows, max(args.tune_rows or rows // 4, batch * (args.warmup + 3)))
    work = tempfile.mkdtemp(prefix="bench-job-")
    assets_dir = args.assets or os.path.join(work, "assets")
    path = args.model or build_preset(args.preset, os.path.join(work, "model"))
    ckpt = open_checkpoint(path)
    manifest = os.path.join(assets_dir, "manifest")
    if not os.path.isdir(manifest):
        made = write_job_assets(assets_dir, rows, min_side=args.min_side, max_side=args.max_side)
        print(f"assets: {made.rows} images, {made.image_bytes / 1e6:.1f} MB, sides {args.min_side}-{args.max_side} px")
    layout = job_layout(args.num_stages, args.stages)
    k = len(args.stages.split("|")) if args.stages else args.num_stages
    # a GPU per stage where there are enough (data parallel, 'auto' on a GPU: one per replica), else a share
    stage_gpus = (1.0 if not isinstance(k, int) or gpus >= k else round(1.0 / k, 3)) if gpus else 0.0
    job = JobSettings(
        ckpt.uri,
        manifest,
        os.path.join(work, "job-out"),
        args.dtype,
        batch,
        1.0,
        stage_gpus,
        args.preprocess_pool or (1, max(2, cores - 1)),
        gpus,
        layout + tuple(args.job_setting),
    )
    device = "cuda" if gpus else "cpu"
    workers, threads = _grid(cores, bool(gpus))
    workers, threads = args.loader_workers or workers, args.loader_threads or threads
    variants = [LoaderVariant(w, t) for w in workers for t in threads]
    print(
        f"model={ckpt.name} ({ckpt.format}) dtype={args.dtype} rows={rows} batch={batch} device={device} "
        f"cores={cores} gpus={gpus} preprocess_pool={job.preprocess_pool[0]}-{job.preprocess_pool[1]}\n"
        f"job settings: {', '.join(f'{n}={v}' for n, v in job.settings) or 'the defaults'}",
        flush=True,
    )

    def loader(variant, n):
        out = os.path.join(work, f"loader-{variant.workers}w{variant.threads}t-{n}.parquet")
        return run_loader(LoaderSettings(ckpt.uri, manifest, out, device, args.dtype, batch, args.warmup, n), variant)

    print(f"tuning the DataLoader on {tune_rows} rows:", flush=True)
    tuned = {}
    for v in variants:
        f = loader(v, tune_rows)
        tuned[v] = f.steady_rows_per_s
        print(
            f"  {v.name:32s} steady {f.steady_rows_per_s:9.2f} rows/s  "
            f"end-to-end {f.rows_in / f.end_to_end_s:9.2f} rows/s"
        )
    best = max(tuned, key=tuned.get)
    print(f"best DataLoader: {best.name}", flush=True)

    steady: dict[str, list[float]] = {"job": [], "loader": []}
    e2e: dict[str, list[float]] = {"job": [], "loader": []}
    last_job = None
    stack = contextlib.ExitStack()
    if args.ray == "running":
        job = dataclasses.replace(job, ray_address=stack.enter_context(running_cluster(job)))
        print(f"jobs connect to a running local Ray at {job.ray_address} (started before the repetitions)", flush=True)
    with stack:
        for rep, side in alternating(args.reps, ("job", "loader")):
            if side == "job":
                last_job = f = run_job(job)
                steady["job"].append(f.steady_rows_per_s)
                e2e["job"].append(f.rows_in / f.end_to_end_s)
                print(
                    f"rep {rep} job: steady {f.steady_rows_per_s:9.2f} rows/s  end-to-end "
                    f"{f.rows_in / f.end_to_end_s:9.2f} rows/s ({f.end_to_end_s:.1f}s, "
                    f"run_prepared {f.pipeline_s:.1f}s, {f.rows_ok}/{f.rows_in} ok) layout {f.layout}",
                    flush=True,
                )
                if f.startup:
                    print(f"  start-up s: {' '.join(f'{k}={v:.1f}' for k, v in f.startup)}", flush=True)
            else:
                f = loader(best, rows)
                steady["loader"].append(f.steady_rows_per_s)
                e2e["loader"].append(f.rows_in / f.end_to_end_s)
                print(
                    f"rep {rep} {best.name}: steady {f.steady_rows_per_s:9.2f} rows/s  end-to-end "
                    f"{f.rows_in / f.end_to_end_s:9.2f} rows/s ({f.end_to_end_s:.1f}s, {f.rows_ok}/{f.rows_in} ok)",
                    flush=True,
                )

    print("job's operators (Ray Data stats, last run): busy = remote wall time summed over tasks/actor calls")
    print(
        f"  {'operator':44s} {'busy s':>8s} {'cpu s':>8s} {'span s':>8s} {'rows out':>9s} {'MB out':>9s} {'KB/row':>7s}"
    )
    for op in last_job.operators:
        per_row = op.bytes_out / op.rows_out / 1e3 if op.rows_out else 0.0
        print(
            f"  {op.name[:44]:44s} {op.busy_s:8.1f} {op.cpu_s:8.1f} {op.span_s:8.1f} {op.rows_out:9d} "
            f"{op.bytes_out / 1e6:9.1f} {per_row:7.1f}"
        )
    traffic = sum(op.bytes_out for op in last_job.operators)
    print(
        f"  object-store traffic {traffic / 1e6:.1f} MB put by operators; "
        f"spilled {last_job.spilled_bytes / 1e6:.1f} MB, restored {last_job.restored_bytes / 1e6:.1f} MB"
    )
    if args.stats_out:
        with open(args.stats_out, "w") as fh:
            fh.write(last_job.stats_text)
    where = "on a running Ray" if args.ray == "running" else "each starting its own local Ray"
    print(f"summary (job layout {last_job.layout}, {where}; loader {best.name}):")
    for side in ("job", "loader"):
        print(f"  {side:7s} steady     {Spread.of(steady[side]).text()}")
        print(f"  {side:7s} end-to-end {Spread.of(e2e[side]).text()}")
    print(f"end_to_end_ratio={ratio(Spread.of(e2e['job']).median, Spread.of(e2e['loader']).median):.3f}")
    print(f"ratio={ratio(Spread.of(steady['job']).median, Spread.of(steady['loader']).median):.3f}")


if __name__ == "__main__":
    main()
