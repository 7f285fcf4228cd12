"""Image segments as the features of Captum's perturbation methods (docs/methods.md §11).

Captum 0.9 has an interpretable input for image segments, ``captum.attr.ImageMaskInput``: a label mask
over a PIL image whose segments are switched on and off, ``to_model_input`` filling the absent ones with
an RGB baseline. It is built for ``LLMAttribution``, which scores the log-probability of a generated
text, and it perturbs one PIL image per forward pass. A CLIP score needs neither: the image is already a
tensor, the score is a column of :class:`~captum_iclip.CLIPSimilarity`, and Captum's perturbation methods
take the same segments through their own ``feature_mask`` argument, batched over images and
perturbations. :class:`ImageSegments` is that label mask (segment ids renumbered to positions, as
``ImageMaskInput`` does), and :class:`SegmentAttribution` runs a Captum method on it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from captum._utils.typing import TargetType
from captum.attr import (
    Attribution,
    FeatureAblation,
    FeaturePermutation,
    KernelShap,
    Lime,
    Occlusion,
    ShapleyValues,
    ShapleyValueSampling,
)
from captum.log import log_usage
from torch import Tensor

from captum_iclip._precision import upcast
from captum_iclip.attr._utils import as_inputs_came, check_forward_func, target_indices, unpack_inputs
from captum_iclip.similarity import CLIPSimilarity

PERTURBATION_METHODS = (FeatureAblation, ShapleyValueSampling, ShapleyValues, Lime, KernelShap)
"""The Captum methods that take segments through ``feature_mask`` (those of Captum's ``LLMAttribution``)."""


def _connected_components(foreground: Tensor) -> Tensor:
    """(N, h, w) bool -> (N, h, w) int64: 0 off the foreground, 1..C its 4-connected components, numbered in
    the raster order of their first cell."""
    n, h, w = foreground.shape
    outside = h * w  # larger than every cell index: the minimum over a component is its first cell
    cells = torch.arange(h * w, device=foreground.device).reshape(1, h, w).expand(n, h, w)
    labels = torch.where(foreground, cells, outside)
    while True:  # each round spreads the smallest index one cell further; at most h*w rounds
        padded = F.pad(labels, (1, 1, 1, 1), value=outside)
        neighbours = torch.stack(
            [labels, padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]]
        ).amin(dim=0)
        spread = torch.where(foreground, neighbours, outside)
        if torch.equal(spread, labels):
            break
        labels = spread
    # ``outside`` sorts last, so the components come first, in the order of their first cells.
    numbered = torch.stack([torch.unique(image, return_inverse=True)[1] for image in labels])
    return torch.where(foreground, numbered + 1, 0)


