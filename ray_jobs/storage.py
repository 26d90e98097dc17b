"""Where bytes live: local paths, ``file://`` and ``s3://`` URIs through fsspec.

S3 goes through s3fs. Credentials come from the usual AWS environment (or an instance
role); ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) points it at MinIO, moto or any
S3-compatible endpoint, which is how the tests reach a real S3 server on loopback.

Commit markers need a write that succeeds only if nothing is there (:func:`create_exclusive`):
``O_EXCL`` semantics locally (a hard link of a complete temporary file, so no reader ever sees
half a marker), and on an object store a conditional ``PUT`` with ``If-None-Match: *`` (AWS S3
since 2024, MinIO, moto). Some stores accept that header and ignore it (older MinIO, Ceph RGW,
some moto releases): :func:`probe_conditional_create` finds out by creating one object twice
(the second must be refused) and remembers the answer per store. A store that ignores the
header, answers it with ``501 NotImplemented``, or is declared not to support it
(``RAY_JOBS_S3_CONDITIONAL_WRITES=0``) gets the claim protocol instead (:func:`_create_by_claim`):
put a claim object of one's own, list the claims, and put the target only when no other claim
and no target exist, then remove the claim. On a store whose PUT, LIST and HEAD are strongly
consistent (S3 and its compatibles) at most one writer wins: of two writers, the one that lists
second sees the other's claim, or, once that claim is gone, the target it guarded.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import posixpath
import random
import secrets
import time
from functools import lru_cache

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from ray_jobs.errors import FilesystemUnavailable, OutputError

log = logging.getLogger(__name__)


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


#: S3 options for a caller that owns its retry policy: one try per call (the connect and read
#: timeouts of s3fs still bound each request). Without this, botocore's and s3fs's own retry
#: loops nest (up to 25 tries with sleeps) and hide throttling from the caller.
_S3_SINGLE_TRY = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}


@lru_cache(maxsize=16)
def _remote_fs(protocol: str, options_key: tuple, single_try: bool = False) -> fsspec.AbstractFileSystem:
    options = dict(options_key)
    if single_try and protocol == "s3":
        options.update(_S3_SINGLE_TRY)  # botocore: one attempt
    fs = fsspec.filesystem(protocol, **options)
    if single_try and protocol == "s3":
        fs.retries = 1  # s3fs's own loop (a class attribute, not a constructor argument)
    return fs


def filesystem_for(uri: str, *, single_try: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem holding *uri* and the path inside it.

    ``single_try=True``: the S3 client makes one attempt per call, for callers that retry with
    their own bounded backoff (image fetches, :func:`ray_jobs.job.preprocess.fetch_bytes`)."""
    if uri.startswith("file://"):
        return LocalFileSystem(), os.path.abspath(uri[len("file://") :])
    if is_remote(uri):
        protocol, _, rest = uri.partition("://")
        protocol = "s3" if protocol == "s3a" else protocol
        opts = _s3_options() if protocol == "s3" else {}
        try:
            fs = _remote_fs(protocol, tuple(sorted(opts.items())), single_try)
        except ImportError as exc:
            package = getattr(exc, "name", None) or required_package(uri) or protocol
            raise FilesystemUnavailable(
                f"no filesystem for {protocol}:// URIs ({uri}): install the {package!r} package where this runs ({exc})"
            ) from exc
        except ValueError as exc:
            raise ValueError(f"no filesystem for {protocol}:// URIs ({uri}): {exc}") from exc
        if protocol in ("http", "https"):  # fsspec's HTTP filesystem addresses objects by the whole URL
            return fs, uri
        return fs, rest.rstrip("/")
    return LocalFileSystem(), os.path.abspath(uri)


def required_package(uri: str) -> str | None:
    """The package to install for *uri*'s filesystem when it cannot be imported here (``gcsfs``
    for ``gs://``, ``adlfs`` for ``az://``), or None when it can (and for local paths). A
    protocol fsspec does not know at all raises ValueError."""
    scheme = _scheme(uri)
    if scheme in (None, "file"):
        return None
    from fsspec.registry import known_implementations, registry

    if scheme in registry:  # registered in this process: importable by definition
        return None
    spec = known_implementations.get(scheme)
    if spec is None:
        raise ValueError(f"no fsspec filesystem is known for {scheme}:// URIs ({uri})")
    module = spec["class"].rsplit(".", 1)[0]
    try:
        importlib.import_module(module)
    except ImportError as exc:  # the filesystem's own package, or one it needs (aiohttp for http)
        return getattr(exc, "name", None) or module.split(".")[0]
    return None


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


def version_of(info: dict) -> str:
    """What a listing entry says about the object's content beyond its size: the ETag (or
    generation / version id) on object stores, the modification time otherwise. The ETag comes
    first because a LIST and a HEAD both return it (a version id only comes with a HEAD)."""
    for key in ("ETag", "etag", "generation", "VersionId", "version_id"):
        if info.get(key):
            return str(info[key]).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    return str(mtime) if mtime is not None else ""


