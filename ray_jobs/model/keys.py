"""Names inside a checkpoint are untrusted: object keys, tower sub-dirs and shard file names."""

from __future__ import annotations

from ray_jobs.errors import ModelError


def safe_relpath(rel: str, where: str, kind: str) -> str:
    """*rel* if it names a place inside its root: no ``..``, no absolute path, no backslash, no empty part."""
    parts = rel.split("/")
    if (
        not rel
        or "\\" in rel
        or "\0" in rel
        or rel.startswith("/")
        or (len(rel) > 1 and rel[1] == ":")
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ModelError(f"{where}: refusing {kind} {rel!r}: it would resolve outside the checkpoint")
    return rel
