import io
import random

import numpy as np
import pytest
from PIL import Image

from ray_jobs.demo_assets import _bomb_png, _broken, _image_bytes
from ray_jobs.model.image_ops import ImageProcessing
from ray_jobs.preprocess import Preprocessor, RowRejected, decode_image, fetch_bytes

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
