"""Faithfulness of image attributions: does the model's score follow what the map says matters?

Two families, for a single image tensor input ``(N, C, H, W)`` in the model's
normalised input space and one map per image (docs/methods.md §5.1):

- Captum's infidelity and max-sensitivity (Yeh et al. 2019), thin wrappers
  around :func:`captum.metrics.infidelity` and :func:`captum.metrics.sensitivity_max`
  with documented perturbations:

  - :func:`gaussian_perturbation`: I ~ N(0, σ²) i.i.d. per pixel and channel,
    perturbed input x − I (Captum's convention: the model is compared at
    x and x − I).
  - :func:`patch_perturbation`: the image is cut into square patches and each
    patch is replaced by a fill value with probability ``drop_prob``; I is
    x − x̃, non-zero only on dropped patches.

  Attribution maps of shape ``(N, 1, H, W)`` — one value per pixel, as the
  project's attribution classes return — are expanded to ``(N, C, H, W)`` by
  repeating the map on every channel, so a pixel's attribution multiplies the
  sum of that pixel's channel perturbations. Infidelity is normalised by
  default (Captum's ``normalize=True``: the best scaling β of the
  attributions is applied first), which makes it independent of the map's
  scale; min–max normalised maps are only defined up to scale anyway.

- The removal metrics of the CLIP explanation papers, which change pixels in
  the order of the map and read the score of the target prompt:
  :func:`deletion_curve` and :func:`insertion_curve` (Petsiuk et al. 2018, with
  Grad-ECLIP's steps and fills; :func:`fill_image` builds the fills),
  :func:`confidence_change` (Chattopadhyay et al. 2018's Average Drop and
  Increase in Confidence, as M2IB reports them) and :func:`road_scores` (Rong et
  al. 2022's ROAD: :func:`noisy_linear_imputation` at fixed percentages, most or
  least relevant first). Maps of shape ``(N, 1, h, w)`` are upsampled
  bilinearly to the input when ``(h, w)`` is not its size; ties in a map are
  broken in raster order (top-left first), so constant maps give one fixed order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from captum.metrics import infidelity, sensitivity_max
from torch import Tensor

from captum_iclip._precision import full_precision, upcast
from captum_iclip.attr._utils import minmax_normalize, target_indices

__all__ = [
    "FILLS",
    "FILL_IMAGES",
    "PROTOCOL_FILLS",
    "ROAD_PERCENTAGES",
    "ConfidenceChange",
    "PerturbationCurve",
    "confidence_change",
    "deletion_curve",
    "expand_attributions",
    "fill_image",
    "gaussian_perturbation",
    "infidelity_score",
    "insertion_curve",
    "noisy_linear_imputation",
    "patch_perturbation",
    "road_scores",
    "sensitivity_score",
    "trapezoid_auc",
]

PerturbFunc = Callable[[Tensor], tuple[Tensor, Tensor]]


def gaussian_perturbation(std: float) -> PerturbFunc:
    """Gaussian-noise perturbation for :func:`captum.metrics.infidelity`.

    Args:
        std: Standard deviation σ of the noise, in input units. For
            CLIP-normalised inputs (channel std ≈ 0.27 of the [0, 1] range)
            0.1 is about 7 grey levels out of 255.

    Returns:
        ``perturb(inputs) -> (perturbation, inputs - perturbation)`` with
        ``perturbation ~ N(0, std²)`` of the inputs' shape.

    Examples:
        >>> perturb = gaussian_perturbation(0.1)
        >>> noise, perturbed = perturb(torch.zeros(2, 3, 8, 8))
        >>> torch.equal(perturbed, -noise)
        True
    """
    if not std > 0:
        raise ValueError(f"std: expected a positive value, got {std!r}")

    def perturb(inputs: Tensor) -> tuple[Tensor, Tensor]:
        noise = torch.randn_like(inputs) * std
        return noise, inputs - noise

    return perturb


def patch_perturbation(patch_size: int, drop_prob: float = 0.25, fill: float = 0.0) -> PerturbFunc:
    """Patch-removal perturbation for :func:`captum.metrics.infidelity`.

    The image is tiled into ``patch_size`` × ``patch_size`` patches (the
    last row/column of patches may be cut by the border); each patch of each
    example is independently replaced by ``fill`` with probability
    ``drop_prob`` (on every channel). The perturbation is ``inputs -
    perturbed``, so it is non-zero only on dropped patches.

    Args:
        patch_size: Patch side in pixels (e.g. the model's ViT patch size).
        drop_prob: Probability that a patch is replaced, in (0, 1].
        fill: Replacement value (0 is the dataset mean for normalised inputs).

    Returns:
        ``perturb(inputs) -> (perturbation, perturbed_inputs)`` for
        ``(N, C, H, W)`` inputs.

    Examples:
        >>> perturb = patch_perturbation(4, drop_prob=1.0)
        >>> delta, perturbed = perturb(torch.ones(1, 3, 8, 8))
        >>> float(perturbed.abs().sum()), float(delta.sum())
        (0.0, 192.0)
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size: expected a positive int, got {patch_size!r}")
    if not 0.0 < drop_prob <= 1.0:
        raise ValueError(f"drop_prob: expected in (0, 1], got {drop_prob!r}")

    def perturb(inputs: Tensor) -> tuple[Tensor, Tensor]:
        if inputs.dim() != 4:
            raise ValueError(f"inputs: expected shape (N, C, H, W), got {tuple(inputs.shape)}")
        batch, _, height, width = inputs.shape
        grid = (-(-height // patch_size), -(-width // patch_size))
        dropped = torch.rand(batch, 1, *grid, device=inputs.device) < drop_prob
        dropped = dropped.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
        dropped = dropped[:, :, :height, :width]
        perturbed = torch.where(dropped, torch.full_like(inputs, fill), inputs)
        return inputs - perturbed, perturbed

    return perturb


def expand_attributions(attributions: Tensor, inputs: Tensor) -> Tensor:
    """Bring attributions to the inputs' shape, repeating a 1-channel map.

    Args:
        attributions: ``(N, C, H, W)`` (returned unchanged) or ``(N, 1, H, W)``.
        inputs: ``(N, C, H, W)`` inputs.

    Returns:
        Attributions of the inputs' shape.

    Raises:
        ValueError: If the shapes are not compatible.
    """
    if attributions.shape == inputs.shape:
        return attributions
    if (
        attributions.dim() == 4
        and inputs.dim() == 4
        and attributions.shape[1] == 1
        and attributions.shape[0] == inputs.shape[0]
        and attributions.shape[2:] == inputs.shape[2:]
    ):
        return attributions.expand_as(inputs)
    raise ValueError(
        f"attributions: expected the inputs' shape {tuple(inputs.shape)} or "
        f"(N, 1, H, W) with the same N, H, W, got {tuple(attributions.shape)}"
    )


def infidelity_score(
    forward_func: Callable[..., Tensor],
    attributions: Tensor,
    inputs: Tensor,
    target: Any = None,
    *,
    noise_std: float = 0.1,
    n_perturb_samples: int = 10,
    perturb_func: PerturbFunc | None = None,
    normalize: bool = True,
    max_examples_per_batch: int | None = None,
    additional_forward_args: Any = None,
) -> Tensor:
    """Infidelity of image attributions (Yeh et al. 2019) via Captum.

    ``E_I[(Iᵀ·β·Φ − (f(x) − f(x − I)))²]`` over perturbations I, with
    β the best scale when ``normalize`` (lower is better; 0 for a model
    that is linear in the perturbed directions and its gradient).

    Args:
        forward_func: Maps ``(N, C, H, W)`` inputs to ``(N, K)`` scores (e.g.
            ``CLIPSimilarity``) or ``(N,)`` scalars.
        attributions: ``(N, C, H, W)`` or ``(N, 1, H, W)`` (repeated over
            channels, see the module docstring).
        inputs: ``(N, C, H, W)`` inputs the attributions explain.
        target: Captum target (int, list, tensor or None).
        noise_std: σ of :func:`gaussian_perturbation`, used when
            ``perturb_func`` is None.
        n_perturb_samples: Perturbations per example.
        perturb_func: A ``(perturbation, perturbed_inputs)`` function such
            as :func:`patch_perturbation`; overrides ``noise_std``.
        normalize: Apply Captum's optimal scaling β of the attributions.
        max_examples_per_batch: Limit on perturbed examples per forward.
        additional_forward_args: Passed on to ``forward_func``.

    Returns:
        ``(N,)`` infidelity per example.

    Examples:
        >>> from captum.attr import Saliency
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
        >>> x = torch.randn(1, 3, 4, 4)
        >>> attr = Saliency(net).attribute(x, target=0, abs=False)
        >>> float(infidelity_score(net, attr, x, 0)) < 1e-6
        True
    """
    if not isinstance(inputs, Tensor) or inputs.dim() != 4:
        raise ValueError(
            f"inputs: expected a tensor of shape (N, C, H, W), "
            f"got {tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__}"
        )
    attributions = expand_attributions(attributions, inputs)
    return infidelity(
        forward_func,
        perturb_func if perturb_func is not None else gaussian_perturbation(noise_std),
        inputs,
        attributions,
        additional_forward_args=additional_forward_args,
        target=target,
        n_perturb_samples=n_perturb_samples,
        max_examples_per_batch=max_examples_per_batch,
        normalize=normalize,
    )


def sensitivity_score(
    explanation_func: Callable[..., Tensor],
    inputs: Tensor,
    target: Any = None,
    *,
    perturb_radius: float = 0.02,
    n_perturb_samples: int = 10,
    max_examples_per_batch: int | None = None,
    **explanation_kwargs: Any,
) -> Tensor:
    """Max-sensitivity of an explanation (Yeh et al. 2019) via Captum.

    ``max_δ ||Φ(x + δ) − Φ(x)|| / ||Φ(x)||`` (Frobenius norms) over
    ``n_perturb_samples`` draws of δ uniform in the L∞ ball of radius
    ``perturb_radius`` (Captum's default perturbation). Lower is better.

    Args:
        explanation_func: E.g. ``ITSMAttribution(sim).attribute``; called as
            ``explanation_func(inputs, target=target, **explanation_kwargs)``.
        inputs: ``(N, C, H, W)`` inputs.
        target: Captum target, repeated for the perturbed copies by Captum.
        perturb_radius: L∞ radius of the perturbations, input units.
        n_perturb_samples: Perturbations per example.
        max_examples_per_batch: Limit on perturbed examples per call.
        **explanation_kwargs: Further keyword arguments of ``explanation_func``.

    Returns:
        ``(N,)`` max-sensitivity per example.

    Examples:
        >>> from captum.attr import Saliency
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
        >>> x = torch.randn(2, 3, 4, 4)
        >>> sensitivity_score(Saliency(net).attribute, x, 0).tolist()  # constant gradient
        [0.0, 0.0]
    """
    if not isinstance(inputs, Tensor) or inputs.dim() != 4:
        raise ValueError(
            f"inputs: expected a tensor of shape (N, C, H, W), "
            f"got {tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__}"
        )
    if not perturb_radius > 0:
        raise ValueError(f"perturb_radius: expected a positive value, got {perturb_radius!r}")
    return sensitivity_max(
        explanation_func,
        inputs,
        perturb_radius=perturb_radius,
        n_perturb_samples=n_perturb_samples,
        max_examples_per_batch=max_examples_per_batch,
        target=target,
        **explanation_kwargs,
    )


# --------------------------------------------------------------------------- removal metrics
FILL_IMAGES = ("random", "black", "blur")
"""What removed pixels become (:func:`fill_image`): uniform random colours, black, or RISE's blurred image."""

FILLS = ("protocol", *FILL_IMAGES)
"""The fill options of the evaluation; ``"protocol"`` is Grad-ECLIP's pair, :data:`PROTOCOL_FILLS`."""

PROTOCOL_FILLS = {"deletion": "random", "insertion": "black"}
"""Grad-ECLIP's fills: deleted pixels get random colours, insertion starts from a black image."""

ROAD_PERCENTAGES = tuple(round(0.1 * k, 1) for k in range(1, 10))
"""ROAD's fixed shares of the pixels removed: 10 %, 20 %, ..., 90 %."""

ROAD_ORDERS = ("morf", "lerf")
"""Most relevant first, least relevant first."""

# Noisy linear imputation's neighbour weights (Rong et al. 2022): 1/6 for the 4 edge neighbours, 1/12 for the
# 4 corner neighbours; symmetric, so the system is symmetric positive definite when a pixel is kept.
_ROAD_WEIGHTS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))
_RISE_BLUR = (11, 5.0)  # RISE's blur kernel: side and σ, pixels


class PerturbationCurve(NamedTuple):
    """A deletion or insertion curve of N images.

    Attributes:
        fractions: ``(S + 1,)`` share of the pixels changed at each scored step, from 0.
        scores: ``(N, S + 1)`` the target's score at each step.
        auc: ``(N,)`` the area under each curve over ``fractions`` (trapezoid rule).
    """

    fractions: Tensor
    scores: Tensor
    auc: Tensor


class ConfidenceChange(NamedTuple):
    """The target's score before and after multiplying each image by its map.

    Attributes:
        original: ``(N,)`` Y, the score of the image.
        masked: ``(N,)`` O, the score of the image times the map.
        drop: ``(N,)`` ``100 · max(0, Y − O) / Y``, in percent; NaN where Y ≤ 0 (a share of a
            non-positive score is not defined).
        increase: ``(N,)`` whether O > Y.
    """

    original: Tensor
    masked: Tensor
    drop: Tensor
    increase: Tensor


def _check_images(inputs: Any) -> Tensor:
    if not isinstance(inputs, Tensor) or inputs.dim() != 4 or not inputs.is_floating_point():
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"inputs: expected a floating-point tensor of shape (N, C, H, W), got {shape}")
    if not torch.isfinite(inputs).all():
        raise ValueError("inputs: expected finite values, got NaN or infinity")
    return inputs


