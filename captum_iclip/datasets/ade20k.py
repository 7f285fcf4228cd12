"""ADE20K (SceneParsing, 150 classes) reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import SegmentationDataset, load_index_png, reduce_zero_label, require_dir

__all__ = ["ADE20K", "ADE20K_CLASSES"]

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
"""The 150 ADE20K SceneParsing classes, index = class id (label value − 1)."""


def _find_ade_root(root: Path) -> Path:
    """The ``ADEChallengeData2016`` folder: ``root`` itself or its child of that name."""
    root = require_dir(root, "dataset root")
    for candidate in (root, root / "ADEChallengeData2016"):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    raise FileNotFoundError(
        f"root: expected an ADE20K folder (images/ and annotations/) at {root} or {root / 'ADEChallengeData2016'}, "
        "got neither"
    )


class ADE20K(SegmentationDataset):
    """ADE20K SceneParsing (``ADEChallengeData2016``), 150 classes.

    On-disk layout (the official ``ADEChallengeData2016.zip``)::

        ADEChallengeData2016/
            images/<split>/ADE_val_00000001.jpg
            annotations/<split>/ADE_val_00000001.png   8-bit greyscale, 0 = other
                                                       (ignored), c in 1..150 = class

    ``root`` may be the ``ADEChallengeData2016`` folder or its parent. As in the
    benchmarks (mmsegmentation's ``reduce_zero_label``), value 0 becomes 255
    (ignored) and value c becomes class id c − 1: 150 classes
    (:data:`ADE20K_CLASSES`), no background class. Samples are the split's label
    PNGs sorted by name; each needs the JPEG of the same stem.

    Args:
        root: See above.
        split: ``"validation"`` or ``"training"``.
        limit: Keep only the first ``limit`` samples.

    Raises:
        FileNotFoundError: If the folder, the split's image or label folder, or an
            image of a label is missing.

    Examples:
        >>> dataset = ADE20K("/data/ADEChallengeData2016")
        >>> len(dataset.class_names), dataset.background_index
        (150, None)
    """

    def __init__(self, root: str | Path, split: str = "validation", limit: int | None = None) -> None:
        self.root = _find_ade_root(Path(root))
        super().__init__(ADE20K_CLASSES, None, limit)
        self.split = split
        image_dir = require_dir(self.root / "images" / split, "ADE20K image folder")
        label_dir = require_dir(self.root / "annotations" / split, "ADE20K label folder")
        samples = []
        for label_path in sorted(label_dir.glob("*.png")):
            image_path = image_dir / f"{label_path.stem}.jpg"
            if not image_path.is_file():
                raise FileNotFoundError(f"images: expected the image {image_path} of label {label_path}, got none")
            samples.append((image_path, label_path, label_path.stem))
        self._set_samples(samples, label_dir)

    def _read_label(self, path: Path) -> np.ndarray:
        # 0 ("other objects") is ignored; every class shifts down by one.
        return reduce_zero_label(load_index_png(path))
