"""Inference precision: which torch dtype the stages compute in and how hidden states travel.

Stage weights are cast to the chosen dtype and hidden states cross stages in it; numpy has
no bfloat16, so a bfloat16 tensor travels as its raw 16 bits (an ``int16`` view) and is
viewed back on arrival. Embeddings always leave the model as float32.
"""

from __future__ import annotations

import numpy as np

from ray_jobs.config.settings import DTYPES
from ray_jobs.errors import ModelError, UsageError


def check_dtype(name: str) -> str:
    if name not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return name


def torch_dtype(name: str):
    import torch

    return getattr(torch, check_dtype(name))


def check_device(name: str, device: str) -> None:
    """float16 matmuls are a CUDA feature here; refuse it elsewhere with a clear message."""
    if check_dtype(name) == "float16" and not str(device).startswith("cuda"):
        raise ModelError(
            f"--dtype float16 needs a CUDA device, but this stage runs on {device}; "
            "use --dtype bfloat16 on CPU, or give the stages GPUs (--stage-num-gpus / gpus= in --stages)"
        )


def to_numpy(tensor) -> np.ndarray:
    """A CPU numpy array carrying *tensor*'s values exactly (bfloat16 as its int16 bit pattern)."""
    import torch

    tensor = tensor.detach().to("cpu")
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def from_numpy(array: np.ndarray, dtype):
    """Inverse of :func:`to_numpy` for a hidden-state column of the job's *dtype*."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if dtype == torch.bfloat16 and tensor.dtype == torch.int16:
        return tensor.view(torch.bfloat16)
    return tensor.to(dtype)
