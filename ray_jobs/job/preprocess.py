"""CPU side of the job: tokenize text, fetch images by URI, decode, resize and crop them.

Tokenisation and image geometry are the checkpoint's own (its tokenizer, max length and
special tokens; its image processor's RGB conversion, resize mode, resample filter and centre
crop; see :mod:`ray_jobs.model.image_ops`); rescale and normalisation run in the model stage.
Text is padded to the longest row of the batch unless the tower needs its max length.
Every row leaves here either valid (``ok``) with ``input_ids``, ``attention_mask`` and
``pixels`` (uint8 HWC at the model's size), or rejected with the stage and a reason;
rejected rows carry zero placeholders so batches keep one shape, and later stages skip them.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import random
import stat
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from ray_jobs import storage
from ray_jobs.errors import FilesystemUnavailable, TransientFailure
from ray_jobs.model.image_ops import ImageProcessing

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_OBJECT_BYTES = 64 * 1024 * 1024


class RowRejected(Exception):
    """One row cannot be embedded; ``str(exc)`` is the reason written to ``rejects``."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES


def image_limits(settings) -> ImageLimits:
    """The limits a :class:`~ray_jobs.config.settings.JobSettings` sets (None: the default)."""
    return ImageLimits(
        settings.max_image_pixels or DEFAULT_MAX_PIXELS, settings.max_object_bytes or DEFAULT_MAX_OBJECT_BYTES
    )


#: Fetch attempts per object before the batch fails (then Ray Data retries the task).
FETCH_ATTEMPTS = 6
FETCH_BACKOFF_S = 0.25
FETCH_MAX_BACKOFF_S = 8.0
DEFAULT_FETCH_TIMEOUT_S = 60.0

#: errno values that say something about the object, not the path to it: never retried.
_PERMANENT_ERRNOS = {
    errno.ENOENT: "missing object",
    errno.ENOTDIR: "missing object",
    errno.EACCES: "access denied",
    errno.EPERM: "access denied",
    errno.EISDIR: "not a regular file",
    errno.ENAMETOOLONG: "unreadable object",
    errno.ELOOP: "unreadable object",
    errno.EINVAL: "unreadable object",  # S3 400/412/416: the request for this key is wrong
}


class _Transient(Exception):
    """One fetch attempt failed for a reason outside the object: try again."""


