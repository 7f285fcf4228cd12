"""Mask providers: the base class (checks, empty-mask fallback, cache fingerprint), fixed masks, callables,
and the ground-truth oracle (docs/methods.md §3, "mask source")."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_iclip.masks.attention import GridSize

MaskFn = Callable[[Tensor, GridSize], Tensor]


# --------------------------------------------------------------------------- #
# Providers
# --------------------------------------------------------------------------- #
def _check_grid_size(grid_size: GridSize) -> GridSize:
    if (
        not isinstance(grid_size, (tuple, list))
        or len(grid_size) != 2
        or not all(isinstance(v, int) and v > 0 for v in grid_size)
    ):
        raise ValueError(f"grid_size: expected a pair of positive ints (h, w), got {grid_size!r}")
    return int(grid_size[0]), int(grid_size[1])


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            "images: expected a tensor of shape (N, 3, H, W), got "
            f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}"
        )


class MaskProvider(nn.Module):
    """Base class: ``forward(images, grid_size) -> BoolTensor (N, h * w)``.

    Subclasses implement :meth:`compute_mask`; :meth:`forward` validates inputs
    and output, and replaces every empty mask by the all-patches mask (docs/methods.md §3),
    counting each replacement in :attr:`num_empty_fallbacks`.

    Attributes:
        num_empty_fallbacks (int): Number of images whose mask was empty and was
            replaced by all patches, since construction.
    """

    def __init__(self) -> None:
        super().__init__()
        self.num_empty_fallbacks = 0

    def compute_mask(self, images: Tensor, grid_size: GridSize) -> Tensor:
        """Return the raw ``(N, h * w)`` mask (may contain empty rows)."""
        raise NotImplementedError

    def cache_fingerprint(self) -> str:
        """A string that changes whenever the provider's masks would change.

        :class:`CachedMaskProvider` mixes it into its keys. The default covers the
        class, ``extra_repr()`` and the bytes of every parameter and buffer.
        """
        digest = hashlib.sha256(f"{type(self).__qualname__}|{self.extra_repr()}".encode())
        tensors = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        for name, tensor in sorted(tensors.items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def forward(self, images: Tensor, grid_size: GridSize) -> Tensor:
        """Foreground mask of each image on the CLIP patch grid.

        Args:
            images (Tensor): CLIP-preprocessed images ``(N, 3, H, W)``.
            grid_size (tuple[int, int]): CLIP patch grid ``(h, w)``.

        Returns:
            Tensor: Boolean mask ``(N, h * w)``; never empty.
        """
        _check_images(images)
        grid_h, grid_w = _check_grid_size(grid_size)
        mask = self.compute_mask(images, (grid_h, grid_w))
        expected = (images.shape[0], grid_h * grid_w)
        if not isinstance(mask, Tensor) or tuple(mask.shape) != expected:
            raise ValueError(
                f"{type(self).__name__}: expected to return a mask of shape {expected}, got "
                f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}"
            )
        mask = mask.to(device=images.device, dtype=torch.bool)
        empty = ~mask.any(dim=1)
        num_empty = int(empty.sum())
        if num_empty:
            self.num_empty_fallbacks += num_empty
            mask = mask | empty[:, None]
        return mask


def _as_bool_mask(mask: Tensor, argument: str) -> Tensor:
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{argument}: expected a boolean mask or only 0 and 1, got other values")
        return mask != 0
    raise TypeError(f"{argument}: expected a boolean or 0/1 tensor, got dtype {mask.dtype}")


class FixedMaskProvider(MaskProvider):
    """Returns a fixed mask, given per image or once for the whole batch.

    Args:
        mask (Tensor): ``(N, h, w)`` or ``(N, h * w)``, boolean or 0/1. ``N = 1``
            broadcasts to any batch size.

    Examples::

        >>> provider = FixedMaskProvider(torch.ones(1, 7, 7, dtype=torch.bool))
        >>> provider(torch.zeros(2, 3, 224, 224), (7, 7)).shape
        torch.Size([2, 49])
    """

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        if not isinstance(mask, Tensor) or mask.dim() not in (2, 3):
            raise ValueError(
                "mask: expected a tensor of shape (N, h, w) or (N, h*w), got "
                f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}"
            )
        self.grid_size: GridSize | None = tuple(mask.shape[1:]) if mask.dim() == 3 else None
        self.register_buffer("mask", _as_bool_mask(mask, "mask").flatten(1), persistent=False)

    def extra_repr(self) -> str:
        return f"mask_shape={tuple(self.mask.shape)}, grid_size={self.grid_size}"

    def compute_mask(self, images: Tensor, grid_size: GridSize) -> Tensor:
        if self.grid_size is not None and tuple(self.grid_size) != tuple(grid_size):
            raise ValueError(
                f"grid_size: expected the fixed mask's grid {tuple(self.grid_size)}, got {tuple(grid_size)}"
            )
        if self.mask.shape[1] != grid_size[0] * grid_size[1]:
            raise ValueError(
                f"grid_size: expected a grid of the fixed mask's {self.mask.shape[1]} patches, got {tuple(grid_size)} "
                f"({grid_size[0] * grid_size[1]} patches)"
            )
        batch = images.shape[0]
        if self.mask.shape[0] == 1:
            return self.mask.expand(batch, -1)
        if self.mask.shape[0] != batch:
            raise ValueError(
                f"images: expected a batch of {self.mask.shape[0]} images (one per fixed mask), got {batch} images"
            )
        return self.mask


class CallableMaskProvider(MaskProvider):
    """Wraps a user function ``fn(images, grid_size) -> mask``.

    The function may return ``(N, h, w)`` or ``(N, h * w)``, boolean or 0/1; the
    result is validated and flattened.

    Args:
        fn (callable): The mask function.
    """

    def __init__(self, fn: MaskFn) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
        self.fn = fn

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__qualname__', repr(self.fn))}"

    def compute_mask(self, images: Tensor, grid_size: GridSize) -> Tensor:
        mask = self.fn(images, grid_size)
        grid_h, grid_w = grid_size
        allowed = ((images.shape[0], grid_h, grid_w), (images.shape[0], grid_h * grid_w))
        if not isinstance(mask, Tensor) or tuple(mask.shape) not in allowed:
            raise ValueError(
                f"mask function: expected to return a tensor of shape {allowed[0]} or {allowed[1]}, got "
                f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}"
            )
        return _as_bool_mask(mask, "the mask function's output").flatten(1)


def as_mask_provider(obj: MaskProvider | MaskFn | Tensor) -> MaskProvider:
    """Turn a provider, a callable or a fixed mask into a :class:`MaskProvider`.

    Args:
        obj: A :class:`MaskProvider` (returned as is); a callable
            ``(images, grid_size) -> mask`` returning ``(N, h, w)`` or
            ``(N, h * w)``; or a fixed boolean / 0-1 mask tensor ``(N, h, w)`` or
            ``(N, h * w)`` (``N = 1`` broadcasts over the batch).

    Returns:
        MaskProvider: A module mapping ``(images, grid_size)`` to ``(N, h * w)`` booleans.

    Examples::

        >>> centre = torch.zeros(1, 7, 7, dtype=torch.bool)
        >>> centre[:, 2:5, 2:5] = True
        >>> as_mask_provider(centre)(torch.zeros(4, 3, 224, 224), (7, 7)).sum(1)
        tensor([9, 9, 9, 9])
    """
    if isinstance(obj, MaskProvider):
        return obj
    if isinstance(obj, Tensor):
        return FixedMaskProvider(obj)
    if callable(obj):
        return CallableMaskProvider(obj)
    raise TypeError(
        f"mask_provider: expected a MaskProvider, a callable (images, grid_size) -> mask or a mask tensor, "
        f"got {type(obj).__name__}"
    )


class OracleMaskProvider(MaskProvider):
    """Ground-truth foreground masks of a fixed set of images: the best mask any source could give.

    An image is recognised by its content: the preprocessed tensor is mapped back to
    8-bit pixels (``round(255 * (x * std + mean))``, exact for images that were 8-bit
    before normalisation, whatever the preprocessing code or device) and hashed. A
    patch is foreground when the image's foreground covers at least half of it.

    Args:
        images: ``(N, H, W, 3)`` uint8 images, as they are before preprocessing.
        foreground: ``(N, H, W)`` boolean (or 0/1) foreground of each image.
        grid_size: The CLIP patch grid ``(h, w)`` the masks are made on.
        input_mean, input_std: The normalisation of the CLIP inputs.

    Raises:
        ValueError: shapes that disagree, or (when called) an image it was not built from
            or another grid.

    Examples::

        >>> oracle = OracleMaskProvider(images, labels > 0, (8, 8), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
        >>> oracle(preprocessed_images, (8, 8)).shape  # doctest: +SKIP
        torch.Size([4, 64])
    """

    def __init__(
        self,
        images: Tensor | Sequence,
        foreground: Tensor | Sequence,
        grid_size: GridSize,
        input_mean: Sequence[float],
        input_std: Sequence[float],
    ) -> None:
        super().__init__()
        images, foreground = torch.as_tensor(images), torch.as_tensor(foreground)
        if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images: expected uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        if tuple(foreground.shape) != tuple(images.shape[:3]):
            raise ValueError(f"foreground: expected shape {tuple(images.shape[:3])}, got {tuple(foreground.shape)}")
        self.grid_size = _check_grid_size(grid_size)
        self.mean = torch.tensor(input_mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.std = torch.tensor(input_std, dtype=torch.float32).reshape(1, 3, 1, 1)
        cover = F.adaptive_avg_pool2d(foreground.float()[:, None], self.grid_size)[:, 0].flatten(1) >= 0.5
        self.masks = {self._digest(image): mask for image, mask in zip(images, cover)}

    @staticmethod
    def _digest(pixels: Tensor) -> bytes:
        return hashlib.blake2b(pixels.contiguous().numpy().tobytes(), digest_size=16).digest()

    def extra_repr(self) -> str:
        return f"images={len(self.masks)}, grid_size={self.grid_size}"

    def compute_mask(self, images: Tensor, grid_size: GridSize) -> Tensor:
        if tuple(grid_size) != self.grid_size:
            raise ValueError(f"grid_size: expected {self.grid_size} (the oracle's grid), got {tuple(grid_size)}")
        x = images.detach().float().cpu() * self.std + self.mean
        pixels = (x * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        masks = []
        for image in pixels:
            mask = self.masks.get(self._digest(image))
            if mask is None:
                raise ValueError("images: expected images the oracle was built from, got an unknown image")
            masks.append(mask)
        return torch.stack(masks).to(images.device)
