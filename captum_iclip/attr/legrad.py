"""LeGrad: gradients of the prompt score with respect to the attention maps of the last layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from captum._utils.typing import TargetType
from captum.log import log_usage
from torch import Tensor

from captum_iclip._precision import full_precision, upcast
from captum_iclip.attr._prompt_grads import (
    backward_bytes,
    image_chunks,
    prompt_gradients,
    traced_graph_bytes,
)
from captum_iclip.attr._utils import Normalize, resolve_layer
from captum_iclip.attr.base import CLIPMapAttribution
from captum_iclip.models.blocks import AttentionTrace


def _positive_mean_over_layers(gradients: list[Tensor], patches: int) -> Tensor:
    """(k, n, heads, Q, L) gradients per layer -> (k, n, h*w): clipped, averaged over heads and queries,
    summed over layers, the last ``patches`` keys (the patches: prefix tokens come first). The gradients
    are this slice's own (:func:`prompt_gradients`), clipped in place."""
    with torch.no_grad():  # reduced in at least float32 (half-precision rules)
        return sum(upcast(grad).clamp_(min=0).mean(dim=(2, 3))[..., -patches:] for grad in gradients)


class LeGradAttribution(CLIPMapAttribution):
    r"""LeGrad (Bousselham et al., 2024, "LeGrad: An Explainability Method for Vision
    Transformers via Feature Formation Sensitivity", arXiv 2404.03214).

    For every block l from ``layer_index`` to the last, the tokens leaving block l
    are mean-pooled, passed through the final norm and projection and compared
    with the prompt: :math:`s^l = \cos(\mathrm{proj}(\mathrm{ln}(\bar z^l)), t)`.
    The map is the gradient of :math:`s^l` with respect to block l's attention
    probabilities :math:`A^l` (heads × queries × keys), clipped at zero and
    averaged over heads and queries, summed over the layers:

    .. math:: m = \sum_{l} \mathrm{mean}_{h,i}\,\big[\partial s^l / \partial A^l_{h,i,\cdot}\big]^+ ,

    restricted to the patch keys (docs/methods.md). On a tower pooled by an attention
    (SigLIP's MAP head), :math:`s^l` reads block l's tokens through that pool and the
    gradient is taken with respect to the pool's attention, as LeGrad's code does for
    SigLIP (docs/methods.md §7). One forward pass serves every prompt and image; the
    prompts share one batched backward pass through the last blocks only. ViT towers only.

    Built on :class:`~captum_iclip.attr.base.CLIPMapAttribution` (Captum's target
    semantics, min-max normalisation, bilinear upsampling); it always reads the
    recognition projection, the one its paper defines the method on.

    Args:
        forward_func: a :class:`~captum_iclip.CLIPSimilarity`; ``target=k`` is prompt k.

    Examples::

        >>> import open_clip, torch
        >>> from captum_iclip import CLIPSimilarity, LeGradAttribution
        >>> model = open_clip.create_model("ViT-B-16").eval()
        >>> sim = CLIPSimilarity(model, open_clip.get_tokenizer("ViT-B-16"), ["a cat", "a dog"])
        >>> LeGradAttribution(sim).attribute(torch.randn(2, 3, 224, 224), target=0).shape
        torch.Size([2, 1, 224, 224])
    """

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        *,
        layer_index: int = -2,
        normalize: Normalize = True,
        interpolate: bool = True,
    ) -> Tensor | tuple[Tensor]:
        r"""
        Args:
            inputs: preprocessed images (N, 3, H, W), H and W divisible by the
                patch size; or a 1-tuple of such a tensor.
            target: the prompt(s) to explain, with Captum's semantics: an int, a
                list or 1-d tensor of N ints, or ``None`` for every prompt.
            layer_index: the first block whose attention is used (Python indexing;
                the default -2, LeGrad's, uses the last two blocks).
            normalize: ``True`` min-max normalises each (image, prompt) map to [0, 1] on
                the patch grid, then upsamples; ``"reference"`` upsamples first and
                normalises over the pixels, as LeGrad's code does (docs/methods.md §1);
                ``False`` keeps the summed gradients.
            interpolate: upsample bilinearly to (H, W); ``False`` returns the patch grid.

        Returns:
            *Tensor* or *tuple[Tensor]*: (N, 1, H, W) for one target per example,
            (N, K, H, W) for ``target=None``; a tuple if ``inputs`` was a tuple.
        """
        prepared = self.prepare(inputs, target, "recognition")
        images, index, sim = prepared.images, prepared.index, self.similarity
        adapter = sim.adapter
        num_blocks = len(adapter.block_views("LeGradAttribution"))
        start = resolve_layer(layer_index, num_blocks, "layer_index")

        per_image = traced_graph_bytes(adapter, prepared.grid, num_blocks - start, None, images.dtype)
        with torch.enable_grad(), sim.evaluating():
            # The images go through the recorded blocks in chunks whose graphs fit the memory budget.
            chunks = [
                self._gradient_maps(images[part], None if index is None else index[part], start, prepared.grid)
                for part in image_chunks(images.shape[0], per_image)
            ]
            maps = torch.cat(chunks, dim=1)
        with torch.no_grad():
            scores = maps.transpose(0, 1)
            return self.output(scores, prepared, normalize=normalize, interpolate=interpolate, upsample="bilinear")

    def _gradient_maps(self, images: Tensor, index: Tensor | None, start: int, grid: tuple[int, int]) -> Tensor:
        """(k, N, h*w) summed clipped gradients of ``images`` (a chunk) for ``index`` or every prompt."""
        patches = grid[0] * grid[1]
        sim = self.similarity
        adapter = sim.adapter
        trace = AttentionTrace(start, detach=True, parts=True)
        adapter.tokens(images, trace=trace)
        text = sim.text_features
        # Each block's input is detached, so the gradient of the summed scores
        # reaches every block's attention from that block's own score only.
        scores, attention, values = 0, [], []
        for out, attended, value in zip(trace.outputs, trace.attended, trace.values):
            # An attention-pooled tower (SigLIP) is read through its pool's attention, as LeGrad's code does.
            pooled = adapter.layer_pool(out)
            # Otherwise the gradient is taken at the attended heads, the probabilities' one formed from it.
            attention.append(pooled.weights if pooled.learned else attended)
            values.append(None if pooled.learned else value)
            with full_precision(pooled.embedding.device):  # the norm and the scores in >= float32
                feature = F.normalize(upcast(pooled.embedding), dim=-1)
                scores = scores + feature @ upcast(text).to(feature.dtype).t()
        working = images.shape[0] * backward_bytes(adapter, grid, len(trace.outputs), None, images.dtype)
        return prompt_gradients(
            scores,
            attention,
            index,
            lambda gradients, _: _positive_mean_over_layers(gradients, patches),
            values,
            working,
        )
