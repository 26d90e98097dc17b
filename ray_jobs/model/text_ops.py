"""The checkpoint's own tokenisation: its tokenizer, max length, truncation and special tokens.

A checkpoint whose tokenizer transformers runs as its ``tokenizer.json`` stands (the generic
``TokenizersBackend``, nothing in ``tokenizer_config.json`` that changes the pipeline) is
tokenised with the ``tokenizers`` library alone, configured exactly as transformers configures it
(:class:`JsonTokenizer`): the ids are the same, and a preprocessing actor starts without
importing transformers or torch (about 4 CPU-seconds per actor). Any other checkpoint goes
through ``AutoTokenizer``; :func:`json_tokenizer_problem` says why.
"""

from __future__ import annotations

import json
import os
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
        """The tokenizer :meth:`encode` takes: a :class:`JsonTokenizer` where transformers would
        run ``tokenizer.json`` unchanged, else the checkpoint's ``AutoTokenizer``."""
        try:
            return JsonTokenizer.load(self.tokenizer_dir)
        except NotStandalone:
            return self.auto_tokenizer()

    def auto_tokenizer(self):
        """The checkpoint's tokenizer as transformers' ``AutoTokenizer`` loads it."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.tokenizer_dir)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{self.tokenizer_dir}: cannot load the tokenizer: {exc}") from exc

    def encode(self, tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)`` as int64, padded to the longest row unless the tower needs max length."""
        if isinstance(tokenizer, JsonTokenizer):
            return tokenizer.encode(texts, self.max_length, pad_to_max_length=self.pad_to_max_length)
        enc = tokenizer(
            texts,
            padding="max_length" if self.pad_to_max_length else "longest",
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=True,
            return_tensors="np",
        )
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


#: ``tokenizer_config.json`` keys that change nothing transformers' generic backend does when it
#: encodes: names, lengths, sides (applied here as transformers applies them), decode options.
_NEUTRAL_CONFIG_KEYS = frozenset(
    {
        "added_tokens_decoder",
        "backend",
        "bos_token",
        "clean_up_tokenization_spaces",
        "cls_token",
        "eos_token",
        "mask_token",
        "model_input_names",
        "model_max_length",
        "name_or_path",
        "pad_token",
        "padding_side",
        "processor_class",
        "sep_token",
        "tokenizer_class",
        "truncation_side",
        "unk_token",
    }
)
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
#: classes that run the serialised pipeline as it stands (a model-specific class may rebuild
#: the normaliser, pre-tokeniser or post-processor from its own arguments instead)
_GENERIC_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
#: transformers patches the pre-tokeniser of some vocabularies over this size
_MAX_VOCAB = 100_000
#: Model types for which ``AutoTokenizer`` ignores a generic ``tokenizer_class`` and builds the
#: model's own tokenizer class (transformers' ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``, as
#: pinned; a test fails when the installed transformers lists one that is missing here).
_CLASS_OVERRIDDEN_MODEL_TYPES = frozenset(
    {
        "arctic", "camembertv2-base", "chatlm", "cohere_asr", "ernie4_5", "ernie4_5_moe", "fuyu",
        "h2ovl_chat", "hyperclovax", "hyperclovax_vision_v2", "hyperclovax_vlm", "internlm2",
        "internlm3", "iquestcoder", "jamba", "llava", "llava_next", "minicpm3", "minicpmv",
        "minimax_m2", "modernbert", "modernbert-decoder", "molmo", "molmo2", "nemotron", "nvfp4",
        "opencua", "openvla", "paddleocr_vl", "phi3", "phi3_v", "phimoe", "qwen2", "qwen3_5",
        "qwen3_5_moe", "qwen3_5_moe_text", "qwen4_exp", "siglip2", "smolvlm", "step3_vl", "vipllava",
    }
)  # fmt: skip


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


class NotStandalone(ModelError):
    """transformers would not run this ``tokenizer.json`` as it stands (the reason is the message)."""


def json_tokenizer_problem(tokenizer_dir: str) -> str | None:
    """Why *tokenizer_dir* must go through transformers, or None when :class:`JsonTokenizer`
    encodes exactly as transformers would (its generic backend, given this config, leaves the
    serialised pipeline as it is: adds no special token, rebuilds no post-processor)."""
    try:
        _standalone(tokenizer_dir)
    except NotStandalone as exc:
        return str(exc)
    return None


