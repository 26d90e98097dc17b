"""Where bytes live: local paths, ``file://`` and ``s3://`` URIs through fsspec.

S3 goes through s3fs. Credentials come from the usual AWS environment (or an instance
role); ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) points it at MinIO, moto or any
S3-compatible endpoint, which is how the tests reach a real S3 server on loopback.
"""

from __future__ import annotations

import os
import posixpath
from functools import lru_cache

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem


def _scheme(uri: str) -> str | None:
    head, sep, _ = uri.partition("://")
    return head.lower() if sep and head.isidentifier() else None


def is_remote(uri: str) -> bool:
    """True for any ``scheme://`` URI other than ``file://`` (s3, gs, az, or any fsspec protocol)."""
    return _scheme(uri) not in (None, "file")


def _s3_options() -> dict:
    opts: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


@lru_cache(maxsize=16)
def _remote_fs(protocol: str, options_key: tuple) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem(protocol, **dict(options_key))


def filesystem_for(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem holding *uri* and the path inside it."""
    if uri.startswith("file://"):
        return LocalFileSystem(), os.path.abspath(uri[len("file://") :])
    if is_remote(uri):
        protocol, _, rest = uri.partition("://")
        protocol = "s3" if protocol == "s3a" else protocol
        opts = _s3_options() if protocol == "s3" else {}
        try:
            fs = _remote_fs(protocol, tuple(sorted(opts.items())))
        except (ValueError, ImportError) as exc:
            raise ValueError(f"no filesystem for {protocol}:// URIs ({uri}): {exc}") from exc
        return fs, rest.rstrip("/")
    return LocalFileSystem(), os.path.abspath(uri)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Inverse of :func:`filesystem_for` for a path found by listing *fs*."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols:
        return path
    return f"{protocols[0]}://{path}"


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """A pyarrow filesystem over *fs*: Arrow's own for local files, s3fs wrapped otherwise."""
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def exists(uri: str) -> bool:
    fs, path = filesystem_for(uri)
    return fs.exists(path)


def read_text(uri: str) -> str:
    fs, path = filesystem_for(uri)
    with fs.open(path, "rb") as fh:
        return fh.read().decode()


def write_text(uri: str, text: str) -> None:
    fs, path = filesystem_for(uri)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(text.encode())


def remove_tree(uri: str) -> None:
    """Delete *uri* and everything under it; a missing path is not an error."""
    fs, path = filesystem_for(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache(path)


def list_files(uri: str) -> list[str]:
    """Plain files directly under *uri*, sorted, as URIs."""
    fs, path = filesystem_for(uri)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    entries = fs.ls(path, detail=True)
    return sorted(to_uri(fs, e["name"]) for e in entries if e["type"] == "file")
