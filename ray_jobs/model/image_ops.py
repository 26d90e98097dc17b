"""The checkpoint's own image preprocessing, split between the CPU actors and the model stage.

:class:`ImageProcessing` is read from the checkpoint's image-processor config through the
Hugging Face processor class itself (so legacy spellings of ``size`` etc. mean what they mean
there), except where the config spells out, in the current form, every value a common
processor class uses: then it is read as plain JSON, and a preprocessing actor starts without
importing transformers or torch (:func:`plain_image_processing`).

The CPU side (:meth:`ImageProcessing.transform`) does RGB conversion, resize and centre crop on
uint8 pixels exactly as the processor's PIL backend does; the model stage
(:func:`pixels_to_tensor`) rescales and normalises, so only uint8 pixels cross the object store.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from math import ceil

import numpy as np

from ray_jobs.errors import ModelError


@dataclass(frozen=True)
class ImageProcessing:
    """What the checkpoint's image processor does to an image, as plain values.

    ``resize`` is ``("shortest_edge", N, 0)``, ``("fixed", H, W)``, or ``("max_patches", P, M)``
    (SigLIP 2's NaFlex: keep the aspect ratio, at most M patches of P x P, patches padded to M)."""

    resize: tuple[str, int, int] | None
    crop: tuple[int, int] | None  # centre crop (height, width)
    resample: int = 3  # PIL filter id
    rescale_factor: float | None = 1 / 255
    image_mean: tuple[float, float, float] | None = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] | None = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.resize is not None and self.resize[0] not in ("shortest_edge", "fixed", "max_patches"):
            raise ModelError(f"image processor: unsupported resize mode {self.resize[0]!r}")
        if self.crop is None and (self.resize is None or self.resize[0] == "shortest_edge"):
            raise ModelError(
                "image processor: images of different sizes cannot be batched; the config needs a fixed "
                "size ({'height', 'width'}) or a centre crop (do_center_crop with crop_size)"
            )
        if self.patches and self.crop is not None:
            raise ModelError("image processor: a patch-count resize (max_num_patches) takes no centre crop")

    @property
    def patches(self) -> bool:
        return self.resize is not None and self.resize[0] == "max_patches"

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the pixels the model sees (fixed-size modes)."""
        if self.patches:
            raise ModelError("a patch-count (NaFlex) processor has no fixed image size; see pixel_shape")
        if self.crop is not None:
            return self.crop
        return self.resize[1], self.resize[2]

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        """Shape of one row's ``pixels``: ``(H, W, 3)``, or ``(M, P * P * 3)`` patches."""
        if self.patches:
            _, p, m = self.resize
            return (m, p * p * 3)
        return (*self.size, 3)

    # -- CPU side
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The processor's resize target for an image of *height* x *width*."""
        if self.resize is None:
            return height, width
        mode, a, b = self.resize
        if mode == "fixed":
            return a, b
        if mode == "max_patches":
            return size_for_max_patches(height, width, a, b)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = a, int(a * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def transform(self, image) -> tuple[np.ndarray, tuple[int, int]]:
        """A decoded PIL image -> (uint8 ``pixels`` of :attr:`pixel_shape`, patch grid), as the processor would.

        The grid ``(rows, cols)`` of patches is SigLIP 2's ``spatial_shapes``; ``(0, 0)`` for fixed-size modes."""
        from PIL import Image

        image = to_rgb(image)
        h, w = self.resized_size(image.height, image.width)
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), resample=Image.Resampling(self.resample))
        pixels = np.asarray(image, dtype=np.uint8)
        if self.patches:
            return to_patches(pixels, self.resize[1], self.resize[2])
        if self.crop is not None:
            pixels = center_crop(pixels, self.crop)
        return pixels, (0, 0)


def size_for_max_patches(height: int, width: int, patch: int, max_patches: int, eps: float = 1e-5):
    """SigLIP 2's target size: the largest scale whose patch-multiple size has at most *max_patches* patches
    (the same binary search as ``get_image_size_for_max_num_patches``)."""
    import math

    def scaled(scale: float, size: int) -> int:
        return int(max(patch, math.ceil(size * scale / patch) * patch))

    lo, hi = eps / 10, 100.0
    while (hi - lo) >= eps:
        scale = (lo + hi) / 2
        if (scaled(scale, height) / patch) * (scaled(scale, width) / patch) <= max_patches:
            lo = scale
        else:
            hi = scale
    return scaled(lo, height), scaled(lo, width)


