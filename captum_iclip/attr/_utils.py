"""Shared plumbing of the attribution classes: forward-function checks, Captum target semantics, the block
and depth arguments, and the output tail (the map post-processing of docs/methods.md §1)."""

from __future__ import annotations

import numbers
from typing import Literal

import torch
import torch.nn.functional as F
from captum._utils.typing import TargetType
from torch import Tensor

from captum_iclip._precision import full_precision, upcast
from captum_iclip.models.base import check_depth
from captum_iclip.similarity import CLIPSimilarity

UPSAMPLING = ("bilinear", "spread")
Normalize = bool | Literal["reference"]
"""The ``normalize`` argument of the map methods: ``True`` (min-max on the patch grid, then upsample),
``False`` (no normalisation) or ``"reference"`` (upsample, then min-max over the pixels, as the reference
code of GEM, LeGrad and Chefer et al. does)."""


def check_forward_func(forward_func: object, method: str) -> CLIPSimilarity:
    if not isinstance(forward_func, CLIPSimilarity):
        raise TypeError(
            f"forward_func: expected a captum_iclip.CLIPSimilarity ({method} reads the model's "
            f"dense features and the prompt embeddings), got {type(forward_func).__name__}"
        )
    return forward_func


def unpack_inputs(inputs: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, bool]:
    """Accept a tensor or a 1-tuple of tensors, as Captum does; remember which."""
    if isinstance(inputs, tuple):
        if len(inputs) != 1:
            raise ValueError(f"inputs: expected one image tensor, got a tuple of {len(inputs)}")
        return inputs[0], True
    return inputs, False


def target_indices(target: TargetType, num_examples: int, num_prompts: int) -> Tensor | None:
    """Captum's target semantics for an (N, K) output, as a (N,) index tensor.

    ``None`` stays ``None`` (every prompt). An int, or a tensor with one element,
    applies to every example (as Captum broadcasts it); a list or 1-d tensor gives
    one prompt per example. Floats and booleans are refused, as Captum refuses them
    (a float target would otherwise be truncated to a different prompt).
    """
    if target is None:
        return None
    if isinstance(target, tuple):
        raise ValueError(f"target: expected a prompt index (the output is (N, K)), got the tuple {target!r}")
    if isinstance(target, bool) or (isinstance(target, Tensor) and target.dtype == torch.bool):
        raise TypeError(f"target: expected integer prompt indices, got a boolean {target!r}")
    if isinstance(target, numbers.Integral):
        index = torch.full((num_examples,), int(target), dtype=torch.long)
    else:
        if isinstance(target, list) and any(isinstance(t, tuple) for t in target):
            raise ValueError(f"target: expected prompt indices (the output is (N, K)), got tuples in {target!r}")
        # As Captum does, refuse what is not an integer (a float 1.5 must not become prompt 1).
        if isinstance(target, list) and not all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in target
        ):
            raise TypeError(f"target: expected integer prompt indices, got {target!r}")
        try:
            values = target if isinstance(target, Tensor) else torch.as_tensor(target)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"target: expected an int, a list or a tensor of ints, got {type(target).__name__}"
            ) from error
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"target: expected integer prompt indices, got a tensor of dtype {values.dtype}")
        if isinstance(target, Tensor) and values.numel() == 1:
            index = torch.full((num_examples,), int(values.reshape(())), dtype=torch.long)
        else:
            index = values.to(torch.long).flatten().cpu()
        if index.numel() != num_examples:
            raise ValueError(f"target: expected one prompt index per example ({num_examples}), got {index.numel()}")
    bad = (index < 0) | (index >= num_prompts)
    if bad.any():
        raise ValueError(
            f"target: expected prompt indices in 0..{num_prompts - 1} ({num_prompts} prompts), got {int(index[bad][0])}"
        )
    return index


def select_targets(maps: Tensor, index: Tensor | None) -> Tensor:
    """(N, K, ...) -> (N, 1, ...) at ``index``, or all K when ``index`` is None."""
    if index is None:
        return maps
    return maps[torch.arange(maps.shape[0], device=maps.device), index.to(maps.device)].unsqueeze(1)


