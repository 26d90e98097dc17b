import errno
import http.server
import io
import os
import random
import threading
from typing import ClassVar

import fsspec
import numpy as np
import pytest
from fsspec import AbstractFileSystem
from PIL import Image

from ray_jobs import storage
from ray_jobs.demo.assets import _bomb_png, _broken, _image_bytes
from ray_jobs.errors import TransientFailure
from ray_jobs.job.preprocess import Preprocessor, RowRejected, decode_image, fetch_bytes
from ray_jobs.model.image_ops import ImageProcessing

FIXED = ImageProcessing(resize=("fixed", 32, 32), crop=None, resample=2)
CLIP_LIKE = ImageProcessing(resize=("shortest_edge", 36, 0), crop=(32, 32), resample=3)


@pytest.mark.parametrize("n", range(8))
def test_every_demo_format_and_mode_decodes_to_rgb_uint8(n):
    data, _ = _image_bytes(random.Random(n), n)
    for processing in (FIXED, CLIP_LIKE):
        out, _ = decode_image(data, processing, 10_000_000)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("truncated", "truncated image"),
        ("not_image", "not an image"),
        ("bomb", "decompression bomb"),
        ("corrupt_png", "undecodable image"),
    ],
)
def test_broken_bytes_are_rejected_with_a_reason(kind, reason):
    data, _ = _broken(kind, random.Random(1))
    with pytest.raises(RowRejected) as exc:
        decode_image(data, FIXED, 10_000_000)
    assert exc.value.stage == "decode" and exc.value.reason.startswith(reason)


def test_pixel_cap_is_ours_not_only_pillows():
    buf = io.BytesIO()
    Image.new("RGB", (300, 300)).save(buf, format="PNG")
    with pytest.raises(RowRejected, match=r"decompression bomb: 300x300 exceeds 1000 pixels"):
        decode_image(buf.getvalue(), FIXED, 1000)
    assert _bomb_png()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fetch_reasons(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "big.jpg").write_bytes(b"x" * 100)
    (tmp_path / "ok.jpg").write_bytes(b"abc")
    with pytest.raises(RowRejected, match="missing object"):
        fetch_bytes(str(tmp_path / "nope.jpg"), 50)
    with pytest.raises(RowRejected, match="empty object"):
        fetch_bytes(f"file://{tmp_path}/empty.jpg", 50)
    with pytest.raises(RowRejected, match="object too large"):
        fetch_bytes(str(tmp_path / "big.jpg"), 50)
    with pytest.raises(RowRejected, match="missing object: empty image_uri"):
        fetch_bytes("", 50)
    assert fetch_bytes(f"file://{tmp_path}/ok.jpg", 50) == b"abc"


def test_preprocessor_accounts_for_every_row(demo_checkpoint, tmp_path):
    good, _ = _image_bytes(random.Random(0), 0)
    (tmp_path / "good.jpg").write_bytes(good)
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    pre = Preprocessor(demo_checkpoint)
    out = pre(
        {
            "id": np.array(["a", "b", None, "d"], dtype=object),
            "text": np.array(["a red cat", None, "x", ""], dtype=object),
            "image_uri": np.array(
                [str(tmp_path / "good.jpg"), str(tmp_path / "bad.jpg"), "x", str(tmp_path / "good.jpg")], dtype=object
            ),
        }
    )
    assert out["ok"].tolist() == [True, False, False, True]
    assert out["reject_reason"][1].startswith("not an image")
    assert out["reject_reason"][2].startswith("missing id")
    assert out["pixels"].shape == (4, 32, 32, 3) and out["pixels"].dtype == np.uint8
    assert not out["pixels"][1].any()
    longest = max(int(m.sum()) for m in out["attention_mask"])
    assert out["input_ids"].shape == (4, longest) and longest < 32, "padded to the longest row, not the max length"
    assert out["attention_mask"][3].sum() == 2  # [CLS] [SEP] for ""


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_shortest_edge_resize_then_centre_crop_keeps_the_aspect_ratio():
    """A wide image is resized so its short side is 36, then the centre 32x32 is cut:
    the left and right thirds are cropped away, nothing is squashed."""
    wide = np.zeros((60, 180, 3), dtype=np.uint8)
    wide[:, :60] = (255, 0, 0)  # left third red
    wide[:, 60:120] = (0, 255, 0)  # middle third green
    wide[:, 120:] = (0, 0, 255)
    out, _ = decode_image(_png(Image.fromarray(wide)), CLIP_LIKE, 10_000_000)
    assert out.shape == (32, 32, 3)
    assert (out[..., 1] > 250).all() and (out[..., 0] < 5).all(), "only the green middle survives the crop"
    squashed, _ = decode_image(_png(Image.fromarray(wide)), FIXED, 10_000_000)
    assert squashed[:, 0, 0].min() > 200, "a fixed-size resize keeps all three thirds"


