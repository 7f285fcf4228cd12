"""The explanation methods compared by ``demo``, ``eval`` and ``audit``, by name.

Each method maps a batch of images (a tensor, or Captum's 1-tuple of one) and
one prompt index per image to maps (N, 1, H, W), returned in the same form;
higher means "more of this prompt here". They all explain the
same :class:`~captum_iclip.CLIPSimilarity`:

* ``raw``: ITSM on the recognition projection (SPEC §1);
* ``surgery``: ITSM with CLIP Surgery (SPEC §2);
* ``iclip``: ITSM on the interpretability projection of a ``DualProjectionCLIP`` (SPEC §4);
* ``mmp``: masked-max-pooling attribution (SPEC §3), DINO masks when a provider is given;
* ``gradcam``: Captum ``LayerGradCam`` on the patch grid, upsampled;
* ``ig``: Captum ``IntegratedGradients`` (black baseline in pixel space), summed over channels;
* ``occlusion``: Captum ``Occlusion`` with patch-sized windows, summed over channels.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

from captum_iclip.attr.itsm import ITSMAttribution
from captum_iclip.attr.mmp import MaskedMaxPoolingAttribution
from captum_iclip.similarity import CLIPSimilarity

METHODS = ("raw", "surgery", "iclip", "mmp", "gradcam", "ig", "occlusion")
Method = Callable[[Tensor, Tensor], Tensor]


def build_method(
    name: str,
    sim: CLIPSimilarity,
    *,
    mask_provider: Any = None,
    ig_steps: int = 16,
    baseline: Optional[Tensor] = None,
) -> Method:
    """Return ``fn(images, target) -> (N, 1, H, W)`` for method ``name`` (Captum's explanation-function form).

    Args:
        name: one of :data:`METHODS`.
        sim: the forward function.
        mask_provider: foreground masks for ``mmp`` (``None``: all patches).
        ig_steps: integration steps of ``ig``.
        baseline: (3,) or (1, 3, H, W) baseline of ``ig`` in the model's input
            space; default the normalised black image.
    """
    method = _build(name, sim, mask_provider=mask_provider, ig_steps=ig_steps, baseline=baseline)

    def run(images, target):
        # Captum's metrics (sensitivity_max) call explanation functions with 1-tuples and target=.
        if isinstance(images, tuple):
            return (method(images[0], target),)
        return method(images, target)

    return run


def _build(name: str, sim: CLIPSimilarity, *, mask_provider: Any, ig_steps: int, baseline: Optional[Tensor]) -> Method:
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion

    has_head = sim.adapter.interpretability_head is not None
    if name == "raw":
        itsm = ITSMAttribution(sim)
        return lambda x, t: itsm.attribute(x, target=t, projection="recognition")
    if name == "surgery":
        itsm = ITSMAttribution(sim)
        return lambda x, t: itsm.attribute(x, target=t, variant="surgery", projection="recognition")
    if name == "iclip":
        if not has_head:
            raise ValueError("method 'iclip' needs a DualProjectionCLIP model (with an interpretability projection)")
        itsm = ITSMAttribution(sim)
        return lambda x, t: itsm.attribute(x, target=t, projection="interpretability")
    if name == "mmp":
        mmp = MaskedMaxPoolingAttribution(sim, mask_provider=mask_provider)
        return lambda x, t: mmp.attribute(x, target=t)
    if name == "gradcam":
        gradcam = LayerGradCam(sim, sim.gradcam_layer())

        def run_gradcam(x: Tensor, t: Tensor) -> Tensor:
            maps = gradcam.attribute(x, target=t, relu_attributions=True)
            return LayerAttribution.interpolate(maps, tuple(x.shape[-2:]), interpolate_mode="bilinear")

        return run_gradcam
    if name == "ig":
        ig = IntegratedGradients(sim)

        def run_ig(x: Tensor, t: Tensor) -> Tensor:
            base = _black(sim) if baseline is None else baseline
            base = base.to(x).expand_as(x) if base.dim() == 4 else base.to(x).reshape(1, 3, 1, 1).expand_as(x)
            return ig.attribute(x, baselines=base, target=t, n_steps=ig_steps).sum(dim=1, keepdim=True)

        return run_ig
    if name == "occlusion":
        occlusion = Occlusion(sim)
        ph, pw = sim.adapter.patch_size

        def run_occlusion(x: Tensor, t: Tensor) -> Tensor:
            with torch.no_grad():
                maps = occlusion.attribute(x, target=t, sliding_window_shapes=(3, ph, pw), strides=(3, ph, pw))
            return maps.sum(dim=1, keepdim=True)

        return run_occlusion
    raise ValueError(f"method: expected one of {METHODS}, got {name!r}")


def _black(sim: CLIPSimilarity) -> Tensor:
    """A black image in the model's normalised input space, as (3,)."""
    mean = torch.as_tensor(sim.adapter.image_mean)
    std = torch.as_tensor(sim.adapter.image_std)
    return -mean / std


def available_methods(sim: CLIPSimilarity) -> Dict[str, bool]:
    """Which methods apply to ``sim`` (``iclip`` needs a dual-projection model)."""
    has_head = sim.adapter.interpretability_head is not None
    return {name: (name != "iclip" or has_head) for name in METHODS}
