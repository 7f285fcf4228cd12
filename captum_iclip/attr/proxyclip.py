"""ProxyCLIP: the last block's attention replaced by a vision foundation model's patch affinity."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from captum._utils.typing import TargetType
from captum.log import log_usage
from torch import Tensor, nn

from captum_iclip._precision import full_precision, upcast
from captum_iclip.attr._utils import Normalize, select_targets
from captum_iclip.attr.base import CLIPMapAttribution
from captum_iclip.models.attention import PROXY_BETA, PROXY_GAMMA, proxy_affinity, proxy_path
from captum_iclip.similarity import CLIPSimilarity


class ProxyCLIPAttribution(CLIPMapAttribution):
    r"""ProxyCLIP (Lan et al., ECCV 2024, "ProxyCLIP: Proxy Attention Improves CLIP for
    Open-Vocabulary Segmentation", arXiv 2408.04883).

    The last block of the CLIP ViT attends with the *proxy attention* of a vision
    foundation model (a DINO backbone) instead of its own: with :math:`f_i` the proxy's
    L2-normalised patch features, :math:`c_{ij} = f_i \cdot f_j` and :math:`\bar c` their
    mean over the image, the weights are
    :math:`A_i = \mathrm{softmax}_j\, \gamma (c_{ij} - \beta \bar c)` over the pairs where that is
    non-negative (the others get none). They mix the last block's value embeddings, resampled
    bilinearly from CLIP's patch grid to the proxy's, the same for every head; the block's
    output projection follows, without the residual and the MLP (docs/methods.md §7). The map
    of a prompt is the cosine similarity of each patch's projected feature with the prompt, like
    ITSM, on the *proxy's* patch grid. One forward pass of each model serves every prompt; no
    gradients. ViT towers run by the shared block loop only.

    The proxy sees the CLIP input as it is, converted to its own normalisation (the reference
    feeds its DINO proxies the CLIP crop), resized only where its patch size does not divide it.
    Where the threshold :math:`\beta \bar c` exceeds 1, a patch's affinity to itself (an image whose
    patches are all alike), the reference's weights are NaN; here the threshold is lowered to it, each
    patch attending to itself, and the image is counted in :attr:`num_lowered_thresholds`.

    Built on :class:`~captum_iclip.attr.base.CLIPMapAttribution` (Captum's target semantics,
    min-max normalisation, bilinear upsampling); it reads the recognition projection, the one
    its paper defines the method on.

    Attributes:
        num_lowered_thresholds (int): images whose threshold was lowered (see above), since construction.

    Args:
        forward_func: a :class:`~captum_iclip.CLIPSimilarity`; ``target=k`` is prompt k.
        proxy: the proxy model: a :class:`~captum_iclip.masks.DINOMaskProvider` (its DINO model and
            its conversion from the CLIP normalisation: e.g. ``captum_iclip.mask_source(...)``, a
            bundled model's ``mask_provider``), a :class:`~captum_iclip.masks.CachedMaskProvider`
            around one, or a DINO backbone module (timm ``VisionTransformer`` / ``Eva``, Hugging Face
            ``ViTModel`` / ``Dinov2Model`` / ``Dinov2WithRegistersModel`` / ``DINOv3ViTModel``; e.g.
            :func:`~captum_iclip.models.tiny_dino.load_tiny_dino`), whose inputs are then converted from
            the CLIP model's normalisation.

    Examples::

        >>> import captum_iclip
        >>> loaded = captum_iclip.load("shapes-tiny")
        >>> sim = captum_iclip.CLIPSimilarity(loaded.model, loaded.tokenizer, ["a circle", "a star"])
        >>> proxyclip = captum_iclip.ProxyCLIPAttribution(sim, loaded.mask_provider)
        >>> proxyclip.attribute(torch.randn(2, 3, 96, 96)).shape
        torch.Size([2, 2, 96, 96])
    """

    def __init__(self, forward_func: CLIPSimilarity, proxy: nn.Module) -> None:
        super().__init__(forward_func)
        # masks imports timm: only here, when a proxy is given.
        from captum_iclip.masks import DINOMaskProvider, MaskProvider, dino_provider
        from captum_iclip.masks.attention import dino_patch_size

        provider = dino_provider(proxy)
        if provider is None:
            if isinstance(proxy, MaskProvider) or not isinstance(proxy, nn.Module):
                raise TypeError(
                    "proxy: expected a DINOMaskProvider (e.g. captum_iclip.mask_source(name)), a CachedMaskProvider "
                    f"around one or a DINO backbone module, got {type(proxy).__name__}"
                )
            try:
                dino_patch_size(proxy)
            except TypeError:
                raise TypeError(
                    "proxy: expected a DINO backbone (a timm VisionTransformer / Eva or a Hugging Face "
                    f"ViT/DINOv2/DINOv3 model), got {type(proxy).__name__}"
                ) from None
            adapter = self.similarity.adapter
            device = next(proxy.parameters()).device
            provider = DINOMaskProvider(proxy, input_mean=adapter.image_mean, input_std=adapter.image_std).to(device)
        self.proxy = provider
        self.proxy_patch_size = dino_patch_size(provider.model)
        self.num_lowered_thresholds = 0

    def proxy_size(self, height: int, width: int) -> tuple[int, int]:
        """The proxy's input size for a (height, width) input: the nearest multiple of its patch size, ties
        upward (the size itself when the patch size divides it)."""
        return tuple(max(p, p * math.floor(side / p + 0.5)) for side, p in zip((height, width), self.proxy_patch_size))

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        *,
        beta: float = PROXY_BETA,
        gamma: float = PROXY_GAMMA,
        normalize: Normalize = True,
        interpolate: bool = True,
    ) -> Tensor | tuple[Tensor]:
        r"""
        Args:
            inputs: preprocessed images (N, 3, H, W), H and W divisible by the
                patch size; or a 1-tuple of such a tensor.
            target: the prompt(s) to explain, with Captum's semantics: an int, a
                list or 1-d tensor of N ints, or ``None`` for every prompt.
            beta: the affinity threshold, in units of the image's mean affinity (ProxyCLIP's 1.2).
            gamma: the sharpness of the proxy attention (ProxyCLIP's 3.0).
            normalize: ``True`` min-max normalises each (image, prompt) map to [0, 1] on the
                patch grid, ``"reference"`` after upsampling (docs/methods.md §1);
                ``False`` keeps the cosine similarities.
            interpolate: upsample bilinearly to (H, W); ``False`` returns the maps on the
                proxy's patch grid (h', w') (:meth:`proxy_size` over its patch size).

        Returns:
            *Tensor* or *tuple[Tensor]*: (N, 1, H, W) for one target per example,
            (N, K, H, W) for ``target=None``; a tuple if ``inputs`` was a tuple.

        Raises:
            ValueError: a ``beta`` or ``gamma`` that is not a finite number (``beta`` >= 0, ``gamma`` > 0).
            TypeError: a tower the shared block loop does not run (ResNets), naming the method.
        """
        for name, value, zero_allowed in (("beta", beta, True), ("gamma", gamma, False)):
            number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            if not number or value < 0 or (value == 0 and not zero_allowed):
                raise ValueError(f"{name}: expected a finite number {'>=' if zero_allowed else '>'} 0, got {value!r}")
        prepared = self.prepare(inputs, target, "recognition")
        images, sim = prepared.images, self.similarity
        sim.adapter.block_views("ProxyCLIPAttribution")  # a clear error for towers without blocks

        with torch.no_grad(), sim.evaluating():
            proxy = self.proxy.patch_features(images, self.proxy_size(*images.shape[-2:]))
            weights, lowered = proxy_affinity(proxy.features.to(images.device), float(beta), float(gamma))
            self.num_lowered_thresholds += int(lowered.sum())
            features = sim.adapter.dense_features(images, path=proxy_path(weights, proxy.grid))
            with full_precision(features.device):  # half-precision rules: the similarities in >= float32
                features = F.normalize(upcast(features[:, 1:]), dim=-1)
                scores = features @ upcast(sim.text_features).to(features.dtype).t()
            scores = select_targets(scores.transpose(1, 2), prepared.index)
            on_proxy_grid = prepared._replace(grid=proxy.grid)
            return self.output(scores, on_proxy_grid, normalize=normalize, interpolate=interpolate, upsample="bilinear")