def _read_local(path: str, uri: str, max_bytes: int) -> bytes:
    """Read a local regular file; anything else (FIFO, device, socket, directory) is a reject."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO never waits for a writer
    with os.fdopen(fd, "rb", buffering=0) as fh:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "directory" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "special file"
            raise RowRejected("fetch", f"not a regular file: {uri} is a {kind}")
        return fh.read(max_bytes + 1)


#: S3 error codes that say nothing about the object: credentials that expired, must be
#: refreshed, or were rotated or revoked mid-night (the worker's key, not the row, is wrong: the
#: batch fails and the job fails loudly rather than committing every row as a reject), a clock
#: out of step, a request body cut short, throttling and server errors. s3fs
#: maps several of them to PermissionError or EINVAL, as if the object were the problem. A bare
#: ``400`` (no code: a HEAD, or a proxy's answer) is not the object's fault either.
_TRANSIENT_S3_CODES = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "TokenRefreshRequired",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "AccountProblem",
        "RequestExpired",
        "RequestTimeTooSkewed",
        "IncompleteBody",
        "RequestTimeout",
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "OperationAborted",
        "Throttling",
        "ThrottlingException",
        "400",
    }
)
#: HTTP statuses of an ``http(s)`` image that are the object's own: never retried. Any other
#: error status (408, 429, 5xx, ...) is transient.
_PERMANENT_HTTP = {401: "access denied", 403: "access denied", 404: "missing object", 410: "missing object"}


def _remote_verdict(exc: BaseException, uri: str) -> RowRejected | _Transient | None:
    """What the S3 error code or HTTP status behind *exc* says (s3fs and fsspec's HTTP
    filesystem raise their own errors from botocore's and aiohttp's); None when neither is there."""
    try:
        from aiohttp import ClientError, ClientResponseError
    except ImportError:  # no HTTP stack installed: nothing of it can be in the chain
        ClientError = ClientResponseError = ()
    seen, link = set(), exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        response = getattr(link, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):  # botocore ClientError
            code = str(response["Error"].get("Code") or "")
            if code in ("InvalidRange", "416"):  # the range starts at byte 0: there is no byte 0
                return RowRejected("fetch", f"empty object: {uri}")
            if code in _TRANSIENT_S3_CODES:
                return _Transient(f"S3 {code}: {exc}")
            return None  # the translated error (PermissionError, ...) says what it is
        if isinstance(link, ClientResponseError):
            if link.status in _PERMANENT_HTTP:
                return RowRejected("fetch", f"{_PERMANENT_HTTP[link.status]}: {uri}: HTTP {link.status}")
            return _Transient(f"HTTP {link.status}: {link.message}")
        if isinstance(link, ClientError):  # connection refused or reset, before any status
            return _Transient(f"{type(link).__name__}: {link}")
        link = link.__cause__ or link.__context__
    return None


def _is_s3(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "s3" in protocols


def _fetch_once(uri: str, max_bytes: int) -> bytes:
    try:
        fs, path = storage.filesystem_for(uri, single_try=True)  # this function owns the retries
        if isinstance(fs, LocalFileSystem):
            return _read_local(path, uri, max_bytes)
        if _is_s3(fs):
            # One ranged GET and no HEAD before it: every error answer carries its S3 error code
            # (a HEAD's has none, so an expired token or a skewed clock would read as "403").
            # botocore checks the body against its Content-Length: a cut body raises.
            return fs.cat_file(path, start=0, end=max_bytes + 1)
        with fs.open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
            expected = min(getattr(fh, "size", None) or 0, max_bytes + 1)
        if len(data) < expected:  # a connection cut mid-body must not look like a truncated image
            raise _Transient(f"short read: {len(data)} of {expected} bytes")
        return data
    except (RowRejected, _Transient, FilesystemUnavailable):
        raise
    except Exception as exc:
        verdict = _remote_verdict(exc, uri) or _local_verdict(exc, uri)
        if isinstance(verdict, RowRejected):
            raise verdict from None
        raise verdict from exc


def _local_verdict(exc: Exception, uri: str) -> RowRejected | _Transient:
    """What a filesystem's own exception says about the row (no S3 code or HTTP status behind it)."""
    if isinstance(exc, FileNotFoundError):
        return RowRejected("fetch", f"missing object: {uri}")
    if isinstance(exc, PermissionError):
        return RowRejected("fetch", f"access denied: {uri}: {exc}"[:300])
    if isinstance(exc, IsADirectoryError):
        return RowRejected("fetch", f"not a regular file: {uri} is a directory")
    if isinstance(exc, ValueError):  # a URI the filesystem cannot even address (bad bucket name)
        return RowRejected("fetch", f"unreadable object: {uri}: {exc}"[:300])
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return RowRejected("fetch", f"{_PERMANENT_ERRNOS[exc.errno]}: {uri}: {exc}"[:300])
    return _Transient(f"{type(exc).__name__}: {exc}")  # botocore/aiohttp connection, timeout, throttling


def fetch_bytes(
    uri: str,
    max_bytes: int,
    *,
    attempts: int = FETCH_ATTEMPTS,
    backoff_s: float = FETCH_BACKOFF_S,
    max_backoff_s: float = FETCH_MAX_BACKOFF_S,
) -> bytes:
    """The object at *uri*.

    Raises :class:`RowRejected` when the object itself is the problem (missing, access
    denied, not a regular file, empty, too large), and
    :class:`~ray_jobs.errors.TransientFailure` when it could not be had for another reason
    (throttling, 5xx, timeouts, lost connections) *attempts* times in a row, with exponential
    backoff and jitter between tries: the batch then fails and is retried, never rejected."""
    if not uri:
        raise RowRejected("fetch", "missing object: empty image_uri")
    for attempt in range(attempts):
        try:
            data = _fetch_once(uri, max_bytes)
            break
        except _Transient as exc:
            if attempt + 1 >= attempts:
                raise TransientFailure(f"fetching {uri} failed {attempts} times: {exc}"[:500]) from exc
            delay = min(max_backoff_s, backoff_s * 2**attempt)
            log.info("fetch %s: %s; retrying in <= %.1fs", uri, exc, delay)
            time.sleep(delay * random.uniform(0.5, 1.0))
    if not data:
        raise RowRejected("fetch", f"empty object: {uri}")
    if len(data) > max_bytes:
        raise RowRejected("fetch", f"object too large: {uri} exceeds {max_bytes} bytes")
    return data


