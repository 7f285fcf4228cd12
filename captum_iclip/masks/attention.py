"""The [CLS] attention of DINO backbones and its top-mass threshold: what a DINO mask is read from
(docs/methods.md §3; Caron et al., arXiv 2104.14294)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from captum_iclip.models.blocks import TimmBlockView

GridSize = tuple[int, int]


# --------------------------------------------------------------------------- #
# Thresholding
# --------------------------------------------------------------------------- #
def top_mass_mask(attention: Tensor, tau: float) -> Tensor:
    """Smallest set of patches whose attention sums to at least ``tau`` of the total.

    Patches are sorted by decreasing attention (a stable sort, so equal values are
    taken in increasing patch index) and kept up to and including the first one at
    which the cumulative sum reaches ``tau`` times the total. A patch is therefore
    kept exactly when the mass ranked strictly before it is below ``tau * total``:
    with ``tau = 1`` every patch with non-zero attention is selected, and a map with
    zero total mass gives an empty mask.

    Args:
        attention (Tensor): Non-negative attention maps, ``(N, h, w)`` or ``(N, L)``.
        tau (float): Fraction of the total mass to cover, in ``(0, 1]``.

    Returns:
        Tensor: Boolean mask ``(N, L)`` with ``L = h * w`` (row-major over the grid).

    Examples::

        >>> attn = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
        >>> top_mass_mask(attn, 0.6)
        tensor([[ True,  True, False, False]])
    """
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not 0.0 < tau <= 1.0:
        raise ValueError(f"tau: expected a float in (0, 1], got {tau!r}")
    if not isinstance(attention, Tensor) or attention.dim() not in (2, 3):
        raise ValueError(
            "attention: expected a tensor of shape (N, h, w) or (N, L), got "
            f"{tuple(attention.shape) if isinstance(attention, Tensor) else type(attention).__name__}"
        )
    flat = attention.detach().flatten(1).to(torch.float64)
    if not torch.isfinite(flat).all() or (flat < 0).any():
        raise ValueError("attention: expected finite, non-negative values, got NaN, inf or negative values")
    values, order = torch.sort(flat, dim=1, descending=True, stable=True)
    cumulative = values.cumsum(dim=1)
    # Use the cumulative sum's own total so that rounding cannot leave the last
    # non-zero patch out when tau == 1.
    total = cumulative[:, -1:]
    mass_before = cumulative - values
    keep_sorted = mass_before < tau * total
    mask = torch.zeros_like(keep_sorted)
    mask.scatter_(1, order, keep_sorted)
    return mask


# --------------------------------------------------------------------------- #
# [CLS] attention of DINO backbones
# --------------------------------------------------------------------------- #
def _is_hf_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def _as_pair(value: int | Sequence[int]) -> GridSize:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def dino_patch_size(model: nn.Module) -> GridSize:
    """Patch size ``(ph, pw)`` of a timm or Hugging Face ViT.

    Args:
        model (nn.Module): timm ``VisionTransformer`` or Hugging Face ViT/DINOv2 model.

    Returns:
        tuple[int, int]: The patch height and width.
    """
    if _is_hf_model(model) and hasattr(getattr(model, "config", None), "patch_size"):
        return _as_pair(model.config.patch_size)
    if hasattr(getattr(model, "patch_embed", None), "patch_size"):
        return _as_pair(model.patch_embed.patch_size)
    raise TypeError(
        f"model: expected a timm VisionTransformer or a Hugging Face ViT/DINOv2 model, got {type(model).__name__}"
    )


def _native_image_size(model: nn.Module) -> GridSize:
    if _is_hf_model(model):
        return _as_pair(model.config.image_size)
    return _as_pair(model.patch_embed.img_size)


def _patch_grid(model: nn.Module, images: Tensor) -> GridSize:
    """The DINO patch grid of ``images``; their size must be divisible by the patch size."""
    height, width = images.shape[-2:]
    patch_h, patch_w = dino_patch_size(model)
    if height % patch_h or width % patch_w:
        raise ValueError(
            f"images: expected H, W divisible by the DINO patch size {(patch_h, patch_w)}, got {(height, width)}"
        )
    return height // patch_h, width // patch_w


def _timm_cls_attention(model: nn.Module, images: Tensor, blocks: Sequence[int] = (-1,)) -> Tensor:
    from timm.layers import Attention
    from timm.models.eva import Eva, EvaAttention
    from timm.models.vision_transformer import VisionTransformer

    is_eva = isinstance(model, Eva)
    if not isinstance(model, VisionTransformer) and not is_eva:
        raise TypeError(
            "model: expected a timm VisionTransformer or a Hugging Face ViT/DINOv2/DINOv3 model "
            f"(or a timm Eva, DINOv3), got {type(model).__name__}"
        )
    if model.cls_token is None:
        raise ValueError("model: expected a DINO model with a [CLS] token (its [CLS] attention), got class_token=False")
    grid_h, grid_w = _patch_grid(model, images)
    if not model.dynamic_img_size and tuple(images.shape[-2:]) != tuple(model.patch_embed.img_size):
        raise ValueError(
            f"images: expected the size {tuple(model.patch_embed.img_size)} this timm model accepts (or a model "
            f"built with dynamic_img_size=True), got {tuple(images.shape[-2:])}"
        )
    chosen = _block_indices(blocks, len(model.blocks))
    attention_type = EvaAttention if is_eva else Attention
    for index in chosen:
        block = model.blocks[index]
        if not isinstance(getattr(block, "attn", None), attention_type) or not hasattr(block, "norm1"):
            raise TypeError(
                f"blocks: expected pre-norm timm blocks with a timm {attention_type.__name__} module, got block "
                f"{index}: {type(block).__name__} / {type(getattr(block, 'attn', None)).__name__}"
            )

    tokens = model.patch_embed(images)
    if is_eva:
        if getattr(model, "rope_mixed", False):
            raise TypeError(
                "model: expected a timm Eva with one rotary embedding for all blocks, got per-block (mixed) ones"
            )
        # Eva applies its patch dropout inside _pos_embed (an identity in eval mode).
        tokens, rope = model._pos_embed(tokens)
    else:
        tokens, rope = model.patch_drop(model._pos_embed(tokens)), None
    tokens = model.norm_pre(tokens)
    maps = []
    for index, block in enumerate(model.blocks):
        if index in chosen:
            maps.append(_block_cls_attention(block, tokens, model.num_prefix_tokens, rope))
        if index == chosen[-1]:
            break
        tokens = block(tokens, rope=rope) if is_eva else block(tokens)
    return torch.stack(maps).mean(0).reshape(images.shape[0], grid_h, grid_w)


def _depth(model: nn.Module) -> int | None:
    """Number of transformer blocks of a timm ViT or a Hugging Face ViT/DINOv2 (``None``: unknown)."""
    if hasattr(model, "blocks"):
        return len(model.blocks)
    return getattr(getattr(model, "config", None), "num_hidden_layers", None)


def _block_indices(blocks: Sequence[int], depth: int) -> list[int]:
    """Non-negative, sorted, distinct block indices (negative ones count from the end)."""
    if (
        not isinstance(blocks, (tuple, list))
        or not blocks
        or not all(isinstance(b, int) and not isinstance(b, bool) and -depth <= b < depth for b in blocks)
    ):
        raise ValueError(
            f"blocks: expected a non-empty sequence of block indices in [-{depth}, {depth}), got {blocks!r}"
        )
    return sorted({b % depth for b in blocks})


def _block_cls_attention(block: nn.Module, tokens: Tensor, prefix: int, rope: Tensor | None = None) -> Tensor:
    """``(N, T - prefix)``: the block's [CLS] attention to the patches, averaged over heads.

    Recomputed from the block's own ``norm1``, ``qkv`` and ``q_norm`` / ``k_norm`` (and, for a
    timm ``EvaAttention``, its rotary embedding ``rope``), as the block loop reads them
    (:class:`~captum_iclip.models.blocks.TimmBlockView`): the fused (SDPA) kernel that timm
    uses never materialises the probabilities.
    """
    view = TimmBlockView(block, rope)
    q, k, _ = view.qkv(view.ln_1(tokens))
    probs = ((q[:, :, :1] * view.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (N, heads, 1, T)
    return probs[:, :, 0, prefix:].mean(dim=1)


def _hf_cls_attention(model: nn.Module, images: Tensor, blocks: Sequence[int] = (-1,)) -> Tensor:
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation != "eager":
        raise ValueError(
            "model: expected a Hugging Face model with attn_implementation='eager' (the only one that returns "
            "attention probabilities; load it so or call model.set_attn_implementation('eager')), got "
            f"{implementation!r}"
        )
    grid_h, grid_w = _patch_grid(model, images)
    kwargs = {"output_attentions": True}
    if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
        kwargs["interpolate_pos_encoding"] = True
    outputs = model(pixel_values=images, **kwargs)
    chosen = _block_indices(blocks, len(outputs.attentions))
    probs = torch.stack([outputs.attentions[i] for i in chosen]).mean(0)  # (N, heads, T, T)
    # [CLS] first, then any register tokens, then the patches.
    prefix = probs.shape[-1] - grid_h * grid_w
    if prefix < 1:
        raise ValueError(
            f"model: expected a [CLS] token before the {grid_h * grid_w} patch tokens, got {probs.shape[-1]} tokens"
        )
    return probs[:, :, 0, prefix:].mean(dim=1).reshape(images.shape[0], grid_h, grid_w)


def cls_attention(model: nn.Module, images: Tensor, blocks: Sequence[int] = (-1,)) -> Tensor:
    """Attention of the [CLS] query to the patch tokens, averaged over heads (and over ``blocks``).

    By default the last block's, as in DINO (Caron et al., 2021); ``blocks`` averages
    the maps of several blocks instead (docs/methods.md §3).

    For a timm ``VisionTransformer`` (DINO ``vit_small_patch16_224.dino``, DINOv2
    ``vit_small_patch14_dinov2`` / ``..._reg4_dinov2``) or ``Eva`` (DINOv3
    ``vit_small_patch16_dinov3``, with rotary position embeddings) the blocks
    before the last are run as usual and the last block's attention is recomputed
    from its ``norm1``, query/key projections, ``q_norm`` / ``k_norm`` and (Eva) its
    rotary embedding; the ``model.num_prefix_tokens`` prefix tokens ([CLS] and
    registers) are dropped from the keys. Any H, W divisible by the patch size works when the model was
    built with ``dynamic_img_size=True`` (positional embeddings are interpolated).

    For a Hugging Face ``ViTModel`` / ``Dinov2Model`` / ``Dinov2WithRegistersModel`` /
    ``DINOv3ViTModel`` the attention comes from ``output_attentions=True``, which needs the eager
    attention implementation (``attn_implementation="eager"``).

    Args:
        model (nn.Module): The DINO backbone.
        images (Tensor): ``(N, 3, H, W)`` images in the model's own normalisation.
        blocks (sequence of int): Blocks whose maps are averaged (negative indices
            count from the end). Default: the last block.

    Returns:
        Tensor: ``(N, H // p, W // p)`` attention maps; each sums to at most 1 (the
        remainder is the attention to the prefix tokens).

    Examples::

        >>> import timm
        >>> dino = timm.create_model("vit_small_patch16_224.dino", dynamic_img_size=True)
        >>> cls_attention(dino.eval(), torch.randn(1, 3, 224, 320)).shape
        torch.Size([1, 14, 20])
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            "images: expected a tensor of shape (N, 3, H, W), got "
            f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}"
        )
    if _is_hf_model(model):
        return _hf_cls_attention(model, images, blocks)
    return _timm_cls_attention(model, images, blocks)
