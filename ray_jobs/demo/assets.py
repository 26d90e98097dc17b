"""``demo-assets``: a tiny checkpoint, real images (some broken) and a manifest that references them.

Images are JPEG, PNG and WebP in varied sizes and modes (RGB, L, RGBA, P, CMYK, LA). Broken
ones cycle through the failure kinds the job must survive: a missing object, a zero-byte
object, a truncated JPEG, bytes that are not an image, a decompression bomb (a PNG whose
header claims 40000x40000 pixels) and a corrupt PNG stream.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_jobs import storage
from ray_jobs.contract.layout import join_uri
from ray_jobs.errors import UsageError

BROKEN_KINDS = ("missing", "empty", "truncated", "not_image", "bomb", "corrupt_png")
_FORMATS = (
    ("JPEG", "jpg", "RGB"),
    ("PNG", "png", "RGBA"),
    ("WEBP", "webp", "RGB"),
    ("JPEG", "jpg", "L"),
    ("PNG", "png", "P"),
    ("JPEG", "jpg", "CMYK"),
    ("PNG", "png", "LA"),
    ("PNG", "png", "RGB"),
)


@dataclass(frozen=True)
class DemoAssets:
    root: str
    model: str
    manifest: str
    images: str
    rows: int
    broken: dict[str, int]


def render_image(rng: random.Random, w: int, h: int, fmt: str, mode: str) -> bytes:
    """A seeded *w* x *h* gradient image in PIL format *fmt* (JPEG, PNG, WEBP) and *mode*."""
    from PIL import Image

    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [
            (xx * rng.randint(1, 5) + rng.randint(0, 255)) % 256,
            (yy * rng.randint(1, 5) + rng.randint(0, 255)) % 256,
            ((xx + yy) * rng.randint(1, 3)) % 256,
        ],
        axis=-1,
    ).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(((xx * 255) // max(1, w - 1)).astype(np.uint8), "L"))
    elif mode == "LA":
        img = img.convert("LA")
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=85) if fmt in ("JPEG", "WEBP") else img.save(buf, format=fmt)
    return buf.getvalue()


def _image_bytes(rng: random.Random, n: int) -> tuple[bytes, str]:
    fmt, ext, mode = _FORMATS[n % len(_FORMATS)]
    w, h = rng.randint(20, 320), rng.randint(20, 320)
    return render_image(rng, w, h, fmt, mode), ext


def _bomb_png() -> bytes:
    """A valid PNG signature and IHDR claiming 40000x40000, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _broken(kind: str, rng: random.Random) -> tuple[bytes | None, str]:
    if kind == "missing":
        return None, "jpg"
    if kind == "empty":
        return b"", "jpg"
    if kind == "truncated":
        data, _ = _image_bytes(rng, 0)
        return data[: len(data) // 3], "jpg"
    if kind == "not_image":
        return b"this is not an image, it is a text file that someone uploaded by mistake\n" * 8, "jpg"
    if kind == "bomb":
        return _bomb_png(), "png"
    data, _ = _image_bytes(rng, 7)  # corrupt_png: a real PNG with its pixel stream overwritten
    mid = len(data) // 2
    return data[:mid] + bytes(rng.randrange(256) for _ in range(64)) + data[mid + 64 :], "png"


def write_demo_assets(
    out: str, rows: int = 200, bad_images: int = 6, seed: int = 0, files: int = 2, row_group_rows: int = 64
) -> DemoAssets:
    """Write model/, images/ and manifest/ under *out* (a local dir or an ``s3://`` prefix)."""
    from ray_jobs.demo.checkpoint import build_demo_checkpoint

    if rows <= 0:
        raise UsageError(f"--rows must be > 0, got {rows}")
    if not 0 <= bad_images <= rows:
        raise UsageError(f"--bad-images must be between 0 and --rows ({rows}), got {bad_images}")
    rng = random.Random(seed)
    remote = storage.is_remote(out)
    final_root = out.rstrip("/") if remote else os.path.abspath(out)
    work = tempfile.mkdtemp(prefix="demo-assets-") if remote else final_root
    os.makedirs(os.path.join(work, "images"), exist_ok=True)
    os.makedirs(os.path.join(work, "manifest"), exist_ok=True)
    build_demo_checkpoint(os.path.join(work, "model"), seed=seed)

    bad_rows = set(rng.sample(range(rows), bad_images))
    table, broken = _write_images(work, final_root, remote, rows, bad_rows, rng)
    _write_manifest(table, os.path.join(work, "manifest"), files, row_group_rows)
    if remote:
        fs, path = storage.filesystem_for(final_root)
        fs.put(work.rstrip("/") + "/", path + "/", recursive=True)
        shutil.rmtree(work)
    return DemoAssets(
        final_root,
        join_uri(final_root, "model"),
        join_uri(final_root, "manifest"),
        join_uri(final_root, "images"),
        rows,
        broken,
    )


def _write_images(
    work: str, final_root: str, remote: bool, rows: int, bad_rows: set[int], rng: random.Random, first: int = 0
) -> tuple[pa.Table, dict[str, int]]:
    """Write one image per row under ``{work}/images`` (the rows in *bad_rows* broken, cycling
    through :data:`BROKEN_KINDS`); return the manifest table, whose URIs point under
    *final_root*, and how many images of each broken kind were written. Rows are numbered
    from *first* (earlier rows are someone else's)."""
    from ray_jobs.demo.checkpoint import caption

    broken: dict[str, int] = {}
    ids, texts, uris, sizes = [], [], [], []
    bad_seen = 0
    for n in range(first, rows):
        if n in bad_rows:
            kind = BROKEN_KINDS[bad_seen % len(BROKEN_KINDS)]
            bad_seen += 1
            data, ext = _broken(kind, rng)
            broken[kind] = broken.get(kind, 0) + 1
        else:
            data, ext = _image_bytes(rng, n)
        name = f"images/img-{n:06d}.{ext}"
        if data is not None:
            with open(os.path.join(work, name), "wb") as fh:
                fh.write(data)
        location = join_uri(final_root, name)
        uris.append(location if remote or n % 5 else f"file://{location}")  # both URI forms
        ids.append(f"row-{n:06d}")
        texts.append("" if n % 17 == 3 else caption(rng))  # some empty texts: embedded, not rejected
        sizes.append(0 if data is None else len(data))
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "text": pa.array(texts, pa.string()),
            "image_uri": pa.array(uris, pa.string()),
            "image_bytes": pa.array(sizes, pa.int64()),
        }
    )
    return table, broken


