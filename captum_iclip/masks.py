"""Foreground mask providers for masked max pooling (docs/methods.md §3, "mask source";
DINO: Caron et al., arXiv 2104.14294).

A *mask provider* maps a batch of CLIP-preprocessed images ``(N, 3, H, W)`` and a
CLIP patch grid ``(h, w)`` to a boolean foreground mask ``(N, h * w)`` (row-major
over the grid, like the CLIP patch tokens). The default source is the [CLS]
attention of a self-supervised DINO ViT, thresholded to the smallest set of
patches holding a fraction ``tau`` of the attention mass.

Public API:

* :func:`top_mass_mask`: the top-τ attention-mass threshold.
* :func:`cls_attention`: last-block [CLS]→patch attention of a timm
  ``VisionTransformer`` or a Hugging Face ``ViTModel`` / ``Dinov2Model``.
* :class:`MaskProvider`: base class (empty-mask fallback and its counter).
* :class:`DINOMaskProvider`: CLIP images → DINO attention → CLIP-grid mask.
* :func:`as_mask_provider`: wraps a provider, a callable or a fixed mask tensor.
* :class:`CachedMaskProvider`: on-disk per-image cache around any provider.
* :class:`OracleMaskProvider`: ground-truth foreground masks of known images (an upper bound on any
  mask source, for ablations).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data import OPENAI_CLIP_MEAN as OPENAI_DATASET_MEAN
from timm.data import OPENAI_CLIP_STD as OPENAI_DATASET_STD
from torch import Tensor, nn

from captum_iclip._io import load_torch_file

__all__ = [
    "OPENAI_DATASET_MEAN",
    "OPENAI_DATASET_STD",
    "top_mass_mask",
    "cls_attention",
    "MaskProvider",
    "DINOMaskProvider",
    "as_mask_provider",
    "CachedMaskProvider",
    "OracleMaskProvider",
]

GridSize = tuple[int, int]
MaskFn = Callable[[Tensor, GridSize], Tensor]

_RESAMPLE_MODES = ("bilinear", "nearest")


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


def _eva_query_key(attn: nn.Module, x: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor]:
    """Queries and keys (N, heads, T, d) of a timm ``EvaAttention``, rotary embedding applied
    to the patch tokens as the module applies it (DINOv3, EVA02)."""
    from timm.layers import apply_rot_embed_cat

    batch, num_tokens, _ = x.shape
    if attn.qkv is not None:
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, bias).reshape(batch, num_tokens, 3, attn.num_heads, -1)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = attn.q_proj(x).reshape(batch, num_tokens, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(batch, num_tokens, attn.num_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        prefix, half = attn.num_prefix_tokens, attn.rotate_half
        q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], rope, half=half)], dim=2)
    return q, k


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
    timm ``EvaAttention``, its rotary embedding ``rope``): the fused (SDPA) kernel that timm
    uses never materialises the probabilities.
    """
    from timm.models.eva import EvaAttention

    attn = block.attn
    x = block.norm1(tokens)
    batch, num_tokens, _ = x.shape
    if isinstance(attn, EvaAttention):
        q, k = _eva_query_key(attn, x, rope)
    else:
        qkv = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (N, heads, 1, T)
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


# --------------------------------------------------------------------------- #
# Providers
# --------------------------------------------------------------------------- #
def _check_grid_size(grid_size: GridSize) -> GridSize:
    if (
        not isinstance(grid_size, (tuple, list))
        or len(grid_size) != 2
        or not all(isinstance(v, int) and v > 0 for v in grid_size)
    ):
        raise ValueError(f"grid_size: expected a pair of positive ints (h, w), got {grid_size!r}")
    return int(grid_size[0]), int(grid_size[1])


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            "images: expected a tensor of shape (N, 3, H, W), got "
            f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}"
        )