def _pixel_map(attributions: Any, inputs: Tensor) -> Tensor:
    """One map per image at the inputs' size, (N, 1, H, W) in at least float32 (upsampled bilinearly)."""
    if not isinstance(attributions, Tensor) or attributions.dim() != 4 or attributions.shape[:2] != (len(inputs), 1):
        shape = tuple(attributions.shape) if isinstance(attributions, Tensor) else type(attributions).__name__
        raise ValueError(f"attributions: expected one map per image, shape ({len(inputs)}, 1, h, w), got {shape}")
    with full_precision(attributions.device):
        maps = upcast(attributions.detach().to(inputs.device))
        if not torch.isfinite(maps).all():
            raise ValueError("attributions: expected finite values, got NaN or infinity")
        if maps.shape[-2:] != inputs.shape[-2:]:
            maps = F.interpolate(maps, size=tuple(inputs.shape[-2:]), mode="bilinear", align_corners=False)
    return maps


def _pixel_ranks(maps: Tensor) -> Tensor:
    """(N, H·W) rank of each pixel in decreasing attribution (0 = the highest), ties in raster order."""
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def _substrate(fill: Tensor | float, inputs: Tensor, name: str) -> Tensor:
    """``fill`` (a number or a tensor that broadcasts to the inputs) as a tensor of the inputs' shape."""
    if isinstance(fill, bool) or not isinstance(fill, (Tensor, int, float)):
        raise TypeError(f"{name}: expected a number or a tensor broadcastable to the inputs, got {type(fill).__name__}")
    if not isinstance(fill, Tensor):
        return torch.full_like(inputs, float(fill))
    try:
        fill = torch.broadcast_to(fill.to(inputs.device, inputs.dtype), inputs.shape)
    except RuntimeError as error:
        raise ValueError(
            f"{name}: expected a tensor broadcastable to the inputs' shape {tuple(inputs.shape)}, "
            f"got {tuple(fill.shape)}"
        ) from error
    if not torch.isfinite(fill).all():
        raise ValueError(f"{name}: expected finite values, got NaN or infinity")
    return fill


