#!/usr/bin/env python
"""Nightly runs embed only what changed: night 2 against night 1 and against a full re-run.

    flock /tmp/heavy.lock python bench/incremental.py                    # 100,000 rows, 200 files
    python bench/incremental.py --rows 2000 --files 10                   # a quick run

Night 1 plans a manifest of ``--files`` equal Parquet files, embeds every partition with the
tiny demo model (``python -m ray_jobs plan``, ``embed --plan --partition``, ``validate
--report --catalog-uri``, in this process on one local Ray) and registers the table in a
SQLite Iceberg catalog. Then the manifest changes: ``--append`` of the rows arrive in new
files, ``--rewrite-files`` files are rewritten with new ids and image URIs, ``--delete-files``
files are removed. Night 2 plans the changed manifest continuing night 1's plan (sticky) and
runs the same commands. Last, a full re-run over night 2's manifest from scratch (``plan
--fresh`` into another output root and catalog) is the reference: night 2's table must equal
its table (same ids, embeddings within 1e-5).

Image reads are counted by the kernel (inotify ``IN_OPEN`` on the images directory,
:mod:`bench.open_counter`), whatever process reads them. Every row has its own image path;
the paths are hard links to ``--images`` distinct rendered images (rendering 100,000 images
takes longer than embedding them and measures nothing). Compute is the summed wall time of
the partition jobs that ran (a committed partition is skipped in milliseconds). Ray is
started once, before night 1, outside the timings.

The default geometry is the issue's: a file is 0.5 % of the rows and a partition is one file
(``--partition-files``), so a retired partition has no unchanged neighbours to re-embed. Every
partition job pays Ray's per-job start-up (actor processes, model load; ~15 s on 2 cores), so
wall time and compute grow with the number of partitions more than with rows at this size.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import math
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class Night:
    name: str
    rows_planned: int
    partitions: int
    jobs_run: int
    rows_embedded: int
    image_reads: int
    wall_s: float
    job_s: float
    kept_rows: int
    retired_rows: int
    catalog: dict


@dataclass
class Corpus:
    root: str
    images: str
    manifest: str
    model: str
    pool: list[str]
    rng: random.Random

    def link_image(self, name: str, k: int) -> str:
        path = os.path.join(self.images, name)
        os.link(self.pool[k % len(self.pool)], path)
        return path

    def write_file(self, path: str, ids: list[str], k0: int) -> None:
        from ray_jobs.demo.checkpoint import caption

        uris = [self.link_image(f"img-{i}.jpg", k0 + n) for n, i in enumerate(ids)]
        table = pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "text": pa.array([caption(self.rng) for _ in ids], pa.string()),
                "image_uri": pa.array(uris, pa.string()),
                "image_bytes": pa.array([os.path.getsize(u) for u in uris], pa.int64()),
            }
        )
        tmp = path + ".tmp"
        pq.write_table(table, tmp, row_group_size=self.row_group_rows)
        os.replace(tmp, path)  # a rewrite is a new file version (size + mtime)

    row_group_rows: int = 10_000


def build_corpus(root: str, rows: int, files: int, images: int, row_group_rows: int, seed: int) -> Corpus:
    from ray_jobs.demo.assets import render_image
    from ray_jobs.demo.checkpoint import build_demo_checkpoint

    rng = random.Random(seed)
    for d in ("pool", "images", "manifest"):
        os.makedirs(os.path.join(root, d))
    model = build_demo_checkpoint(os.path.join(root, "model"), seed=seed)
    pool = []
    for k in range(images):
        path = os.path.join(root, "pool", f"{k:05d}.jpg")
        with open(path, "wb") as fh:
            fh.write(render_image(rng, rng.randint(24, 96), rng.randint(24, 96), "JPEG", "RGB"))
        pool.append(path)
    corpus = Corpus(root, os.path.join(root, "images"), os.path.join(root, "manifest"), model, pool, rng)
    corpus.row_group_rows = row_group_rows
    per_file = rows // files
    for f in range(files):
        ids = [f"row-{n:07d}" for n in range(f * per_file, (f + 1) * per_file)]
        corpus.write_file(os.path.join(corpus.manifest, f"part-{f:05d}.parquet"), ids, f * per_file)
    return corpus


def change_manifest(corpus: Corpus, files: int, per_file: int, append_rows: int, rewrite: int, delete: int) -> dict:
    """Append new files, rewrite some files with new ids and image URIs, delete others; returns what changed."""
    names = sorted(os.listdir(corpus.manifest))
    rewritten = [names[(k + 1) * len(names) // (rewrite + delete + 1)] for k in range(rewrite)]
    deleted = [names[(rewrite + k + 1) * len(names) // (rewrite + delete + 1)] for k in range(delete)]
    for name in rewritten:
        path = os.path.join(corpus.manifest, name)
        n = pq.ParquetFile(path).metadata.num_rows
        stem = name.removesuffix(".parquet")
        corpus.write_file(path, [f"rw-{stem}-{i:06d}" for i in range(n)], 7 + len(corpus.pool) // 2)
    for name in deleted:
        os.remove(os.path.join(corpus.manifest, name))
    appended, left, f = 0, append_rows, files
    while left > 0:
        n = min(per_file, left)
        ids = [f"new-{appended + i:07d}" for i in range(n)]
        corpus.write_file(os.path.join(corpus.manifest, f"part-{f:05d}.parquet"), ids, 3 * appended + 1)
        appended, left, f = appended + n, left - n, f + 1
    return {
        "appended_rows": appended,
        "appended_files": f - files,
        "rewritten_rows": rewrite * per_file,
        "rewritten_files": rewritten,
        "deleted_rows": delete * per_file,
        "deleted_files": deleted,
    }


def _cli(*argv: str) -> None:
    from ray_jobs.cli import main

    with contextlib.redirect_stdout(io.StringIO()) as out:
        rc = main(list(argv))
    if rc != 0:
        raise SystemExit(f"`python -m ray_jobs {shlex.join(argv)}` exited {rc}:\n{out.getvalue()[-3000:]}")


def run_night(name, corpus, counter, output, catalog, run_id, args, *, fresh=False) -> Night:
    """plan, embed every partition, validate and register: the DAG's steps as commands."""
    tmp = tempfile.mkdtemp(prefix=f"{name}-", dir=corpus.root)
    counter.settle()
    reads_before = counter.total
    start = time.perf_counter()
    plan_args = ["plan", "--manifest", corpus.manifest, "--output", output, "--run-id", run_id]
    plan_args += ["--partition-rows", str(args.partition_rows), "--model", corpus.model]
    _cli(*plan_args, *(["--fresh"] if fresh else []), "--summary-json", f"{tmp}/plan.json")
    with open(f"{tmp}/plan.json") as fh:
        planned = json.load(fh)
    jobs, rows_embedded, job_s = 0, 0, 0.0
    for k in planned["partitions"]:
        summary = f"{tmp}/embed-{k}.json"
        _cli(
            "embed",
            "--plan",
            planned["plan_uri"],
            "--partition",
            str(k),
            "--model",
            corpus.model,
            "--batch-size",
            str(args.batch_size),
            "--summary-json",
            summary,
        )
        with open(summary) as fh:
            result = json.load(fh)
        if not result["skipped"]:
            jobs, rows_embedded, job_s = jobs + 1, rows_embedded + result["rows_in"], job_s + result["wall_s"]
    _cli(
        "validate",
        "--plan",
        planned["plan_uri"],
        "--report",
        "--catalog-uri",
        catalog,
        "--summary-json",
        f"{tmp}/validate.json",
    )
    wall = time.perf_counter() - start
    counter.settle()
    reads = counter.total - reads_before
    with open(f"{tmp}/validate.json") as fh:
        validated = json.load(fh)
    if not validated["ok"]:
        raise SystemExit(f"{name}: validate failed: {validated['problems']}")
    return Night(
        name,
        planned["rows"],
        len(planned["partitions"]),
        jobs,
        rows_embedded,
        reads,
        wall,
        job_s,
        planned["kept_rows"],
        planned["retired_rows"],
        {"catalog": catalog, "output": output},
    )