class MaskProvider(nn.Module):
    """Base class: ``forward(images, grid_size) -> BoolTensor (N, h * w)``.

    Subclasses implement :meth:`compute_mask`; :meth:`forward` validates inputs
    and output, and replaces every empty mask by the all-patches mask (docs/methods.md §3),
    counting each replacement in :attr:`num_empty_fallbacks`.

    Attributes:
        num_empty_fallbacks (int): Number of images whose mask was empty and was
            replaced by all patches, since construction.
    """

    def __init__(self) -> None:
        super().__init__()
        self.num_empty_fallbacks = 0

    def compute_mask(self, images: Tensor, grid_size: GridSize) -> Tensor:
        """Return the raw ``(N, h * w)`` mask (may contain empty rows)."""
        raise NotImplementedError

    def cache_fingerprint(self) -> str:
        """A string that changes whenever the provider's masks would change.

        :class:`CachedMaskProvider` mixes it into its keys. The default covers the
        class, ``extra_repr()`` and the bytes of every parameter and buffer.
        """
        digest = hashlib.sha256(f"{type(self).__qualname__}|{self.extra_repr()}".encode())
        tensors = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        for name, tensor in sorted(tensors.items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def forward(self, images: Tensor, grid_size: GridSize) -> Tensor:
        """Foreground mask of each image on the CLIP patch grid.

        Args:
            images (Tensor): CLIP-preprocessed images ``(N, 3, H, W)``.
            grid_size (tuple[int, int]): CLIP patch grid ``(h, w)``.

        Returns:
            Tensor: Boolean mask ``(N, h * w)``; never empty.
        """
        _check_images(images)
        grid_h, grid_w = _check_grid_size(grid_size)
        mask = self.compute_mask(images, (grid_h, grid_w))
        expected = (images.shape[0], grid_h * grid_w)
        if not isinstance(mask, Tensor) or tuple(mask.shape) != expected:
            raise ValueError(
                f"{type(self).__name__}: expected to return a mask of shape {expected}, got "
                f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}"
            )
        mask = mask.to(device=images.device, dtype=torch.bool)
        empty = ~mask.any(dim=1)
        num_empty = int(empty.sum())
        if num_empty:
            self.num_empty_fallbacks += num_empty
            mask = mask | empty[:, None]
        return mask


def _as_bool_mask(mask: Tensor, argument: str) -> Tensor:
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{argument}: expected a boolean mask or only 0 and 1, got other values")
        return mask != 0
    raise TypeError(f"{argument}: expected a boolean or 0/1 tensor, got dtype {mask.dtype}")


class FixedMaskProvider(MaskProvider):
    """Returns a fixed mask, given per image or once for the whole batch.

    Args:
        mask (Tensor): ``(N, h, w)`` or ``(N, h * w)``, boolean or 0/1. ``N = 1``
            broadcasts to any batch size.

    Examples::

        >>> provider = FixedMaskProvider(torch.ones(1, 7, 7, dtype=torch.bool))
        >>> provider(torch.zeros(2, 3, 224, 224), (7, 7)).shape
        torch.Size([2, 49])
    """

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        if not isinstance(mask, Tensor) or mask.dim() not in (2, 3):
            raise ValueError(
                "mask: expected a tensor of shape (N, h, w) or (N, h*w), got "
                f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}"
            )
        self.grid_size: GridSize | None = tuple(mask.shape[1:]) if mask.dim() == 3 else None
        self.register_buffer("mask", _as_bool_mask(mask, "mask").flatten(1), persistent=False)

    def extra_repr(self) -> str:
        return f"mask_shape={tuple(self.mask.shape)}, grid_size={self.grid_size}"

    def compute_mask(self, images: Tensor, grid_size: GridSize) -> Tensor:
        if self.grid_size is not None and tuple(self.grid_size) != tuple(grid_size):
            raise ValueError(
                f"grid_size: expected the fixed mask's grid {tuple(self.grid_size)}, got {tuple(grid_size)}"
            )
        if self.mask.shape[1] != grid_size[0] * grid_size[1]:
            raise ValueError(
                f"grid_size: expected a grid of the fixed mask's {self.mask.shape[1]} patches, got {tuple(grid_size)} "
                f"({grid_size[0] * grid_size[1]} patches)"
            )
        batch = images.shape[0]
        if self.mask.shape[0] == 1:
            return self.mask.expand(batch, -1)
        if self.mask.shape[0] != batch:
            raise ValueError(
                f"images: expected a batch of {self.mask.shape[0]} images (one per fixed mask), got {batch} images"
            )
        return self.mask


