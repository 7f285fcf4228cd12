"""COCO readers: instance annotations as semantic labels, and COCO-Stuff."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from .base import IGNORE_INDEX, SegmentationDataset, load_index_png, require_dir

__all__ = ["COCOInstances", "COCOObject", "COCOStuff", "COCO_OBJECT_CLASSES", "COCO_STUFF_CLASSES"]

# COCO-Stuff category names by COCO category id (1..182). Ids absent here
# (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91) are unused thing ids.
_COCO_STUFF_NAMES_BY_ID = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus",
    7: "train", 8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant",
    13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird", 17: "cat",
    18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag",
    32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis", 36: "snowboard",
    37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl",
    52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli",
    57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair",
    63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard",
    77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors",
    88: "teddy bear", 89: "hair drier", 90: "toothbrush",
    92: "banner", 93: "blanket", 94: "branch", 95: "bridge", 96: "building",
    97: "bush", 98: "cabinet", 99: "cage", 100: "cardboard", 101: "carpet",
    102: "ceiling", 103: "ceiling tile", 104: "cloth", 105: "clothes",
    106: "clouds", 107: "counter", 108: "cupboard", 109: "curtain", 110: "desk",
    111: "dirt", 112: "door", 113: "fence", 114: "marble floor", 115: "floor",
    116: "stone floor", 117: "tile floor", 118: "wood floor", 119: "flower",
    120: "fog", 121: "food", 122: "fruit", 123: "furniture", 124: "grass",
    125: "gravel", 126: "ground", 127: "hill", 128: "house", 129: "leaves",
    130: "light", 131: "mat", 132: "metal", 133: "mirror", 134: "moss",
    135: "mountain", 136: "mud", 137: "napkin", 138: "net", 139: "paper",
    140: "pavement", 141: "pillow", 142: "plant", 143: "plastic", 144: "platform",
    145: "playingfield", 146: "railing", 147: "railroad", 148: "river", 149: "road",
    150: "rock", 151: "roof", 152: "rug", 153: "salad", 154: "sand", 155: "sea",
    156: "shelf", 157: "sky", 158: "skyscraper", 159: "snow", 160: "solid",
    161: "stairs", 162: "stone", 163: "straw", 164: "structural", 165: "table",
    166: "tent", 167: "textile", 168: "towel", 169: "tree", 170: "vegetable",
    171: "brick wall", 172: "concrete wall", 173: "wall", 174: "panel wall",
    175: "stone wall", 176: "tile wall", 177: "wood wall", 178: "water",
    179: "waterdrops", 180: "window blind", 181: "window", 182: "wood",
}  # fmt: skip

COCO_STUFF_CLASSES = tuple(_COCO_STUFF_NAMES_BY_ID[i] for i in sorted(_COCO_STUFF_NAMES_BY_ID))
"""The 171 COCO-Stuff classes (80 things then 91 stuff), index = class id.
Stuff names such as "building-other" are written as plain words
("building") so they read naturally in prompts."""

# Raw stuffthingmaps value v stores COCO category id v + 1; map it to the
# contiguous class id, and unused ids plus 255 ("unlabeled") to ignore.
_STUFF_RAW_TO_CLASS = np.full(256, IGNORE_INDEX, dtype=np.int64)
for _class_id, _category_id in enumerate(sorted(_COCO_STUFF_NAMES_BY_ID)):
    _STUFF_RAW_TO_CLASS[_category_id - 1] = _class_id

_THING_CLASSES = 80  # COCO-Stuff's first 80 classes are COCO's things (category ids 1..90)

COCO_OBJECT_CLASSES = ("background", *COCO_STUFF_CLASSES[:_THING_CLASSES])
"""The 81 COCO-Object classes: ``"background"`` (every stuff class and the unlabeled pixels), then the 80
COCO things, index = class id."""

# COCO-Object from the same maps: thing class t -> t + 1, stuff classes and 255 ("unlabeled") -> 0,
# as the benchmarks' converter (GroupViT/TCL's, used by SCLIP and NACLIP) writes them; the unused
# category ids stay ignored.
_OBJECT_RAW_TO_CLASS = np.where(
    _STUFF_RAW_TO_CLASS == IGNORE_INDEX,
    IGNORE_INDEX,
    np.where(_STUFF_RAW_TO_CLASS < _THING_CLASSES, _STUFF_RAW_TO_CLASS + 1, 0),
)
_OBJECT_RAW_TO_CLASS[255] = 0


# Converted copies that mmsegmentation and the COCO-Object converter write beside the raw maps.
_CONVERTED_SUFFIXES = ("_labelTrainIds", "_instanceTrainIds")


def _find_image_dir(root: Path, split: str) -> Path:
    """COCO images live in ``root/<split>`` or ``root/images/<split>``."""
    for candidate in (root / split, root / "images" / split):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"root: expected a COCO image folder at {root / split} or {root / 'images' / split}, got neither"
    )


class COCOInstances(SegmentationDataset):
    """COCO instance annotations rendered as semantic labels (80 classes + background).

    On-disk layout (the official archives)::

        root/
            annotations/instances_<split>.json
            <split>/<file_name>            or  images/<split>/<file_name>

    Annotations are decoded with pycocotools (polygons, compressed and
    uncompressed RLE). The label of an image is built as follows:

    - class id = 1 + the rank of the category id among the file's categories
      sorted by id (so 1..80 for COCO), 0 = background (no instance);
    - non-crowd instances are painted from the largest area to the smallest,
      so where instances overlap the smaller one (usually the occluder in
      front) wins;
    - crowd regions (``iscrowd = 1``) are then set to 255 (ignored) where no
      non-crowd instance was painted, since they mix objects and background.

    Every image listed in the annotation file is a sample (images without
    any annotation give an all-background label), in increasing image id.

    Args:
        root: See above.
        split: Split name, e.g. ``"val2017"``.
        limit: Keep only the first ``limit`` images (by image id).

    Raises:
        FileNotFoundError: If the root, the annotation file or the image
            folder is missing.

    Examples:
        >>> dataset = COCOInstances("/data/coco", split="val2017")
        >>> dataset.class_names[1], dataset.background_index
        ('person', 0)
    """

    def __init__(self, root: str | Path, split: str = "val2017", limit: int | None = None) -> None:
        from captum_iclip._optional import require

        COCO = require("pycocotools.coco", "the COCO datasets (--dataset coco, coco-stuff)").COCO

        self.root = require_dir(Path(root), "dataset root")
        annotation_file = self.root / "annotations" / f"instances_{split}.json"
        if not annotation_file.is_file():
            raise FileNotFoundError(f"root: expected the COCO annotation file {annotation_file}, got no file there")
        image_dir = _find_image_dir(self.root, split)
        # pycocotools reports its progress on stdout; keep library output quiet.
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(str(annotation_file))
            categories = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
            class_of_category = {c["id"]: index + 1 for index, c in enumerate(categories)}
            class_names = ["background"] + [str(c["name"]) for c in categories]
            samples = []
            for image_id in sorted(self.coco.getImgIds()):
                file_name = self.coco.imgs[image_id]["file_name"]
                samples.append((image_dir / file_name, image_id, Path(file_name).stem))
        # A malformed file: not UTF-8, not JSON, or entries without the fields COCO defines.
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            raise ValueError(
                f"annotation file: expected COCO instances JSON, got {annotation_file}: {type(error).__name__}: {error}"
            ) from error
        self._class_of_category = class_of_category
        super().__init__(class_names, 0, limit)
        self.split = split
        self._annotation_file = annotation_file
        self._set_samples(samples, annotation_file)

    def _describe_label(self, image_id: int) -> str:
        return f"of image id {image_id} in {self._annotation_file}"

    def _read_label(self, image_id: int) -> np.ndarray:
        info = self.coco.imgs[image_id]
        label = np.zeros((info["height"], info["width"]), dtype=np.int64)
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))
        things = sorted(
            (a for a in annotations if not a.get("iscrowd", 0)),
            key=lambda a: a["area"],
            reverse=True,
        )
        for annotation in things:
            label[self.coco.annToMask(annotation) > 0] = self._class_of_category[annotation["category_id"]]
        for annotation in annotations:
            if annotation.get("iscrowd", 0):
                crowd = (self.coco.annToMask(annotation) > 0) & (label == 0)
                label[crowd] = IGNORE_INDEX
        return label


class COCOStuff(SegmentationDataset):
    """COCO-Stuff 164k (171 classes: 80 things + 91 stuff, 255 = ignore).

    Supported on-disk layouts (``<split>`` e.g. ``val2017``)::

        root/<split>/<stem>.jpg                              images, or
        root/images/<split>/<stem>.jpg
        root/stuffthingmaps_trainval2017/<split>/<stem>.png  labels, or
        root/annotations/<split>/<stem>.png

    The label PNGs are the official ``stuffthingmaps_trainval2017`` maps
    (also what mmsegmentation's ``coco_stuff164k`` folder keeps as
    ``annotations/<split>/<stem>.png``): 8-bit greyscale, value v = COCO
    category id v + 1 (0 = person, 91 = banner, 181 = wood), 255 =
    unlabeled. Values are mapped to contiguous class ids 0..170 in category
    id order (:data:`COCO_STUFF_CLASSES`); the 11 unused category ids and
    255 become 255 (ignored). mmsegmentation's ``*_labelTrainIds.png``
    files and COCO-Object's ``*_instanceTrainIds.png`` are not read (they
    hold the same information, converted). There is no
    background class. Samples are the label PNGs of the split, sorted by name.

    Args:
        root: See above.
        split: Split name, e.g. ``"val2017"``.
        limit: Keep only the first ``limit`` samples.

    Raises:
        FileNotFoundError: If the root, the image folder or the label folder
            is missing.

    Examples:
        >>> dataset = COCOStuff("/data/cocostuff", split="val2017")
        >>> len(dataset.class_names)
        171
    """

    # The label space and the map from raw values to class ids (COCO-Object reads the same maps otherwise).
    _classes, _background_index, _raw_to_class = COCO_STUFF_CLASSES, None, _STUFF_RAW_TO_CLASS

    def __init__(self, root: str | Path, split: str = "val2017", limit: int | None = None) -> None:
        self.root = require_dir(Path(root), "dataset root")
        super().__init__(self._classes, self._background_index, limit)
        self.split = split
        image_dir = _find_image_dir(self.root, split)
        label_candidates = (
            self.root / "stuffthingmaps_trainval2017" / split,
            self.root / "annotations" / split,
        )
        label_dir = next((d for d in label_candidates if d.is_dir()), None)
        if label_dir is None:
            raise FileNotFoundError(
                "root: expected a COCO-Stuff label folder at "
                + " or ".join(str(d) for d in label_candidates)
                + ", got neither"
            )
        label_files = sorted(p for p in label_dir.glob("*.png") if not p.stem.endswith(_CONVERTED_SUFFIXES))
        self._set_samples([(image_dir / f"{p.stem}.jpg", p, p.stem) for p in label_files], label_dir)

    def _read_label(self, path: Path) -> np.ndarray:
        return self._raw_to_class[load_index_png(path).clip(0, 255)]


class COCOObject(COCOStuff):
    """COCO-Object: COCO-Stuff 164k's label maps with the 80 object classes kept and everything else background.

    The layout and ``root`` of :class:`COCOStuff` (the raw ``stuffthingmaps`` PNGs). Each label is
    converted as the training-free segmentation benchmarks convert it (GroupViT's and TCL's
    ``cvt_coco_object.py``, which SCLIP and NACLIP run once on disk): thing class t (COCO-Stuff class
    id 0..79) becomes t + 1; the 91 stuff classes *and* the unlabeled value 255 become the background
    class 0, which is scored like any class. The 11 unused category ids (absent from real maps)
    stay ignored. Classes: :data:`COCO_OBJECT_CLASSES`.

    Args:
        root: See :class:`COCOStuff`.
        split: Split name, e.g. ``"val2017"``.
        limit: Keep only the first ``limit`` samples.

    Examples:
        >>> dataset = COCOObject("/data/cocostuff")
        >>> dataset.class_names[:2], dataset.background_index
        (['background', 'person'], 0)
    """

    _classes, _background_index, _raw_to_class = COCO_OBJECT_CLASSES, 0, _OBJECT_RAW_TO_CLASS
