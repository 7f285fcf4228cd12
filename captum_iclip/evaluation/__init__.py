"""Evaluation of where CLIP sees a text: localization, segmentation, faithfulness."""

from .faithfulness import (
    expand_attributions,
    gaussian_perturbation,
    infidelity_score,
    patch_perturbation,
    sensitivity_score,
)
from .metrics import LocalizationMetrics, SegmentationMetrics, map_agreement, segment_from_maps, sliding_window

__all__ = [
    "LocalizationMetrics",
    "SegmentationMetrics",
    "expand_attributions",
    "gaussian_perturbation",
    "infidelity_score",
    "map_agreement",
    "patch_perturbation",
    "segment_from_maps",
    "sensitivity_score",
    "sliding_window",
]