def test_transparency_is_composited_onto_white_like_the_hf_processor():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent black
    out, _ = decode_image(_png(Image.fromarray(rgba, "RGBA")), ImageProcessing(("fixed", 8, 8), None), 10_000_000)
    assert (out == 255).all()


def test_a_config_that_cannot_batch_is_refused():
    from ray_jobs.errors import ModelError

    with pytest.raises(ModelError, match="cannot be batched"):
        ImageProcessing(resize=("shortest_edge", 224, 0), crop=None)


# ----------------------------------------------------------------------------- fetch classification


class ScriptedFS(AbstractFileSystem):
    """A stand-in object store whose every open follows a script (S3-like failures on demand)."""

    protocol = "scripted"
    script: ClassVar[dict[str, list]] = {}
    opens: ClassVar[dict[str, int]] = {}

    def _open(self, path, mode="rb", **kwargs):
        path = path.removeprefix("scripted://")
        self.opens[path] = self.opens.get(path, 0) + 1
        steps = self.script[path]
        outcome = steps.pop(0) if len(steps) > 1 else steps[0]
        if isinstance(outcome, BaseException):
            raise outcome
        if callable(outcome):
            return outcome()
        return io.BytesIO(outcome)


fsspec.register_implementation("scripted", ScriptedFS, clobber=True)


@pytest.fixture
def scripted(monkeypatch):
    sleeps = []
    monkeypatch.setattr("ray_jobs.job.preprocess.time.sleep", sleeps.append)
    ScriptedFS.script.clear()
    ScriptedFS.opens.clear()
    return sleeps


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (FileNotFoundError("NoSuchKey"), "missing object"),
        (PermissionError("AccessDenied"), "access denied"),
        (IsADirectoryError("a prefix"), "not a regular file"),
        (OSError(errno.EINVAL, "InvalidRange"), "unreadable object"),
        (ValueError("Bucket name must match the regex"), "unreadable object"),
    ],
)
def test_permanent_fetch_errors_are_rejects_at_once(scripted, error, reason):
    ScriptedFS.script["b/k.jpg"] = [error]
    with pytest.raises(RowRejected) as exc:
        fetch_bytes("scripted://b/k.jpg", 100)
    assert exc.value.stage == "fetch" and exc.value.reason.startswith(f"{reason}: scripted://b/k.jpg")
    assert ScriptedFS.opens["b/k.jpg"] == 1 and scripted == [], "never retried"


def test_transient_fetch_errors_are_retried_with_backoff_and_jitter(scripted):
    from botocore.exceptions import ConnectionClosedError, ReadTimeoutError

    ScriptedFS.script["b/k.jpg"] = [
        OSError(errno.EBUSY, "SlowDown: Please reduce your request rate."),
        ConnectionClosedError(endpoint_url="http://s3"),
        ReadTimeoutError(endpoint_url="http://s3"),
        b"image bytes",
    ]
    assert fetch_bytes("scripted://b/k.jpg", 100, attempts=4, backoff_s=0.2) == b"image bytes"
    assert len(scripted) == 3
    for n, delay in enumerate(scripted):  # exponential, jittered into [50 %, 100 %] of the step
        assert 0.5 * 0.2 * 2**n <= delay <= 0.2 * 2**n


def test_a_fetch_that_keeps_failing_transiently_fails_the_batch_not_the_row(scripted):
    ScriptedFS.script["b/k.jpg"] = [ConnectionResetError(104, "Connection reset by peer")]
    with pytest.raises(TransientFailure, match=r"^transient failure: fetching scripted://b/k.jpg failed 4 times"):
        fetch_bytes("scripted://b/k.jpg", 100, attempts=4)
    assert ScriptedFS.opens["b/k.jpg"] == 4


def test_a_connection_cut_mid_body_is_transient_not_a_truncated_image(scripted):
    class Short(io.BytesIO):
        size = 50  # the object's size from its HEAD; the body stopped after 10 bytes

    ScriptedFS.script["b/k.jpg"] = [lambda: Short(b"x" * 10), b"y" * 50]
    assert fetch_bytes("scripted://b/k.jpg", 100) == b"y" * 50
    assert len(scripted) == 1


