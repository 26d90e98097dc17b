"""The user's alternative in bench/job_vs_torch.py: a torch ``DataLoader`` feeding the unsplit model.

Worker processes fetch and decode each image and tokenise each batch with the project's own
functions (:func:`ray_jobs.job.preprocess.fetch_bytes`, :func:`ray_jobs.job.preprocess.decode_image`,
the checkpoint's tokenizer and text encoding), so the CPU work is the job's; the main process
runs the reference model (``reference_for``) with *threads* intra-op threads and writes the
embeddings to Parquet as batches come. Each run is a fresh spawned process; its end-to-end
time runs from the spawn to the closed Parquet file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from bench.fair import BenchError, steady_rate
from bench.spawned import run_spawned


@dataclass(frozen=True)
class LoaderVariant:
    workers: int
    threads: int

    def __post_init__(self) -> None:
        if self.workers < 0 or self.threads < 1:
            raise BenchError(f"DataLoader variant needs workers >= 0 and threads >= 1, got {self}")

    @property
    def name(self) -> str:
        return f"DataLoader {self.workers}workers x {self.threads}thr"


@dataclass(frozen=True)
class LoaderSettings:
    model: str
    manifest: str
    output: str
    device: str
    dtype: str
    batch: int
    warmup: int
    rows: int  # the first *rows* rows of the manifest


@dataclass(frozen=True)
class LoaderFigures:
    rows_in: int
    rows_ok: int
    end_to_end_s: float
    steady_rows_per_s: float


class ManifestImages:
    """Map-style dataset: row *i* -> (id, text, uint8 pixels or None, reject reason)."""

    def __init__(self, model: str, ids, texts, uris):
        self.model, self.ids, self.texts, self.uris = model, ids, texts, uris
        self._processing = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        from ray_jobs.job.preprocess import ImageLimits, RowRejected, decode_image, fetch_bytes
        from ray_jobs.model.checkpoint import open_checkpoint

        if self._processing is None:  # once per worker process
            self._processing = open_checkpoint(self.model).image_processing
        limits = ImageLimits()
        try:
            pixels, _ = decode_image(
                fetch_bytes(self.uris[i], limits.max_object_bytes), self._processing, limits.max_pixels
            )
            return self.ids[i], self.texts[i], pixels, ""
        except RowRejected as exc:
            return self.ids[i], self.texts[i], None, exc.reason


class Collate:
    """Tokenise a batch's texts with the checkpoint's tokenizer (padded to the batch's longest) and stack pixels."""

    def __init__(self, model: str):
        self.model = model
        self._text = None

    def __call__(self, items):
        from ray_jobs.model.checkpoint import open_checkpoint

        if self._text is None:  # once per worker process
            ckpt = open_checkpoint(self.model)
            self._text = (
                ckpt.text_processing,
                ckpt.text_processing.load_tokenizer(),
                ckpt.image_processing.pixel_shape,
            )
        text, tokenizer, shape = self._text
        input_ids, attention_mask = text.encode(tokenizer, [t for _, t, _, _ in items])
        ok = np.array([p is not None for _, _, p, _ in items])
        pixels = np.stack([p if p is not None else np.zeros(shape, np.uint8) for _, _, p, _ in items])
        return {
            "id": [i for i, *_ in items],
            "ok": ok,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixels": pixels,
        }


def _loader_process(settings: LoaderSettings, variant: LoaderVariant, spawned_at: float, queue) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch
        from torch.utils.data import DataLoader
        from transformers.utils import logging as hf_logging

        from bench.reference_model import reference_for
        from ray_jobs.model.checkpoint import open_checkpoint

        hf_logging.disable_progress_bar()
        torch.set_num_threads(variant.threads)
        table = pq.read_table(settings.manifest, columns=["id", "text", "image_uri"]).slice(0, settings.rows)
        data = ManifestImages(settings.model, *(table.column(c).to_pylist() for c in ("id", "text", "image_uri")))
        ckpt = open_checkpoint(settings.model)
        model = reference_for(ckpt, device=settings.device, dtype=settings.dtype)
        loader = DataLoader(
            data,
            batch_size=settings.batch,
            num_workers=variant.workers,
            collate_fn=Collate(settings.model),
            prefetch_factor=4 if variant.workers else None,
        )
        dim = ckpt.embed_dim
        schema = pa.schema(
            [
                ("id", pa.string()),
                ("text_embedding", pa.list_(pa.float32(), dim)),
                ("image_embedding", pa.list_(pa.float32(), dim)),
            ]
        )
        times, sizes, ok_rows = [], [], 0
        with pq.ParquetWriter(settings.output, schema) as writer:
            for b in loader:
                ok = np.flatnonzero(b["ok"])
                if len(ok):
                    emb = model.embed(b["input_ids"][ok], b["attention_mask"][ok], b["pixels"][ok])
                    cols = {
                        "id": pa.array([b["id"][i] for i in ok], pa.string()),
                        **{
                            k: pa.FixedSizeListArray.from_arrays(pa.array(emb[k].astype(np.float32).ravel()), dim)
                            for k in ("text_embedding", "image_embedding")
                        },
                    }
                    writer.write_table(pa.table(cols, schema=schema))
                ok_rows += len(ok)
                times.append(time.perf_counter())
                sizes.append(len(b["id"]))
        end_to_end = time.time() - spawned_at
        queue.put(LoaderFigures(sum(sizes), ok_rows, end_to_end, steady_rate(times, sizes, settings.warmup)))
    except BaseException as exc:
        queue.put(f"{type(exc).__name__}: {exc}")


def run_loader(settings: LoaderSettings, variant: LoaderVariant, timeout_s: float = 3600.0) -> LoaderFigures:
    return run_spawned(
        _loader_process,
        (settings, variant),
        timeout_s=timeout_s,
        what=variant.name,
    )
