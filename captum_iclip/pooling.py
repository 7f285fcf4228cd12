"""Masked max pooling (ICLIP, arXiv 2209.07046; docs/methods.md §3).

The paper's pooling that avoids the semantic shift.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MaskedMaxPooling(nn.Module):
    r"""Channel-wise max over the foreground patches.

    For patch features :math:`P` (N, L, D) and a binary foreground mask :math:`m`
    (N, L), :math:`z_d = \max_{i : m_i = 1} P_{i,d}` for every channel d. The
    gradient of :math:`z_d` flows only to the winning patch of channel d (the
    argmax), as for any max. An image whose mask is empty is pooled over all of
    its patches instead; such fallbacks are counted in :attr:`num_empty_masks`
    (and all pooled images in :attr:`num_pooled`).

    The image embedding of the paper is ``z / ||z||``; this module returns ``z``
    so that callers can keep the norm (attributions need it).

    Examples::

        >>> pool = MaskedMaxPooling()
        >>> patches = torch.randn(2, 196, 512, requires_grad=True)
        >>> mask = torch.rand(2, 196) > 0.5
        >>> pooled, winners = pool(patches, mask, return_indices=True)
        >>> pooled.shape, winners.shape
        (torch.Size([2, 512]), torch.Size([2, 512]))
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("num_empty_masks", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("num_pooled", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, patches: Tensor, mask: Tensor, return_indices: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """
        Args:
            patches: (N, L, D) patch features.
            mask: (N, L) foreground mask, bool or 0/1.
            return_indices: also return the (N, D) index of each channel's winning patch.

        Returns:
            (N, D) pooled features, and the winners if ``return_indices``.
        """
        if patches.dim() != 3:
            raise ValueError(f"patches: expected (N, L, D), got shape {tuple(patches.shape)}")
        if mask.shape != patches.shape[:2]:
            raise ValueError(f"mask: expected shape {tuple(patches.shape[:2])} (N, L), got {tuple(mask.shape)}")
        mask = mask.to(device=patches.device, dtype=torch.bool)
        empty = ~mask.any(dim=1)
        self.num_empty_masks += int(empty.sum())
        self.num_pooled += patches.shape[0]
        mask = mask | empty[:, None]
        masked = patches.masked_fill(~mask[..., None], float("-inf"))
        pooled, winners = masked.max(dim=1)
        return (pooled, winners) if return_indices else pooled