def read_table(catalog_uri: str, output: str) -> pa.Table:
    from ray_jobs.contract.layout import join_uri
    from ray_jobs.output.catalog import NAMESPACE, open_catalog

    catalog = open_catalog(catalog_uri, join_uri(output, "warehouse"))
    (ident,) = catalog.list_tables(NAMESPACE)
    return catalog.load_table(ident).scan().to_arrow().sort_by("id")


def compare_tables(a: pa.Table, b: pa.Table) -> tuple[bool, float, int]:
    """(same ids each once, max |difference| of any embedding value, rows)."""
    ids_a, ids_b = a["id"].to_pylist(), b["id"].to_pylist()
    same = ids_a == ids_b and len(set(ids_a)) == len(ids_a)
    if not same:
        return False, math.inf, len(ids_a)
    diff = 0.0
    for col in ("text_embedding", "image_embedding"):
        x = np.stack(a[col].to_numpy(zero_copy_only=False))
        y = np.stack(b[col].to_numpy(zero_copy_only=False))
        diff = max(diff, float(np.abs(x - y).max()) if len(x) else 0.0)
    return True, diff, len(ids_a)


def start_ray(corpus: Corpus, output: str, args) -> None:
    """Start a new local Ray sized as a partition job sizes it (``ensure_ray``), once, before
    any timing; ``address="local"``: never a cluster another process started on this machine."""
    import ray

    from ray_jobs.cli import build_parser
    from ray_jobs.cli.embed import embed_config
    from ray_jobs.job.preflight import prepare
    from ray_jobs.job.ray_start import job_runtime_env

    parsed = build_parser().parse_args(
        ["embed", "--manifest", corpus.manifest, "--output", output, "--model", corpus.model,
         "--batch-size", str(args.batch_size)]
    )  # fmt: skip
    footprint = prepare(embed_config(parsed)).footprint
    needed = footprint.total()["CPU"] - footprint.driver_cpus
    env = job_runtime_env()
    os.environ.update(env)
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, int(needed + 0.999) + 2),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
        log_to_driver=False,
    )


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.4f}" if b else "n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000, help="rows of night 1's manifest")
    ap.add_argument("--files", type=int, default=200, help="manifest files of equal size (200: one is 0.5%% of rows)")
    ap.add_argument("--partition-files", type=int, default=1, help="files per partition (partition_rows / file rows)")
    ap.add_argument("--row-group-rows", type=int, default=10_000)
    ap.add_argument("--append", type=float, default=0.01, help="fraction of rows appended in new files")
    ap.add_argument("--rewrite-files", type=int, default=1, help="files rewritten with new ids and image URIs")
    ap.add_argument("--delete-files", type=int, default=1, help="files removed")
    ap.add_argument("--images", type=int, default=500, help="distinct rendered images the rows' image files link to")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="work in this (new) directory and keep it")
    ap.add_argument("--json", help="also write the figures as JSON to this path")
    args = ap.parse_args(argv)
    if args.rows % args.files:
        ap.error(f"--rows {args.rows} must be a multiple of --files {args.files}")
    per_file = args.rows // args.files
    args.partition_rows = per_file * args.partition_files
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    print(f"# bench/incremental.py  {dt.date.today().isoformat()}  {platform.node()}")
    print(f"# machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}")
    print(f"# command: {shlex.join(['python', 'bench/incremental.py', *(argv if argv is not None else sys.argv[1:])])}")
    print(
        f"# manifest: {args.rows:,} rows in {args.files} files of {per_file:,} rows; partitions of "
        f"{args.partition_rows:,} rows; tiny demo model, batch {args.batch_size}",
        flush=True,
    )

    from bench.open_counter import OpenCounter

    root = args.keep or tempfile.mkdtemp(prefix="incremental-")
    if args.keep:
        os.makedirs(root)
    try:
        t0 = time.perf_counter()
        corpus = build_corpus(root, args.rows, args.files, args.images, args.row_group_rows, args.seed)
        print(f"built the corpus in {time.perf_counter() - t0:.1f}s: {root}", flush=True)
        out, ref = os.path.join(root, "output"), os.path.join(root, "output-full")
        catalog, ref_catalog = f"sqlite:///{root}/catalog.db", f"sqlite:///{root}/catalog-full.db"
        start_ray(corpus, os.path.join(root, "warmup"), args)
        with OpenCounter(corpus.images) as counter:
            night1 = run_night("night 1", corpus, counter, out, catalog, "night-1", args)
            changed = change_manifest(
                corpus, args.files, per_file, round(args.append * args.rows), args.rewrite_files, args.delete_files
            )
            night2 = run_night("night 2", corpus, counter, out, catalog, "night-2", args)
            full = run_night("full re-run", corpus, counter, ref, ref_catalog, "full", args, fresh=True)
        same, diff, table_rows = compare_tables(read_table(catalog, out), read_table(ref_catalog, ref))
    finally:
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    changed_rows = changed["appended_rows"] + changed["rewritten_rows"] + changed["deleted_rows"]
    changed_fraction = changed_rows / night1.rows_planned
    print(
        f"\nchange: +{changed['appended_rows']:,} rows in {changed['appended_files']} new file(s), "
        f"{changed['rewritten_rows']:,} rows rewritten ({len(changed['rewritten_files'])} file(s)), "
        f"-{changed['deleted_rows']:,} rows deleted ({len(changed['deleted_files'])} file(s)): "
        f"{changed_fraction:.2%} of night 1's rows"
    )
    print(
        f"night 2 plan: kept {night2.kept_rows:,} rows, retired {night2.retired_rows:,} rows, "
        f"{night2.jobs_run} of {night2.partitions} partitions embedded\n"
    )
    print("| run | rows planned | partition jobs | rows embedded | image reads | wall s | job s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n in (night1, night2, full):
        print(
            f"| {n.name} | {n.rows_planned:,} | {n.jobs_run} | {n.rows_embedded:,} | {n.image_reads:,} "
            f"| {n.wall_s:.1f} | {n.job_s:.1f} |"
        )
    print("\n| night 2 / | rows embedded | image reads | wall | compute (job s) |")
    print("|---|---:|---:|---:|---:|")
    for base in (night1, full):
        print(
            f"| {base.name} | {_ratio(night2.rows_embedded, base.rows_embedded)} "
            f"| {_ratio(night2.image_reads, base.image_reads)} | {_ratio(night2.wall_s, base.wall_s)} "
            f"| {_ratio(night2.job_s, base.job_s)} |"
        )
    bound = 2 * changed_fraction
    work = max(night2.rows_embedded / night1.rows_embedded, night2.image_reads / max(1, night1.image_reads))
    work_ok = work <= bound
    print(
        f"\nnight 2's work (rows embedded, image reads) is {work:.2%} of night 1's; bound 2 x changed fraction = "
        f"{bound:.2%}: {'OK' if work_ok else 'EXCEEDED'}"
    )
    tables_ok = same and diff <= 1e-5
    print(
        f"night 2's table equals the full re-run's: {'yes' if tables_ok else 'NO'} "
        f"({table_rows:,} rows, ids {'equal' if same else 'DIFFER'}, max |embedding difference| {diff:.2e})"
    )
    figures = {
        "args": vars(args),
        "change": changed,
        "changed_fraction": changed_fraction,
        "nights": [n.__dict__ for n in (night1, night2, full)],
        "work_fraction": work,
        "work_ok": work_ok,
        "tables_equal": tables_ok,
        "max_embedding_diff": diff,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2, default=str)
    return 0 if work_ok and tables_ok else 1


if __name__ == "__main__":
    sys.exit(main())
