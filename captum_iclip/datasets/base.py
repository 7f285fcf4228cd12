"""Shared machinery of the segmentation dataset readers.

Every reader is a :class:`torch.utils.data.Dataset` whose samples are
``(image, label, name)``:

- ``image``: a :class:`PIL.Image.Image` in RGB mode,
- ``label``: a ``numpy.ndarray`` of dtype ``int64`` and shape ``(H, W)``
  holding class ids in ``[0, num_classes)`` and :data:`IGNORE_INDEX` (255)
  for pixels that take no part in any metric,
- ``name``: the sample's identifier (the file stem), unique in the split.

Readers describe their label space with ``class_names`` (index = class id),
``prompts`` (one natural-language prompt per class) and ``background_index``
(the id of the background class, or ``None`` when the dataset has none);
``foreground_classes`` lists every other class id.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from captum_iclip._io import read_image

__all__ = [
    "IGNORE_INDEX",
    "SegmentationDataset",
    "class_prompt",
    "find_background",
    "load_index_png",
    "load_rgb_image",
    "read_class_names",
    "read_split_file",
    "reduce_zero_label",
    "require_dir",
]

IGNORE_INDEX = 255
"""Label value of pixels excluded from every metric."""

_BACKGROUND_NAME = "background"


def class_prompt(name: str) -> str:
    """The natural-language prompt used for a class name.

    Follows CLIP's ``"a photo of a {}."`` template, with the article adapted
    to the name ("an apple") and "the background" for the background class.

    Args:
        name: Human-readable class name, e.g. ``"dining table"``.

    Returns:
        The prompt, e.g. ``"a photo of a dining table."``.

    Examples:
        >>> class_prompt("cat")
        'a photo of a cat.'
        >>> class_prompt("aeroplane")
        'a photo of an aeroplane.'
    """
    if name.strip().lower() == _BACKGROUND_NAME:
        return "a photo of the background."
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"a photo of {article} {name}."


def find_background(class_names: Sequence[str]) -> int | None:
    """Index of the class named "background" (case-insensitive), if any.

    Args:
        class_names: Class names, index = class id.

    Returns:
        The background class id, or ``None`` when no class has that name.
    """
    for index, name in enumerate(class_names):
        if name.strip().lower() == _BACKGROUND_NAME:
            return index
    return None


def _read_text(path: Path, what: str) -> str:
    """A UTF-8 text file (a byte-order mark is dropped), with an error naming it if it is not text."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what}: expected UTF-8 text, got {path}: {error}") from error


