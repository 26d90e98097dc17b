"""The checkpoint's own tokenisation: its tokenizer, max length, truncation and special tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ray_jobs.errors import ModelError


@dataclass(frozen=True)
class TextProcessing:
    """How text becomes ``input_ids`` / ``attention_mask`` for this checkpoint."""

    tokenizer_dir: str
    max_length: int
    pad_to_max_length: bool = False  # the tower reads a fixed position (SigLIP pools the last token)

    def __post_init__(self) -> None:
        if self.max_length <= 1:
            raise ModelError(f"text max length must be > 1, got {self.max_length}")

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.tokenizer_dir)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{self.tokenizer_dir}: cannot load the tokenizer: {exc}") from exc

    def encode(self, tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)`` as int64, padded to the longest row unless the tower needs max length."""
        enc = tokenizer(
            texts,
            padding="max_length" if self.pad_to_max_length else "longest",
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=True,
            return_tensors="np",
        )
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def tokenizer_max_length(tokenizer_dir: str, position_limit: int | None, default: int) -> int:
    """The tokenizer's ``model_max_length`` (its own truncation length), bounded by the tower's positions."""
    import json
    import os

    value = None
    path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    if os.path.exists(path):
        with open(path) as fh:
            value = json.load(fh).get("model_max_length")
    if not isinstance(value, int) or value <= 1 or value > 1_000_000:
        value = position_limit or default
    if position_limit:
        value = min(value, int(position_limit))
    return int(value)
