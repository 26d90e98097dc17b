"""Pixel normalisation shared by the staged pipeline and the unsplit reference."""

from __future__ import annotations


def pixels_to_tensor(pixels, processing: dict, device=None):
    """uint8 ``(B, H, W, 3)`` -> normalised float32 ``(B, 3, H, W)`` as the image processor defines."""
    import torch

    x = torch.as_tensor(pixels, device=device).permute(0, 3, 1, 2).to(torch.float32)
    if processing.get("do_rescale", True):
        x = x * float(processing.get("rescale_factor", 1 / 255))
    if processing.get("do_normalize", True):
        mean = torch.tensor(processing.get("image_mean", [0.5, 0.5, 0.5]), device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(processing.get("image_std", [0.5, 0.5, 0.5]), device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x


def target_size(processing: dict) -> tuple[int, int]:
    """``(height, width)`` the processor resizes to."""
    size = processing.get("size", 224)
    if isinstance(size, int):
        return size, size
    if "height" in size:
        return int(size["height"]), int(size["width"])
    edge = int(size.get("shortest_edge", 224))
    return edge, edge


def pool(hidden, attention_mask, how: str):
    """``mean`` over unmasked tokens, or the first (``cls``) token."""
    if how == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