def to_patches(pixels: np.ndarray, patch: int, max_patches: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``(H, W, C)`` -> ``(max_patches, P * P * C)`` row-major patches (each patch row-major, channels
    last, as ``convert_image_to_patches``), zero-padded; and the patch grid ``(H / P, W / P)``."""
    h, w, c = pixels.shape
    rows, cols = h // patch, w // patch
    out = np.zeros((max_patches, patch * patch * c), dtype=pixels.dtype)
    grid = pixels[: rows * patch, : cols * patch].reshape(rows, patch, cols, patch, c).transpose(0, 2, 1, 3, 4)
    out[: rows * cols] = grid.reshape(rows * cols, -1)
    return out, (rows, cols)


def to_rgb(image):
    """RGB as ``transformers.image_transforms.convert_to_rgb``: transparency composited onto white."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(H, W, C)`` centre crop with the processor's offsets, zero-padding an image that is too small."""
    crop_h, crop_w = size
    h, w = pixels.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return np.ascontiguousarray(pixels[top : top + crop_h, left : left + crop_w])
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    canvas = np.zeros((new_h, new_w, pixels.shape[2]), dtype=pixels.dtype)
    top_pad, left_pad = ceil((new_h - h) / 2), ceil((new_w - w) / 2)
    canvas[top_pad : top_pad + h, left_pad : left_pad + w] = pixels
    top, left = top + top_pad, left + left_pad
    return np.ascontiguousarray(canvas[max(top, 0) : max(top, 0) + crop_h, max(left, 0) : max(left, 0) + crop_w])


def _size_dict(size) -> dict:
    if size is None:
        return {}
    if hasattr(size, "items"):
        return {k: v for k, v in size.items() if v is not None}
    return {k: getattr(size, k) for k in ("height", "width", "shortest_edge", "longest_edge") if getattr(size, k, None)}


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def has_image_processor(directory: str) -> bool:
    """``preprocessor_config.json`` (an image processor saved alone) or ``processor_config.json`` with an
    ``image_processor`` entry (a whole processor saved by transformers 5)."""
    if os.path.exists(os.path.join(directory, PROCESSOR_FILES[0])):
        return True
    path = os.path.join(directory, PROCESSOR_FILES[1])
    if not os.path.exists(path):
        return False
    try:
        with open(path) as fh:
            return isinstance(json.load(fh).get("image_processor"), dict)
    except (OSError, ValueError):
        return False


#: Processor classes read as plain JSON, each with whether it centre-crops by default: their
#: other defaults (resize, rescale and normalise on) are alike.
_PLAIN_CLASSES = {
    "ViTImageProcessor": False,
    "SiglipImageProcessor": False,
    "CLIPImageProcessor": True,
    "ChineseCLIPImageProcessor": True,
}
_PLAIN_KEYS = frozenset(
    {
        "crop_size",
        "do_center_crop",
        "do_convert_rgb",
        "do_normalize",
        "do_rescale",
        "do_resize",
        "image_mean",
        "image_processor_type",
        "image_std",
        "processor_class",
        "resample",
        "rescale_factor",
        "size",
    }
)


def _processor_config(directory: str) -> dict:
    path = os.path.join(directory, PROCESSOR_FILES[0])
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    with open(os.path.join(directory, PROCESSOR_FILES[1])) as fh:
        return json.load(fh)["image_processor"]


def _hw(value) -> tuple[int, int] | None:
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        h, w = value["height"], value["width"]
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            return h, w
    return None


def _triple(value) -> tuple[float, float, float] | None:
    if isinstance(value, list) and len(value) == 3 and all(isinstance(x, (int, float)) for x in value):
        return tuple(float(x) for x in value)
    return None


def plain_image_processing(config: dict) -> ImageProcessing | None:
    """*config* (an image processor's saved dict) as :class:`ImageProcessing`, read without
    transformers; None where only the processor class can say what it means: another class, a
    key this reader does not know, a legacy ``size`` spelling, or a value left to a default."""
    cls = config.get("image_processor_type")
    if cls not in _PLAIN_CLASSES or set(config) - _PLAIN_KEYS:
        return None
    flags = {k: config.get(k, True) for k in ("do_resize", "do_rescale", "do_normalize")}
    if not all(v is True for v in flags.values()):
        return None
    do_crop = config.get("do_center_crop", _PLAIN_CLASSES[cls])
    if do_crop not in (True, False) or ("do_center_crop" not in config and _PLAIN_CLASSES[cls]):
        return None
    size = config.get("size")
    if _hw(size) is not None:
        resize = ("fixed", *_hw(size))
    elif isinstance(size, dict) and set(size) == {"shortest_edge"} and isinstance(size["shortest_edge"], int):
        resize = ("shortest_edge", size["shortest_edge"], 0)
    else:
        return None
    crop = _hw(config.get("crop_size")) if do_crop else None
    mean, std = _triple(config.get("image_mean")), _triple(config.get("image_std"))
    resample, factor = config.get("resample"), config.get("rescale_factor")
    if (do_crop and crop is None) or mean is None or std is None or not isinstance(resample, int):
        return None
    if not isinstance(factor, (int, float)) or isinstance(factor, bool):
        return None
    return ImageProcessing(
        resize=resize, crop=crop, resample=resample, rescale_factor=float(factor), image_mean=mean, image_std=std
    )


def load_image_processing(directory: str) -> ImageProcessing:
    """Read the image processor's config in *directory*: as plain JSON where
    :func:`plain_image_processing` can, otherwise through the Hugging Face processor class."""
    if not has_image_processor(directory):
        raise ModelError(
            f"{directory}: no image processor config (preprocessor_config.json, or processor_config.json with an "
            "image_processor entry): save the model's processor beside it"
        )
    try:
        plain = plain_image_processing(_processor_config(directory))
    except (OSError, ValueError, KeyError, TypeError):
        plain = None  # transformers reads it, or says what is wrong
    return plain if plain is not None else processor_class_image_processing(directory)


def processor_class_image_processing(directory: str) -> ImageProcessing:
    """Read the image processor's config in *directory* through the Hugging Face processor class."""
    path = os.path.join(directory, "preprocessor_config.json")
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{path}: cannot build the image processor: {exc}") from exc
    size = _size_dict(getattr(proc, "size", None))
    resize = None
    if getattr(proc, "max_num_patches", None) and getattr(proc, "patch_size", None):  # SigLIP 2 (NaFlex)
        resize = ("max_patches", int(proc.patch_size), int(proc.max_num_patches))
    elif getattr(proc, "do_resize", True):
        if "longest_edge" in size or "max_height" in size:
            raise ModelError(f"{path}: resize mode {size} is not supported (use shortest_edge or height/width)")
        if "shortest_edge" in size:
            resize = ("shortest_edge", int(size["shortest_edge"]), 0)
        elif "height" in size and "width" in size:
            resize = ("fixed", int(size["height"]), int(size["width"]))
        else:
            raise ModelError(f"{path}: cannot read the resize size from {size}")
    crop = None
    if getattr(proc, "do_center_crop", False):
        c = _size_dict(getattr(proc, "crop_size", None))
        crop = (int(c["height"]), int(c["width"]))
    mean = std = None
    if getattr(proc, "do_normalize", True):
        mean = tuple(float(x) for x in np.broadcast_to(np.asarray(proc.image_mean, dtype=float), (3,)))
        std = tuple(float(x) for x in np.broadcast_to(np.asarray(proc.image_std, dtype=float), (3,)))
    resample = getattr(proc, "resample", None)
    return ImageProcessing(
        resize=resize,
        crop=crop,
        resample=int(resample if resample is not None else 2),
        rescale_factor=float(proc.rescale_factor) if getattr(proc, "do_rescale", True) else None,
        image_mean=mean,
        image_std=std,
    )


def pixels_to_tensor(pixels, processing: ImageProcessing, device=None, dtype=None):
    """uint8 ``(B, H, W, 3)`` -> ``(B, 3, H, W)`` (or patches ``(B, M, P*P*3)`` as they are) rescaled and
    normalised as the processor does (rescale in float64, normalise in float32, as its numpy code),
    then cast to *dtype*."""
    import torch

    if isinstance(pixels, np.ndarray) and not pixels.flags.writeable:  # Arrow-backed batches are read-only
        pixels = np.array(pixels)
    x = torch.as_tensor(pixels, device=device)
    if processing.patches:
        b, m, d = x.shape
        x = _rescale_normalise(x.reshape(b, m, d // 3, 3).permute(0, 3, 1, 2), processing)
        return x.permute(0, 2, 3, 1).reshape(b, m, d).to(dtype or torch.float32)
    x = _rescale_normalise(x.permute(0, 3, 1, 2), processing)
    return x if dtype is None else x.to(dtype)


def _rescale_normalise(x, processing: ImageProcessing):
    """Channel-first ``(B, 3, ...)`` uint8 -> float32, rescaled and normalised."""
    import torch

    if processing.rescale_factor is not None:
        x = (x.to(torch.float64) * processing.rescale_factor).to(torch.float32)
    else:
        x = x.to(torch.float32)
    if processing.image_mean is not None:
        mean = torch.tensor(processing.image_mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(processing.image_std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x
