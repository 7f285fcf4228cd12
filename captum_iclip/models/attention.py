"""The attention of the training-free dense CLIP methods, as second paths of the block loop.

Each function maps :class:`~captum_iclip.models.blocks.AttentionInputs` (the q/k/v heads
of one block) to attended heads (N, heads, L, head_dim); :func:`dense_path` turns a
method's name into the :class:`~captum_iclip.models.blocks.DensePath` its paper defines.
Formulas: docs/methods.md.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_iclip._precision import full_precision, upcast
from captum_iclip.models.blocks import AttentionInputs, DensePath, Grid

#: ITSM variants that are a second path through the last block(s).
PATH_VARIANTS = ("maskclip", "clearclip", "sclip", "naclip")
#: NACLIP's default neighbourhood: a Gaussian of 5 patches' standard deviation.
NACLIP_STD = 5.0
#: ProxyCLIP's defaults: the affinity threshold beta (times the mean affinity) and the sharpness gamma.
PROXY_BETA = 1.2
PROXY_GAMMA = 3.0


def self_value_attention(value: Tensor, num_heads: int, scale: float, l2_normalize: bool = False) -> Tensor:
    """Attention in which query, key and value are all ``value`` (CLIP Surgery, Li et al. 2023).

    Args:
        value: (N, L, C) value projections of the tokens.
        num_heads: heads to split C into.
        scale: softmax temperature applied to ``q @ k^T``.
        l2_normalize: L2-normalise each head's vectors before the product
            (used for the ResNet attention pool).

    Returns:
        (N, L, C) attended values, heads merged, before the output projection.
    """
    n, length, channels = value.shape
    heads = value.reshape(n, length, num_heads, channels // num_heads).transpose(1, 2)
    if l2_normalize:
        heads = heads / (heads.norm(dim=-1, keepdim=True) + 1e-6)
    out = F.scaled_dot_product_attention(heads, heads, heads, scale=scale)
    return out.transpose(1, 2).reshape(n, length, channels)


def value_value(inputs: AttentionInputs) -> Tensor:
    """CLIP Surgery: softmax(v v^T * scale) v."""
    return F.scaled_dot_product_attention(inputs.v, inputs.v, inputs.v, scale=inputs.scale)


def identity(inputs: AttentionInputs) -> Tensor:
    """MaskCLIP (Zhou et al., ECCV 2022): every token attends to itself only, so the block
    outputs its value embedding."""
    return inputs.v


def query_query(inputs: AttentionInputs) -> Tensor:
    """ClearCLIP (Lan et al., ECCV 2024): softmax(q q^T * scale) v."""
    return F.scaled_dot_product_attention(inputs.q, inputs.q, inputs.v, scale=inputs.scale)


def correlative(inputs: AttentionInputs) -> Tensor:
    """SCLIP's correlative self-attention (Wang et al., 2023): (softmax(q q^T s) + softmax(k k^T s)) v."""
    q, k, v, scale = inputs.q, inputs.k, inputs.v, inputs.scale
    return F.scaled_dot_product_attention(q, q, v, scale=scale) + F.scaled_dot_product_attention(k, k, v, scale=scale)


@functools.lru_cache(maxsize=16)
def gaussian_neighbourhood(grid: Grid, std: float, prefix: int = 1) -> Tensor:
    r"""NACLIP's additive neighbourhood term :math:`\omega` for ``grid``: (prefix + h*w, prefix + h*w).

    :math:`\omega_{ij} = \exp(-\lVert p_i - p_j \rVert^2 / (2\sigma^2))` for patches i, j
    at grid positions :math:`p_i, p_j`; 0 in the rows and columns of the ``prefix`` tokens
    before the patches (the class token, registers).
    """
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    positions = torch.stack([rows.flatten(), cols.flatten()], dim=-1).double()
    squared = torch.cdist(positions, positions).pow(2)
    omega = torch.zeros(prefix + squared.shape[0], prefix + squared.shape[0], dtype=torch.float64)
    omega[prefix:, prefix:] = torch.exp(-squared / (2 * std**2))
    return omega


def neighbourhood_key_key(std: float):
    """NACLIP (Hajimiri et al., WACV 2025): softmax(k k^T * scale + omega) v with a Gaussian
    neighbourhood ``omega`` of standard deviation ``std`` patches."""

    def attend(inputs: AttentionInputs) -> Tensor:
        k = inputs.k
        omega = gaussian_neighbourhood(tuple(inputs.grid), float(std), inputs.prefix).to(device=k.device, dtype=k.dtype)
        return F.scaled_dot_product_attention(k, k, inputs.v, attn_mask=omega, scale=inputs.scale)

    return attend


def self_self(iterations: int = 1, temperature: float | None = None):
    r"""GEM's self-self attention (Bousselham et al., CVPR 2024, "Grounding Everything").

    For each of :math:`x \in \{q, k, v\}`, ``iterations`` times
    :math:`x \leftarrow \mathrm{softmax}(\hat x \hat x^\top \tau)\,\hat x` with
    :math:`\hat x` the per-head L2-normalised :math:`x`; then the three are
    assigned to the values, :math:`\mathrm{softmax}(\hat x \hat x^\top \tau)\,v`, and
    averaged. The inverse temperature :math:`\tau` is ``temperature``, or by default
    the block's softmax scale times the mean token norm of the block's ln_1 output
    (one per image).
    """

    def attend(inputs: AttentionInputs) -> Tensor:
        if temperature is None:
            tokens = upcast(inputs.tokens)
            inverse_temperature = tokens.norm(dim=-1).mean(dim=-1)[:, None, None, None] * inputs.scale
        else:
            inverse_temperature = temperature

        def clustered(x: Tensor, onto: Tensor | None) -> Tensor:
            # softmax(x̂ x̂^T τ) (x̂ or ``onto``) as one fused attention kernel (the L x L weights are never
            # held), τ folded into the queries since it is per image; the norm, cosine and softmax in at
            # least float32 (half-precision rules, docs/methods.md).
            with full_precision(x.device):
                wide = F.normalize(upcast(x), dim=-1)
                values = wide if onto is None else upcast(onto)
                out = F.scaled_dot_product_attention(wide * inverse_temperature, wide, values, scale=1.0)
            return out.to(x.dtype)

        out = 0
        for x in (inputs.v, inputs.k, inputs.q):
            for _ in range(iterations):
                x = clustered(x, None)
            out = out + clustered(x, inputs.v)
        return out / 3

    return attend


