"""The procedural world as a segmentation dataset, generated in memory (no files, no download)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .base import SegmentationDataset

__all__ = ["WorldScenes"]

DEFAULT_SCENES = 100


class WorldScenes(SegmentationDataset):
    """Consecutive seeds of the procedural world (:mod:`captum_iclip.world`) with their exact labels.

    Class 0 is the background, class ``c + 1`` the shape ``CATEGORIES[c]``;
    nothing is ignored. Scenes are generated when read, so the dataset costs no
    disk and no download: ``captum-iclip eval --dataset world --root heldout``
    evaluates the bundled model offline, and ``captum-iclip demo`` is this
    evaluation on fresh held-out scenes.

    Args:
        root: the first seed, as an int or a string of one, or ``"heldout"``
            (the first held-out seed, which no bundled model was trained on).
        limit: the number of scenes (default 100).
        size: the image side in pixels.

    Raises:
        ValueError: a ``root`` that is neither ``"heldout"`` nor a non-negative integer.

    Examples:
        >>> scenes = WorldScenes("heldout", limit=4)
        >>> image, label, name = scenes[0]
        >>> image.size, label.shape, scenes.class_names[:2]
        ((96, 96), (96, 96), ['background', 'circle'])
    """

    def __init__(self, root: str | int = "heldout", limit: int | None = None, *, size: int = 96) -> None:
        from captum_iclip.world import HELDOUT_SEED_START, class_names

        super().__init__(class_names(), 0, limit)
        if root == "heldout":
            start = HELDOUT_SEED_START
        else:
            try:
                start = int(root)
            except (TypeError, ValueError):
                start = -1
            if start < 0:
                raise ValueError(f"root: expected 'heldout' or a non-negative first seed, got {root!r}")
        self.size = size
        count = DEFAULT_SCENES if limit is None else limit
        self._set_samples([(seed, seed, f"world-{seed}") for seed in range(start, start + count)], f"seed {start}")

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray, str]:
        from captum_iclip.world import generate_scene

        seed, _, name = self._samples[index]
        scene = generate_scene(seed, size=self.size)
        return scene.pil(), scene.label.astype(np.int64), name