def _standalone(tokenizer_dir: str):
    """``(backend, tokenizer config)`` of *tokenizer_dir*, each file read once; raises
    :class:`NotStandalone` naming why transformers would do otherwise than run the file."""
    from tokenizers import Tokenizer

    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise NotStandalone("no tokenizer.json")
    try:
        config_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
        config = _read_json(config_path) if os.path.exists(config_path) else {}
    except (OSError, ValueError) as exc:
        raise NotStandalone(f"unreadable tokenizer files: {exc}") from None
    cls = config.get("tokenizer_class") or "PreTrainedTokenizerFast"
    if cls not in _GENERIC_CLASSES:
        raise NotStandalone(f"tokenizer class {cls} (its own code builds the pipeline)")
    try:
        model_config_path = os.path.join(tokenizer_dir, "config.json")
        model_config = _read_json(model_config_path) if os.path.exists(model_config_path) else {}
    except (OSError, ValueError) as exc:
        raise NotStandalone(f"unreadable config.json: {exc}") from None
    for key in ("model_type", "model_name"):
        if model_config.get(key) in _CLASS_OVERRIDDEN_MODEL_TYPES:
            raise NotStandalone(f"{key} {model_config[key]} (transformers builds its own tokenizer class for it)")
    if os.path.exists(os.path.join(tokenizer_dir, "tekken.json")):
        raise NotStandalone("a Mistral tekken.json (transformers may load that instead)")
    extra = sorted(set(config) - _NEUTRAL_CONFIG_KEYS)
    if extra:
        raise NotStandalone(f"tokenizer_config.json sets {', '.join(extra)}")
    try:
        backend = Tokenizer.from_file(path)
    except Exception as exc:  # the Rust loader raises a bare Exception on a malformed file
        raise NotStandalone(f"unreadable tokenizer files: {exc}") from None
    if backend.post_processor is None:
        raise NotStandalone("no post-processor (transformers builds one)")
    if backend.truncation is not None or backend.padding is not None:
        raise NotStandalone("tokenizer.json fixes its own truncation or padding")
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [k for k in _SPECIAL_TOKEN_KEYS if _token_content(config.get(k)) not in (None, *added)]
    if missing:
        raise NotStandalone(f"special tokens not in tokenizer.json: {', '.join(missing)} (transformers adds them)")
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict) or any(_token_content(t) not in added for t in decoder.values()):
        raise NotStandalone("added_tokens_decoder holds tokens not in tokenizer.json (transformers adds them)")
    if config.get("padding_side", "right") not in ("left", "right"):
        raise NotStandalone(f"padding_side {config.get('padding_side')!r}")
    if config.get("truncation_side", "right") not in ("left", "right"):
        raise NotStandalone(f"truncation_side {config.get('truncation_side')!r}")
    pad_token = _token_content(config.get("pad_token"))
    if pad_token is None:
        raise NotStandalone("no pad token")
    if backend.get_vocab_size(with_added_tokens=True) > _MAX_VOCAB:
        raise NotStandalone(f"vocabulary over {_MAX_VOCAB:,} tokens")
    return backend, config


class JsonTokenizer:
    """A ``tokenizer.json`` run by the ``tokenizers`` library, configured per call exactly as
    transformers' ``TokenizersBackend.__call__`` configures the same object: truncation to
    ``max_length`` (longest first, the config's side), padding to the longest row or to
    ``max_length`` with the config's pad token and side, special tokens added by the
    post-processor. Use only where :func:`json_tokenizer_problem` found none."""

    def __init__(self, backend, pad_token: str, pad_id: int, padding_side: str, truncation_side: str):
        self.backend = backend
        self.pad_token = pad_token
        self.pad_id = pad_id
        self.padding_side = padding_side
        self.truncation_side = truncation_side

    @classmethod
    def load(cls, tokenizer_dir: str) -> JsonTokenizer:
        """Raises :class:`NotStandalone` where transformers would not run the file as it stands."""
        try:
            backend, config = _standalone(tokenizer_dir)
        except NotStandalone as exc:
            raise NotStandalone(f"{tokenizer_dir}: the tokenizers library alone cannot stand in: {exc}") from None
        pad_token = _token_content(config.get("pad_token"))
        pad_id = backend.token_to_id(pad_token)
        if pad_id is None:
            raise ModelError(f"{tokenizer_dir}: pad token {pad_token!r} is not in the vocabulary")
        backend.encode_special_tokens = False
        return cls(
            backend, pad_token, pad_id, config.get("padding_side", "right"), config.get("truncation_side", "right")
        )

    def encode(self, texts: list[str], max_length: int, pad_to_max_length: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)`` as int64, as :meth:`TextProcessing.encode` returns them."""
        self.backend.enable_truncation(max_length, stride=0, strategy="longest_first", direction=self.truncation_side)
        self.backend.enable_padding(
            direction=self.padding_side,
            pad_id=self.pad_id,
            pad_type_id=0,
            pad_token=self.pad_token,
            length=max_length if pad_to_max_length else None,
        )
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=True)
        if not encodings:
            empty = np.zeros((0, max_length if pad_to_max_length else 0), np.int64)
            return empty, empty.copy()
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return ids, mask


def tokenizer_max_length(tokenizer_dir: str, position_limit: int | None, default: int) -> int:
    """The tokenizer's ``model_max_length`` (its own truncation length), bounded by the tower's positions."""
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