def _write_manifest(table: pa.Table, manifest_dir: str, files: int, row_group_rows: int) -> None:
    """Split *table* into *files* Parquet files of *row_group_rows*-row groups under *manifest_dir*."""
    rows = table.num_rows
    per_file = -(-rows // max(1, files))
    for k in range(0, rows, per_file):
        pq.write_table(
            table.slice(k, per_file),
            os.path.join(manifest_dir, f"part-{k // per_file:05d}.parquet"),
            row_group_size=row_group_rows,
        )


@dataclass(frozen=True)
class NightChange:
    added_rows: int
    added_file: str
    dropped_files: tuple[str, ...]
    dropped_rows: int

    def summary(self) -> str:
        return (
            f"demo-night: manifest gained {self.added_rows} rows ({self.added_file}) and lost "
            f"{len(self.dropped_files)} file(s) ({self.dropped_rows} rows)"
        )


def change_demo_manifest(out: str, add_rows: int = 200, drop_files: int = 1, seed: int = 1) -> NightChange:
    """What a night's upstream does to the demo manifest (local demo only): a new file of
    *add_rows* rows with new ids and images, and the last *drop_files* files deleted."""
    if storage.is_remote(out):
        raise UsageError("demo-night changes a local demo directory only")
    root = os.path.abspath(out)
    manifest_dir = os.path.join(root, "manifest")
    files = sorted(f for f in os.listdir(manifest_dir) if f.endswith(".parquet"))
    if drop_files < 0 or drop_files >= len(files):
        raise UsageError(f"--drop-files must be between 0 and {len(files) - 1} (the manifest has {len(files)} files)")
    ids = [pq.read_table(os.path.join(manifest_dir, f), columns=["id"])["id"].to_pylist() for f in files]
    start = max(int(i.removeprefix("row-")) for chunk in ids for i in chunk) + 1
    rng = random.Random(seed)
    table, _ = _write_images(root, root, False, start + add_rows, set(), rng, first=start)
    name = f"part-{start:06d}-added.parquet"
    pq.write_table(table, os.path.join(manifest_dir, name), row_group_size=64)
    dropped = files[len(files) - drop_files :]
    dropped_rows = 0
    for f in dropped:
        dropped_rows += pq.ParquetFile(os.path.join(manifest_dir, f)).metadata.num_rows
        os.remove(os.path.join(manifest_dir, f))
    return NightChange(add_rows, name, tuple(dropped), dropped_rows)