def minmax_normalize(maps: Tensor) -> Tensor:
    """Min-max normalise each (image, prompt) map of (N, K, h, w) to [0, 1]; constant maps give 0."""
    flat = maps.flatten(2)
    low = flat.min(dim=-1, keepdim=True).values
    span = flat.max(dim=-1, keepdim=True).values - low
    flat = (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny)
    return flat.reshape(maps.shape)


def resolve_layer(layer_index: int, num_blocks: int, name: str) -> int:
    """A block index from a Python-style (possibly negative) ``layer_index``."""
    if isinstance(layer_index, bool) or not isinstance(layer_index, int):
        raise TypeError(f"{name}: expected an int, got {type(layer_index).__name__}")
    if not -num_blocks <= layer_index < num_blocks:
        raise ValueError(
            f"{name}: expected -{num_blocks}..{num_blocks - 1} (the tower has {num_blocks} blocks), got {layer_index}"
        )
    return layer_index % num_blocks


def check_path_depth(depth: int, num_blocks: int, path: str, name: str = "depth") -> None:
    """The depth of a second ``path`` through the last blocks: an int in 1..num_blocks (through no block,
    the path would be the plain tower)."""
    check_depth(depth, num_blocks, name)
    if depth == 0:
        raise ValueError(f"{name}: expected at least 1 block for {path}, got 0")


def check_normalize(normalize: object) -> Normalize:
    """``normalize`` as :data:`Normalize` allows it: ``True``, ``False`` or ``"reference"``."""
    if isinstance(normalize, bool) or (isinstance(normalize, str) and normalize == "reference"):
        return normalize
    raise ValueError(f"normalize: expected True, False or 'reference', got {normalize!r}")


def finish_maps(
    scores: Tensor,
    grid: tuple[int, int],
    size: tuple[int, int],
    patch_size: tuple[int, int],
    *,
    normalize: Normalize,
    interpolate: bool,
    upsample: str,
) -> Tensor:
    """(N, K, h*w) patch scores as the maps ``attribute`` returns, upsampled to ``size`` (docs/methods.md §1).

    ``normalize=True`` min-max normalises each (image, prompt) map on the patch grid, then upsamples;
    ``"reference"`` upsamples first and min-max normalises over the pixels, the order of the reference code
    of GEM, LeGrad and Chefer et al. Both give maps in [0, 1] (a bilinear pixel is a convex combination of
    patch values), but only ``"reference"`` reaches 0 and 1 at pixels: bilinear upsampling lowers an
    interior peak, so the two differ by a few hundredths. With ``"spread"``, ``True`` gives the normalised
    patch values divided over the pixels (at most ``1 / (ph * pw)``) and ``"reference"`` the same map scaled to
    [0, 1]. Without upsampling both orders give the same maps.

    ``"bilinear"`` gives smooth maps; ``"spread"`` divides each patch's value evenly over its ``patch_size``
    pixels, which keeps the sum of the map. Both run in at least float32 with autocast off (half-precision
    rules, docs/methods.md), so the maps of a half-precision model come out in float32.
    """
    if upsample not in UPSAMPLING:
        raise ValueError(f"upsample: expected one of {UPSAMPLING}, got {upsample!r}")
    normalize = check_normalize(normalize)
    maps = scores.reshape(*scores.shape[:2], *grid)
    with full_precision(maps.device):
        maps = upcast(maps)
        if normalize is True:
            maps = minmax_normalize(maps)
        if interpolate:
            if upsample == "bilinear":
                maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
            else:
                ph, pw = patch_size
                maps = F.interpolate(maps, scale_factor=(ph, pw), mode="nearest") / (ph * pw)
        if normalize == "reference":
            maps = minmax_normalize(maps)
        return maps


def as_inputs_came(maps: Tensor, is_tuple: bool) -> Tensor | tuple[Tensor]:
    """The maps as a 1-tuple when the inputs came as Captum's 1-tuple, else the tensor."""
    return (maps,) if is_tuple else maps
