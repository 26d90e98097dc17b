"""Rows that would fail their batch on every retry, through the whole partition job on a real
local Ray: each partition commits, with exactly the bad rows rejected.

- a SigLIP 2 tail batch of one row whose image is missing (its patch grid is empty);
- a batch whose only valid row breaks the model (a token id outside its vocabulary);
- images behind ``http://`` answering 401, 403 and 410.
"""

from __future__ import annotations

import http.server
import os
import random
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_jobs.demo.assets import render_image
from ray_jobs.job.embed import prepare, run_prepared
from ray_jobs.job.preprocess import Preprocessor
from tests.ray_jobs.job.test_embed import _cfg

pytestmark = pytest.mark.integration


def _images(folder, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"img-{i:03d}.png")
        with open(path, "wb") as fh:
            fh.write(render_image(rng, 40 + 8 * (i % 3), 32 + 8 * (i % 4), "PNG", "RGB"))
        paths.append(path)
    return paths


def _manifest(path, uris: list[str], row_group_rows: int, ids: list[str] | None = None) -> str:
    ids = ids or [f"row-{i:03d}" for i in range(len(uris))]
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "text": pa.array([f"picture number {i}" for i in range(len(uris))], pa.string()),
            "image_uri": pa.array(uris, pa.string()),
        }
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_rows)
    return path


class _Assets:
    def __init__(self, model: str, manifest: str):
        self.model, self.manifest = model, manifest


def test_a_siglip2_tail_batch_whose_one_row_has_no_image_commits(ray_session, tmp_path_factory, tmp_path):
    from bench.hf_presets import build_siglip2

    model = build_siglip2(str(tmp_path_factory.mktemp("siglip2") / "siglip2-tiny"), seed=3)
    uris = [*_images(tmp_path / "images", 16), str(tmp_path / "images" / "gone.png")]
    manifest = _manifest(str(tmp_path / "manifest" / "m.parquet"), uris, row_group_rows=16)
    job = prepare(_cfg(_Assets(model, manifest), tmp_path / "out", stages="text,image:0-1|image:2-3", task_retries=1))
    result = run_prepared(job)
    assert (result.rows_ok, result.rows_rejected) == (16, 1)
    assert result.rejects_by_reason == {"missing object": 1}


class VocabularyMismatch(Preprocessor):
    """The real preprocessor, then one row's text token replaced by an id outside the model's
    vocabulary: a stand-in for a tokenizer that does not match its model (no such checkpoint
    ships), the kind of fault that belongs to one row."""

    def __call__(self, batch):
        out = super().__call__(batch)
        for r, rid in enumerate(out["id"]):
            if rid == "poison":
                out["input_ids"][r, 1] = 10_000_000
        return out


def test_a_batch_whose_only_valid_row_breaks_the_model_commits_that_row_as_a_reject(
    ray_session, demo_assets, tmp_path, monkeypatch
):
    monkeypatch.setattr("ray_jobs.job.preprocess.Preprocessor", VocabularyMismatch)
    uris = [str(tmp_path / "images" / "gone.png"), *_images(tmp_path / "images", 1)]
    manifest = _manifest(str(tmp_path / "manifest" / "m.parquet"), uris, row_group_rows=2, ids=["gone", "poison"])
    job = prepare(_cfg(_Assets(demo_assets.model, manifest), tmp_path / "out", num_stages=1, task_retries=1))
    result = run_prepared(job)
    assert (result.rows_ok, result.rows_rejected) == (0, 2)
    assert result.rejects_by_reason == {"missing object": 1, "model error": 1}


class _Images(http.server.BaseHTTPRequestHandler):
    """``/<status>/<name>``: the image file *name* for 200, otherwise that status."""

    folder = ""

    def log_message(self, *args):
        pass

    def _any(self):
        status, name = self.path.strip("/").split("/", 1)
        body = b"no"
        if status == "200":
            with open(os.path.join(self.folder, name), "rb") as fh:
                body = fh.read()
        self.send_response(int(status))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _any


def test_images_answering_401_403_410_over_http_are_rejects_and_the_partition_commits(
    ray_session, demo_assets, tmp_path
):
    paths = _images(tmp_path / "images", 5)
    handler = type("Images", (_Images,), {"folder": str(tmp_path / "images")})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        uris = [f"{base}/200/{os.path.basename(p)}" for p in paths] + [
            f"{base}/401/a.png",
            f"{base}/403/b.png",
            f"{base}/410/c.png",
        ]
        manifest = _manifest(str(tmp_path / "manifest" / "m.parquet"), uris, row_group_rows=8)
        job = prepare(_cfg(_Assets(demo_assets.model, manifest), tmp_path / "out", num_stages=1, task_retries=1))
        result = run_prepared(job)
    finally:
        server.shutdown()
    assert (result.rows_ok, result.rows_rejected) == (5, 3)
    assert result.rejects_by_reason == {"access denied": 2, "missing object": 1}
    assert np.isfinite(result.rows_per_s)