def test_only_regular_files_are_read_a_fifo_is_a_reject_never_a_hang(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(RowRejected, match=r"not a regular file: .* is a FIFO"):
        fetch_bytes(str(fifo), 100)
    with pytest.raises(RowRejected, match="not a regular file: /dev/zero is a special file"):
        fetch_bytes("/dev/zero", 100)
    with pytest.raises(RowRejected, match=r"not a regular file: .* is a directory"):
        fetch_bytes(str(tmp_path), 100)


def test_preprocessor_fails_the_batch_on_a_transient_fetch_and_rejects_only_real_problems(demo_checkpoint, scripted):
    good, _ = _image_bytes(random.Random(0), 0)
    ScriptedFS.script.update({"b/good.jpg": [good], "b/gone.jpg": [FileNotFoundError("NoSuchKey")]})
    pre = Preprocessor(demo_checkpoint)
    batch = {
        "id": np.array(["a", "b"], dtype=object),
        "text": np.array(["x", "y"], dtype=object),
        "image_uri": np.array(["scripted://b/good.jpg", "scripted://b/gone.jpg"], dtype=object),
    }
    out = pre(batch)
    assert out["ok"].tolist() == [True, False] and out["reject_reason"][1].startswith("missing object")
    ScriptedFS.script["b/gone.jpg"] = [OSError(errno.EBUSY, "SlowDown")]
    with pytest.raises(TransientFailure, match="SlowDown"):
        pre(batch)


def test_preprocessor_times_out_a_fetch_that_hangs(demo_checkpoint, scripted):
    import threading

    release = threading.Event()

    def hang():
        release.wait(30)
        return io.BytesIO(b"late")

    ScriptedFS.script["b/slow.jpg"] = [hang]
    pre = Preprocessor(demo_checkpoint, fetch_timeout_s=0.5)
    batch = {"id": np.array(["a"], dtype=object), "text": np.array(["x"], dtype=object)}
    batch["image_uri"] = np.array(["scripted://b/slow.jpg"], dtype=object)
    try:
        with pytest.raises(TransientFailure, match=r"scripted://b/slow.jpg took more than 0.5s"):
            pre(batch)
    finally:
        release.set()


# ----------------------------------------------------------- real stores: S3 behind the fault proxy, HTTP


@pytest.fixture
def s3_image(s3_bucket):
    key = f"fetch/{os.getpid()}-{random.Random().randrange(10**9)}/img.jpg"
    storage.write_text(f"{s3_bucket}/{key}", "jpeg bytes")
    return f"{s3_bucket}/{key}"


def _through_proxy(s3_server, monkeypatch, **proxy_args):
    from tests.s3_faults import FaultProxy

    proxy = FaultProxy(s3_server, match="/fetch/", **proxy_args)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    storage._remote_fs.cache_clear()
    return proxy


@pytest.mark.integration
@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "ExpiredToken"),
        (403, "RequestTimeTooSkewed"),
        (400, "TokenRefreshRequired"),
        (400, "IncompleteBody"),
        (400, None),  # a bare 400: no error code at all
        (403, "InvalidAccessKeyId"),  # the worker's key rotated or revoked mid-night
        (403, "SignatureDoesNotMatch"),
    ],
)
def test_credential_clock_and_body_errors_from_s3_are_transient_never_rejects(
    s3_server, s3_image, scripted, monkeypatch, status, code
):
    """s3fs reads ExpiredToken and RequestTimeTooSkewed as "access denied", the others as EINVAL."""
    with _through_proxy(s3_server, monkeypatch, answers=[(status, code)] * 2) as proxy:
        assert fetch_bytes(s3_image, 100, attempts=3) == b"jpeg bytes"
        assert proxy.counts["answered"] == 2 and len(scripted) == 2, "retried with backoff"
        proxy.answers = [(status, code)] * 3
        with pytest.raises(TransientFailure, match=f"failed 3 times: S3 {code or status}"):
            fetch_bytes(s3_image, 100, attempts=3)
    storage._remote_fs.cache_clear()


@pytest.mark.integration
def test_a_real_access_denied_from_s3_is_still_a_reject(s3_server, s3_image, scripted, monkeypatch):
    with (
        _through_proxy(s3_server, monkeypatch, answers=[(403, "AccessDenied")]),
        pytest.raises(RowRejected, match="access denied"),
    ):
        fetch_bytes(s3_image, 100, attempts=3)
    storage._remote_fs.cache_clear()
    assert scripted == [], "never retried"


class _Statuses(http.server.BaseHTTPRequestHandler):
    """``/<status>/...`` answers GET with that status; ``/head-ok/<status>/...`` answers HEAD with
    200 and a size first (a signed URL valid for GET only, or one that expired in between)."""

    def log_message(self, *args):
        pass

    def _any(self):
        parts = self.path.strip("/").split("/")
        head_ok = parts[0] == "head-ok"
        status = int(parts[1] if head_ok else parts[0])
        if status == 200 or (head_ok and self.command == "HEAD"):
            status, body = 200, b"image bytes"
        else:
            body = b"no"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _any