class CallableMaskProvider(MaskProvider):
    """Wraps a user function ``fn(images, grid_size) -> mask``.

    The function may return ``(N, h, w)`` or ``(N, h * w)``, boolean or 0/1; the
    result is validated and flattened.

    Args:
        fn (callable): The mask function.
    """

    def __init__(self, fn: MaskFn) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
        self.fn = fn

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__qualname__', repr(self.fn))}"

    def compute_mask(self, images: Tensor, grid_size: GridSize) -> Tensor:
        mask = self.fn(images, grid_size)
        grid_h, grid_w = grid_size
        allowed = ((images.shape[0], grid_h, grid_w), (images.shape[0], grid_h * grid_w))
        if not isinstance(mask, Tensor) or tuple(mask.shape) not in allowed:
            raise ValueError(
                f"mask function: expected to return a tensor of shape {allowed[0]} or {allowed[1]}, got "
                f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}"
            )
        return _as_bool_mask(mask, "the mask function's output").flatten(1)


def as_mask_provider(obj: MaskProvider | MaskFn | Tensor) -> MaskProvider:
    """Turn a provider, a callable or a fixed mask into a :class:`MaskProvider`.

    Args:
        obj: A :class:`MaskProvider` (returned as is); a callable
            ``(images, grid_size) -> mask`` returning ``(N, h, w)`` or
            ``(N, h * w)``; or a fixed boolean / 0-1 mask tensor ``(N, h, w)`` or
            ``(N, h * w)`` (``N = 1`` broadcasts over the batch).

    Returns:
        MaskProvider: A module mapping ``(images, grid_size)`` to ``(N, h * w)`` booleans.

    Examples::

        >>> centre = torch.zeros(1, 7, 7, dtype=torch.bool)
        >>> centre[:, 2:5, 2:5] = True
        >>> as_mask_provider(centre)(torch.zeros(4, 3, 224, 224), (7, 7)).sum(1)
        tensor([9, 9, 9, 9])
    """
    if isinstance(obj, MaskProvider):
        return obj
    if isinstance(obj, Tensor):
        return FixedMaskProvider(obj)
    if callable(obj):
        return CallableMaskProvider(obj)
    raise TypeError(
        f"mask_provider: expected a MaskProvider, a callable (images, grid_size) -> mask or a mask tensor, "
        f"got {type(obj).__name__}"
    )


# --------------------------------------------------------------------------- #
# DINO mask provider
# --------------------------------------------------------------------------- #
def _load_state_dict_file(path: str | os.PathLike) -> dict:
    """Backbone state dict from a plain, ``{"state_dict"|"model"|"teacher": ...}`` or DDP file."""
    checkpoint = load_torch_file(path, "checkpoint")
    for key in ("teacher", "state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint: expected a state dict, got a {type(checkpoint).__name__} in {path!s}")
    state_dict = {}
    for name, value in checkpoint.items():
        for prefix in ("module.", "backbone."):
            name = name[len(prefix) :] if name.startswith(prefix) else name
        state_dict[name] = value
    return state_dict


def _load_timm_dino(name: str, pretrained: bool, checkpoint: str | None) -> nn.Module:
    import timm
    from timm.models import eva, vision_transformer

    try:
        model = timm.create_model(
            name, pretrained=pretrained and checkpoint is None, num_classes=0, dynamic_img_size=True
        )
    except Exception as error:  # offline hub / missing file: say what to do
        raise RuntimeError(
            f"pretrained: expected the weights of timm model {name!r} to be downloadable, got {error}. "
            f"Download them on a machine with network access (e.g. the 'timm/{name}' Hugging Face "
            f"repository, file model.safetensors or pytorch_model.bin, or the original DINO .pth) and "
            f"pass checkpoint='/path/to/file' instead of pretrained=True"
        ) from error
    if checkpoint is not None:
        # Each timm family maps original (e.g. DINOv3) checkpoints to its own layout.
        family = eva if isinstance(model, eva.Eva) else vision_transformer
        state_dict = family.checkpoint_filter_fn(_load_state_dict_file(checkpoint), model)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing:
            raise ValueError(
                f"checkpoint: expected every weight of {name!r}, got {checkpoint!s} without {missing[:5]}..."
            )
        if unexpected:
            warnings.warn(f"checkpoint {checkpoint!s}: ignored unexpected keys {unexpected[:5]}...", stacklevel=3)
    elif not pretrained:
        warnings.warn(
            f"DINOMaskProvider({name!r}) has random weights (pretrained=False and no checkpoint): "
            "its masks are meaningless; pass pretrained=True or checkpoint=PATH",
            stacklevel=3,
        )
    return model


