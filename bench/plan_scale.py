#!/usr/bin/env python
"""Planning at scale: N manifest files planned from their footers, against reading all the data.

    python bench/plan_scale.py                 # 10,000 files, 8 row groups each
    python bench/plan_scale.py --files 2000    # smaller

Writing 10,000 distinct multi-MB files would take tens of GB, so ``--distinct`` real files
(default 200, each ~3 MB, 8 row groups) are hard-linked to N paths: every path is opened,
seeked and parsed independently, exactly as distinct files would be. Bytes read are
counted by a wrapping filesystem, not self-reported. The full-data comparison reads a
sample of files completely (raw bytes and a Parquet decode) and scales to N.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow as pa
import pyarrow.parquet as pq


def generate(root: str, files: int, distinct: int, row_groups: int, rows_per_group: int) -> int:
    os.makedirs(root, exist_ok=True)
    templates = []
    for d in range(min(distinct, files)):
        n = row_groups * rows_per_group
        table = pa.table(
            {
                "id": [f"{d}-{i:08d}" for i in range(n)],
                "text": [os.urandom(32).hex() for _ in range(n)],
                "image_uri": [f"s3://images/{d}/{i:08d}.jpg" for i in range(n)],
                "image_bytes": pa.array([150_000 + (i * 7919) % 200_000 for i in range(n)], pa.int64()),
            }
        )
        path = os.path.join(root, f"template-{d:05d}.parquet")
        pq.write_table(table, path, row_group_size=rows_per_group)
        templates.append(path)
    for i in range(files):
        os.link(templates[i % len(templates)], os.path.join(root, f"part-{i:06d}.parquet"))
    for t in templates:
        os.rename(t, t.replace("template-", "_template-"))  # keep data, hide from the manifest listing
    return sum(os.path.getsize(os.path.join(root, f"part-{i:06d}.parquet")) for i in range(files))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--distinct", type=int, default=200)
    parser.add_argument("--row-groups", type=int, default=8)
    parser.add_argument("--rows-per-group", type=int, default=4000)
    parser.add_argument("--sample", type=int, default=100, help="files read completely for the comparison")
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="timed planning runs (the median is reported)")
    parser.add_argument("--keep", help="generate into this directory and keep it")
    args = parser.parse_args()

    from bench.counting_fs import CountingFileSystem
    from bench.counting_fs import register as register_counting_fs
    from ray_jobs.config.settings import Partitioning
    from ray_jobs.planning.plan import make_plan

    register_counting_fs()
    root = args.keep or tempfile.mkdtemp(prefix="plan-scale-")
    manifest = os.path.join(root, "manifest")
    try:
        t0 = time.perf_counter()
        stored = generate(manifest, args.files, args.distinct, args.row_groups, args.rows_per_group)
        print(
            f"generated {args.files} files ({args.distinct} distinct contents hard-linked), "
            f"{args.row_groups} row groups each, {stored / 1e9:.2f} GB stored, in {time.perf_counter() - t0:.1f}s"
        )

        settings = Partitioning(partition_rows=1_000_000)
        out = os.path.join(root, "out")
        # bytes: through the counting wrapper (an fsspec protocol, so planned like a remote store)
        make_plan(f"counting://{manifest}", out, settings, threads=args.threads)
        read = CountingFileSystem.bytes_read
        # time: the plain local path, page cache warm (the run above read every footer once); median of --runs
        runs = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            plan, groups = make_plan(manifest, out, settings, threads=args.threads)
            runs.append(time.perf_counter() - t0)
        plan_s = sorted(runs)[len(runs) // 2]
        print("plan: runs " + ", ".join(f"{r:.2f}s" for r in runs) + f" -> median {plan_s:.2f}s")
        print(
            f"plan: {args.files} files, {groups} row groups, {plan.rows} rows -> {len(plan.partitions)} partitions "
            f"in {plan_s:.2f}s ({plan_s / args.files * 1e6:.0f} us/file on {os.cpu_count()} cores)"
        )
        print(
            f"plan: bytes read {read} of {stored} stored = {read / stored:.4%} "
            f"({read / args.files:.0f} B/file, {CountingFileSystem.opens} opens)"
        )

        sample = [
            os.path.join(manifest, f"part-{i:06d}.parquet")
            for i in range(0, args.files, max(1, args.files // args.sample))
        ]
        t0 = time.perf_counter()
        raw = 0
        for p in sample:
            with open(p, "rb") as fh:
                raw += len(fh.read())
        raw_s = (time.perf_counter() - t0) / len(sample) * args.files
        t0 = time.perf_counter()
        for p in sample:
            pq.read_table(p)
        decode_s = (time.perf_counter() - t0) / len(sample) * args.files
        print(f"full read (scaled from {len(sample)} files): raw bytes {raw_s:.1f}s, Parquet decode {decode_s:.1f}s")
        print(f"speedup_vs_decode={decode_s / plan_s:.1f}x fraction_read={read / stored:.5f} plan_seconds={plan_s:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
