"""An on-disk cache of any provider's masks, one file per image."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from captum_iclip._io import atomic_torch_save, load_torch_file
from captum_iclip.masks.attention import GridSize
from captum_iclip.masks.providers import MaskFn, MaskProvider, as_mask_provider


# --------------------------------------------------------------------------- #
# On-disk cache
# --------------------------------------------------------------------------- #
class CachedMaskProvider(MaskProvider):
    """Caches another provider's masks on disk, one file per image.

    The key of an image is the SHA-256 of its tensor bytes, shape and dtype, the
    CLIP grid and the wrapped provider's fingerprint (its
    :meth:`MaskProvider.cache_fingerprint`: class, settings and weights), so a
    changed model, ``tau`` or grid never reads a stale entry. Each mask is stored
    as ``cache_dir/ab/abcdef....pt`` (a boolean ``(h * w,)`` tensor) written atomically
    (:func:`~captum_iclip._io.atomic_torch_save`: a temporary file moved into place), so concurrent
    writers (data-loader workers, ranks) never expose a partial file. Only the
    images that miss are sent to the wrapped provider, as one batch; the masks
    stored are the provider's final ones (after its empty-mask fallback, which
    the wrapped provider counts on misses only).

    Args:
        provider: Any input accepted by :func:`as_mask_provider`.
        cache_dir (str or Path): Cache folder (created if missing).
        fingerprint (str, optional): Overrides the provider fingerprint, e.g. to
            name a user callable whose behaviour the cache cannot observe.

    Attributes:
        hits (int): Masks read from disk.
        misses (int): Masks computed and written.

    Examples::

        >>> cached = CachedMaskProvider(DINOMaskProvider(dino_model), "cache/masks")
        >>> masks = cached(clip_images, (14, 14))
        >>> cached.hits, cached.misses
        (0, 8)
    """

    def __init__(
        self,
        provider: MaskProvider | MaskFn | Tensor,
        cache_dir: str | os.PathLike,
        *,
        fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        self.provider = as_mask_provider(provider)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint if fingerprint is not None else self.provider.cache_fingerprint()
        self.hits = 0
        self.misses = 0

    def extra_repr(self) -> str:
        return f"cache_dir={str(self.cache_dir)!r}"

    def cache_fingerprint(self) -> str:
        return self.fingerprint

    def _key(self, image: Tensor, grid_size: GridSize) -> str:
        image = image.detach().cpu().contiguous()
        digest = hashlib.sha256(f"{self.fingerprint}|{tuple(grid_size)}|{tuple(image.shape)}|{image.dtype}".encode())
        digest.update(image.view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.pt"

    def _read(self, path: Path, patches: int) -> Tensor | None:
        """A cached mask, or ``None`` (a miss) when the entry is corrupt, truncated or of the wrong shape:
        the cache holds derived data, so a damaged entry is recomputed and rewritten, with a warning."""
        try:
            mask = load_torch_file(path, "cache_dir")
        except ValueError as error:
            warnings.warn(
                f"CachedMaskProvider: recomputing a damaged cache entry: {error}", RuntimeWarning, stacklevel=2
            )
            return None
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (patches,):
            warnings.warn(
                f"CachedMaskProvider: recomputing the cache entry {path}: it does not hold a boolean ({patches},) mask",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        return mask

    def compute_mask(self, images: Tensor, grid_size: GridSize) -> Tensor:
        paths = [self._path(self._key(image, grid_size)) for image in images]
        masks: list = [None] * len(paths)
        missing = []
        expected = grid_size[0] * grid_size[1]
        for index, path in enumerate(paths):
            mask = self._read(path, expected) if path.is_file() else None
            if mask is None:
                missing.append(index)
            else:
                masks[index] = mask
        self.hits += len(paths) - len(missing)
        if missing:
            computed = self.provider(images[missing], grid_size).cpu()
            for index, mask in zip(missing, computed):
                atomic_torch_save(mask.detach().cpu().clone(), paths[index])
                masks[index] = mask
            self.misses += len(missing)
        return torch.stack(masks).to(images.device)