class ImageSegments:
    r"""A segmentation of a batch of images: the features that Captum's perturbation methods remove.

    ``labels`` give every pixel of every image a non-negative integer segment id,
    like the ``mask`` of Captum's ``ImageMaskInput``. The ids of the batch, sorted,
    are the segments (:attr:`ids`); an image need not hold every id, and a segment
    absent from an image is attributed 0 there (removing it changes nothing).
    Segments come from:

    * a user mask: ``ImageSegments(labels)`` with (N, H, W) or (1, H, W) integer
      labels (a boolean mask gives the segments False and True);
    * a regular grid aligned with the model's patches: :meth:`patch_grid`;
    * foreground masks on the patch grid, DINO's above all (any mask source of
      :class:`~captum_iclip.MaskedMaxPoolingAttribution`): :meth:`from_masks`.

    Args:
        labels: (N, H, W) or (1, H, W) integer (or boolean) segment ids, H and W
            those of the images they segment; (1, H, W) serves every image.

    Attributes:
        labels: (N or 1, H, W) int64 positions 0..S-1 of each pixel's id in :attr:`ids`.
        ids: (S,) the segment ids, sorted.

    Examples::

        >>> import torch
        >>> from captum_iclip import ImageSegments
        >>> labels = torch.zeros(1, 4, 6, dtype=torch.long)
        >>> labels[:, :, 3:] = 7                     # left half: segment 0, right half: segment 7
        >>> segments = ImageSegments(labels)
        >>> segments.ids, segments.num_segments
        (tensor([0, 7]), 2)
        >>> segments.labels[0, 0]
        tensor([0, 0, 0, 1, 1, 1])
    """

    def __init__(self, labels: Tensor) -> None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"segments: expected an (N, H, W) tensor of integer labels, got {type(labels).__name__}")
        if labels.dtype == torch.bool:
            labels = labels.long()
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(
                f"segments: expected integer segment labels, got dtype {labels.dtype} "
                "(a float mask is not a segmentation; round it or cast it with .long() first)"
            )
        if labels.dim() != 3:
            raise ValueError(f"segments: expected (N, H, W) labels, got shape {tuple(labels.shape)}")
        if labels.numel() == 0:
            raise ValueError(f"segments: expected at least one pixel in one image, got shape {tuple(labels.shape)}")
        labels = labels.long()
        if (labels < 0).any():
            raise ValueError(f"segments: expected non-negative segment ids, got {int(labels.min())}")
        self.ids, positions = torch.unique(labels, return_inverse=True)
        self.labels = positions.reshape(labels.shape)

    def __repr__(self) -> str:
        return f"ImageSegments(num_segments={self.num_segments}, shape={tuple(self.labels.shape)})"

    @property
    def num_segments(self) -> int:
        """S, the number of segments of the batch."""
        return int(self.ids.numel())

    @property
    def present(self) -> Tensor:
        """(N, S) booleans: which segments each image holds."""
        flat = self.labels.flatten(1)
        counts = torch.zeros(flat.shape[0], self.num_segments, dtype=torch.long, device=flat.device)
        return counts.scatter_add_(1, flat, torch.ones_like(flat)) > 0

    # --- construction -------------------------------------------------------------------
    @classmethod
    def patch_grid(cls, sim: CLIPSimilarity, images: Tensor, cell: int | tuple[int, int] = 1) -> ImageSegments:
        """A regular grid of cells of ``cell`` patches, aligned with the model's patches.

        Segment ``r * columns + c`` is the cell in row r and column c (row-major, like
        the patch tokens); cells at the right and bottom edges are cut short when the
        grid does not divide.

        Args:
            sim: the forward function (its model gives the patch size and the grid).
            images: the preprocessed images (N, 3, H, W) to segment.
            cell: the cell size in patches, an int or (rows, columns) of positive ints;
                1 makes every patch a segment.

        Returns:
            One segmentation (1, H, W) for every image.
        """
        check_forward_func(sim, "ImageSegments.patch_grid")
        grid = sim.check_inputs(images, "images")
        cells = (cell, cell) if isinstance(cell, numbers.Integral) and not isinstance(cell, bool) else cell
        if not (
            isinstance(cells, (tuple, list))
            and len(cells) == 2
            and all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and c > 0 for c in cells)
        ):
            raise ValueError(f"cell: expected a positive int or a pair of positive ints (patches), got {cell!r}")
        (ph, pw), (ch, cw) = sim.adapter.patch_size, (int(cells[0]), int(cells[1]))
        columns = -(-grid[1] // cw)
        rows = torch.arange(images.shape[-2], device=images.device) // ph // ch
        cols = torch.arange(images.shape[-1], device=images.device) // pw // cw
        return cls((rows[:, None] * columns + cols[None, :])[None])

    @classmethod
    def from_masks(cls, masks: Any, sim: CLIPSimilarity, images: Tensor, *, components: bool = False) -> ImageSegments:
        """Segments from foreground masks on the model's patch grid: DINO's, or any mask source.

        Args:
            masks: what :func:`~captum_iclip.masks.as_mask_provider` takes: a
                :class:`~captum_iclip.masks.DINOMaskProvider` (e.g. from
                :func:`~captum_iclip.mask_source`, or a bundled model's
                ``mask_provider``), a callable ``(images, grid) -> mask``, or a fixed
                (N, h, w) or (N, h*w) boolean mask. A provider replaces an empty mask
                by every patch (docs/methods.md §3).
            sim: the forward function (its model gives the patch grid).
            images: the preprocessed images (N, 3, H, W).
            components: ``False``: two segments, id 0 the background and id 1 the
                foreground; ``True``: id 0 the background and ids 1, 2, ... each
                4-connected component of the foreground on the patch grid, in
                row-major order of their first patch.

        Returns:
            The segmentation (N, H, W), each patch's label spread over its pixels.
        """
        from captum_iclip.masks import as_mask_provider  # imports timm: only when masks are used

        check_forward_func(sim, "ImageSegments.from_masks")
        grid = sim.check_inputs(images, "images")
        foreground = as_mask_provider(masks)(images, grid).reshape(-1, *grid)
        labels = _connected_components(foreground) if components else foreground.long()
        ph, pw = sim.adapter.patch_size
        return cls(labels.repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2))

    # --- use ------------------------------------------------------------------------------
    def feature_mask(self, images: Tensor) -> Tensor:
        """Captum's ``feature_mask`` for ``images``: (N or 1, 1, H, W), one feature per segment over the
        three colour channels."""
        n, height, width = self.labels.shape
        if n not in (1, images.shape[0]) or (height, width) != tuple(images.shape[-2:]):
            raise ValueError(
                f"segments: expected labels of shape ({images.shape[0]}, {images.shape[-2]}, {images.shape[-1]}) "
                f"or (1, {images.shape[-2]}, {images.shape[-1]}) for inputs of shape {tuple(images.shape)}, "
                f"got {tuple(self.labels.shape)}"
            )
        return self.labels.to(images.device)[:, None]

    def values(self, attributions: Tensor) -> Tensor:
        """Each segment's attribution: (N, K, H, W) maps of :class:`SegmentAttribution` -> (N, K, S).

        Every pixel of a segment holds its attribution; a segment absent from an
        image gets 0 there (see :attr:`present`).
        """
        n, height, width = self.labels.shape
        if not isinstance(attributions, Tensor) or attributions.dim() != 4:
            raise ValueError(
                "attributions: expected (N, K, H, W) maps, got "
                f"{tuple(attributions.shape) if isinstance(attributions, Tensor) else type(attributions).__name__}"
            )
        if n not in (1, attributions.shape[0]) or tuple(attributions.shape[-2:]) != (height, width):
            batch = "" if n == 1 else f", N = {n}"
            raise ValueError(
                f"attributions: expected (N, K, {height}, {width}) maps (the segments' shape{batch}), "
                f"got {tuple(attributions.shape)}"
            )
        flat = self.labels.to(attributions.device).flatten(1).expand(attributions.shape[0], -1)
        pixels = flat.shape[1]
        # The first pixel of each segment carries its value (all its pixels carry the same).
        first = torch.full((flat.shape[0], self.num_segments), pixels, dtype=torch.long, device=flat.device)
        first = first.scatter_reduce(1, flat, torch.arange(pixels, device=flat.device).expand_as(flat), "amin")
        present = first < pixels
        values = attributions.flatten(2).gather(
            2, first.clamp_max(pixels - 1)[:, None].expand(-1, attributions.shape[1], -1)
        )
        return torch.where(present[:, None], values, torch.zeros((), dtype=values.dtype, device=values.device))