@pytest.fixture(scope="module")
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Statuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("head", ["", "head-ok/"])
@pytest.mark.parametrize(
    ("status", "reason"),
    [(401, "access denied"), (403, "access denied"), (404, "missing object"), (410, "missing object")],
)
def test_a_permanent_http_status_is_a_reject_at_once(http_server, scripted, head, status, reason):
    uri = f"{http_server}/{head}{status}/img.jpg"
    with pytest.raises(RowRejected, match=f"^{reason}: {uri}"):
        fetch_bytes(uri, 100)
    assert scripted == [], "never retried"


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_other_http_error_statuses_are_transient(http_server, scripted, status):
    assert fetch_bytes(f"{http_server}/200/img.jpg", 100) == b"image bytes"
    with pytest.raises(TransientFailure, match=f"failed 2 times: HTTP {status}"):
        fetch_bytes(f"{http_server}/{status}/img.jpg", 100, attempts=2)


def test_a_protocol_without_its_filesystem_fails_the_batch_naming_the_package(demo_checkpoint):
    from ray_jobs.errors import FilesystemUnavailable

    assert storage.required_package("gs://bucket/img.jpg") == "gcsfs", "this environment has no gcsfs"
    assert storage.required_package("s3://bucket/img.jpg") is None and storage.required_package("/x") is None
    batch = {"id": np.array(["a"], dtype=object), "text": np.array(["x"], dtype=object)}
    batch["image_uri"] = np.array(["gs://bucket/img.jpg"], dtype=object)
    with pytest.raises(FilesystemUnavailable, match="install the 'gcsfs' package"):
        Preprocessor(demo_checkpoint)(batch)


def test_a_fetch_queued_behind_a_hung_one_is_bounded_from_its_submission(demo_checkpoint, scripted, tmp_path):
    """One fetch thread, held by a fetch that never returns: the next batch's fetch waits in the
    queue. Its deadline runs from submission (the batch fails in time), and the next batch gets
    a fresh pool instead of queueing behind the hung thread forever."""
    release = threading.Event()
    ScriptedFS.script["b/hung.jpg"] = [lambda: release.wait(60) and io.BytesIO(b"late")]
    good, _ = _image_bytes(random.Random(0), 0)
    (tmp_path / "good.jpg").write_bytes(good)
    pre = Preprocessor(demo_checkpoint, fetch_threads=1, fetch_timeout_s=0.5)

    def batch(uri):
        return {
            "id": np.array(["a"], dtype=object),
            "text": np.array(["x"], dtype=object),
            "image_uri": np.array([uri]),
        }

    outcome = {}

    def run():
        try:
            with pytest.raises(TransientFailure, match=r"took more than 0\.5s"):
                pre(batch("scripted://b/hung.jpg"))
            outcome["after"] = pre(batch(str(tmp_path / "good.jpg")))["ok"].tolist()
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    try:
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), "the batch after a hung fetch waited forever"
        assert outcome == {"after": [True]}, outcome
    finally:
        release.set()


def test_each_wave_of_fetches_gets_its_own_timeout_so_slow_healthy_batches_commit(demo_checkpoint, scripted):
    """Four fetches of 0.3 s each through one thread, fetch_timeout_s 0.5: the last one ends
    1.2 s after the batch's submission. Each wave of ``fetch_threads`` fetches has its own
    0.5 s, so the batch commits; one deadline for the whole batch timed it out on every retry."""
    good, _ = _image_bytes(random.Random(0), 0)

    def slow():
        threading.Event().wait(0.3)  # not time.sleep: the fixture records sleeps instead of sleeping
        return io.BytesIO(good)

    uris = [f"scripted://b/slow{i}.jpg" for i in range(4)]
    ScriptedFS.script.update({u.removeprefix("scripted://"): [slow] for u in uris})
    pre = Preprocessor(demo_checkpoint, fetch_threads=1, fetch_timeout_s=0.5)
    batch = {
        "id": np.array(list("abcd"), dtype=object),
        "text": np.array(list("wxyz"), dtype=object),
        "image_uri": np.array(uris, dtype=object),
    }
    assert pre(batch)["ok"].tolist() == [True] * 4


def test_fetch_waves_count_only_submitted_fetches():
    from ray_jobs.job.preprocess import fetch_waves

    futures = ["f", None, "f", "f", None, "f", "f"]
    assert list(fetch_waves(futures, 2)) == [(0, 0), (2, 0), (3, 1), (5, 1), (6, 2)]
