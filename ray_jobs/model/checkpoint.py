"""The twin-tower checkpoint format and how to open one from a local dir or an S3 prefix.

On disk (local directory or ``s3://`` prefix)::

    twin_tower.json            name, embed_dim, poolings, text max length, tower sub-dirs
    projection.safetensors     text_projection.weight [D, H_text], image_projection.weight [D, H_image]
    text/                      a Hugging Face text encoder: config.json, model.safetensors, tokenizer files
    image/                     a Hugging Face ViT-style encoder: config.json, model.safetensors,
                               preprocessor_config.json

A real checkpoint is the same layout with real towers copied in (``save_pretrained`` output
of e.g. ``albert-base-v2`` and ``google/vit-base-patch16-224``) and trained projection heads.
Small files are synced to a local cache (tokenizers and configs need a local path); weights
are read in place, tensor by tensor (see :mod:`ray_jobs.model.safetensors_io`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from functools import cached_property

from ray_jobs import storage
from ray_jobs.contract import join_uri, make_model_id
from ray_jobs.errors import ModelError

MANIFEST_FILE = "twin_tower.json"
PROJECTION_FILE = "projection.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_POOLINGS = ("mean", "cls")


@dataclass(frozen=True)
class TwinTowerConfig:
    """``twin_tower.json``: how the two towers form one embedding model."""

    name: str
    embed_dim: int
    text_dir: str = "text"
    image_dir: str = "image"
    text_pooling: str = "mean"
    image_pooling: str = "cls"
    text_max_length: int = 64

    def __post_init__(self) -> None:
        if self.embed_dim <= 0:
            raise ModelError(f"{MANIFEST_FILE}: embed_dim must be positive, got {self.embed_dim}")
        for key in ("text_pooling", "image_pooling"):
            if getattr(self, key) not in _POOLINGS:
                raise ModelError(f"{MANIFEST_FILE}: {key} must be one of {_POOLINGS}, got {getattr(self, key)!r}")
        if self.text_max_length <= 1:
            raise ModelError(f"{MANIFEST_FILE}: text_max_length must be > 1, got {self.text_max_length}")

    @classmethod
    def from_json(cls, text: str, source: str) -> TwinTowerConfig:
        try:
            data = json.loads(text)
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ModelError(f"{source}: invalid twin-tower config: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


def _cache_root() -> str:
    return os.environ.get("RAY_JOBS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ray_jobs")


def _sync_small_files(uri: str) -> str:
    """Copy every non-weight file of the checkpoint at *uri* into a local cache dir."""
    fs, root = storage.filesystem_for(uri)
    local = os.path.join(_cache_root(), "models", hashlib.sha256(uri.encode()).hexdigest()[:16])
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        found = {}
    if not found:
        raise ModelError(f"model {uri}: nothing found at that prefix")
    for path, info in sorted(found.items()):
        rel = os.path.relpath(path, root)
        if rel.endswith(_WEIGHT_SUFFIXES) or info.get("type") != "file":
            continue
        dest = os.path.join(local, rel)
        if os.path.exists(dest) and os.path.getsize(dest) == info.get("size"):
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".sync-")
        os.close(fd)
        fs.get_file(path, tmp)
        os.replace(tmp, dest)  # atomic: concurrent actors on one node never see half a file
    return local


class TwinTowerCheckpoint:
    """An opened checkpoint: configs and tokenizer locally, weights where they are."""

    def __init__(self, uri: str) -> None:
        self.uri = uri if storage.is_remote(uri) else storage.filesystem_for(uri)[1]
        if storage.is_remote(uri):
            self.local_dir = _sync_small_files(uri)
        else:
            if not os.path.isdir(self.uri):
                raise ModelError(f"model directory {uri} does not exist")
            self.local_dir = self.uri
        manifest = os.path.join(self.local_dir, MANIFEST_FILE)
        if not os.path.exists(manifest):
            raise ModelError(f"model {uri}: {MANIFEST_FILE} is missing; is this a twin-tower checkpoint?")
        with open(manifest) as fh:
            self.config = TwinTowerConfig.from_json(fh.read(), manifest)
        for sub in (self.config.text_dir, self.config.image_dir):
            if not os.path.exists(os.path.join(self.local_dir, sub, "config.json")):
                raise ModelError(f"model {uri}: tower directory {sub}/ has no config.json")
        if not os.path.exists(os.path.join(self.local_dir, self.config.image_dir, "preprocessor_config.json")):
            raise ModelError(f"model {uri}: {self.config.image_dir}/preprocessor_config.json is missing")

    # -- locations
    def tower_uri(self, tower: str) -> str:
        return join_uri(self.uri, self.tower_subdir(tower))

    def tower_local_dir(self, tower: str) -> str:
        return os.path.join(self.local_dir, self.tower_subdir(tower))

    def tower_subdir(self, tower: str) -> str:
        return {"text": self.config.text_dir, "image": self.config.image_dir}[tower]

    @property
    def projection_uri(self) -> str:
        return join_uri(self.uri, PROJECTION_FILE)

    # -- configs
    def hf_config(self, tower: str):
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(self.tower_local_dir(tower))
        cfg._attn_implementation = "sdpa"
        return cfg

    @cached_property
    def image_processing(self) -> dict:
        with open(os.path.join(self.tower_local_dir("image"), "preprocessor_config.json")) as fh:
            return json.load(fh)

    @cached_property
    def model_id(self) -> str:
        """Checkpoint name plus a hash of every file's name and content (weights included).

        Local and remote copies of one checkpoint get the same id. For a remote one the
        content hash is computed once per machine and cached under its listing (paths,
        sizes, ETags), so partition jobs do not re-read the weights just to name them.
        """
        fs, root = storage.filesystem_for(self.uri)
        found = fs.find(root, detail=True)
        files = []
        for path, info in sorted(found.items()):
            rel = os.path.relpath(path, root)
            if not os.path.basename(rel).startswith("."):
                files.append((rel, path, info))
        cache = None
        if storage.is_remote(self.uri):
            listing = [(rel, info.get("size"), info.get("ETag")) for rel, _, info in files]
            key = hashlib.sha256(json.dumps([self.uri, listing]).encode()).hexdigest()[:24]
            cache = os.path.join(_cache_root(), "model-ids", key)
            if os.path.exists(cache):
                with open(cache) as fh:
                    return fh.read().strip()
        digest = hashlib.sha256()
        for rel, path, _ in files:
            digest.update(rel.encode() + b"\0")
            with fs.open(path, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                    digest.update(chunk)
        model_id = make_model_id(self.config.name, digest.hexdigest())
        if cache:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            with open(cache, "w") as fh:
                fh.write(model_id)
        return model_id
