"""The base class of our map attributions: what ITSM and masked max pooling share."""

from __future__ import annotations

from typing import NamedTuple

from captum._utils.typing import TargetType
from captum.attr import Attribution
from torch import Tensor

from captum_iclip.attr._utils import (
    Normalize,
    as_inputs_came,
    check_forward_func,
    finish_maps,
    target_indices,
    unpack_inputs,
)
from captum_iclip.similarity import CLIPSimilarity


class PreparedInputs(NamedTuple):
    """Checked inputs of one ``attribute`` call."""

    images: Tensor  # (N, 3, H, W)
    is_tuple: bool  # the inputs came as Captum's 1-tuple: return a 1-tuple
    grid: tuple[int, int]  # the patch grid (h, w)
    index: Tensor | None  # (N,) prompt per example, or None for every prompt
    projection: str  # "recognition" or "interpretability"


class CLIPMapAttribution(Attribution):
    r"""Base of the attributions that read a CLIP model's dense features (docs/methods.md).

    It holds what every map method does the same way:

    * the forward function: a :class:`~captum_iclip.CLIPSimilarity`, the same one
      that Captum's own methods explain, so ``target=k`` names the same score;
    * Captum's target semantics (an int, N ints, or ``None`` for every prompt),
      giving (N, 1, ...) or (N, K, ...) maps;
    * the projection of the patch tokens: ``"auto"`` is the interpretability
      projection of a :class:`~captum_iclip.DualProjectionCLIP` (ICLIP), else the
      recognition projection; ``"recognition"`` and ``"interpretability"`` force one;
    * the post-processing of (N, K, h, w) patch maps: optional per-map min-max
      normalisation to [0, 1] (``normalize=True`` on the patch grid before
      upsampling; ``"reference"`` over the pixels after it, as the reference code
      of GEM, LeGrad and Chefer et al. does), and upsampling to the input size, either
      ``"bilinear"`` (smooth maps for display and localization metrics) or
      ``"spread"`` (each patch's value divided evenly over its pixels, which keeps
      the sum of the map, hence completeness).

    Subclasses choose their defaults and say why in their docstrings.

    Args:
        forward_func: a :class:`~captum_iclip.CLIPSimilarity`.
    """

    def __init__(self, forward_func: CLIPSimilarity) -> None:
        super().__init__(check_forward_func(forward_func, type(self).__name__))
        self.similarity: CLIPSimilarity = forward_func

    def prepare(self, inputs: Tensor | tuple[Tensor], target: TargetType, projection: str) -> PreparedInputs:
        """Check the inputs, the target and the projection of one ``attribute`` call."""
        images, is_tuple = unpack_inputs(inputs)
        sim = self.similarity
        grid = sim.check_inputs(images)
        index = target_indices(target, images.shape[0], sim.num_prompts)
        return PreparedInputs(images, is_tuple, grid, index, self.resolve_projection(projection))

    def resolve_projection(self, projection: str) -> str:
        """``"auto"`` -> the interpretability projection when the model has one, else the recognition one
        (:meth:`~captum_iclip.models.base.VisionAdapter.resolve_projection`)."""
        return self.similarity.adapter.resolve_projection(projection)

    def finish(
        self, scores: Tensor, prepared: PreparedInputs, *, normalize: Normalize, interpolate: bool, upsample: str
    ) -> Tensor:
        """(N, K, h*w) patch scores as (N, K, H, W) maps (:func:`~captum_iclip.attr._utils.finish_maps`)."""
        size, patch_size = prepared.images.shape[-2:], self.similarity.adapter.patch_size
        return finish_maps(
            scores, prepared.grid, size, patch_size, normalize=normalize, interpolate=interpolate, upsample=upsample
        )

    def output(
        self, scores: Tensor, prepared: PreparedInputs, *, normalize: Normalize, interpolate: bool, upsample: str
    ) -> Tensor | tuple[Tensor]:
        """What ``attribute`` returns: the finished maps of (N, K, h*w) patch scores, a 1-tuple if the inputs were."""
        maps = self.finish(scores, prepared, normalize=normalize, interpolate=interpolate, upsample=upsample)
        return as_inputs_came(maps, prepared.is_tuple)

    def has_convergence_delta(self) -> bool:
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        return False
