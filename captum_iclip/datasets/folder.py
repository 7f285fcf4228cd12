"""A plain folder format for users' own segmentation data."""

from __future__ import annotations

from pathlib import Path

from .base import SegmentationDataset, find_background, read_class_names, require_dir

__all__ = ["FolderDataset"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class FolderDataset(SegmentationDataset):
    """User data in a plain folder: images, index masks and a class list.

    On-disk layout::

        root/
            classes.txt          one class name per line, line i = class id i
            images/<stem>.jpg    (or .jpeg / .png, any case)
            masks/<stem>.png     8-bit greyscale or palette PNG, pixel value =
                                 class id, 255 = ignored

    Every image must have a mask with the same stem; samples are sorted by
    stem. The background class is the one named "background" in
    ``classes.txt`` (if any); name it so, conventionally on line 1, to have
    it excluded from the localization metrics.

    Args:
        root: See above.
        limit: Keep only the first ``limit`` samples.

    Raises:
        FileNotFoundError: If ``classes.txt``, ``images/`` or ``masks/`` is
            missing, or an image has no mask (the expected mask path is named).
        ValueError: If two images share a stem, or no image is found.

    Examples:
        >>> dataset = FolderDataset("my_data")
        >>> image, label, name = dataset[0]
    """

    def __init__(self, root: str | Path, limit: int | None = None) -> None:
        self.root = require_dir(Path(root), "dataset root")
        class_names = read_class_names(self.root / "classes.txt")
        super().__init__(class_names, find_background(class_names), limit)
        self.class_list_file = self.root / "classes.txt"
        image_dir = require_dir(self.root / "images", "image folder")
        mask_dir = require_dir(self.root / "masks", "mask folder")
        image_paths = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
        samples = []
        seen_stems: dict[str, Path] = {}
        for image_path in image_paths:
            stem = image_path.stem
            if stem in seen_stems:
                raise ValueError(
                    f"images: expected a unique stem per image (it names its mask), got {stem!r} for both "
                    f"{seen_stems[stem]} and {image_path}"
                )
            seen_stems[stem] = image_path
            mask_path = mask_dir / f"{stem}.png"
            if not mask_path.is_file():
                raise FileNotFoundError(
                    f"masks: expected the mask {mask_path} of image {image_path}, got no file there"
                )
            samples.append((image_path, mask_path, stem))
        self._set_samples(samples, image_dir)
