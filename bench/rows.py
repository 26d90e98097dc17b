"""Benchmark inputs: a random-init checkpoint of a preset, and rows as the preprocessing actors emit them."""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np

TINY_PRESETS = ("tiny", "clip-tiny")


def preset_names() -> list[str]:
    from bench.hf_presets import CLIP_PRESETS
    from ray_jobs.demo.checkpoint import PRESETS

    return sorted(PRESETS) + [f"clip-{p}" for p in CLIP_PRESETS]


def build_preset(preset: str, out: str | None = None) -> str:
    """A random-init checkpoint of *preset* (a twin-tower preset or ``clip-<CLIP preset>``) under
    *out* (default: a new temp dir); returns its directory."""
    from bench.hf_presets import CLIP_PRESETS, build_clip
    from ray_jobs.demo.checkpoint import PRESETS, build_demo_checkpoint

    out = out or tempfile.mkdtemp(prefix="bench-ckpt-")
    if preset in PRESETS:
        return build_demo_checkpoint(os.path.join(out, preset), preset=preset)
    if preset.startswith("clip-") and preset[len("clip-") :] in CLIP_PRESETS:
        return build_clip(os.path.join(out, preset), preset=preset[len("clip-") :])
    raise SystemExit(f"unknown preset {preset!r}: one of {', '.join(preset_names())}")


def make_rows(ckpt, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """*n* rows as the preprocessing actors emit them (the checkpoint's own tokenizer and image size).

    Text is padded to the longest caption of all rows, so every batch has one shape on both sides."""
    from ray_jobs.demo.checkpoint import caption

    rng = random.Random(seed)
    text = ckpt.text_processing
    input_ids, attention_mask = text.encode(text.load_tokenizer(), [caption(rng) for _ in range(n)])
    pixel_shape = ckpt.image_processing.pixel_shape
    pixels = np.random.default_rng(seed).integers(0, 256, (n, *pixel_shape), dtype=np.uint8)
    return {
        "id": np.array([f"row-{i:06d}" for i in range(n)], dtype=object),
        "ok": np.ones(n, dtype=bool),
        "reject_stage": np.full(n, "", dtype=object),
        "reject_reason": np.full(n, "", dtype=object),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixels": pixels,
    }