def _load_hf_dino(name: str) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    from transformers import AutoImageProcessor, AutoModel

    def load(local_files_only: bool):
        model = AutoModel.from_pretrained(name, attn_implementation="eager", local_files_only=local_files_only)
        try:
            processor = AutoImageProcessor.from_pretrained(name, local_files_only=local_files_only)
            mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        except (OSError, ValueError, AttributeError, TypeError):
            mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        return model, mean, std

    # The local cache first: it needs no network and gives the same files.
    try:
        return load(local_files_only=True)
    except OSError:
        if os.path.isdir(name):
            raise
    try:
        return load(local_files_only=False)
    except OSError as error:
        raise RuntimeError(
            f"model: expected a Hugging Face model {name!r} in the local cache or on the hub, got {error}. "
            "Download it where the network is reachable (e.g. `huggingface-cli download "
            f"{name} --local-dir DIR`) and pass model='DIR'"
        ) from error


def _resolve_dino_model(
    model: str | nn.Module, pretrained: bool, checkpoint: str | None
) -> tuple[nn.Module, Sequence[float], Sequence[float]]:
    """The DINO model of :class:`DINOMaskProvider` (built from a timm name, a Hugging Face id or folder, or
    given), ready for its [CLS] attention, with the mean and std of its own input normalisation."""
    dino_mean, dino_std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if isinstance(model, str):
        if checkpoint is not None and pretrained:
            raise ValueError(
                f"checkpoint: expected None with pretrained=True (one source of weights), got {checkpoint!r}"
            )
        import timm

        if timm.is_model(model):
            model = _load_timm_dino(model, pretrained, checkpoint)
        elif os.path.isdir(model) or "/" in model:
            if pretrained or checkpoint is not None:
                raise ValueError(
                    "pretrained: expected pretrained=False and checkpoint=None for a Hugging Face model (they "
                    f"apply to timm model names), got pretrained={pretrained!r}, checkpoint={checkpoint!r}"
                )
            model, dino_mean, dino_std = _load_hf_dino(model)
        else:
            raise ValueError(f"model: expected a timm model name, a Hugging Face id or a local folder, got {model!r}")
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a model name or an nn.Module, got {type(model).__name__}")
    elif pretrained or checkpoint is not None:
        raise ValueError(
            "pretrained: expected pretrained=False and checkpoint=None for a built module (they apply to "
            f"model names), got pretrained={pretrained!r}, checkpoint={checkpoint!r}"
        )

    if _is_hf_model(model):
        if getattr(model.config, "_attn_implementation", None) != "eager":
            model.set_attn_implementation("eager")
    else:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        dino_mean, dino_std = cfg.get("mean", dino_mean), cfg.get("std", dino_std)
    return model, dino_mean, dino_std


