"""Half-precision rules of the attributions (docs/methods.md, "Half precision").

A model in float16 or bfloat16 (or run under ``torch.autocast``) runs its tower in that
precision; what reads the tower's output runs in at least float32: the norms, the
image-text products and softmaxes, the gradient reductions, min-max normalisation and
upsampling. Maps and scores therefore come out in :func:`compute_dtype` of the model's
dtype (float32 for a half-precision model, float64 for a float64 one).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

HALF_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the arithmetic after the tower: ``dtype`` promoted to at least float32."""
    return torch.promote_types(dtype, torch.float32)


def upcast(tensor: Tensor) -> Tensor:
    """``tensor`` in :func:`compute_dtype` of its dtype (itself when already float32 or wider)."""
    return tensor.to(compute_dtype(tensor.dtype))


@contextmanager
def full_precision(device: torch.device | str) -> Iterator[None]:
    """Turn ``torch.autocast`` off on ``device``'s type for the block, so that upcast tensors stay upcast
    (autocast would run a float32 product in its half dtype again)."""
    device_type = torch.device(device).type
    if not torch.amp.is_autocast_available(device_type):
        yield
        return
    with torch.autocast(device_type, enabled=False):
        yield


def project(tokens: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``tokens @ weight (+ bias)`` in at least float32 with autocast off: a token projection.

    Its outputs are compared across patches (masked max pooling takes a max per channel), and a
    half-precision output rounds near-equal patches to ties that the max then breaks by position.
    """
    with full_precision(tokens.device):
        tokens = upcast(tokens)
        out = tokens @ weight.to(tokens.dtype)
        return out if bias is None else out + bias.to(tokens.dtype)
