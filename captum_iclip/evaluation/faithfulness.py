"""Faithfulness of image attributions: Captum's infidelity and max-sensitivity.

Thin wrappers around :func:`captum.metrics.infidelity` and
:func:`captum.metrics.sensitivity_max` for a single image tensor input
``(N, C, H, W)``, with documented perturbations:

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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from captum.metrics import infidelity, sensitivity_max
from torch import Tensor

__all__ = [
    "expand_attributions",
    "gaussian_perturbation",
    "infidelity_score",
    "patch_perturbation",
    "sensitivity_score",
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
