"""Quality figures of a bundled model on held-out scenes of the procedural world.

Two questions decide whether the miniature can test the paper's claims at all:

* **Recognition** (:func:`recognition_report`): does the tiny CLIP know the world's
  objects? Zero-shot over the bundle's shape-only prompts, top-1 must name an
  object of the scene; on single-object scenes we also record per-class recall
  and the confusion matrix.
* **Mask quality** (:func:`mask_quality`): does the self-supervised mask source
  find the objects? IoU of its foreground masks with the patches that objects
  cover at least half, next to two trivial masks (a centre box, every patch).

Both read scenes from a seed range chosen by the caller. The ranges are fixed
in :data:`captum_iclip.world.SEED_RANGES` so that recipe selection, the reported figures, the demo
and the ablation study never share a scene.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from captum_iclip.world import CATEGORIES, SEED_RANGES, Scene, WorldVariant, generate_scene

# How many scenes of a seed range (SEED_RANGES) each use reads, in one place. The bundle's recorded figures
# (its config.json) and docs/study/results.json were measured on these counts.
SELECTION_SCENES = 1000  # "selection": recognition of the recipe and template candidates (zoo.select)
REPORT_SCENES = 1000  # "report": the bundle's recorded recognition figures (zoo.train)
MASK_SCENES = 500  # "selection" and "report": mask quality of the mask-source candidates and of the bundle
STUDY_SCENES = 500  # "study": every figure of the ablation study (zoo.study)
LADDER_SCENES = 500  # "selection", and "report" for the pick's replication: each row of the miniature ladder
# The study picks its ICLIP configuration on fewer selection scenes than the recipe selection reads:
# docs/study/README.md pre-registered the first 200, and results.json records the pick made on them.
STUDY_SELECTION_SCENES = 200


def scene_range(name: str, count: int, size: int, variant: WorldVariant | None = None) -> list[Scene]:
    """``count`` scenes of side ``size`` from the seed range ``name`` of :data:`SEED_RANGES`, rendered in
    ``variant`` (default: the world itself)."""
    if name not in SEED_RANGES:
        raise ValueError(f"name: expected one of {sorted(SEED_RANGES)}, got {name!r}")
    if not 0 < count < 1_000_000:
        raise ValueError(f"count: expected 1 to 999999 scenes, got {count}")
    return [generate_scene(SEED_RANGES[name] + i, size, variant) for i in range(count)]


@torch.no_grad()
def recognition_report(
    score: Callable[[torch.Tensor], torch.Tensor],
    scenes: Sequence[Scene],
    preprocess: Callable,
    categories: Sequence[str] = CATEGORIES,
    batch_size: int = 250,
) -> dict:
    """Zero-shot recognition of the scenes' objects.

    Args:
        score: Maps preprocessed images ``(N, 3, S, S)`` to ``(N, K)`` scores, prompt
            ``k`` naming ``categories[k]`` (e.g. a :class:`~captum_iclip.CLIPSimilarity`).
        scenes: Held-out scenes.
        preprocess: The bundle's image preprocessing (uint8 array -> tensor).
        categories: Category named by each prompt.
        batch_size: Images per forward pass.

    Returns:
        ``top1_any``: percentage of scenes whose top prompt names an object present;
        ``chance``: the same for a uniformly random prompt; ``single_object``: top-1
        accuracy on single-object scenes; ``per_class_recall``: that accuracy per
        class; ``min_class_recall``; ``confusion``: rows = true class, columns =
        predicted class, counts on single-object scenes; ``scenes`` and
        ``single_object_scenes``.
    """
    k = len(categories)
    hits, chance = 0, 0.0
    confusion = np.zeros((k, k), dtype=np.int64)
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        top = score(torch.stack([preprocess(s.image) for s in chunk])).argmax(-1).tolist()
        for scene, predicted in zip(chunk, top):
            present = set(scene.categories)
            hits += categories[predicted] in present
            chance += len(present) / k
            if len(scene.objects) == 1:
                confusion[categories.index(scene.objects[0].category), predicted] += 1
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    singles = int(confusion.sum())
    return {
        "scenes": len(scenes),
        "top1_any": 100.0 * hits / len(scenes),
        "chance": 100.0 * chance / len(scenes),
        "single_object_scenes": singles,
        "single_object": 100.0 * float(confusion.trace()) / max(singles, 1),
        "per_class_recall": {c: round(100.0 * float(r), 2) for c, r in zip(categories, per_class)},
        "min_class_recall": 100.0 * float(per_class.min()),
        "confusion": confusion.tolist(),
    }


def foreground_truth(scenes: Sequence[Scene], grid: tuple[int, int]) -> torch.Tensor:
    """``(N, h, w)`` bool: patches of ``grid`` that objects cover at least half."""
    foreground = torch.stack([torch.from_numpy((s.label > 0).astype(np.float32)) for s in scenes])[:, None]
    return F.adaptive_avg_pool2d(foreground, grid)[:, 0] >= 0.5


def centre_box(grid: tuple[int, int]) -> torch.Tensor:
    """The fixed centre box: the middle half of each side of the patch grid, (h, w) bool."""
    box = torch.zeros(grid, dtype=torch.bool)
    box[grid[0] // 4 : grid[0] - grid[0] // 4, grid[1] // 4 : grid[1] - grid[1] // 4] = True
    return box


@torch.no_grad()
def mask_quality(
    provider: nn.Module,
    scenes: Sequence[Scene],
    preprocess: Callable,
    grid: tuple[int, int],
    attention: torch.Tensor | None = None,
) -> dict:
    """IoU (percent, pooled over all patches of all scenes) of a DINO mask source's
    foreground with the object patches, next to a centre box (half the side) and
    every patch; and the share of the [CLS] attention on object pixels against the
    share of the image they cover (equal for a map blind to the objects).

    Args:
        provider: A :class:`~captum_iclip.masks.DINOMaskProvider`.
        scenes: Held-out scenes.
        preprocess: The CLIP preprocessing the provider expects its inputs in.
        grid: The CLIP patch grid ``(h, w)`` the masks are made on.
        attention: ``provider.attention`` of the preprocessed scenes when already computed
            (it depends on the provider's blocks, not on its ``tau``).
    """
    if attention is None:
        attention = provider.attention(torch.stack([preprocess(s.image) for s in scenes]))  # one DINO pass
    masks = provider.mask_from_attention(attention, grid).reshape(-1, *grid)
    truth = foreground_truth(scenes, grid)
    foreground = torch.stack([torch.from_numpy((s.label > 0).astype(np.float32)) for s in scenes])[:, None]
    coverage = F.adaptive_avg_pool2d(foreground, attention.shape[-2:])[:, 0]
    centre = centre_box(grid)

    def iou(pred: torch.Tensor) -> float:
        return 100.0 * float((pred & truth).sum()) / float((pred | truth).sum())

    return {
        "scenes": len(scenes),
        "dino_iou": iou(masks),
        "centre_box_iou": iou(centre.expand_as(truth)),
        "all_patches_iou": iou(torch.ones_like(truth)),
        "mean_foreground_fraction": float(masks.float().mean()),
        "attention_on_objects": 100.0 * float((attention * coverage).sum() / attention.sum()),
        "object_area": 100.0 * float(foreground.mean()),
    }
