"""Quality figures of bundled models: known answers on constructed scorers and masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from captum_iclip.world import CATEGORIES
from captum_iclip.zoo.quality import (
    MASK_SCENES,
    REPORT_SCENES,
    SEED_RANGES,
    STUDY_SCENES,
    STUDY_SELECTION_SCENES,
    foreground_truth,
    mask_quality,
    recognition_report,
    scene_range,
)

REPO = Path(__file__).resolve().parents[2]


def _identity_preprocess(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float()


@pytest.fixture(scope="module")
def scenes():
    return scene_range("selection", 60, 48)


def _oracle(scenes, pick):
    """A scorer that puts the top score on ``pick(scene)`` for each scene, in order."""
    calls = iter(scenes)

    def score(images: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(images), len(CATEGORIES))
        for row in range(len(images)):
            out[row, CATEGORIES.index(pick(next(calls)))] = 1.0
        return out

    return score


def test_recognition_of_an_oracle_and_of_a_constant_guess(scenes):
    perfect = recognition_report(
        _oracle(scenes, lambda s: s.objects[-1].category), scenes, _identity_preprocess, batch_size=7
    )
    singles = [s for s in scenes if len(s.objects) == 1]
    assert perfect["top1_any"] == 100.0 and perfect["single_object"] == 100.0
    assert perfect["single_object_scenes"] == len(singles) > 0
    confusion = np.array(perfect["confusion"])
    assert confusion.sum() == len(singles) and (confusion == np.diag(confusion.diagonal())).all()

    circle = recognition_report(_oracle(scenes, lambda s: "circle"), scenes, _identity_preprocess)
    expected_any = 100.0 * sum("circle" in s.categories for s in scenes) / len(scenes)
    assert circle["top1_any"] == pytest.approx(expected_any)
    assert circle["per_class_recall"]["circle"] in (0.0, 100.0)
    assert circle["min_class_recall"] == 0.0
    assert np.array(circle["confusion"])[:, 1:].sum() == 0  # every guess is column 0
    chance = 100.0 * np.mean([len(set(s.categories)) / len(CATEGORIES) for s in scenes])
    assert circle["chance"] == pytest.approx(chance)


class _AttentionOnTruth(nn.Module):
    """A stand-in mask source whose [CLS] attention is the objects' own coverage."""

    tau = 0.6

    def __init__(self, scenes):
        super().__init__()
        self.scenes = scenes

    def attention(self, images):
        return torch.stack([torch.from_numpy((s.label > 0).astype(np.float32)) for s in self.scenes])

    def mask_from_attention(self, attention, grid):
        return foreground_truth(self.scenes, grid).flatten(1)


def test_mask_quality_of_perfect_masks(scenes):
    result = mask_quality(_AttentionOnTruth(scenes), scenes, _identity_preprocess, (4, 4))
    assert result["dino_iou"] == 100.0 and result["attention_on_objects"] == 100.0
    assert result["centre_box_iou"] < 100.0 and result["all_patches_iou"] < result["dino_iou"]
    area = 100.0 * np.mean([(s.label > 0).mean() for s in scenes])
    assert result["object_area"] == pytest.approx(area, rel=1e-5)


def test_seed_ranges_are_disjoint_and_checked():
    starts = sorted(SEED_RANGES.values())
    assert all(b - a >= 1_000_000 for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError, match="name: expected one of"):
        scene_range("demo-2", 3, 48)
    with pytest.raises(ValueError, match="count: expected"):
        scene_range("report", 0, 48)


def test_scene_counts_are_those_of_the_committed_figures():
    """The one constant per use matches what the bundle's recorded figures and the study's results read."""
    recorded = json.loads((REPO / "captum_iclip/zoo/weights/shapes-tiny/config.json").read_text())["training"]
    assert recorded["recognition"]["scenes"] == REPORT_SCENES
    assert recorded["dino_masks"]["scenes"] == MASK_SCENES
    study = json.loads((REPO / "docs" / "study" / "results.json").read_text())["study"]
    assert (study["scenes"], study["selection_scenes"]) == (STUDY_SCENES, STUDY_SELECTION_SCENES)
