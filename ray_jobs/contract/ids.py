"""Deterministic ids: model ids, plan ids, dataset names and the manifest fingerprint."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_ID_SAFE = re.compile(r"[^a-z0-9_]+")


def short_hash(*parts: object, length: int = 12) -> str:
    """A stable short hex digest of JSON-serialisable *parts*."""
    payload = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def sanitize_name(name: str) -> str:
    """Lower-case ``[a-z0-9_]`` form of *name*, usable in paths and table names."""
    cleaned = _ID_SAFE.sub("_", name.lower()).strip("_")
    return cleaned or "model"


def make_model_id(name: str, content_digest: str) -> str:
    """``{sanitised name}-{first 10 hex of the checkpoint content hash}``."""
    return f"{sanitize_name(name)}-{content_digest[:10]}"


@dataclass(frozen=True)
class FileFingerprint:
    """One manifest file as planning sees it: its path, byte size, row count and version.

    ``version`` is what the listing says about the content: the object's ETag (or version
    id) on S3, the modification time in nanoseconds locally. A file rewritten with the same
    size and row count gets another version, so the manifest plans anew."""

    path: str
    size: int
    rows: int
    version: str = ""


def manifest_fingerprint(files: Iterable[FileFingerprint]) -> str:
    """A digest of the manifest's files (sorted), independent of listing order."""
    rows = sorted((f.path, f.size, f.rows, f.version) for f in files)
    return short_hash("manifest", rows, length=16)


def default_dataset_name(manifest_uri: str) -> str:
    """The dataset a manifest belongs to when none is named: its last path segment (without
    ``.parquet``), sanitised, plus a short hash of the whole URI, so two manifests that share
    a directory name never share a table (``s3://b/nightly/products/`` -> ``products_1a2b3c4d``)."""
    normalized = manifest_uri.rstrip("/")
    last = normalized.rsplit("/", 1)[-1].removesuffix(".parquet")
    return f"{sanitize_name(last)[:40]}_{short_hash('dataset', normalized, length=8)}"


def make_plan_id(fingerprint: str, settings: Mapping[str, object], previous: str = "") -> str:
    """Short hash of the manifest fingerprint, the partitioning settings and the plan this one
    continues (a sticky plan depends on which partitions it kept)."""
    if previous:
        return short_hash("plan", fingerprint, dict(settings), previous, length=12)
    return short_hash("plan", fingerprint, dict(settings), length=12)


def work_key(fragments: Iterable[tuple[str, str, Iterable[int]]]) -> str:
    """The content key of a unit of work: its fragments, each a manifest file's URI, its
    version and the row groups read from it. Equal keys mean equal input rows, whatever plan
    or run the work is part of."""
    rows = [(uri, version, list(groups)) for uri, version, groups in fragments]
    return short_hash("work", rows, length=16)


def output_key(model_id: str, settings: Mapping[str, object]) -> str:
    """The identity of what a run writes: the model and every setting that changes the
    embeddings or which rows are rejected (dtype, image limits). Execution settings (batch
    size, pools, stage layout, partition size) are not part of it."""
    return short_hash("output", model_id, dict(sorted(settings.items())), length=10)
