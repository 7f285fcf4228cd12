"""ITSM: the Image-Text Similarity Map (Li et al., arXiv 2209.07046; docs/methods.md §1)
and its training-free correction, CLIP Surgery (Li et al., arXiv 2304.05653; docs/methods.md §2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from captum._utils.typing import TargetType
from captum.log import log_usage
from torch import Tensor

from captum_iclip._precision import full_precision, upcast
from captum_iclip.attr._utils import Normalize, select_targets
from captum_iclip.attr.base import CLIPMapAttribution
from captum_iclip.models.attention import PATH_VARIANTS, dense_path

VARIANTS = ("plain", "surgery", *PATH_VARIANTS)
"""``plain``: ITSM as defined by Li et al. (2022); ``surgery``: with CLIP Surgery's corrections;
``maskclip``, ``clearclip``, ``sclip``, ``naclip``: last-block dense paths of ViT towers (docs/methods.md)."""


def feature_surgery(patch_features: Tensor, global_feature: Tensor, text_features: Tensor) -> Tensor:
    r"""CLIP Surgery's feature surgery for K >= 2 prompts (arXiv 2304.05653; docs/methods.md §2).

    With :math:`c_{i,k} = f_i \cdot t_k`, :math:`p_k = \mathrm{softmax}_k(2 f_0 \cdot t_k)`
    and :math:`w_k = p_k / \mathrm{mean}_k p_k`, the paper's
    :math:`s_{i,k} = \sum_d (e_{i,k} - r_i)_d` with :math:`e_{i,k} = (f_i \odot t_k) w_k`,
    :math:`r_i = \mathrm{mean}_k e_{i,k}` reduces exactly to
    :math:`w_k c_{i,k} - \mathrm{mean}_{k'} w_{k'} c_{i,k'}`, because the channel sum of
    :math:`f_i \odot t_k` is :math:`c_{i,k}`. Computing it that way costs O(L·K)
    instead of O(L·K·D) memory, so a thousand prompts are cheap.

    Args:
        patch_features: (N, L, D) normalised patch features :math:`f_i`.
        global_feature: (N, D) normalised global feature :math:`f_0`.
        text_features: (K, D) normalised prompt embeddings.

    Returns:
        (N, L, K) corrected similarities.
    """
    weights = (2 * global_feature @ text_features.t()).softmax(dim=-1)
    weights = weights / weights.mean(dim=-1, keepdim=True)
    weighted = (patch_features @ text_features.t()) * weights[:, None, :]
    return weighted - weighted.mean(dim=-1, keepdim=True)


class ITSMAttribution(CLIPMapAttribution):
    r"""Image-Text Similarity Map (Li et al., 2022, arXiv 2209.07046).

    Every image token is projected into the joint embedding space like the
    global token, and its cosine similarity with the prompt's text embedding is
    the attribution of that patch (docs/methods.md §1). It needs one forward pass of the
    image encoder per batch, whatever the number of prompts, and no gradients.

    ``variant="surgery"`` applies CLIP Surgery (Li et al., 2023, arXiv
    2304.05653) without training: the last ``surgery_depth`` transformer blocks
    gain a value-value attention path that skips the MLP (for ResNets, the
    attention pool uses normalised value-value attention), and *feature surgery*
    removes the component that the prompts share (docs/methods.md §2). With a single
    prompt the empty prompt ``""`` is subtracted instead, which needs the
    tokenizer of the ``CLIPSimilarity``.

    The other training-free dense variants change the last block for the patch
    tokens only (the global token stays the model's image embedding) and score
    them like ``"plain"`` (docs/methods.md): ``"maskclip"`` (Zhou et al., ECCV 2022:
    the value embedding, attention replaced by identity), ``"sclip"`` (Wang et al.,
    2023: correlative self-attention), ``"clearclip"`` (Lan et al., ECCV 2024:
    query-query attention without the residual and the MLP), ``"naclip"``
    (Hajimiri et al., WACV 2025: key-key attention with a Gaussian neighbourhood,
    without the residual and the MLP). They need a ViT tower.

    When the forward function wraps a :class:`~captum_iclip.DualProjectionCLIP`,
    the maps are drawn from its interpretability projection while the scores
    keep the recognition projection (docs/methods.md §4).

    What differs from :class:`~captum_iclip.MaskedMaxPoolingAttribution` (the
    rest is :class:`~captum_iclip.attr.base.CLIPMapAttribution`): the maps are
    min-max normalised by default (an ITSM map is read by its shape, and the
    localization metrics compare normalised maps) and upsampled bilinearly; there
    is no convergence delta, because a similarity map is not a decomposition of
    the score.

    Args:
        forward_func: a :class:`~captum_iclip.CLIPSimilarity`: the same forward
            function that Captum's methods explain, so ``target=k`` names the
            same score for all of them.

    Examples::

        >>> import open_clip, torch
        >>> from captum_iclip import CLIPSimilarity, ITSMAttribution
        >>> model = open_clip.create_model("ViT-B-16").eval()
        >>> sim = CLIPSimilarity(model, open_clip.get_tokenizer("ViT-B-16"), ["a cat", "a dog"])
        >>> itsm = ITSMAttribution(sim)
        >>> images = torch.randn(2, 3, 224, 224)
        >>> itsm.attribute(images, target=0).shape      # one prompt per example
        torch.Size([2, 1, 224, 224])
        >>> itsm.attribute(images, variant="surgery").shape  # every prompt
        torch.Size([2, 2, 224, 224])
    """

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        *,
        variant: str = "plain",
        normalize: Normalize = True,
        interpolate: bool = True,
        surgery_depth: int | None = None,
        projection: str = "auto",
    ) -> Tensor | tuple[Tensor]:
        r"""
        Args:
            inputs: preprocessed images (N, 3, H, W), H and W divisible by the
                patch size (32 for ResNets); or a 1-tuple of such a tensor.
            target: the prompt(s) to explain, with Captum's semantics: an int
                (every example), a list or 1-d tensor of N ints (one per example),
                or ``None`` for every prompt.
            variant: ``"plain"`` (the ITSM of Li et al. 2022, docs/methods.md §1),
                ``"surgery"`` (CLIP Surgery, docs/methods.md §2), or ``"maskclip"``,
                ``"sclip"``, ``"clearclip"``, ``"naclip"`` (ViT towers only; see above
                and docs/methods.md).
            normalize: ``True`` min-max normalises each (image, prompt) map to [0, 1] on
                the patch grid, then upsamples; ``"reference"`` upsamples first and
                normalises over the pixels (the order of GEM's, LeGrad's and Chefer et
                al.'s code, docs/methods.md §1). ``False`` keeps the cosine similarities
                (or surgery scores).
            interpolate: upsample bilinearly to (H, W); ``False`` returns the
                patch grid (h, w).
            surgery_depth: number of final transformer blocks given the
                surgery path (``variant="surgery"`` only). Default: 6, as in
                CLIP Surgery, capped at half the tower's blocks for towers
                shallower than 12.
            projection: ``"auto"`` (the interpretability projection when the
                model has one, else the recognition projection),
                ``"recognition"`` or ``"interpretability"``.

        Returns:
            *Tensor* or *tuple[Tensor]* of attributions (N, 1, H, W) for one target
            per example, (N, K, H, W) for ``target=None``; a tuple if ``inputs``
            was a tuple. Draw one with
            ``captum.attr.visualization.visualize_image_attr(attr[0].permute(1, 2, 0).numpy(), ...)``.
        """
        if variant not in VARIANTS:
            hint = " ('raw' is now 'plain')" if variant == "raw" else ""
            raise ValueError(f"variant: expected one of {VARIANTS}{hint}, got {variant!r}")
        prepared = self.prepare(inputs, target, projection)
        images, sim = prepared.images, self.similarity
        if variant == "surgery":
            if surgery_depth is None:
                blocks = sim.adapter.num_blocks
                surgery_depth = 6 if blocks is None else min(6, blocks // 2)
            sim.adapter.check_surgery_depth(surgery_depth)
        if variant in PATH_VARIANTS:
            sim.adapter.block_views(f"variant={variant!r}")  # a clear error for towers without blocks

        with torch.no_grad(), sim.evaluating():
            scores = self.similarity_maps(
                images, variant=variant, surgery_depth=surgery_depth, projection=prepared.projection
            ).transpose(1, 2)
            scores = select_targets(scores, prepared.index)
            return self.output(scores, prepared, normalize=normalize, interpolate=interpolate, upsample="bilinear")

    def similarity_maps(self, images: Tensor, *, variant: str, surgery_depth: int, projection: str) -> Tensor:
        """Unnormalised (N, h*w, K) patch-prompt scores of ``variant``."""
        sim = self.similarity
        text = sim.text_features
        single_prompt_surgery = variant == "surgery" and text.shape[0] == 1
        if single_prompt_surgery:
            # One prompt: subtract the direction of the empty prompt (docs/methods.md §2). Embedded
            # first, so that a missing tokenizer fails before the image encoder runs.
            text = text - sim.empty_prompt_feature()
        if variant == "surgery" and not single_prompt_surgery and not sim.adapter.exact_global_with_path:
            raise NotImplementedError(
                f"model: feature surgery of several prompts expected a tower whose global embedding survives CLIP "
                f"Surgery's second path, got {sim.adapter.family} with an attention pool (its output has no slot "
                "among the tokens); explain one prompt at a time or use another variant"
            )
        depth = surgery_depth if variant == "surgery" else 0
        path = dense_path(variant) if variant in PATH_VARIANTS else None
        features = sim.adapter.dense_features(images, surgery_depth=depth, projection=projection, path=path)
        # The tower ran in the model's dtype; the norms, products and softmax in at least float32.
        with full_precision(features.device):
            features = F.normalize(upcast(features), dim=-1)
            text = upcast(text).to(features.dtype)
            global_feature, patches = features[:, 0], features[:, 1:]
            if variant != "surgery" or single_prompt_surgery:
                return patches @ text.t()
            return feature_surgery(patches, global_feature, text)
