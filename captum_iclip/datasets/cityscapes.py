"""Cityscapes fine-annotation reader (19 evaluation classes)."""

from __future__ import annotations

from pathlib import Path

from .base import SegmentationDataset, require_dir

__all__ = ["CITYSCAPES_CLASSES", "Cityscapes"]

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
"""The 19 Cityscapes evaluation classes, index = train id."""

_IMAGE_SUFFIX = "_leftImg8bit"
_LABEL_SUFFIX = "_gtFine_labelTrainIds"


class Cityscapes(SegmentationDataset):
    """Cityscapes semantic segmentation with train-id labels.

    On-disk layout::

        root/
            leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
            gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png

    The ``*_labelTrainIds.png`` files are the ones written by
    ``cityscapesscripts``' ``createTrainIdLabelImgs`` (values 0..18 = the 19
    classes of :data:`CITYSCAPES_CLASSES`, 255 = ignored). There is no
    background class. Samples are sorted by city then file name; ``name`` is
    ``<city>_<seq>_<frame>``.

    Args:
        root: See above.
        split: ``"train"``, ``"val"`` or ``"test"``.
        limit: Keep only the first ``limit`` samples.

    Raises:
        FileNotFoundError: If the image or label folder of the split is missing.

    Examples:
        >>> dataset = Cityscapes("/data/cityscapes", split="val")
        >>> dataset.class_names[:3]
        ['road', 'sidewalk', 'building']
    """

    def __init__(self, root: str | Path, split: str = "val", limit: int | None = None) -> None:
        self.root = require_dir(Path(root), "dataset root")
        super().__init__(CITYSCAPES_CLASSES, None, limit)
        self.split = split
        image_dir = require_dir(self.root / "leftImg8bit" / split, "Cityscapes image folder")
        label_dir = require_dir(self.root / "gtFine" / split, "Cityscapes label folder")
        samples = []
        for image_path in sorted(image_dir.glob(f"*/*{_IMAGE_SUFFIX}.png")):
            name = image_path.name[: -len(f"{_IMAGE_SUFFIX}.png")]
            label_path = label_dir / image_path.parent.name / f"{name}{_LABEL_SUFFIX}.png"
            samples.append((image_path, label_path, name))
        self._set_samples(samples, image_dir)
