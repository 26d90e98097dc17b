"""CPU side of the job: tokenize text, fetch images by URI, decode, resize and crop them.

Tokenisation and image geometry are the checkpoint's own (its tokenizer, max length and
special tokens; its image processor's RGB conversion, resize mode, resample filter and centre
crop; see :mod:`ray_jobs.model.image_ops`); rescale and normalisation run in the model stage.
Text is padded to the longest row of the batch unless the tower needs its max length.
Every row leaves here either valid (``ok``) with ``input_ids``, ``attention_mask`` and
``pixels`` (uint8 HWC at the model's size), or rejected with the stage and a reason;
rejected rows carry zero placeholders so batches keep one shape, and later stages skip them.
"""

from __future__ import annotations

import io
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ray_jobs import storage
from ray_jobs.model.image_ops import ImageProcessing

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_OBJECT_BYTES = 64 * 1024 * 1024


class RowRejected(Exception):
    """One row cannot be embedded; ``str(exc)`` is the reason written to ``rejects``."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES


def fetch_bytes(uri: str, max_bytes: int) -> bytes:
    """The object at *uri*, or :class:`RowRejected` saying why it cannot be had."""
    if not uri:
        raise RowRejected("fetch", "missing object: empty image_uri")
    try:
        fs, path = storage.filesystem_for(uri)
        with fs.open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise RowRejected("fetch", f"missing object: {uri}") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise RowRejected("fetch", f"unreadable object: {uri}: {type(exc).__name__}") from None
    except OSError as exc:
        raise RowRejected("fetch", f"fetch error: {uri}: {exc}") from None
    if not data:
        raise RowRejected("fetch", f"empty object: {uri}")
    if len(data) > max_bytes:
        raise RowRejected("fetch", f"object too large: {uri} exceeds {max_bytes} bytes")
    return data


def decode_image(data: bytes, processing: ImageProcessing, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode *data* and apply the checkpoint's own resize / crop: uint8 pixels of
    ``processing.pixel_shape`` and the patch grid (SigLIP 2; ``(0, 0)`` otherwise); never more
    than *max_pixels* decoded."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise RowRejected("decode", f"decompression bomb: {w}x{h} exceeds {max_pixels} pixels")
            img.load()
            img = ImageOps.exif_transpose(img)
            return processing.transform(img)
    except RowRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RowRejected("decode", f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise RowRejected("decode", "not an image: unrecognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc)
        kind = "truncated image" if "truncated" in msg.lower() or isinstance(exc, EOFError) else "undecodable image"
        raise RowRejected("decode", f"{kind}: {msg}"[:300]) from None


class Preprocessor:
    """Ray Data callable class: one per CPU actor of the preprocessing pool."""

    def __init__(self, model_uri: str, limits: ImageLimits | None = None, fetch_threads: int = 16):
        from ray_jobs.model.checkpoint import open_checkpoint

        ckpt = open_checkpoint(model_uri)
        self.text = ckpt.text_processing
        self.tokenizer = self.text.load_tokenizer()
        self.processing = ckpt.image_processing
        self.limits = limits or ImageLimits()
        self.pool = ThreadPoolExecutor(max_workers=fetch_threads, thread_name_prefix="fetch")

    def _image(self, uri: str) -> tuple[np.ndarray, tuple[int, int]]:
        data = fetch_bytes(uri, self.limits.max_object_bytes)
        return decode_image(data, self.processing, self.limits.max_pixels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"]
        n = len(ids)
        texts = ["" if t is None else str(t) for t in batch["text"]]
        uris = ["" if u is None else str(u) for u in batch["image_uri"]]
        ok = np.ones(n, dtype=bool)
        stage = np.full(n, "", dtype=object)
        reason = np.full(n, "", dtype=object)
        out_ids = np.array(["" if i is None else str(i) for i in ids], dtype=object)
        for r in range(n):
            if ids[r] is None or out_ids[r] == "":
                ok[r], stage[r], reason[r] = False, "read", "missing id: null or empty id"
        input_ids, attention_mask = self.text.encode(self.tokenizer, texts)
        pixels = np.zeros((n, *self.processing.pixel_shape), dtype=np.uint8)
        grids = np.zeros((n, 2), dtype=np.int64)
        futures = [self.pool.submit(self._image, u) if ok[r] else None for r, u in enumerate(uris)]
        for r, fut in enumerate(futures):
            if fut is None:
                continue
            try:
                pixels[r], grids[r] = fut.result()
            except RowRejected as exc:
                ok[r], stage[r], reason[r] = False, exc.stage, exc.reason
            except Exception as exc:  # never let one row fail the partition
                ok[r], stage[r], reason[r] = False, "decode", f"undecodable image: {type(exc).__name__}: {exc}"[:300]
        return {
            "id": out_ids,
            "ok": ok,
            "reject_stage": stage,
            "reject_reason": reason,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixels": pixels,
            **({"spatial_shapes": grids} if self.processing.patches else {}),
        }
