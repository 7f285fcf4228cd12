"""Evaluation of where CLIP sees a text: localization, segmentation, faithfulness."""

from .faithfulness import (
    confidence_change,
    deletion_curve,
    expand_attributions,
    fill_image,
    gaussian_perturbation,
    infidelity_score,
    insertion_curve,
    noisy_linear_imputation,
    patch_perturbation,
    road_scores,
    sensitivity_score,
    trapezoid_auc,
)
from .metrics import LocalizationMetrics, SegmentationMetrics, map_agreement, segment_from_maps, sliding_window

__all__ = [
    "LocalizationMetrics",
    "SegmentationMetrics",
    "confidence_change",
    "deletion_curve",
    "expand_attributions",
    "fill_image",
    "gaussian_perturbation",
    "infidelity_score",
    "insertion_curve",
    "map_agreement",
    "noisy_linear_imputation",
    "patch_perturbation",
    "road_scores",
    "segment_from_maps",
    "sensitivity_score",
    "sliding_window",
    "trapezoid_auc",
]