def _target_scores(
    forward_func: Callable[[Tensor], Tensor],
    build: Callable[[int, int], Tensor],
    rows: int,
    target: Any,
    num_examples: int,
    max_examples_per_batch: int | None,
) -> Tensor:
    """(N, R) target scores of ``rows`` = N·R perturbed images, example-major; ``build(start, stop)`` makes the
    images of rows ``start:stop``, scored ``max_examples_per_batch`` at a time (all at once for ``None``)."""
    if max_examples_per_batch is not None and (
        isinstance(max_examples_per_batch, bool)
        or not isinstance(max_examples_per_batch, int)
        or max_examples_per_batch < 1
    ):
        raise ValueError(f"max_examples_per_batch: expected a positive int or None, got {max_examples_per_batch!r}")
    repeats, chunk = rows // num_examples, max_examples_per_batch or rows
    index, scores = None, []
    with torch.no_grad():
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            out = forward_func(build(start, stop))
            if not isinstance(out, Tensor) or out.dim() not in (1, 2) or out.shape[0] != stop - start:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"forward_func: expected (B, K) or (B,) scores of B = {stop - start} images, got {shape}"
                )
            if out.dim() == 2:
                if index is None:
                    index = target_indices(target, num_examples, out.shape[1])
                    if index is None:
                        raise ValueError("target: expected a prompt index per image (the scores are (N, K)), got None")
                    index = index.to(out.device).repeat_interleave(repeats)
                out = out[torch.arange(stop - start, device=out.device), index[start:stop]]
            elif target is not None:
                raise ValueError(
                    f"target: expected None (the forward function gives one score per image), got {target!r}"
                )
            scores.append(upcast(out))
    return torch.cat(scores).reshape(num_examples, repeats)


