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
* :class:`DINOMaskProvider`: CLIP images → DINO attention → CLIP-grid mask; its
  :meth:`~DINOMaskProvider.patch_features` give ProxyCLIP its proxy (:func:`patch_features`),
  :func:`dino_provider` finds the provider behind a mask source.
* :func:`as_mask_provider`: wraps a provider, a callable or a fixed mask tensor.
* :class:`CachedMaskProvider`: on-disk per-image cache around any provider.
* :class:`OracleMaskProvider`: ground-truth foreground masks of known images (an upper bound on any
  mask source, for ablations).

The package holds them by concept: :mod:`~captum_iclip.masks.attention` (the [CLS] attention and its
threshold), :mod:`~captum_iclip.masks.providers` (the base class, fixed masks, callables, the oracle),
:mod:`~captum_iclip.masks.dino` (DINO backbones as a mask source), :mod:`~captum_iclip.masks.features` (their
patch features) and :mod:`~captum_iclip.masks.cache`.
"""

from captum_iclip.masks.attention import cls_attention, top_mass_mask
from captum_iclip.masks.cache import CachedMaskProvider
from captum_iclip.masks.dino import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, DINOMaskProvider, dino_provider
from captum_iclip.masks.features import PatchFeatures, patch_features
from captum_iclip.masks.providers import (
    CallableMaskProvider,
    FixedMaskProvider,
    MaskProvider,
    OracleMaskProvider,
    as_mask_provider,
)

__all__ = [
    "OPENAI_DATASET_MEAN",
    "OPENAI_DATASET_STD",
    "top_mass_mask",
    "cls_attention",
    "MaskProvider",
    "DINOMaskProvider",
    "dino_provider",
    "PatchFeatures",
    "patch_features",
    "as_mask_provider",
    "CallableMaskProvider",
    "FixedMaskProvider",
    "CachedMaskProvider",
    "OracleMaskProvider",
]