def local_version(path: str, st: os.stat_result | None = None) -> str:
    """The version of a local file: its modification time in nanoseconds."""
    return f"mtime_ns={(st or os.stat(path)).st_mtime_ns}"


def stat_file(uri: str) -> tuple[int, str] | None:
    """``(size, version)`` of the file at *uri*, or None if there is none."""
    fs, path = filesystem_for(uri)
    if isinstance(fs, LocalFileSystem):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return st.st_size, local_version(path, st)
    invalidate(fs, path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    return int(info["size"]), version_of(info)


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


def conditional_writes_supported() -> bool:
    return os.environ.get("RAY_JOBS_S3_CONDITIONAL_WRITES", "1").strip().lower() not in ("0", "false", "no")


#: Per object store (protocol, endpoint, bucket): whether it refuses a conditional PUT of a key
#: that exists, as :func:`probe_conditional_create` found (or a ``501`` answer taught).
_HONOURS_IF_NONE_MATCH: dict[tuple[str, str, str], bool] = {}

#: Claims of the claim protocol live in this folder beside their target.
CLAIMS_DIR = "_claims"
#: How long a writer waits for another writer's claim to turn into the target or go away.
CLAIM_PENDING_S = 60.0
#: A claim this much older than one's own (both dated by the store) was left by a writer that
#: died inside the protocol, which takes a few requests: it is removed instead of waited for.
CLAIM_STALE_S = 600.0


def _store_key(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, str, str]:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    endpoint = _s3_options().get("endpoint_url", "") if protocol in ("s3", "s3a") else ""
    return protocol, endpoint, path.split("/", 1)[0]


def probe_conditional_create(probe_uri: str) -> bool:
    """Whether the store holding *probe_uri* honours ``If-None-Match: *``.

    Puts *probe_uri* (a deterministic name: every writer probes the same object) with the
    header twice; the store honours it when one of the two is refused. The answer is kept for
    the store for this process (a second call asks nothing), and :func:`create_exclusive` uses it.
    Local filesystems always honour exclusive creation; a store declared without conditional
    writes (``RAY_JOBS_S3_CONDITIONAL_WRITES=0``) is not probed."""
    fs, path = filesystem_for(probe_uri)
    if isinstance(fs, LocalFileSystem):
        return True
    if not conditional_writes_supported():
        return False
    key = _store_key(fs, path)
    if key not in _HONOURS_IF_NONE_MATCH:
        _HONOURS_IF_NONE_MATCH[key] = _one_of_two_creates_refused(fs, path)
    return _HONOURS_IF_NONE_MATCH[key]


def _one_of_two_creates_refused(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    data = f'{{"probe": "If-None-Match", "at": {time.time():.3f}}}'.encode()
    for _ in range(2):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return True
        except OSError as exc:
            if exc.errno == errno.ENOSYS:  # 501 NotImplemented: the store says so itself
                return False
            raise
    return False  # two creates of one name both succeeded: the header was ignored


def create_exclusive(uri: str, text: str) -> bool:
    """Write *text* at *uri* only if nothing is there; True if this call created it.

    On an object store: a conditional PUT, unless :func:`probe_conditional_create` found that
    the store ignores the header (or it answers ``501``), then the claim protocol."""
    fs, path = filesystem_for(uri)
    data = text.encode()
    if isinstance(fs, LocalFileSystem):
        tmp = _complete_temp_file(path, data)
        try:
            os.link(tmp, path)  # atomic, fails if the name exists: O_EXCL for a complete file
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    key = _store_key(fs, path)
    if conditional_writes_supported() and _HONOURS_IF_NONE_MATCH.get(key, True):
        try:
            fs.pipe_file(path, data, mode="create")  # PUT with If-None-Match: *
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno != errno.ENOSYS:  # anything but "NotImplemented" is a real failure
                raise
            _HONOURS_IF_NONE_MATCH[key] = False
    return _create_by_claim(fs, path, data)


def _create_by_claim(fs: fsspec.AbstractFileSystem, path: str, data: bytes, pending_s: float = CLAIM_PENDING_S) -> bool:
    """Create *path* on a store without conditional writes: claim, list, check, put, release.

    A writer puts its own claim ``_claims/<name>.<token>`` beside *path*, then lists the claims
    and checks *path*. It puts *path* only when it sees no other claim and no *path*, and removes
    its claim after that PUT. Otherwise it removes its claim; if *path* exists it has lost, and
    if another claim was there it waits (jittered) and tries again, for at most *pending_s*."""
    parent, name = posixpath.split(path)
    claims = f"{parent}/{CLAIMS_DIR}"
    deadline = time.monotonic() + pending_s
    while True:
        mine = f"{claims}/{name}.{secrets.token_hex(8)}"
        fs.pipe_file(mine, b"")
        try:
            invalidate(fs, claims)
            others = _live_claims(fs, claims, name, mine)
            invalidate(fs, path)
            if not others and not fs.exists(path):
                fs.pipe_file(path, data)
                return True
        finally:
            fs.rm_file(mine)
            invalidate(fs, claims)
        invalidate(fs, path)
        if fs.exists(path):
            return False
        if time.monotonic() > deadline:
            raise OutputError(
                f"{claims}: another writer's claim on {name} ({', '.join(sorted(others))}) has been pending for "
                f"{pending_s:g}s without {name} appearing: if no attempt on this partition is running, delete the claim"
            )
        time.sleep(random.uniform(0.05, 0.5))


def _claim_of(claim_path: str, name: str) -> bool:
    return posixpath.basename(claim_path.rstrip("/")).startswith(f"{name}.")


def _modified(entry: dict) -> float | None:
    """An ``ls`` entry's modification time, epoch seconds (S3: ``LastModified``; local: ``mtime``)."""
    value = entry.get("LastModified", entry.get("mtime"))
    if value is None:
        return None
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def _live_claims(fs: fsspec.AbstractFileSystem, claims: str, name: str, mine: str) -> list[str]:
    """The other writers' claims on *name*, after removing those :data:`CLAIM_STALE_S` older than
    *mine* (dated by the store itself, so no clock of ours is compared with the store's)."""
    entries = [e for e in fs.ls(claims, detail=True) if _claim_of(e["name"], name)]
    own = next((_modified(e) for e in entries if e["name"].rstrip("/") == mine.rstrip("/")), None)
    live = []
    for entry in entries:
        path = entry["name"].rstrip("/")
        if path == mine.rstrip("/"):
            continue
        when = _modified(entry)
        if own is not None and when is not None and own - when > CLAIM_STALE_S:
            log.warning(
                "removing the claim %s: %.0fs older than this writer's, left by a writer that died mid-commit",
                path,
                own - when,
            )
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path)
            continue
        live.append(path)
    return live


def replace_text(uri: str, text: str) -> None:
    """Replace *uri*'s content atomically: a reader sees the old text or the new, never neither."""
    fs, path = filesystem_for(uri)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, text.encode())  # an S3 PUT replaces an object atomically
        invalidate(fs, path)
        return
    os.replace(_complete_temp_file(path, text.encode()), path)