def read_class_names(path: Path) -> list[str]:
    """Read a class list file: one class name per line, line i = class id i.

    Blank lines at the end of the file are ignored; blank lines inside it
    are an error because they would shift every following class id.
    A UTF-8 byte-order mark (written by some editors) is not part of the
    first name.

    Args:
        path: The text file.

    Returns:
        The class names.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is empty, has a blank line inside, has
            duplicate names, or lists more than 255 classes (255 is the
            ignore label).
    """
    if not path.is_file():
        raise FileNotFoundError(f"class list file: expected an existing file, got {path} (no file there)")
    lines = [line.strip() for line in _read_text(path, "class list file").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ValueError(f"class list file: expected one class name per line, got the empty file {path}")
    if "" in lines:
        raise ValueError(
            f"class list file: expected one class name per line, got a blank line {lines.index('') + 1} in {path}"
        )
    if len(set(lines)) != len(lines):
        raise ValueError(f"class list file: expected distinct class names, got duplicates in {path}")
    if len(lines) > IGNORE_INDEX:
        raise ValueError(
            f"class list file: expected at most {IGNORE_INDEX} classes (8-bit labels with {IGNORE_INDEX} = ignore), "
            f"got {len(lines)} in {path}"
        )
    return lines


def read_split_file(path: Path) -> list[str]:
    """Read an image-set file (one sample id per line).

    Args:
        path: The split file, e.g. ``ImageSets/Segmentation/val.txt``.

    Returns:
        The sample ids in file order.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it lists no sample.
    """
    if not path.is_file():
        raise FileNotFoundError(f"split file: expected an existing file, got {path} (no file there)")
    ids = [line.strip() for line in _read_text(path, "split file").splitlines()]
    ids = [sample_id for sample_id in ids if sample_id]
    if not ids:
        raise ValueError(f"split file: expected at least one sample id, got none in {path}")
    return ids


def load_rgb_image(path: Path) -> Image.Image:
    """Open an image file as RGB with the package's one reader, naming the file on failure.

    See :func:`captum_iclip._io.read_image` (EXIF orientation, 16-bit and float images).

    Args:
        path: The image file.

    Returns:
        The decoded RGB image.

    Raises:
        FileNotFoundError: If the file does not exist.
        OSError: If the file cannot be decoded (corrupt or not an image).
    """
    if not path.is_file():
        raise FileNotFoundError(f"image file: expected an existing file, got {path} (no file there)")
    return read_image(path, "image file")


def load_index_png(path: Path) -> np.ndarray:
    """Read a label PNG whose pixel values are class indices.

    Palette (``"P"``) PNGs are read as their palette indices, which is how
    VOC-style label images store classes; greyscale (``"L"``) and 16-bit
    (``"I;16"``/``"I"``) PNGs are read as their values.

    Args:
        path: The label file.

    Returns:
        ``int64`` array of shape ``(H, W)``.

    Raises:
        FileNotFoundError: If the file does not exist.
        OSError: If the file cannot be decoded.
        ValueError: If the PNG is in a colour mode (e.g. RGB), where pixel
            values are not class indices.
    """
    if not path.is_file():
        raise FileNotFoundError(f"label file: expected an existing file, got {path} (no file there)")
    try:
        with Image.open(path) as label:
            label.load()
            mode = label.mode
            values = np.array(label)
    except (OSError, SyntaxError, ValueError) as error:
        raise OSError(f"label file: expected a decodable image, got {path}: {error}") from error
    if mode not in ("P", "L", "I;16", "I"):
        raise ValueError(
            f"label file: expected a palette ('P') or greyscale ('L', 'I;16') PNG whose values are class "
            f"indices, got PIL mode {mode!r} in {path}"
        )
    return values.astype(np.int64)


def reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    """Labels whose value 0 means "none of the classes": 0 (and 255) become :data:`IGNORE_INDEX`,
    every other value c becomes class id c − 1 (mmsegmentation's ``reduce_zero_label``).

    Args:
        raw: ``int64`` label values.

    Returns:
        The class ids, same shape.

    Examples:
        >>> reduce_zero_label(np.array([0, 1, 5, 255])).tolist()
        [255, 0, 4, 255]
    """
    return np.where((raw == 0) | (raw == IGNORE_INDEX), IGNORE_INDEX, raw - 1)


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a directory, else raise naming it and its role."""
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: expected an existing folder, got {path} (no folder there)")
    return path


class SegmentationDataset(Dataset):
    """Base class of the readers: label space, sample access and checks.

    Subclasses pass :meth:`_set_samples` a list of ``(image_path,
    label_source, name)`` triples (``label_source`` is a label file path
    unless the subclass overrides :meth:`_read_label` to decode something
    else); this class applies ``limit``, checks every label and exposes
    the label-space attributes.

    Args:
        class_names: Class names, index = class id.
        background_index: Id of the background class, or ``None``.
        limit: Keep only the first ``limit`` samples of the split (in the
            split's order), or all when ``None``.

    Attributes:
        class_names (list[str]): Class names, index = class id.
        prompts (list[str]): One prompt per class (see :func:`class_prompt`).
        background_index (int | None): The background class id, if any.
        foreground_classes (list[int]): Every class id but the background.
        ignore_index (int): The label value excluded from metrics (255).
    """

    ignore_index: int = IGNORE_INDEX

    def __init__(
        self,
        class_names: Sequence[str],
        background_index: int | None,
        limit: int | None = None,
    ) -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit: expected a non-negative int or None, got {limit!r}")
        self.class_names = list(class_names)
        self.prompts = [class_prompt(name) for name in self.class_names]
        self.background_index = background_index
        self.foreground_classes = [index for index in range(len(self.class_names)) if index != background_index]
        self._limit = limit
        self._samples: list[tuple[Path, Any, str]] = []
        # The file the class names came from, if any (named when a label does not fit them).
        self.class_list_file: Path | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (the background included when there is one)."""
        return len(self.class_names)

    def _set_samples(self, samples: list[tuple[Path, Any, str]], source: os.PathLike | str) -> None:
        """Store the split's samples, applying ``limit``; an empty split is an error."""
        if not samples:
            raise ValueError(f"split: expected at least one sample, got none under {source}")
        self._samples = samples if self._limit is None else samples[: self._limit]

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray, str]:
        image_path, label_source, name = self._samples[index]
        image = load_rgb_image(image_path)
        where = self._describe_label(label_source)
        try:
            label = self._read_label(label_source)
        except (KeyError, TypeError, IndexError) as error:  # a malformed annotation, not a bug of ours
            raise ValueError(
                f"label: expected a well-formed annotation, got {where}: {type(error).__name__}: {error}"
            ) from error
        if label.shape != (image.height, image.width):
            raise ValueError(
                f"label: expected the shape {(image.height, image.width)} of image {image_path}, got {label.shape} "
                f"for {where}"
            )
        invalid = ((label >= self.num_classes) & (label != self.ignore_index)) | (label < 0)
        if invalid.any():
            bad = np.unique(label[invalid])[:8].tolist()
            listed = f" (the classes listed in {self.class_list_file})" if self.class_list_file else ""
            raise ValueError(
                f"label: expected values in [0, {self.num_classes}){listed} or the ignore value "
                f"{self.ignore_index}, got {bad} in {where}"
            )
        return image, label, name

    def _read_label(self, label_source: Any) -> np.ndarray:
        """Decode one sample's label into class ids (override for other encodings).

        ``label_source`` is the second item of the sample triple: a label
        file path for the file-based readers.
        """
        return load_index_png(label_source)

    def _describe_label(self, label_source: Any) -> str:
        """How error messages name a sample's label (default: its path)."""
        return str(label_source)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(samples={len(self)}, classes={self.num_classes}, "
            f"background_index={self.background_index})"
        )
