"""Attribution of the masked-max-pooled image-text score to patches (ICLIP, arXiv 2209.07046; docs/methods.md §3)."""

from __future__ import annotations

from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from captum._utils.typing import TargetType
from captum.log import log_usage
from torch import Tensor

from captum_iclip._precision import full_precision, upcast
from captum_iclip.attr._utils import Normalize, as_inputs_came
from captum_iclip.attr.base import CLIPMapAttribution
from captum_iclip.pooling import MaskedMaxPooling
from captum_iclip.similarity import CLIPSimilarity


class MaskedMaxPoolingAttribution(CLIPMapAttribution):
    r"""Exact decomposition of the masked-max-pooled score over patches (ICLIP).

    The patch features :math:`P` of the interpretability projection are pooled
    with :class:`~captum_iclip.MaskedMaxPooling` over the foreground given by
    ``mask_provider`` (DINO attention by default in ICLIP), giving
    :math:`z`. For prompt k the pooled score is
    :math:`S_k = \sum_d z_d t_{k,d} / \lVert z \rVert`. Each channel d has one
    winning patch :math:`i^*(d)`, so the score splits exactly over patches:
    :math:`a_i = \sum_{d : i^*(d) = i} z_d t_{k,d} / \lVert z \rVert` and
    :math:`\sum_i a_i = S_k` (completeness). Background patches get 0.

    Upsampling to pixels spreads each patch's value evenly over its
    :math:`p \times p` pixels (nearest upsampling divided by :math:`p^2`), so
    the sum over pixels still equals :math:`S_k`; ``return_convergence_delta``
    returns :math:`S_k - \sum a` (0 up to float error).

    Note that this explains the *masked-max-pooled* score, the quantity ICLIP
    trains, not the recognition score of ``forward_func`` (which comes from the
    global token); ``forward_func`` provides the model, the prompts and their
    embeddings.

    What differs from :class:`~captum_iclip.ITSMAttribution` (the rest is
    :class:`~captum_iclip.attr.base.CLIPMapAttribution`): no normalisation by
    default and ``"spread"`` upsampling, both so that the map sums to the pooled
    score (completeness); a convergence delta; and a foreground mask.

    Args:
        forward_func: a :class:`~captum_iclip.CLIPSimilarity` (ideally around a
            :class:`~captum_iclip.DualProjectionCLIP`).
        mask_provider: a :class:`~captum_iclip.masks.DINOMaskProvider`, any
            callable ``(images, grid_size) -> (N, h*w) bool``, a fixed mask tensor,
            or ``None`` for all patches (plain max pooling).

    Examples::

        >>> from captum_iclip import CLIPSimilarity, DualProjectionCLIP, MaskedMaxPoolingAttribution
        >>> from captum_iclip.masks import DINOMaskProvider
        >>> sim = CLIPSimilarity(DualProjectionCLIP(clip), tokenizer, ["a cat", "a dog"])
        >>> mmp = MaskedMaxPoolingAttribution(sim, mask_provider=DINOMaskProvider(dino))
        >>> attr, delta = mmp.attribute(images, target=0, return_convergence_delta=True)
        >>> attr.shape, delta.abs().max() < 1e-5
    """

    def __init__(self, forward_func: CLIPSimilarity, mask_provider: Any = None) -> None:
        super().__init__(forward_func)
        from captum_iclip.masks import as_mask_provider  # imports timm: only when a provider is given

        self.mask_provider = None if mask_provider is None else as_mask_provider(mask_provider)
        self.pool = MaskedMaxPooling()

    def foreground(self, images: Tensor, grid: tuple[int, int], mask: Tensor | None = None) -> Tensor:
        """The (N, h*w) boolean foreground of ``images`` on the CLIP patch grid.

        ``mask`` (one call's override) goes through the same checks as a provider's
        masks (:class:`~captum_iclip.masks.FixedMaskProvider`): shape, 0/1 values,
        and an empty mask replaced by every patch.
        """
        if mask is not None:
            from captum_iclip.masks import FixedMaskProvider

            return FixedMaskProvider(mask.to(images.device))(images, grid)
        if self.mask_provider is None:
            return torch.ones(images.shape[0], grid[0] * grid[1], dtype=torch.bool, device=images.device)
        return self.mask_provider(images, grid)

    # The attributions alone, or with their convergence deltas: what a type checker sees of each call.
    @overload
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        *,
        mask: Tensor | None = None,
        normalize: Normalize = False,
        interpolate: bool = True,
        projection: str = "auto",
        return_convergence_delta: Literal[False] = False,
    ) -> Tensor | tuple[Tensor]: ...

    @overload
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        *,
        mask: Tensor | None = None,
        normalize: Normalize = False,
        interpolate: bool = True,
        projection: str = "auto",
        return_convergence_delta: Literal[True],
    ) -> tuple[Tensor | tuple[Tensor], Tensor]: ...

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        *,
        mask: Tensor | None = None,
        normalize: Normalize = False,
        interpolate: bool = True,
        projection: str = "auto",
        return_convergence_delta: bool = False,
    ) -> Tensor | tuple[Tensor] | tuple[Tensor | tuple[Tensor], Tensor]:
        r"""
        Args:
            inputs: preprocessed images (N, 3, H, W), or a 1-tuple of them.
            target: prompt index with Captum's semantics (int, list or tensor of N
                ints, or ``None`` for every prompt).
            mask: an explicit (N, h*w) or (N, h, w) foreground mask on the patch
                grid (boolean or 0/1, NaN refused; N = 1 applies to every image)
                overriding the provider for this call, with the provider's checks:
                an empty mask means every patch.
            normalize: min-max normalise each map to [0, 1] (this breaks
                completeness; off by default): ``True`` normalises the patch
                grid, then spreads (pixels at most ``1 / p²``); ``"reference"``
                normalises the spread map over the pixels (to [0, 1]). The convergence delta is always
                that of the attributions returned, so with ``normalize=True`` it
                shows how far the normalised map is from summing to the score.
            interpolate: spread each patch's value over its pixels, giving
                (H, W) maps whose sum equals the patch sum; ``False`` returns the
                patch grid.
            projection: ``"auto"`` (interpretability when available),
                ``"interpretability"`` or ``"recognition"``.
            return_convergence_delta: also return :math:`S_k - \sum_i a_i` per
                example over the returned attributions :math:`a`, (N,) for one
                target per example, (N, K) for ``None``.

        Returns:
            Attributions (N, 1, H, W) for one target per example or (N, K, H, W)
            for ``target=None`` (a tuple if ``inputs`` was one), and the deltas
            if asked.
        """
        prepared = self.prepare(inputs, target, projection)
        images, grid, sim = prepared.images, prepared.grid, self.similarity

        with torch.no_grad(), sim.evaluating():
            foreground = self.foreground(images, grid, mask)
            patches = sim.adapter.dense_features(images, projection=prepared.projection)[:, 1:]
        # The pooling, norm and shares in at least float32 (half-precision rules, docs/methods.md).
        with torch.no_grad(), full_precision(images.device):
            patches = upcast(patches)
            text = upcast(sim.text_features).to(patches.dtype)
            attributions, scores = self.decompose(patches, foreground, text, prepared.index)
            attributions = self.finish(
                attributions, prepared, normalize=normalize, interpolate=interpolate, upsample="spread"
            )
            # Captum's convergence delta relates the attributions *returned* to the score they explain.
            delta = scores - attributions.flatten(2).sum(-1)
        if prepared.index is not None:
            delta = delta[:, 0]
        out = as_inputs_came(attributions, prepared.is_tuple)
        return (out, delta) if return_convergence_delta else out

    def decompose(
        self, patches: Tensor, foreground: Tensor, text: Tensor, index: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Per-patch shares of the pooled score.

        Args:
            patches: (N, L, D) patch features.
            foreground: (N, L) mask.
            text: (K, D) normalised prompt embeddings.
            index: (N,) prompt per example, or None for all.

        Returns:
            attributions (N, K', L) and pooled scores (N, K'), K' = 1 or K.
        """
        pooled, winners = self.pool(patches, foreground, return_indices=True)
        norm = pooled.norm(dim=-1, keepdim=True)
        if index is not None:
            text = text[index.to(text.device)][:, None]  # (N, 1, D)
        else:
            text = text[None].expand(patches.shape[0], -1, -1)  # (N, K, D)
        contributions = pooled[:, None] * text / norm[:, None]  # (N, K', D): z_d t_kd / ||z||
        attributions = torch.zeros(
            *contributions.shape[:2], patches.shape[1], dtype=patches.dtype, device=patches.device
        )
        attributions.scatter_add_(2, winners[:, None].expand_as(contributions), contributions)
        scores = (F.normalize(pooled, dim=-1)[:, None] * text).sum(-1)
        return attributions, scores

    def has_convergence_delta(self) -> bool:
        return True