class DINOMaskProvider(MaskProvider):
    """Foreground masks from the [CLS] attention of a self-supervised DINO ViT.

    Pipeline for CLIP-preprocessed images ``(N, 3, H, W)``:

    1. undo the CLIP normalisation (``input_mean`` / ``input_std``) and apply the
       DINO model's own (timm ``pretrained_cfg`` mean/std; Hugging Face image
       processor values, ImageNet when unavailable);
    2. resize (bilinear, antialiased) to ``image_size`` (square) or, when ``None``,
       to the model's native input size, which is a multiple of its patch size;
    3. :func:`cls_attention` gives ``A`` on the DINO patch grid (the last block's,
       or the mean over ``blocks``; register tokens, like the [CLS] token itself, are
       excluded from the attended tokens);
    4. resample to the CLIP grid ``(h, w)``. ``resample="bilinear"`` (default)
       interpolates ``A`` bilinearly (``align_corners=False``, antialiased when
       shrinking) and applies :func:`top_mass_mask` with ``tau`` on the resampled
       map, so the mask holds ``tau`` of the mass at the CLIP resolution.
       ``resample="nearest"`` thresholds ``A`` on the DINO grid and resamples
       the binary mask by nearest neighbour.

    An empty mask (possible only with ``nearest``, or an all-zero map) falls back
    to all patches and is counted in :attr:`num_empty_fallbacks`.

    The DINO model stays in eval mode without gradients, whatever ``train()``
    is called on a parent module.

    Args:
        model (str or nn.Module): a timm model name (e.g.
            ``"vit_small_patch16_224.dino"``, ``"vit_base_patch16_224.dino"``,
            ``"vit_small_patch14_dinov2"``, ``"vit_small_patch14_reg4_dinov2"``,
            ``"vit_small_patch16_dinov3"``), a Hugging Face hub id or local folder
            (``"facebook/dino-vits16"``, ``"facebook/dinov2-small"``,
            ``"facebook/dinov2-with-registers-small"``), or a built timm
            ``VisionTransformer`` / ``Eva`` or Hugging Face ``ViTModel`` / ``Dinov2Model`` /
            ``Dinov2WithRegistersModel`` / ``DINOv3ViTModel``
            (e.g. from :func:`captum_iclip.models.tiny_dino.load_tiny_dino`). A Hugging
            Face module is switched to eager attention.
        pretrained (bool): Load a timm model's pretrained weights through timm
            (needs the network or a warm cache).
        checkpoint (str, optional): State-dict file for a timm model name.
        tau (float): Attention mass kept, in ``(0, 1]``. Default 0.6.
        input_mean, input_std (sequence of float): Normalisation of the inputs
            (OpenAI CLIP by default).
        image_size (int, optional): Side of the square DINO input; must be a
            multiple of the patch size. ``None``: the model's native size.
        resample (str): ``"bilinear"`` or ``"nearest"``, see above.
        blocks (sequence of int): DINO blocks whose [CLS] attention maps are
            averaged (negative indices count from the end). Default ``(-1,)``: the
            last block, as in the paper.

    Examples::

        >>> from captum_iclip.models.tiny_dino import load_tiny_dino
        >>> provider = DINOMaskProvider(load_tiny_dino("runs/tiny_dino"), tau=0.6)
        >>> mask = provider(clip_images, grid_size=(14, 14))  # (N, 196) bool
    """

    def __init__(
        self,
        model: str | nn.Module = "vit_small_patch16_224.dino",
        *,
        pretrained: bool = False,
        checkpoint: str | None = None,
        tau: float = 0.6,
        input_mean: Sequence[float] = OPENAI_DATASET_MEAN,
        input_std: Sequence[float] = OPENAI_DATASET_STD,
        image_size: int | None = None,
        resample: str = "bilinear",
        blocks: Sequence[int] = (-1,),
    ) -> None:
        super().__init__()
        if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not 0.0 < tau <= 1.0:
            raise ValueError(f"tau: expected a float in (0, 1], got {tau!r}")
        if resample not in _RESAMPLE_MODES:
            raise ValueError(f"resample: expected one of {_RESAMPLE_MODES}, got {resample!r}")
        for argument, value in (("input_mean", input_mean), ("input_std", input_std)):
            if len(value) != 3:
                raise ValueError(f"{argument}: expected 3 values (RGB), got {value!r}")
        if any(s <= 0 for s in input_std):
            raise ValueError(f"input_std: expected a positive value, got {input_std!r}")

        self.model_name = model if isinstance(model, str) else type(model).__name__
        model, dino_mean, dino_std = _resolve_dino_model(model, pretrained, checkpoint)

        patch_h, patch_w = dino_patch_size(model)
        if image_size is None:
            self.dino_size = _native_image_size(model)
        elif not isinstance(image_size, int) or image_size <= 0 or image_size % patch_h or image_size % patch_w:
            raise ValueError(
                f"image_size: expected a positive multiple of the DINO patch size {(patch_h, patch_w)}, "
                f"got {image_size!r}"
            )
        else:
            self.dino_size = (image_size, image_size)

        depth = _depth(model)
        self.blocks = tuple(_block_indices(blocks, depth)) if depth is not None else tuple(blocks)
        self.model = model.eval().requires_grad_(False)
        self.tau = float(tau)
        self.resample = resample
        # x_dino = (x_clip * s_clip + m_clip - m_dino) / s_dino = x_clip * scale + shift
        clip_mean, clip_std = torch.tensor(input_mean), torch.tensor(input_std)
        dino_mean, dino_std = torch.tensor(dino_mean), torch.tensor(dino_std)
        self.register_buffer("scale", (clip_std / dino_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((clip_mean - dino_mean) / dino_std).view(1, 3, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"model={self.model_name!r}, tau={self.tau}, dino_size={self.dino_size}, resample={self.resample!r}, "
            f"blocks={self.blocks}"
        )

    def train(self, mode: bool = True) -> DINOMaskProvider:
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def attention(self, images: Tensor) -> Tensor:
        """[CLS] attention ``A`` of CLIP-preprocessed images on the DINO patch grid.

        Args:
            images (Tensor): CLIP-preprocessed images ``(N, 3, H, W)``.

        Returns:
            Tensor: ``(N, h_d, w_d)`` float attention maps.
        """
        _check_images(images)
        x = images.float() * self.scale + self.shift
        if tuple(x.shape[-2:]) != self.dino_size:
            x = F.interpolate(x, size=self.dino_size, mode="bilinear", align_corners=False, antialias=True)
        return cls_attention(self.model, x, self.blocks).float()

    def compute_mask(self, images: Tensor, grid_size: GridSize) -> Tensor:
        return self.mask_from_attention(self.attention(images), grid_size)

    def mask_from_attention(self, attention: Tensor, grid_size: GridSize) -> Tensor:
        """The foreground of docs/methods.md §3 on ``grid_size`` from :meth:`attention` maps ``(N, h_d, w_d)``.

        Returns:
            Tensor: ``(N, h * w)`` bool masks (before the empty-mask fallback of ``forward``).
        """
        if self.resample == "bilinear":
            if tuple(attention.shape[-2:]) != tuple(grid_size):
                shrinking = grid_size[0] < attention.shape[-2] or grid_size[1] < attention.shape[-1]
                attention = F.interpolate(
                    attention[:, None], size=grid_size, mode="bilinear", align_corners=False, antialias=shrinking
                )[:, 0].clamp_min(0)
            return top_mass_mask(attention, self.tau)
        mask = top_mass_mask(attention, self.tau).view_as(attention)
        return F.interpolate(mask[:, None].float(), size=grid_size, mode="nearest")[:, 0].flatten(1) > 0.5


# --------------------------------------------------------------------------- #
# On-disk cache
# --------------------------------------------------------------------------- #
class CachedMaskProvider(MaskProvider):
    """Caches another provider's masks on disk, one file per image.

    The key of an image is the SHA-256 of its tensor bytes, shape and dtype, the
    CLIP grid and the wrapped provider's fingerprint (its
    :meth:`MaskProvider.cache_fingerprint`: class, settings and weights), so a
    changed model, ``tau`` or grid never reads a stale entry. Each mask is stored
    as ``cache_dir/ab/abcdef....pt`` (a boolean ``(h * w,)`` tensor) written to a
    temporary file and moved into place with ``os.replace``, so concurrent
    writers (data-loader workers, ranks) never expose a partial file. Only the
    images that miss are sent to the wrapped provider, as one batch; the masks
    stored are the provider's final ones (after its empty-mask fallback, which
    the wrapped provider counts on misses only).

    Args:
        provider: Any input accepted by :func:`as_mask_provider`.
        cache_dir (str or Path): Cache folder (created if missing).
        fingerprint (str, optional): Overrides the provider fingerprint, e.g. to
            name a user callable whose behaviour the cache cannot observe.

    Attributes:
        hits (int): Masks read from disk.
        misses (int): Masks computed and written.

    Examples::

        >>> cached = CachedMaskProvider(DINOMaskProvider(dino_model), "cache/masks")
        >>> masks = cached(clip_images, (14, 14))
        >>> cached.hits, cached.misses
        (0, 8)
    """

    def __init__(
        self,
        provider: MaskProvider | MaskFn | Tensor,
        cache_dir: str | os.PathLike,
        *,
        fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        self.provider = as_mask_provider(provider)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint if fingerprint is not None else self.provider.cache_fingerprint()
        self.hits = 0
        self.misses = 0

    def extra_repr(self) -> str:
        return f"cache_dir={str(self.cache_dir)!r}"

    def cache_fingerprint(self) -> str:
        return self.fingerprint

    def _key(self, image: Tensor, grid_size: GridSize) -> str:
        image = image.detach().cpu().contiguous()
        digest = hashlib.sha256(f"{self.fingerprint}|{tuple(grid_size)}|{tuple(image.shape)}|{image.dtype}".encode())
        digest.update(image.view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.pt"

    def _write(self, path: Path, mask: Tensor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                torch.save(mask.detach().cpu().clone(), stream)
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise

    def _read(self, path: Path, patches: int) -> Tensor | None:
        """A cached mask, or ``None`` (a miss) when the entry is corrupt, truncated or of the wrong shape:
        the cache holds derived data, so a damaged entry is recomputed and rewritten, with a warning."""
        try:
            mask = load_torch_file(path, "cache_dir")
        except ValueError as error:
            warnings.warn(
                f"CachedMaskProvider: recomputing a damaged cache entry: {error}", RuntimeWarning, stacklevel=2
            )
            return None
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (patches,):
            warnings.warn(
                f"CachedMaskProvider: recomputing the cache entry {path}: it does not hold a boolean ({patches},) mask",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        return mask

    def compute_mask(self, images: Tensor, grid_size: GridSize) -> Tensor:
        paths = [self._path(self._key(image, grid_size)) for image in images]
        masks: list = [None] * len(paths)
        missing = []
        expected = grid_size[0] * grid_size[1]
        for index, path in enumerate(paths):
            mask = self._read(path, expected) if path.is_file() else None
            if mask is None:
                missing.append(index)
            else:
                masks[index] = mask
        self.hits += len(paths) - len(missing)
        if missing:
            computed = self.provider(images[missing], grid_size).cpu()
            for index, mask in zip(missing, computed):
                self._write(paths[index], mask)
                masks[index] = mask
            self.misses += len(missing)
        return torch.stack(masks).to(images.device)


class OracleMaskProvider(MaskProvider):
    """Ground-truth foreground masks of a fixed set of images: the best mask any source could give.

    An image is recognised by its content: the preprocessed tensor is mapped back to
    8-bit pixels (``round(255 * (x * std + mean))``, exact for images that were 8-bit
    before normalisation, whatever the preprocessing code or device) and hashed. A
    patch is foreground when the image's foreground covers at least half of it.

    Args:
        images: ``(N, H, W, 3)`` uint8 images, as they are before preprocessing.
        foreground: ``(N, H, W)`` boolean (or 0/1) foreground of each image.
        grid_size: The CLIP patch grid ``(h, w)`` the masks are made on.
        input_mean, input_std: The normalisation of the CLIP inputs.

    Raises:
        ValueError: shapes that disagree, or (when called) an image it was not built from
            or another grid.

    Examples::

        >>> oracle = OracleMaskProvider(images, labels > 0, (8, 8), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
        >>> oracle(preprocessed_images, (8, 8)).shape  # doctest: +SKIP
        torch.Size([4, 64])
    """

    def __init__(
        self,
        images: Tensor | Sequence,
        foreground: Tensor | Sequence,
        grid_size: GridSize,
        input_mean: Sequence[float],
        input_std: Sequence[float],
    ) -> None:
        super().__init__()
        images, foreground = torch.as_tensor(images), torch.as_tensor(foreground)
        if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images: expected uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        if tuple(foreground.shape) != tuple(images.shape[:3]):
            raise ValueError(f"foreground: expected shape {tuple(images.shape[:3])}, got {tuple(foreground.shape)}")
        self.grid_size = _check_grid_size(grid_size)
        self.mean = torch.tensor(input_mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.std = torch.tensor(input_std, dtype=torch.float32).reshape(1, 3, 1, 1)
        cover = F.adaptive_avg_pool2d(foreground.float()[:, None], self.grid_size)[:, 0].flatten(1) >= 0.5
        self.masks = {self._digest(image): mask for image, mask in zip(images, cover)}

    @staticmethod
    def _digest(pixels: Tensor) -> bytes:
        return hashlib.blake2b(pixels.contiguous().numpy().tobytes(), digest_size=16).digest()

    def extra_repr(self) -> str:
        return f"images={len(self.masks)}, grid_size={self.grid_size}"

    def compute_mask(self, images: Tensor, grid_size: GridSize) -> Tensor:
        if tuple(grid_size) != self.grid_size:
            raise ValueError(f"grid_size: expected {self.grid_size} (the oracle's grid), got {tuple(grid_size)}")
        x = images.detach().float().cpu() * self.std + self.mean
        pixels = (x * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        masks = []
        for image in pixels:
            mask = self.masks.get(self._digest(image))
            if mask is None:
                raise ValueError("images: expected images the oracle was built from, got an unknown image")
            masks.append(mask)
        return torch.stack(masks).to(images.device)
