"""The base of every checkpoint format: a checkpoint opened from a local directory or an
``s3://`` prefix, with its configs and tokenizer files local and its weights where they are.

Small files are synced to a local cache (tokenizers and configs need a local path); weights
are read in place, tensor by tensor (see :mod:`ray_jobs.model.safetensors_io`). The formats
are :class:`~ray_jobs.model.checkpoint.TwinTowerCheckpoint` and
:class:`~ray_jobs.model.hf_dual.HFDualCheckpoint`; :func:`ray_jobs.model.checkpoint.open_checkpoint`
tells them apart.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
from functools import cached_property

from ray_jobs import storage
from ray_jobs.errors import ModelError
from ray_jobs.model.image_ops import ImageProcessing
from ray_jobs.model.keys import safe_relpath
from ray_jobs.model.model_id import WEIGHT_SUFFIXES, compute_model_id
from ray_jobs.model.text_ops import TextProcessing


def declared_positive_int(config: dict, key: str) -> int | None:
    """``config[key]`` of a Hugging Face config dict where it is written as a positive integer."""
    value = config.get(key) if isinstance(config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _cache_root() -> str:
    return os.environ.get("RAY_JOBS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ray_jobs")


def sync_small_files(uri: str) -> str:
    """Copy every non-weight file of the checkpoint at *uri* into a local cache dir.

    A cached file is reused only while its object's size and ETag are unchanged, and files
    gone from the prefix leave the cache. Object keys are untrusted: a key that would land
    outside the cache dir (``..``, an absolute path, a backslash) is refused before anything
    is written."""
    fs, root = storage.filesystem_for(uri)
    local = os.path.join(_cache_root(), "models", hashlib.sha256(uri.encode()).hexdigest()[:16])
    root = root.rstrip("/")
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        found = {}
    if not found:
        raise ModelError(f"model {uri}: nothing found at that prefix")
    plan = []
    for path, info in sorted(found.items()):
        if info.get("type") != "file":
            continue
        if not path.startswith(root + "/"):
            raise ModelError(f"model {uri}: refusing object key {path!r}: it is not under the checkpoint prefix")
        rel = safe_relpath(path[len(root) + 1 :], f"model {uri}", "object key")
        dest = os.path.normpath(os.path.join(local, *rel.split("/")))
        if os.path.commonpath([dest, os.path.normpath(local)]) != os.path.normpath(local):
            raise ModelError(f"model {uri}: refusing object key {rel!r}: it would resolve outside the checkpoint")
        if not rel.endswith(WEIGHT_SUFFIXES):
            plan.append((path, info, dest))
    wanted = set()
    for path, info, dest in plan:
        wanted.add(dest)
        stamp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.stamp")
        etag = info.get("ETag") or info.get("etag") or info.get("mtime") or ""
        version = f"{info.get('size')}:{etag}"
        if os.path.exists(dest) and os.path.exists(stamp) and _read(stamp) == version:
            continue  # this exact object version is already here
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".sync-")
        os.close(fd)
        fs.get_file(path, tmp)
        os.replace(tmp, dest)  # atomic: concurrent actors on one node never see half a file
        _write_atomic(stamp, version)
    for dirpath, _, names in os.walk(local):  # a file deleted upstream must not linger in the cache
        for name in names:
            full = os.path.join(dirpath, name)
            if not name.startswith(".") and full not in wanted:
                os.remove(full)
    return local


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".sync-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


class Checkpoint:
    """An opened checkpoint: configs and tokenizer locally, weights where they are.

    Subclasses describe their towers (:meth:`tower`), tokenisation and image processing."""

    format = "?"

    def __init__(self, uri: str) -> None:
        self.uri = uri if storage.is_remote(uri) else storage.filesystem_for(uri)[1]
        if storage.is_remote(uri):
            self.local_dir = sync_small_files(uri)
        else:
            if not os.path.isdir(self.uri):
                raise ModelError(f"model directory {uri} does not exist")
            self.local_dir = self.uri
        self._towers: dict = {}

    @property
    def name(self) -> str:
        return posixpath.basename(self.uri.rstrip("/")) or "model"

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    @property
    def text_processing(self) -> TextProcessing:
        raise NotImplementedError

    @property
    def image_processing(self) -> ImageProcessing:
        raise NotImplementedError

    def _build_tower(self, tower: str):
        raise NotImplementedError

    def tower(self, tower: str):
        """The :class:`~ray_jobs.model.tower_def.TowerDef` of *tower* (``text`` or ``image``)."""
        if tower not in self._towers:
            self._towers[tower] = self._build_tower(tower)
        return self._towers[tower]

    def layer_counts(self) -> dict[str, int]:
        """Transformer layers per tower. Read from the configs' JSON where they state it (a
        partition job's driver needs only these to lay out its stages, and building a tower
        imports torch and transformers: seconds of every driver's start-up); otherwise from
        the built towers, which always agree (tests/ray_jobs/model/test_checkpoint.py)."""
        declared = self._declared_layer_counts()
        if declared is not None:
            return declared
        return {t: self.tower(t).num_layers for t in ("text", "image")}

    def _declared_layer_counts(self) -> dict[str, int] | None:
        """``num_hidden_layers`` of each tower's config as written, or None where a config
        leaves it to its class's default (then only transformers knows it)."""
        return None

    def layer_costs(self) -> dict[str, list[float]]:
        """Rough FLOPs per layer per row of each tower (what a balanced stage split weighs).
        From the configs' JSON where it states every figure, like :meth:`layer_counts`."""
        declared = self._declared_layer_costs()
        if declared is not None:
            return declared
        return {t: [self.tower(t).layer_cost()] * self.tower(t).num_layers for t in ("text", "image")}

    def _declared_layer_costs(self) -> dict[str, list[float]] | None:
        return None

    @cached_property
    def model_id(self) -> str:
        """``{name}-{hash of the checkpoint's metadata}``; reads no weight bytes (see :mod:`.model_id`)."""
        return compute_model_id(self.uri, self.name)
