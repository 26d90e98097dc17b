"""Real image files of mixed sizes and a manifest for the whole-job benchmark.

Mostly JPEG photos-sized images (RGB), some PNG (RGB and RGBA), sides drawn between
*min_side* and *max_side* with aspect ratios from 1:2 to 2:1, rendered by the demo's own
seeded generator (:func:`ray_jobs.demo.assets.render_image`); the manifest has the project's
schema (id, text, image_uri, image_bytes). The same arguments give the same files.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from bench.fair import BenchError

#: (PIL format, extension, mode, weight): what a crawl of web images mostly holds.
_KINDS = (("JPEG", "jpg", "RGB", 8), ("PNG", "png", "RGB", 1), ("PNG", "png", "RGBA", 1))


@dataclass(frozen=True)
class JobAssets:
    manifest: str
    images: str
    rows: int
    image_bytes: int


def write_job_assets(
    out: str, rows: int, *, min_side: int = 160, max_side: int = 1280, seed: int = 0, files: int = 4
) -> JobAssets:
    """Write ``out/images`` and ``out/manifest`` (*files* Parquet files) for *rows* rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_jobs.demo.assets import render_image
    from ray_jobs.demo.checkpoint import caption

    if rows <= 0 or files <= 0:
        raise BenchError(f"rows and files must be > 0, got {rows} and {files}")
    if not 16 <= min_side <= max_side:
        raise BenchError(f"need 16 <= min side <= max side, got {min_side} and {max_side}")
    rng = random.Random(seed)
    images, manifest = os.path.join(out, "images"), os.path.join(out, "manifest")
    os.makedirs(images, exist_ok=True)
    os.makedirs(manifest, exist_ok=True)
    kinds = [k for k in _KINDS for _ in range(k[3])]
    ids, texts, uris, sizes = [], [], [], []
    for n in range(rows):
        fmt, ext, mode, _ = kinds[n % len(kinds)]
        long_side = rng.randint(min_side, max_side)
        short_side = max(min_side // 2, int(long_side / rng.uniform(1.0, 2.0)))
        w, h = (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)
        data = render_image(rng, w, h, fmt, mode)
        path = os.path.join(images, f"img-{n:07d}.{ext}")
        with open(path, "wb") as fh:
            fh.write(data)
        ids.append(f"row-{n:07d}")
        texts.append(caption(rng))
        uris.append(path)
        sizes.append(len(data))
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "text": pa.array(texts, pa.string()),
            "image_uri": pa.array(uris, pa.string()),
            "image_bytes": pa.array(sizes, pa.int64()),
        }
    )
    per_file = -(-rows // files)
    for k in range(0, rows, per_file):
        pq.write_table(table.slice(k, per_file), os.path.join(manifest, f"part-{k // per_file:05d}.parquet"))
    return JobAssets(manifest, images, rows, sum(sizes))
