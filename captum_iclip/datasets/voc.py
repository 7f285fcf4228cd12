"""PASCAL VOC 2012 segmentation and PASCAL Context (59 classes) readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import (
    SegmentationDataset,
    find_background,
    load_index_png,
    read_class_names,
    read_split_file,
    reduce_zero_label,
)

__all__ = [
    "CONTEXT59_CLASSES",
    "VOC_CLASSES",
    "PascalContext59",
    "PascalContext60",
    "VOC20Segmentation",
    "VOCSegmentation",
]

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
    "cat", "chair", "cow", "dining table", "dog", "horse", "motorbike", "person",
    "potted plant", "sheep", "sofa", "train", "tv monitor",
)  # fmt: skip
"""VOC 2012 class names, index = label value (VOC's "diningtable",
"pottedplant" and "tvmonitor" written as words so they read well in prompts)."""

CONTEXT59_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat",
    "book", "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling",
    "chair", "cloth", "computer", "cow", "cup", "curtain", "dog", "door", "fence",
    "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light",
    "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "potted plant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky",
    "snow", "sofa", "table", "track", "train", "tree", "truck", "tv monitor",
    "wall", "water", "window", "wood",
)  # fmt: skip
"""The 59 PASCAL Context classes in the order of the converted labels
(label value c + 1, class id c)."""

_CLASS_NAMES_FILE = "class_names.txt"


def _find_voc_root(root: Path, marker: str, year: str) -> Path:
    """Locate the folder holding ``JPEGImages`` and ``marker`` under ``root``.

    Accepts the folder itself, ``root/VOCdevkit/<year>`` or ``root/<year>``
    (``year`` such as ``"VOC2012"``), then any other ``VOC*`` folder there.
    """
    if not root.exists():
        raise FileNotFoundError(f"root: expected an existing dataset folder, got {root} (nothing there)")
    candidates = [root, root / "VOCdevkit" / year, root / year]
    for parent in (root / "VOCdevkit", root):
        if parent.is_dir():
            candidates += sorted(p for p in parent.glob("VOC*") if p.is_dir())
    for candidate in candidates:
        if (candidate / "JPEGImages").is_dir() and (candidate / marker).is_dir():
            return candidate
    raise FileNotFoundError(
        f"root: expected a VOC-style folder (JPEGImages/ and {marker}/) at {root}, "
        f"{root / 'VOCdevkit' / 'VOC*'} or {root / 'VOC*'}, got none"
    )


def _split_samples(root: Path, split_dir: str, label_dir: str, split: str) -> list:
    """(JPEG, label PNG, id) of every id listed in ``root/ImageSets/<split_dir>/<split>.txt``."""
    ids = read_split_file(root / "ImageSets" / split_dir / f"{split}.txt")
    return [(root / "JPEGImages" / f"{i}.jpg", root / label_dir / f"{i}.png", i) for i in ids]


class VOCSegmentation(SegmentationDataset):
    """PASCAL VOC 2012 semantic segmentation (20 classes + background).

    On-disk layout (the official ``VOCtrainval`` archive)::

        VOC2012/
            JPEGImages/<id>.jpg
            SegmentationClass/<id>.png        palette PNG, value = class id,
                                              255 = object border (ignored)
            ImageSets/Segmentation/<split>.txt
            class_names.txt                   optional, see below

    ``root`` may be the ``VOC2012`` folder itself, a folder containing
    ``VOCdevkit/VOC2012`` (or ``VOC2012``), or any folder with the same three
    sub-folders. Labels are read as palette indices, never as colours.

    If ``class_names.txt`` exists next to ``JPEGImages`` (one name per line,
    line i = class id i), its names replace VOC's; this is how the project's
    procedural world exports its scenes. The background class is the one
    named "background" (id 0 for VOC), or none.

    Args:
        root: See above.
        split: Image-set name, e.g. ``"train"``, ``"val"``, ``"trainval"``.
        limit: Keep only the first ``limit`` ids of the split file.

    Raises:
        FileNotFoundError: If the folder or the split file is missing.

    Examples:
        >>> dataset = VOCSegmentation("/data/VOCdevkit/VOC2012", split="val")
        >>> image, label, name = dataset[0]
        >>> dataset.prompts[dataset.foreground_classes[0]]
        'a photo of an aeroplane.'
    """

    def __init__(self, root: str | Path, split: str = "val", limit: int | None = None) -> None:
        self.root = _find_voc_root(Path(root), "SegmentationClass", "VOC2012")
        names_file = self.root / _CLASS_NAMES_FILE
        class_names = read_class_names(names_file) if names_file.exists() else list(VOC_CLASSES)
        super().__init__(class_names, find_background(class_names), limit)
        self.class_list_file = names_file if names_file.exists() else None
        self.split = split
        self._set_samples(_split_samples(self.root, "Segmentation", "SegmentationClass", split), self.root)


class VOC20Segmentation(SegmentationDataset):
    """PASCAL VOC 2012 without its background class: the 20 object classes (the benchmarks' "VOC20").

    The layout and ``root`` of :class:`VOCSegmentation` (``class_names.txt`` is not read). As in the
    training-free segmentation benchmarks (mmsegmentation's ``reduce_zero_label``), background
    pixels (value 0) are ignored (255) and value c becomes class id c − 1, so ``class_names`` are
    :data:`VOC_CLASSES` without ``"background"`` and there is no background class.

    Args:
        root: See :class:`VOCSegmentation`.
        split: Image-set name, e.g. ``"val"``.
        limit: Keep only the first ``limit`` ids of the split file.

    Examples:
        >>> VOC20Segmentation("/data/VOCdevkit").class_names[:2]
        ['aeroplane', 'bicycle']
    """

    def __init__(self, root: str | Path, split: str = "val", limit: int | None = None) -> None:
        self.root = _find_voc_root(Path(root), "SegmentationClass", "VOC2012")
        super().__init__(VOC_CLASSES[1:], None, limit)
        self.split = split
        self._set_samples(_split_samples(self.root, "Segmentation", "SegmentationClass", split), self.root)

    def _read_label(self, path: Path) -> np.ndarray:
        return reduce_zero_label(load_index_png(path))


class PascalContext59(SegmentationDataset):
    """PASCAL Context, 59-class version, in the widely used converted layout.

    On-disk layout (as produced by mmsegmentation's ``pascal_context.py``
    converter from the VOC 2010 images and the Context ``trainval_merged``
    annotations)::

        VOC2010/
            JPEGImages/<id>.jpg
            SegmentationClassContext/<id>.png   value 0 = none of the 59
                                                classes, c in 1..59 = class
            ImageSets/SegmentationContext/<split>.txt

    ``root`` may be the ``VOC2010`` folder or a folder containing
    ``VOCdevkit/VOC2010``. Following mmsegmentation's 59-class convention
    (``reduce_zero_label``), label value 0 becomes 255 (ignored) and value
    c becomes class id c − 1, so there is no background class
    (``background_index`` is ``None``) and ``class_names`` has 59 entries
    (:data:`CONTEXT59_CLASSES`).

    Args:
        root: See above.
        split: Image-set name, ``"train"`` or ``"val"``.
        limit: Keep only the first ``limit`` ids of the split file.

    Raises:
        FileNotFoundError: If the folder or the split file is missing.

    Examples:
        >>> dataset = PascalContext59("/data/VOCdevkit/VOC2010", split="val")
        >>> len(dataset.class_names)
        59
    """

    def __init__(self, root: str | Path, split: str = "val", limit: int | None = None) -> None:
        self.root = _find_voc_root(Path(root), "SegmentationClassContext", "VOC2010")
        super().__init__(CONTEXT59_CLASSES, None, limit)
        self.split = split
        self._set_samples(
            _split_samples(self.root, "SegmentationContext", "SegmentationClassContext", split), self.root
        )

    def _read_label(self, path: Path) -> np.ndarray:
        # 0 ("none of the 59") is ignored; every class shifts down by one.
        return reduce_zero_label(load_index_png(path))


class PascalContext60(SegmentationDataset):
    """PASCAL Context with its background: the 59 classes and ``"background"`` (the benchmarks' "Context60").

    The layout and ``root`` of :class:`PascalContext59`, read as they are written: value 0
    ("none of the 59") is the background class 0 and value c in 1..59 is class c
    (mmsegmentation's ``PascalContextDataset``, ``reduce_zero_label=False``); 255 is ignored.

    Args:
        root: See :class:`PascalContext59`.
        split: Image-set name, ``"train"`` or ``"val"``.
        limit: Keep only the first ``limit`` ids of the split file.

    Examples:
        >>> dataset = PascalContext60("/data/VOCdevkit/VOC2010")
        >>> len(dataset.class_names), dataset.background_index
        (60, 0)
    """

    def __init__(self, root: str | Path, split: str = "val", limit: int | None = None) -> None:
        self.root = _find_voc_root(Path(root), "SegmentationClassContext", "VOC2010")
        super().__init__(("background", *CONTEXT59_CLASSES), 0, limit)
        self.split = split
        self._set_samples(
            _split_samples(self.root, "SegmentationContext", "SegmentationClassContext", split), self.root
        )

    def _read_label(self, path: Path) -> np.ndarray:
        return load_index_png(path)
