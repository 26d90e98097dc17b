"""A checkpoint's model id from its metadata only: never the weight bytes.

The id is ``{name}-{10 hex}`` (see :func:`ray_jobs.contract.ids.make_model_id`); the hash covers
every file's relative path and size, the full content of the small files (configs, tokenizer,
processor), the header of every safetensors file (tensor names, dtypes, shapes, offsets) and,
on object stores, every object's ETag. A multi-GB checkpoint is named by reading well under
1 MB. The DAG's ``check_inputs`` computes it once per run and passes it to every partition job
(``embed --model-id``).
"""

from __future__ import annotations

import hashlib
import json
import os

from ray_jobs import storage
from ray_jobs.contract.ids import make_model_id
from ray_jobs.errors import ModelError
from ray_jobs.model.safetensors_io import header_bytes

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
#: A small file bigger than this is named by size (and ETag) instead of content.
MAX_HASHED_FILE = 64 * 1024 * 1024


def list_checkpoint(uri: str) -> list[tuple[str, str, dict]]:
    """``(relative path, fs path, info)`` of every file under *uri*, sorted, dotfiles skipped."""
    fs, root = storage.filesystem_for(uri)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        found = {}
    out = []
    for path, info in sorted(found.items()):
        if info.get("type") != "file":
            continue
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        out.append((rel, path, info))
    if not out:
        raise ModelError(f"model {uri}: nothing found at that prefix")
    return out


def _etag(info: dict) -> str:
    return str(info.get("ETag") or info.get("etag") or "").strip('"')


def metadata_digest(uri: str) -> str:
    """Hex digest of the checkpoint's metadata (see the module docstring)."""
    fs, _ = storage.filesystem_for(uri)
    digest = hashlib.sha256(b"ray_jobs-model-id-v2\0")
    for rel, path, info in list_checkpoint(uri):
        size = int(info.get("size") or 0)
        entry = {"path": rel, "size": size, "etag": _etag(info)}
        if rel.endswith(".safetensors"):
            entry["header"] = hashlib.sha256(header_bytes(fs, path)).hexdigest()
        elif not rel.endswith(WEIGHT_SUFFIXES) and size <= MAX_HASHED_FILE:
            entry["content"] = hashlib.sha256(fs.cat_file(path)).hexdigest()
        digest.update(json.dumps(entry, sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


def compute_model_id(uri: str, name: str) -> str:
    return make_model_id(name, metadata_digest(uri))
