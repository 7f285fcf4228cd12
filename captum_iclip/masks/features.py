"""The patch features of DINO backbones: what ProxyCLIP's proxy attention is built from (Lan et al., ECCV 2024,
"ProxyCLIP: Proxy Attention Improves CLIP for Open-Vocabulary Segmentation"; docs/methods.md §7)."""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from captum_iclip.masks.attention import GridSize, _is_hf_model, _patch_grid


class PatchFeatures(NamedTuple):
    """The patch features of a batch on its backbone's patch grid."""

    features: Tensor  # (N, h*w, C), each row L2-normalised, row-major over the grid
    grid: GridSize  # the backbone's patch grid (h, w)


def patch_features(model: nn.Module, images: Tensor) -> PatchFeatures:
    """The L2-normalised patch tokens of a DINO backbone's last block, after its final norm.

    They are what ProxyCLIP's reference reads from its proxies (DINO's ``get_intermediate_layers``,
    DINOv2's with ``reshape=True``): the output of the last block through the backbone's final norm,
    without the prefix tokens ([CLS] and any registers). Here from a timm ``VisionTransformer`` / ``Eva``
    (its ``forward_features``: the bundled tiny DINO, DINO, DINOv2 with registers, DINOv3) or a Hugging
    Face ``ViTModel`` / ``Dinov2Model`` / ``Dinov2WithRegistersModel`` / ``DINOv3ViTModel`` (its
    ``last_hidden_state``, positional embeddings interpolated where the model offers it).

    Args:
        model (nn.Module): The backbone, in eval mode.
        images (Tensor): ``(N, 3, H, W)`` images in the backbone's own normalisation, H and W divisible by its
            patch size (a timm model built with ``dynamic_img_size=True`` for sizes other than its own).

    Returns:
        PatchFeatures: ``features`` (N, h*w, C) with unit rows and the patch ``grid`` (h, w).

    Raises:
        ValueError: a size the backbone does not take.
        TypeError: a module that is none of the backbones above.

    Examples::

        >>> from captum_iclip.models.tiny_dino import load_tiny_dino
        >>> dino = load_tiny_dino("captum_iclip/zoo/weights/shapes-tiny/dino")
        >>> patch_features(dino, torch.randn(2, 3, 96, 96)).features.shape
        torch.Size([2, 144, 128])
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            "images: expected a tensor of shape (N, 3, H, W), got "
            f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}"
        )
    grid = _patch_grid(model, images)
    if _is_hf_model(model):
        kwargs = {}
        if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
            kwargs["interpolate_pos_encoding"] = True
        tokens = model(pixel_values=images, **kwargs).last_hidden_state
    else:
        from timm.models.eva import Eva
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, (VisionTransformer, Eva)):
            raise TypeError(
                "model: expected a timm VisionTransformer / Eva or a Hugging Face ViT/DINOv2/DINOv3 model, "
                f"got {type(model).__name__}"
            )
        if not model.dynamic_img_size and tuple(images.shape[-2:]) != tuple(model.patch_embed.img_size):
            raise ValueError(
                f"images: expected the size {tuple(model.patch_embed.img_size)} this timm model accepts (or a model "
                f"built with dynamic_img_size=True), got {tuple(images.shape[-2:])}"
            )
        tokens = model.forward_features(images)
    # The prefix ([CLS], registers) comes first in every family.
    patches = tokens[:, tokens.shape[1] - grid[0] * grid[1] :]
    return PatchFeatures(F.normalize(patches.float(), dim=-1), grid)