def proxy_affinity(features: Tensor, beta: float = PROXY_BETA, gamma: float = PROXY_GAMMA) -> tuple[Tensor, Tensor]:
    r"""ProxyCLIP's proxy attention (Lan et al., ECCV 2024): (N, M, M) weights from a proxy's (N, M, C)
    L2-normalised patch features.

    With :math:`c_{ij} = f_i \cdot f_j` and :math:`\bar c` its mean over all (i, j) of the image, the
    threshold is :math:`\tau = \beta \bar c` and :math:`A_i = \mathrm{softmax}_j\, \gamma (c_{ij} - \tau)` over
    the j with :math:`c_{ij} \ge \tau` (the others get no weight; docs/methods.md §7). Where :math:`\tau`
    exceeds the patches' affinity to themselves (1: an image whose patches are all alike, or a large
    ``beta``), the reference's weights are NaN; here :math:`\tau` is lowered to the smallest self-affinity of
    the image, so that each patch attends to itself (and to its exact duplicates). Computed in at least float32.

    Returns:
        The (N, M, M) weights, and (N,) which images had their threshold lowered.
    """
    with full_precision(features.device):
        affinity = upcast(features) @ upcast(features).transpose(1, 2)
        threshold = beta * affinity.mean(dim=(1, 2))
        own = affinity.diagonal(dim1=1, dim2=2).amin(dim=-1)
        lowered = threshold > own
        threshold = torch.minimum(threshold, own)[:, None, None]
        logits = (gamma * (affinity - threshold)).masked_fill(affinity < threshold, float("-inf"))
        return torch.softmax(logits, dim=-1), lowered


def proxy_attention(weights: Tensor, proxy_grid: Grid):
    """ProxyCLIP's attend: the block's values resampled to the proxy's grid, mixed by the proxy's ``weights``
    (:func:`proxy_affinity`), the same for every head.

    The patch values are resized from CLIP's grid to ``proxy_grid`` (bilinear, ``align_corners=False``, as
    the reference does), so the path gives ``prefix + h' * w'`` tokens: the prefix tokens' values (the class
    and register tokens; the block loop keeps the patches only), then the proxy grid's patches.
    """

    def attend(inputs: AttentionInputs) -> Tensor:
        v = inputs.v
        n, heads, _, head_dim = v.shape
        h, w = inputs.grid
        prefix = inputs.prefix
        with full_precision(v.device):  # resampled and mixed in at least float32 (half-precision rules)
            patches = upcast(v[:, :, prefix:]).reshape(n * heads, h, w, head_dim).permute(0, 3, 1, 2)
            patches = F.interpolate(patches, size=tuple(proxy_grid), mode="bilinear", align_corners=False)
            patches = patches.flatten(2).transpose(1, 2).reshape(n, heads, -1, head_dim)
            mixed = weights[:, None].to(patches.dtype) @ patches
        return torch.cat([v[:, :, :prefix], mixed.to(v.dtype)], dim=2)

    return attend


def proxy_path(weights: Tensor, proxy_grid: Grid) -> DensePath:
    """ProxyCLIP's last-block path: its proxy attention, no residual, no MLP (the reference's defaults)."""
    return DensePath(1, proxy_attention(weights, proxy_grid), residual=False, mlp=False)


def gem_path(depth: int = 6, iterations: int = 1, temperature: float | None = None) -> DensePath:
    """GEM's self-self path through the last ``depth`` blocks: residual, no MLP."""
    return DensePath(depth, self_self(iterations, temperature), residual=True, mlp=False)


def surgery_path(depth: int) -> DensePath:
    """CLIP Surgery's value-value path through the last ``depth`` blocks: residual, no MLP."""
    return DensePath(depth, value_value, residual=True, mlp=False)


def dense_path(variant: str) -> DensePath:
    """The last-block path of an ITSM ``variant`` (one of :data:`PATH_VARIANTS`), as its reference code defines it.

    * ``maskclip``: value embedding, with the block's residual and MLP;
    * ``sclip``: correlative self-attention, with residual and MLP;
    * ``clearclip``: query-query attention, no residual, no MLP;
    * ``naclip``: key-key attention plus a Gaussian neighbourhood of
      :data:`NACLIP_STD` patches, no residual, no MLP.
    """
    if variant == "maskclip":
        return DensePath(1, identity, residual=True, mlp=True)
    if variant == "sclip":
        return DensePath(1, correlative, residual=True, mlp=True)
    if variant == "clearclip":
        return DensePath(1, query_query, residual=False, mlp=False)
    if variant == "naclip":
        return DensePath(1, neighbourhood_key_key(NACLIP_STD), residual=False, mlp=False)
    raise ValueError(f"variant: expected one of {PATH_VARIANTS}, got {variant!r}")