def fill_image(
    inputs: Tensor,
    kind: str,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """What removed pixels become, in the model's normalised input space.

    ``"random"``: every pixel and channel uniform in [0, 1] (Grad-ECLIP's random RGB deletion);
    ``"black"``: the black image (Grad-ECLIP's insertion start); ``"blur"``: RISE's blurred image, the
    inputs convolved per channel with an 11 × 11 Gaussian of σ = 5 px (as RISE builds it: scipy's
    ``gaussian_filter`` of a centred delta, so the kernel's tails are folded back at its border)
    with zero padding of the normalised image (docs/methods.md §5.1).

    Args:
        inputs: ``(N, C, H, W)`` normalised images.
        kind: One of :data:`FILL_IMAGES`.
        image_mean: The model's per-channel mean (``sim.adapter.image_mean``).
        image_std: The model's per-channel standard deviation.
        generator: A CPU generator for ``"random"`` (the draw is made on the CPU, so it does not depend
            on the device).

    Returns:
        ``(N, C, H, W)`` in the inputs' dtype and device.

    Examples:
        >>> black = fill_image(torch.zeros(1, 3, 4, 4), "black", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        >>> black.unique().tolist()
        [-2.0]
    """
    _check_images(inputs)
    if kind not in FILL_IMAGES:
        raise ValueError(f"kind: expected one of {FILL_IMAGES}, got {kind!r}")
    channels = inputs.shape[1]
    mean, std = (torch.as_tensor(value, dtype=torch.float64).flatten() for value in (image_mean, image_std))
    if len(mean) != channels or len(std) != channels or not (std > 0).all():
        raise ValueError(
            f"image_mean, image_std: expected {channels} values each, the std positive, "
            f"got {image_mean!r}, {image_std!r}"
        )
    mean, std = mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)
    if kind == "random":
        pixels = torch.rand(inputs.shape, generator=generator, dtype=torch.float64)
        return ((pixels - mean) / std).to(inputs.device, inputs.dtype)
    if kind == "black":
        return ((-mean / std).expand(inputs.shape)).to(inputs.device, inputs.dtype)
    size, sigma = _RISE_BLUR
    kernel = _rise_kernel(size, sigma).to(inputs.device).expand(channels, 1, size, size)
    blurred = F.conv2d(inputs.detach().to(torch.float64), kernel, padding=size // 2, groups=channels)
    return blurred.to(inputs.dtype)


def _rise_kernel(size: int, sigma: float) -> Tensor:
    """(size, size) float64: scipy's ``gaussian_filter(delta, sigma)`` of a centred delta, without scipy.

    scipy correlates with 1-D Gaussian weights on [−r, r], r = ⌊4σ + 0.5⌋, normalised to sum 1, along each
    axis, and reflects the signal at the array's border (``d c b a | a b c d | d c b a``): a weight whose
    offset lands outside the kernel is added to the mirrored position.
    """
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1)
    weights = torch.exp(-0.5 * (offsets.to(torch.float64) / sigma) ** 2)
    weights = weights / weights.sum()
    line = torch.zeros(size, dtype=torch.float64)
    for position in range(size):
        source = (position + offsets) % (2 * size)
        source = torch.where(source >= size, 2 * size - 1 - source, source)
        line[position] = weights[source == size // 2].sum()
    return torch.outer(line, line)


def trapezoid_auc(fractions: Tensor, scores: Tensor) -> Tensor:
    """Area under curves by the trapezoid rule: ``Σ_k (f_{k+1} − f_k) · (s_k + s_{k+1}) / 2``.

    Args:
        fractions: ``(S + 1,)`` non-decreasing x values (the share of pixels changed).
        scores: ``(..., S + 1)`` y values.

    Returns:
        ``(...)`` areas, in score × fraction units.

    Examples:
        >>> trapezoid_auc(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1.0, 0.5, 0.0])).item()
        0.5
    """
    if fractions.dim() != 1 or len(fractions) < 2 or scores.shape[-1] != len(fractions):
        raise ValueError(
            f"fractions, scores: expected (S + 1,) fractions, S ≥ 1, and (..., S + 1) scores, "
            f"got {tuple(fractions.shape)} and {tuple(scores.shape)}"
        )
    if (fractions.diff() < 0).any():
        raise ValueError(f"fractions: expected non-decreasing values, got {fractions.tolist()}")
    return torch.trapezoid(scores, fractions.to(scores), dim=-1)


def _step_counts(pixels: int, steps: int, score_every: int, fraction: float) -> list[int]:
    """Pixels changed at each scored step: ``min(H·W, t · max(1, ⌊fraction · H·W / steps⌋))``,
    t = 0, c, 2c, ..., steps (c = ``score_every``)."""
    for name, value in (("steps", steps), ("score_every", score_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if steps % score_every:
        raise ValueError(f"score_every: expected a divisor of steps ({steps}), got {score_every}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: expected a share of the pixels in (0, 1], got {fraction!r}")
    per_step = max(1, int(fraction * pixels / steps))
    return [min(pixels, t * per_step) for t in range(0, steps + 1, score_every)]


def _curve(
    forward_func: Callable[[Tensor], Tensor],
    inputs: Tensor,
    attributions: Tensor,
    target: Any,
    fill: Tensor | float,
    steps: int,
    score_every: int,
    fraction: float,
    max_examples_per_batch: int | None,
    insert: bool,
) -> PerturbationCurve:
    """The deletion (``insert=False``) or insertion curve; see :func:`deletion_curve`."""
    _check_images(inputs)
    ranks = _pixel_ranks(_pixel_map(attributions, inputs))
    substrate = _substrate(fill, inputs, "fill")
    n, _, h, w = inputs.shape
    counts = torch.tensor(_step_counts(h * w, steps, score_every, fraction), device=inputs.device)
    points = len(counts)

    def build(start: int, stop: int) -> Tensor:
        rows = torch.arange(start, stop, device=inputs.device)
        image, point = rows // points, rows % points
        changed = (ranks[image] < counts[point, None]).reshape(-1, 1, h, w)
        first, then = (substrate, inputs) if insert else (inputs, substrate)
        return torch.where(changed, then[image], first[image])

    scores = _target_scores(forward_func, build, n * points, target, n, max_examples_per_batch)
    fractions = counts.to(torch.float64) / (h * w)
    return PerturbationCurve(fractions, scores, trapezoid_auc(fractions, scores))


def deletion_curve(
    forward_func: Callable[[Tensor], Tensor],
    inputs: Tensor,
    attributions: Tensor,
    target: Any = None,
    *,
    fill: Tensor | float,
    steps: int = 100,
    score_every: int = 10,
    fraction: float = 0.5,
    max_examples_per_batch: int | None = None,
) -> PerturbationCurve:
    """Deletion curve (Petsiuk et al. 2018) with Grad-ECLIP's steps: pixels replaced by ``fill`` in
    order of decreasing attribution, the target's score read as they go (lower area is better).

    Step ``t`` = 1, ..., ``steps`` replaces the next ``p = max(1, ⌊fraction · H·W / steps⌋)``
    pixels (all channels), so ``steps`` steps replace ``fraction`` of the image (more on images of fewer
    than ``steps / fraction`` pixels, at one pixel a step); the score is read on
    the unchanged image and after every ``score_every``-th step. Grad-ECLIP's evaluation: 100 steps
    over half the image, scored every 10 (docs/methods.md §5.1). RISE's own protocol is
    ``fraction=1`` with 224-pixel steps.

    Args:
        forward_func: Maps ``(B, C, H, W)`` images to ``(B, K)`` scores (e.g. the probabilities of a
            ``CLIPSimilarity``) or ``(B,)`` scores.
        inputs: ``(N, C, H, W)`` images the attributions explain.
        attributions: ``(N, 1, h, w)`` maps (upsampled bilinearly to the inputs when smaller).
        target: Captum target: an int, or one prompt index per image; ``None`` for ``(B,)`` scores.
        fill: What removed pixels become: a tensor broadcastable to the inputs (see :func:`fill_image`)
            or a number.
        steps: Removal steps (Grad-ECLIP's L).
        score_every: Steps between two scores (a divisor of ``steps``).
        fraction: Share of the pixels that the ``steps`` steps replace, in (0, 1].
        max_examples_per_batch: Perturbed images per forward pass (``None``: all at once).

    Returns:
        A :class:`PerturbationCurve`: ``steps / score_every + 1`` points.

    Examples:
        >>> score = lambda x: x.flatten(1).sum(1)  # the sum of the pixels
        >>> x, attr = torch.ones(1, 1, 2, 2), torch.tensor([[[[4.0, 3.0], [2.0, 1.0]]]])
        >>> curve = deletion_curve(score, x, attr, fill=0.0, steps=4, score_every=1, fraction=1.0)
        >>> curve.scores.tolist(), curve.auc.tolist()
        ([[4.0, 3.0, 2.0, 1.0, 0.0]], [2.0])
    """
    return _curve(
        forward_func, inputs, attributions, target, fill, steps, score_every, fraction, max_examples_per_batch, False
    )


def insertion_curve(
    forward_func: Callable[[Tensor], Tensor],
    inputs: Tensor,
    attributions: Tensor,
    target: Any = None,
    *,
    fill: Tensor | float,
    steps: int = 100,
    score_every: int = 10,
    fraction: float = 0.5,
    max_examples_per_batch: int | None = None,
) -> PerturbationCurve:
    """Insertion curve (Petsiuk et al. 2018) with Grad-ECLIP's steps: starting from ``fill``, the
    image's pixels are put back in order of decreasing attribution (higher area is better).

    The steps are :func:`deletion_curve`'s; the first score is the fill image's. Grad-ECLIP inserts
    into a black image, RISE into a blurred one (:func:`fill_image`).

    Args:
        forward_func: Maps ``(B, C, H, W)`` images to ``(B, K)`` or ``(B,)`` scores.
        inputs: ``(N, C, H, W)`` images the attributions explain.
        attributions: ``(N, 1, h, w)`` maps (upsampled bilinearly to the inputs when smaller).
        target: Captum target: an int, or one prompt index per image; ``None`` for ``(B,)`` scores.
        fill: The start image: a tensor broadcastable to the inputs or a number.
        steps: Insertion steps (Grad-ECLIP's L).
        score_every: Steps between two scores (a divisor of ``steps``).
        fraction: Share of the pixels that the ``steps`` steps put back, in (0, 1].
        max_examples_per_batch: Perturbed images per forward pass (``None``: all at once).

    Returns:
        A :class:`PerturbationCurve`: ``steps / score_every + 1`` points.

    Examples:
        >>> score = lambda x: x.flatten(1).sum(1)
        >>> x, attr = torch.ones(1, 1, 2, 2), torch.tensor([[[[4.0, 3.0], [2.0, 1.0]]]])
        >>> insertion_curve(score, x, attr, fill=0.0, steps=4, score_every=2, fraction=1.0).scores.tolist()
        [[0.0, 2.0, 4.0]]
    """
    return _curve(
        forward_func, inputs, attributions, target, fill, steps, score_every, fraction, max_examples_per_batch, True
    )


def confidence_change(
    forward_func: Callable[[Tensor], Tensor],
    inputs: Tensor,
    attributions: Tensor,
    target: Any = None,
    *,
    baseline: Tensor | float = 0.0,
    max_examples_per_batch: int | None = None,
) -> ConfidenceChange:
    """Average Drop and Increase in Confidence (Chattopadhyay et al. 2018, Grad-CAM++), as M2IB reports them.

    Each map is upsampled to its image and min-max normalised to ``m`` in [0, 1]; the image is
    multiplied by it, ``x̃ = b + m · (x − b)``. With the default ``b = 0`` in the normalised input
    space this is M2IB's evaluation (pytorch-grad-cam's ``input_tensor * cam``: removed pixels go to
    the dataset mean); Grad-CAM++ multiplies the RGB image (``b`` = the black image of
    :func:`fill_image`). Y = score of ``x``, O = score of ``x̃``; over images, Average Drop % =
    mean(``drop``) and % Increase = 100 · mean(``increase``) (docs/methods.md §5.1).

    Args:
        forward_func: Maps ``(B, C, H, W)`` images to ``(B, K)`` or ``(B,)`` scores.
        inputs: ``(N, C, H, W)`` images the attributions explain.
        attributions: ``(N, 1, h, w)`` maps.
        target: Captum target: an int, or one prompt index per image; ``None`` for ``(B,)`` scores.
        baseline: What a zero of the map leaves: a number or a tensor broadcastable to the inputs.
        max_examples_per_batch: Images per forward pass (``None``: all at once).

    Returns:
        A :class:`ConfidenceChange` of ``(N,)`` tensors.

    Examples:
        >>> score = lambda x: x.flatten(1).sum(1)
        >>> x, attr = torch.ones(1, 1, 1, 2), torch.tensor([[[[1.0, 0.0]]]])  # keeps the first pixel
        >>> change = confidence_change(score, x, attr)
        >>> change.original.tolist(), change.masked.tolist(), change.drop.tolist(), change.increase.tolist()
        ([2.0], [1.0], [50.0], [False])
    """
    _check_images(inputs)
    maps = _pixel_map(attributions, inputs)
    with full_precision(maps.device):
        weights = minmax_normalize(maps).to(inputs.dtype)
    base = _substrate(baseline, inputs, "baseline")
    pair = torch.stack([inputs, base + weights * (inputs - base)], dim=1).flatten(0, 1)
    scores = _target_scores(
        forward_func, lambda start, stop: pair[start:stop], len(pair), target, len(inputs), max_examples_per_batch
    )
    original, masked = scores[:, 0], scores[:, 1]
    drop = torch.where(original > 0, 100.0 * (original - masked).clamp_min(0) / original, math.nan)
    return ConfidenceChange(original, masked, drop, masked > original)


def noisy_linear_imputation(
    inputs: Tensor,
    removed: Tensor,
    *,
    noise_std: float | Sequence[float] = 0.0,
    generator: torch.Generator | None = None,
    tolerance: float = 1e-8,
    max_iterations: int = 10_000,
) -> Tensor:
    """ROAD's noisy linear imputation (Rong et al. 2022): each removed pixel becomes the weighted mean
    of its neighbours, plus noise.

    For every image and channel the removed values ``u`` solve ``S_i u_i = Σ_j w_ij v_j`` over the
    8 neighbours ``j`` of each removed pixel ``i`` inside the image (``w`` = 1/6 for the edge
    neighbours, 1/12 for the corner ones, ``S_i`` their sum; ``v_j`` the kept value or the unknown
    ``u_j``), a sparse symmetric positive definite system, solved in float64 by conjugate gradients
    to a relative residual of ``tolerance``. Then ``N(0, noise_std²)`` noise is added to the removed
    pixels (ROAD: 0.01 of the [0, 1] pixel range, ``0.01 / std`` per channel in normalised units).
    The system is linear and its weights sum to ``S_i``, so imputing the normalised image equals
    imputing the pixels and normalising (docs/methods.md §5.1).

    Args:
        inputs: ``(N, C, H, W)`` images.
        removed: ``(N, 1, H, W)`` or ``(N, H, W)`` boolean mask of the pixels to impute; every image
            must keep at least one pixel.
        noise_std: Standard deviation of the noise, one value or one per channel.
        generator: A CPU generator for the noise.
        tolerance: Relative residual ``‖b − A u‖ / ‖b‖`` at which the solver stops.
        max_iterations: Conjugate-gradient iterations before giving up.

    Returns:
        ``(N, C, H, W)`` in the inputs' dtype: the kept pixels unchanged, the removed ones imputed.

    Raises:
        ValueError: If ``removed`` is not a boolean mask of the images, or removes every pixel of an image.
        RuntimeError: If the solver has not converged after ``max_iterations``.

    Examples:
        >>> ramp = torch.arange(5.0).repeat(5, 1)[None, None]  # 0, 1, 2, 3, 4 along each row
        >>> hole = torch.zeros(1, 5, 5, dtype=torch.bool)
        >>> hole[0, 1:4, 1:4] = True
        >>> torch.allclose(noisy_linear_imputation(ramp, hole), ramp)  # a linear image is kept
        True
    """
    _check_images(inputs)
    if isinstance(removed, Tensor) and removed.dim() == 3:
        removed = removed[:, None]
    n, channels, h, w = inputs.shape
    if not isinstance(removed, Tensor) or removed.dtype != torch.bool or removed.shape != (n, 1, h, w):
        got = f"{removed.dtype} {tuple(removed.shape)}" if isinstance(removed, Tensor) else type(removed).__name__
        raise ValueError(f"removed: expected a boolean mask of shape ({n}, 1, {h}, {w}) or ({n}, {h}, {w}), got {got}")
    if removed.flatten(1).all(dim=1).any():
        raise ValueError("removed: expected at least one kept pixel per image (the system needs one), got none kept")
    _check_solver(tolerance, max_iterations)
    removed = removed.to(inputs.device)
    x = inputs.detach().to(torch.float64)
    mask = removed.to(torch.float64).expand_as(x)
    kernel = torch.tensor(_ROAD_WEIGHTS, dtype=torch.float64, device=x.device).expand(channels, 1, 3, 3)

    def neighbours(values: Tensor) -> Tensor:  # Σ_j w_ij values_j over the neighbours inside the image
        return F.conv2d(values, kernel, padding=1, groups=channels)

    weight_sums = neighbours(torch.ones_like(x))
    rhs = neighbours(x * (1 - mask)) * mask

    def system(direction: Tensor) -> Tensor:  # A · direction, on the removed pixels
        return (weight_sums * direction - neighbours(direction)) * mask

    solution = _conjugate_gradients(system, rhs, tolerance, max_iterations)
    std = torch.as_tensor(noise_std, dtype=torch.float64).flatten()
    if len(std) not in (1, channels) or (std < 0).any():
        raise ValueError(f"noise_std: expected one or {channels} non-negative values, got {noise_std!r}")
    if (std > 0).any():
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float64) * std.reshape(1, -1, 1, 1)
        solution = solution + noise.to(x.device)
    return torch.where(removed, solution, x).to(inputs.dtype)


def _check_solver(tolerance: float, max_iterations: int) -> None:
    bad_count = isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1
    if not tolerance > 0 or bad_count:
        raise ValueError(
            f"tolerance, max_iterations: expected a positive value and int, got {tolerance!r}, {max_iterations!r}"
        )


def _conjugate_gradients(
    system: Callable[[Tensor], Tensor], rhs: Tensor, tolerance: float, max_iterations: int
) -> Tensor:
    """Solve ``system(u) = rhs`` (symmetric positive semi-definite, one system per image and channel of the
    (N, C, H, W) ``rhs``) by conjugate gradients, to a relative residual of ``tolerance``."""

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum(dim=(2, 3), keepdim=True)

    solution, residual = torch.zeros_like(rhs), rhs.clone()
    direction, residual_norm = residual.clone(), dot(residual, residual)
    bound = tolerance**2 * dot(rhs, rhs)
    for iteration in range(max_iterations + 1):
        if bool((residual_norm <= bound).all()):
            break
        if iteration == max_iterations:
            raise RuntimeError(f"noisy_linear_imputation: no convergence to {tolerance} in {max_iterations} iterations")
        product = system(direction)
        curvature = dot(direction, product)
        step = torch.where(curvature > 0, residual_norm / curvature, 0.0)
        solution = solution + step * direction
        residual = residual - step * product
        new_norm = dot(residual, residual)
        direction = residual + torch.where(residual_norm > 0, new_norm / residual_norm, 0.0) * direction
        residual_norm = new_norm
    return solution


def road_scores(
    forward_func: Callable[[Tensor], Tensor],
    inputs: Tensor,
    attributions: Tensor,
    target: Any = None,
    *,
    order: str = "morf",
    percentages: Sequence[float] = ROAD_PERCENTAGES,
    noise_std: float | Sequence[float] = 0.0,
    generator: torch.Generator | None = None,
    max_examples_per_batch: int | None = None,
) -> Tensor:
    """ROAD (Rong et al. 2022, *A Consistent and Efficient Evaluation Strategy for Attribution Methods*):
    the target's score after removing a fixed share of the pixels by :func:`noisy_linear_imputation`.

    For each share ``p``, the ``⌊p · H·W⌋`` pixels of highest attribution (``"morf"``, most relevant
    first: lower is better) or of lowest attribution (``"lerf"``, least relevant first: higher is
    better) are imputed; no retraining (docs/methods.md §5.1).

    Args:
        forward_func: Maps ``(B, C, H, W)`` images to ``(B, K)`` or ``(B,)`` scores.
        inputs: ``(N, C, H, W)`` images the attributions explain.
        attributions: ``(N, 1, h, w)`` maps.
        target: Captum target: an int, or one prompt index per image; ``None`` for ``(B,)`` scores.
        order: ``"morf"`` or ``"lerf"``.
        percentages: Shares of the pixels removed, each in (0, 1) (default 0.1, ..., 0.9).
        noise_std: The imputation noise (see :func:`noisy_linear_imputation`).
        generator: A CPU generator for the noise.
        max_examples_per_batch: Imputed images per imputation and forward pass (``None``: all at once).

    Returns:
        ``(N, P)`` scores, one per share.

    Examples:
        >>> score = lambda x: x.flatten(1).sum(1)
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)  # linear: imputation gives it back inside
        >>> attr = torch.zeros(1, 1, 4, 4)
        >>> attr[0, 0, 1:3, 1:3] = 1.0  # the 4 central pixels first
        >>> road_scores(score, x, attr, percentages=[0.25]).tolist()
        [[120.0]]
    """
    _check_images(inputs)
    if order not in ROAD_ORDERS:
        raise ValueError(f"order: expected one of {ROAD_ORDERS}, got {order!r}")
    shares = list(percentages)
    if not shares or any(isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1 for p in shares):
        raise ValueError(f"percentages: expected shares in (0, 1), got {percentages!r}")
    ranks = _pixel_ranks(_pixel_map(attributions, inputs))
    n, _, h, w = inputs.shape
    counts = torch.tensor([int(h * w * p) for p in shares], device=inputs.device)

    def build(start: int, stop: int) -> Tensor:
        rows = torch.arange(start, stop, device=inputs.device)
        image, share = rows // len(shares), rows % len(shares)
        limit = counts[share, None]
        removed = ranks[image] < limit if order == "morf" else ranks[image] >= h * w - limit
        return noisy_linear_imputation(
            inputs[image], removed.reshape(-1, 1, h, w), noise_std=noise_std, generator=generator
        )

    return _target_scores(forward_func, build, n * len(shares), target, n, max_examples_per_batch)
