"""Segmentation dataset readers for evaluating where CLIP sees a text.

Every reader returns samples ``(image, label, name)`` (RGB
:class:`PIL.Image.Image`, ``int64`` ``(H, W)`` label array with 255 =
ignore, sample name) and exposes ``class_names``, ``prompts``,
``background_index`` and ``foreground_classes``; see
:class:`~captum_iclip.datasets.base.SegmentationDataset`.
"""

from __future__ import annotations

from pathlib import Path

from .ade20k import ADE20K, ADE20K_CLASSES
from .base import IGNORE_INDEX, SegmentationDataset, class_prompt
from .cityscapes import CITYSCAPES_CLASSES, Cityscapes
from .coco import COCO_OBJECT_CLASSES, COCO_STUFF_CLASSES, COCOInstances, COCOObject, COCOStuff
from .folder import FolderDataset
from .voc import CONTEXT59_CLASSES, VOC_CLASSES, PascalContext59, PascalContext60, VOC20Segmentation, VOCSegmentation
from .world import WorldScenes

__all__ = [
    "ADE20K",
    "ADE20K_CLASSES",
    "CITYSCAPES_CLASSES",
    "COCO_OBJECT_CLASSES",
    "COCO_STUFF_CLASSES",
    "CONTEXT59_CLASSES",
    "DATASETS",
    "IGNORE_INDEX",
    "VOC_CLASSES",
    "COCOInstances",
    "COCOObject",
    "COCOStuff",
    "Cityscapes",
    "FolderDataset",
    "PascalContext59",
    "PascalContext60",
    "SegmentationDataset",
    "VOC20Segmentation",
    "VOCSegmentation",
    "WorldScenes",
    "build_dataset",
    "class_prompt",
]

DATASETS: dict[str, tuple[type[SegmentationDataset], str | None]] = {
    "voc": (VOCSegmentation, "val"),
    "voc20": (VOC20Segmentation, "val"),
    "coco": (COCOInstances, "val2017"),
    "coco-stuff": (COCOStuff, "val2017"),
    "coco-object": (COCOObject, "val2017"),
    "context": (PascalContext59, "val"),
    "context60": (PascalContext60, "val"),
    "cityscapes": (Cityscapes, "val"),
    "ade20k": (ADE20K, "validation"),
    "folder": (FolderDataset, None),
    "world": (WorldScenes, None),
}
"""Dataset names accepted by :func:`build_dataset`, with their reader and
default split (``None``: the format has no splits)."""


def build_dataset(
    name: str,
    root: str | Path,
    split: str | None = None,
    limit: int | None = None,
) -> SegmentationDataset:
    """Build a dataset reader by name.

    Args:
        name: One of ``"voc"``, ``"voc20"``, ``"coco"``, ``"coco-stuff"``,
            ``"coco-object"``, ``"context"``, ``"context60"``, ``"cityscapes"``,
            ``"ade20k"``, ``"folder"``, ``"world"`` (case-insensitive).
        root: The dataset folder (see each reader for its layout); for
            ``"world"``, the first seed or ``"heldout"``.
        split: Split name; ``None`` uses the reader's default (``"val"``,
            ``"val2017"`` for COCO, ``"validation"`` for ADE20K). Must be ``None``
            for ``"folder"``.
        limit: Keep only the first ``limit`` samples.

    Returns:
        The dataset reader.

    Raises:
        ValueError: If ``name`` is unknown, or a split is given for
            ``"folder"``.

    Examples:
        >>> dataset = build_dataset("voc", "/data/VOCdevkit", limit=100)
        >>> len(dataset) <= 100
        True
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise ValueError(f"name: expected one of {sorted(DATASETS)}, got {name!r}")
    reader, default_split = DATASETS[key]
    if default_split is None:
        if split is not None:
            raise ValueError(f"split: expected None (the {key!r} format has no splits), got {split!r}")
        return reader(root, limit=limit)
    return reader(root, split=split or default_split, limit=limit)