def _complete_temp_file(path: str, data: bytes) -> str:
    """A fully written, fsynced temporary file next to local *path*, to be linked or renamed."""
    os.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}.{secrets.token_hex(6)}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def invalidate(fs: fsspec.AbstractFileSystem, path: str) -> None:
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache(path)


def sizes_under(uri: str) -> dict[str, int]:
    """Byte size of every file below *uri* (recursively), keyed by path relative to *uri*."""
    fs, path = filesystem_for(uri)
    invalidate(fs, path)
    if isinstance(fs, LocalFileSystem):
        out = {}
        for dirpath, _, names in os.walk(path):
            for name in names:
                full = os.path.join(dirpath, name)
                try:
                    out[os.path.relpath(full, path)] = os.stat(full).st_size
                except FileNotFoundError:  # removed while listing
                    continue
        return out
    prefix = path.rstrip("/") + "/"
    found = fs.find(path, detail=True) if fs.exists(path) else {}
    return {name[len(prefix) :]: info["size"] for name, info in found.items() if name.startswith(prefix)}


def last_modified(uri: str) -> float:
    """When anything below *uri* last changed (epoch seconds, the store's clock); 0.0 when
    nothing is there. A local directory counts itself, so one just created, still empty, is new."""
    fs, path = filesystem_for(uri)
    invalidate(fs, path)
    if isinstance(fs, LocalFileSystem):
        newest = 0.0
        for dirpath, _, names in os.walk(path):
            for full in (dirpath, *(os.path.join(dirpath, n) for n in names)):
                try:
                    newest = max(newest, os.stat(full).st_mtime)
                except FileNotFoundError:  # removed while listing
                    continue
        return newest
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return 0.0
    return max((_modified(info) or 0.0 for info in found.values()), default=0.0)


def _entries(uri: str) -> tuple[fsspec.AbstractFileSystem, list[dict]]:
    """The filesystem and the fresh (uncached) listing of what is directly under *uri*."""
    fs, path = filesystem_for(uri)
    invalidate(fs, path)
    return fs, (fs.ls(path, detail=True) if fs.exists(path) else [])


def list_dirs(uri: str) -> list[str]:
    """Names of the directories (prefixes) directly under *uri*."""
    _, entries = _entries(uri)
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")


def remove_tree(uri: str) -> None:
    """Delete *uri* and everything under it; a missing path is not an error."""
    fs, path = filesystem_for(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    invalidate(fs, path)


def list_files(uri: str) -> list[str]:
    """Plain files directly under *uri*, sorted, as URIs."""
    fs, entries = _entries(uri)
    return sorted(to_uri(fs, e["name"]) for e in entries if e["type"] == "file")