def _check_baselines(baselines: float | Tensor, images: Tensor) -> float | Tensor:
    """A number, a (3,) colour or a tensor broadcastable to ``images``, in the input space of the model."""
    if isinstance(baselines, numbers.Real) and not isinstance(baselines, bool):
        if not math.isfinite(baselines):
            raise ValueError(f"baselines: expected a finite number, got {baselines!r}")
        return float(baselines)
    if not isinstance(baselines, Tensor) or not baselines.is_floating_point():
        raise TypeError(
            "baselines: expected a number, a (3,) colour or a floating-point tensor broadcastable to the inputs, "
            f"got {baselines.dtype if isinstance(baselines, Tensor) else type(baselines).__name__}"
        )
    if not torch.isfinite(baselines).all():
        raise ValueError("baselines: expected finite values, got NaN or infinity")
    if baselines.shape == (3,):
        baselines = baselines.reshape(1, 3, 1, 1)
    try:
        return torch.broadcast_to(baselines.to(images), images.shape)
    except RuntimeError as error:
        raise ValueError(
            f"baselines: expected a (3,) colour or a tensor broadcastable to the inputs {tuple(images.shape)}, "
            f"got {tuple(baselines.shape)}"
        ) from error


class SegmentAttribution(Attribution):
    r"""A Captum perturbation method on image segments, explaining a CLIP score.

    The features are the segments of an :class:`ImageSegments` (a user mask, a
    patch grid or DINO masks); removing a segment fills its pixels with
    ``baselines``. The explained score is ``forward_func``'s column of the
    target prompt, the same number that :class:`~captum_iclip.ITSMAttribution` and
    Captum's gradient methods explain. With ``method``:

    * ``FeatureAblation``: :math:`a_s = f(x) - f(x_{\setminus s})`, the drop when
      segment s alone is removed;
    * ``ShapleyValueSampling`` (or exact ``ShapleyValues``): the Shapley value of
      segment s over permutations of the segments, whose sum over the segments is
      :math:`f(x) - f(b)`, the drop when every segment is removed (completeness);
    * ``Lime`` and ``KernelShap``: the coefficients of a linear surrogate over
      segment on/off vectors (scikit-learn by default, or Captum's
      ``captum._utils.models.linear_model.SGDLasso`` given as ``interpretable_model``).

    The cost is the method's: S + 1 forward passes for ``FeatureAblation``,
    ``n_samples`` × S for ``ShapleyValueSampling``, ``n_samples`` for ``Lime``,
    each pass over the whole batch (docs/methods.md §11).

    Captum's own ``attribute(images, feature_mask=segments.feature_mask(images))``
    computes the same (this class also checks the inputs, takes Captum's target
    semantics with ``target=None`` for every prompt, and returns one map per prompt).

    Args:
        forward_func: a :class:`~captum_iclip.CLIPSimilarity`; ``target=k`` is prompt k.
        method: the Captum class, one of :data:`PERTURBATION_METHODS`:
            ``FeatureAblation`` (default), ``ShapleyValueSampling``, ``ShapleyValues``,
            ``Lime``, ``KernelShap``.
        **method_options: passed to ``method``'s constructor (e.g. Lime's
            ``interpretable_model``).

    Examples::

        >>> import open_clip, torch
        >>> from captum.attr import ShapleyValueSampling
        >>> from captum_iclip import CLIPSimilarity, ImageSegments, SegmentAttribution
        >>> model = open_clip.create_model("ViT-B-16").eval()
        >>> sim = CLIPSimilarity(model, open_clip.get_tokenizer("ViT-B-16"), ["a cat", "a dog"])
        >>> images = torch.randn(2, 3, 224, 224)
        >>> segments = ImageSegments.patch_grid(sim, images, cell=7)   # 2 x 2 cells of 7 x 7 patches
        >>> maps = SegmentAttribution(sim).attribute(images, target=0, segments=segments)
        >>> maps.shape, segments.values(maps).shape                    # per pixel, per segment
        (torch.Size([2, 1, 224, 224]), torch.Size([2, 1, 4]))
        >>> shapley = SegmentAttribution(sim, ShapleyValueSampling)
        >>> maps = shapley.attribute(images, target=0, segments=segments, n_samples=4)
    """

    def __init__(self, forward_func: CLIPSimilarity, method: type = FeatureAblation, **method_options: Any) -> None:
        check_forward_func(forward_func, "SegmentAttribution")
        # Two of FeatureAblation's subclasses remove no segment: FeaturePermutation shuffles features across
        # the batch, Occlusion slides windows and takes no feature mask.
        if not (
            isinstance(method, type)
            and issubclass(method, PERTURBATION_METHODS)
            and not issubclass(method, (FeaturePermutation, Occlusion))
        ):
            names = ", ".join(m.__name__ for m in PERTURBATION_METHODS)
            raise TypeError(f"method: expected one of Captum's classes {names}, got {method!r}")
        super().__init__(forward_func)
        self.similarity: CLIPSimilarity = forward_func
        self.method = method(forward_func, **method_options)

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        *,
        segments: ImageSegments | Tensor,
        baselines: float | Tensor = 0.0,
        **method_kwargs: Any,
    ) -> Tensor | tuple[Tensor]:
        r"""
        Args:
            inputs: preprocessed images (N, 3, H, W), or a 1-tuple of them.
            target: the prompt(s) to explain, with Captum's semantics: an int, a
                list or 1-d tensor of N ints, or ``None`` for every prompt (one run
                of the method per prompt).
            segments: an :class:`ImageSegments`, or (N, H, W) / (1, H, W) integer labels.
            baselines: what a removed segment's pixels become, in the model's input
                space: a number (default 0, the dataset's mean colour after the usual
                normalisation), a (3,) colour, or a tensor broadcastable to the inputs
                (e.g. a blurred copy).
            **method_kwargs: passed to the method's ``attribute`` (``n_samples``,
                ``perturbations_per_eval``, ``show_progress``, ...); not
                ``feature_mask``, which the segments give.

        Returns:
            *Tensor* or *tuple[Tensor]*: (N, 1, H, W) for one target per example,
            (N, K, H, W) for ``target=None``, every pixel holding its segment's
            attribution (:meth:`ImageSegments.values` reads them per segment); a
            tuple if ``inputs`` was a tuple.
        """
        images, is_tuple = unpack_inputs(inputs)
        sim = self.similarity
        sim.check_inputs(images)
        index = target_indices(target, images.shape[0], sim.num_prompts)
        if not isinstance(segments, ImageSegments):
            segments = ImageSegments(segments)
        feature_mask = segments.feature_mask(images)
        baselines = _check_baselines(baselines, images)
        if "feature_mask" in method_kwargs:
            raise ValueError("feature_mask: expected none (the segments give Captum's feature mask), got one")
        prompts = range(sim.num_prompts) if index is None else [index]
        maps = []
        with torch.no_grad(), sim.evaluating():
            for prompt in prompts:
                prompt = torch.full((images.shape[0],), prompt) if isinstance(prompt, int) else prompt
                attributions = self.method.attribute(
                    images,
                    target=prompt.to(images.device),
                    baselines=baselines,
                    feature_mask=feature_mask,
                    **method_kwargs,
                )
                # The mask spans the three channels, so each carries the segment's attribution: keep one.
                maps.append(attributions[:, :1])
        return as_inputs_came(upcast(torch.cat(maps, dim=1)), is_tuple)

    def has_convergence_delta(self) -> bool:
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        return False