def decode_image(data: bytes, processing: ImageProcessing, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode *data* and apply the checkpoint's own resize / crop: uint8 pixels of
    ``processing.pixel_shape`` and the patch grid (SigLIP 2; ``(0, 0)`` otherwise); never more
    than *max_pixels* decoded."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise RowRejected("decode", f"decompression bomb: {w}x{h} exceeds {max_pixels} pixels")
            img.load()
            img = ImageOps.exif_transpose(img)
            return processing.transform(img)
    except RowRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RowRejected("decode", f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise RowRejected("decode", "not an image: unrecognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc)
        kind = "truncated image" if "truncated" in msg.lower() or isinstance(exc, EOFError) else "undecodable image"
        raise RowRejected("decode", f"{kind}: {msg}"[:300]) from None


def fetch_waves(futures, threads: int):
    """``(row, wave)`` of each submitted fetch: the fetches run ``threads`` at a time in
    submission order, so the *k*-th submitted one is in wave ``k // threads``."""
    k = 0
    for r, fut in enumerate(futures):
        if fut is not None:
            yield r, k // max(1, threads)
            k += 1


class Preprocessor:
    """Ray Data callable class: one per CPU actor of the preprocessing pool."""

    def __init__(
        self,
        model_uri: str,
        limits: ImageLimits | None = None,
        fetch_threads: int = 16,
        fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
        startup_scope: str = "",
    ):
        from ray_jobs.job.startup import ActorTimer
        from ray_jobs.model.checkpoint import open_checkpoint

        timer = ActorTimer("preprocess", startup_scope)
        ckpt = open_checkpoint(model_uri)
        self.text = ckpt.text_processing
        self.tokenizer = self.text.load_tokenizer()
        self.processing = ckpt.image_processing
        self.limits = limits or ImageLimits()
        self.fetch_threads = fetch_threads
        self.pool = ThreadPoolExecutor(max_workers=fetch_threads, thread_name_prefix="fetch")
        self.fetch_timeout_s = fetch_timeout_s
        timer.done()

    def _image(self, uri: str) -> tuple[np.ndarray, tuple[int, int]]:
        data = fetch_bytes(uri, self.limits.max_object_bytes)
        return decode_image(data, self.processing, self.limits.max_pixels)

    def _result(self, fut, deadline: float, uri: str) -> tuple[np.ndarray, tuple[int, int]]:
        """The row's pixels and patch grid; TransientFailure once *deadline* has passed.

        The deadline runs from the fetch's submission, not from when a thread picks it up, and
        gives each wave of ``fetch_threads`` fetches its own ``fetch_timeout_s``: a fetch queued
        behind hung ones is bounded too, and a big batch of slow but healthy fetches is not
        timed out (and retried forever) because its last wave queued behind the first. Threads
        stuck in hung fetches cannot be stopped, so the pool they hold is left to them and a
        fresh one serves the next batch."""
        try:
            return fut.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = ThreadPoolExecutor(max_workers=self.fetch_threads, thread_name_prefix="fetch")
            raise TransientFailure(
                f"fetching {uri} took more than {self.fetch_timeout_s:g}s from its submission"
            ) from None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"]
        n = len(ids)
        texts = ["" if t is None else str(t) for t in batch["text"]]
        uris = ["" if u is None else str(u) for u in batch["image_uri"]]
        ok = np.ones(n, dtype=bool)
        stage = np.full(n, "", dtype=object)
        reason = np.full(n, "", dtype=object)
        out_ids = np.array(["" if i is None else str(i) for i in ids], dtype=object)
        for r in range(n):
            if ids[r] is None or out_ids[r] == "":
                ok[r], stage[r], reason[r] = False, "read", "missing id: null or empty id"
        input_ids, attention_mask = self.text.encode(self.tokenizer, texts)
        pixels = np.zeros((n, *self.processing.pixel_shape), dtype=np.uint8)
        grids = np.zeros((n, 2), dtype=np.int64)
        submitted = time.monotonic()
        futures = [self.pool.submit(self._image, u) if ok[r] else None for r, u in enumerate(uris)]
        try:
            for r, wave in fetch_waves(futures, self.fetch_threads):
                # the k-th wave of fetch_threads fetches starts once the waves before it ended, each
                # within fetch_timeout_s: its deadline leaves it a whole fetch_timeout_s of its own
                deadline = submitted + (wave + 1) * self.fetch_timeout_s
                try:
                    pixels[r], grids[r] = self._result(futures[r], deadline, uris[r])
                except RowRejected as exc:
                    ok[r], stage[r], reason[r] = False, exc.stage, exc.reason
                except (TransientFailure, FilesystemUnavailable):
                    raise  # not the row's fault: the batch fails (and is retried if transient)
                except MemoryError as exc:
                    raise TransientFailure(f"out of memory decoding {uris[r]}") from exc
                except Exception as exc:  # a decoder bug on odd bytes: one bad row never fails the partition
                    why = f"undecodable image: {type(exc).__name__}: {exc}"[:300]
                    ok[r], stage[r], reason[r] = False, "decode", why
        except BaseException:
            for fut in futures:
                if fut is not None:
                    fut.cancel()
            raise
        return {
            "id": out_ids,
            "ok": ok,
            "reject_stage": stage,
            "reject_reason": reason,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixels": pixels,
            **({"spatial_shapes": grids} if self.processing.patches else {}),
        }
