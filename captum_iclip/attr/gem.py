"""GEM: the self-self attention path of "Grounding Everything"."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from captum._utils.typing import TargetType
from captum.log import log_usage
from torch import Tensor

from captum_iclip._precision import full_precision, upcast
from captum_iclip.attr._utils import Normalize, check_path_depth, select_targets
from captum_iclip.attr.base import CLIPMapAttribution
from captum_iclip.models.attention import gem_path


class GEMAttribution(CLIPMapAttribution):
    r"""GEM (Bousselham et al., CVPR 2024, "Grounding Everything: Emerging
    Localization Properties in Vision-Language Transformers").

    The last ``depth`` blocks gain a second path for the patch tokens, as in
    CLIP Surgery: it adds the output projection of *self-self attention* to its
    stream and skips the MLP. Self-self attention clusters each of q, k and v with
    itself (``iterations`` rounds of :math:`x \leftarrow \mathrm{softmax}(\hat x
    \hat x^\top \tau)\hat x`, :math:`\hat x` L2-normalised per head), assigns each
    clustering to the values and averages the three (docs/methods.md). The map of
    a prompt is the cosine similarity of each patch's projected feature with the
    prompt, like ITSM. One forward pass serves every prompt; no gradients. ViT
    towers only.

    Built on :class:`~captum_iclip.attr.base.CLIPMapAttribution` (Captum's target
    semantics, min-max normalisation, bilinear upsampling); it always reads the
    recognition projection, the one its paper defines the method on.

    Args:
        forward_func: a :class:`~captum_iclip.CLIPSimilarity`; ``target=k`` is prompt k.

    Examples::

        >>> import open_clip, torch
        >>> from captum_iclip import CLIPSimilarity, GEMAttribution
        >>> model = open_clip.create_model("ViT-B-16").eval()
        >>> sim = CLIPSimilarity(model, open_clip.get_tokenizer("ViT-B-16"), ["a cat", "a dog"])
        >>> GEMAttribution(sim).attribute(torch.randn(2, 3, 224, 224)).shape
        torch.Size([2, 2, 224, 224])
    """

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        *,
        depth: int | None = None,
        iterations: int = 1,
        temperature: float | None = None,
        normalize: Normalize = True,
        interpolate: bool = True,
    ) -> Tensor | tuple[Tensor]:
        r"""
        Args:
            inputs: preprocessed images (N, 3, H, W), H and W divisible by the
                patch size; or a 1-tuple of such a tensor.
            target: the prompt(s) to explain, with Captum's semantics: an int, a
                list or 1-d tensor of N ints, or ``None`` for every prompt.
            depth: blocks given the self-self path. Default: GEM's 6 (its code's
                ``gem_depth=7`` patches the last ``gem_depth - 1`` blocks), at most
                the tower's blocks.
            iterations: self-self clustering rounds (GEM's default 1).
            temperature: the inverse temperature :math:`\tau`; ``None`` (GEM's
                default) uses each block's ``head_dim ** -0.5`` times the mean token
                norm of its ln_1 output, per image.
            normalize: ``True`` min-max normalises each (image, prompt) map to [0, 1] on
                the patch grid, then upsamples; ``"reference"`` upsamples first and
                normalises over the pixels, as GEM's code does (docs/methods.md §1);
                ``False`` keeps the cosine similarities.
            interpolate: upsample bilinearly to (H, W); ``False`` returns the patch grid.

        Returns:
            *Tensor* or *tuple[Tensor]*: (N, 1, H, W) for one target per example,
            (N, K, H, W) for ``target=None``; a tuple if ``inputs`` was a tuple.
        """
        prepared = self.prepare(inputs, target, "recognition")
        images, sim = prepared.images, self.similarity
        num_blocks = len(sim.adapter.block_views("GEMAttribution"))
        depth = min(6, num_blocks) if depth is None else depth
        check_path_depth(depth, num_blocks, "the self-self path")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations: expected a non-negative int, got {iterations!r}")
        if temperature is not None and not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature: expected a positive number or None, got {temperature!r}")

        with torch.no_grad(), sim.evaluating():
            path = gem_path(depth, iterations, temperature)
            features = sim.adapter.dense_features(images, path=path)
            with full_precision(features.device):  # half-precision rules: the similarities in >= float32
                features = F.normalize(upcast(features), dim=-1)
                scores = features[:, 1:] @ upcast(sim.text_features).to(features.dtype).t()
            scores = select_targets(scores.transpose(1, 2), prepared.index)
            return self.output(scores, prepared, normalize=normalize, interpolate=interpolate, upsample="bilinear")
