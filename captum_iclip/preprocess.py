"""Image preprocessing that is one operation wherever it runs: images as normalised model inputs.

Resizing to an exact size (bicubic, no crop) serves the bundled models, the evaluation and the demo; the
``explain`` command resizes the short side and centre-crops. A model family whose own processor differs
(Hugging Face, SigLIP 2, open_clip's own transforms) keeps it in :mod:`captum_iclip.loading.loader`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from captum_iclip._io import read_image


def to_model_input(image: Image.Image, size: tuple[int, int], mean: Tensor, std: Tensor) -> Tensor:
    """An RGB image resized (bicubic) to ``size`` = (height, width), as a normalised (3, H, W) tensor;
    ``mean`` and ``std`` are (3, 1, 1) float32 tensors."""
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 255.0
    return (array.permute(2, 0, 1) - mean) / std


def make_preprocess(image_size: int, mean, std) -> Callable[[Image.Image | np.ndarray], Tensor]:
    """PIL image or uint8 (H, W, 3) array -> normalised (3, S, S) float tensor (bicubic resize)."""
    mean_t = torch.tensor(mean).reshape(3, 1, 1)
    std_t = torch.tensor(std).reshape(3, 1, 1)

    def preprocess(image) -> Tensor:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        return to_model_input(read_image(image), (image_size, image_size), mean_t, std_t)

    return preprocess


def center_crop_transform(resolution, mean: Sequence[float], std: Sequence[float]):
    """PIL image -> normalised tensor: resize the short side, centre-crop to ``resolution``."""
    from torchvision import transforms

    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    return transforms.Compose(
        [
            transforms.Resize(min(size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
