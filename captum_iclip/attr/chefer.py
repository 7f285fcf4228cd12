"""Chefer et al.'s relevancy for CLIP: gradient-weighted attention rollout."""

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


class CheferRelevancy(CLIPMapAttribution):
    r"""Relevancy maps of Chefer et al., ICCV 2021, "Generic Attention-model
    Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers"
    (their CLIP relevancy, Transformer-MM-Explainability).

    The explained score is the image-prompt logit :math:`\lambda \cos(f, t)`
    (:math:`\lambda` the model's logit scale). For every block l from
    ``start_layer`` on, with attention probabilities :math:`A^l` and their
    gradient :math:`\nabla A^l`,

    .. math:: \bar A^l = \mathrm{mean}_h\,[\nabla A^l \odot A^l]^+, \qquad
              R \leftarrow R + \bar A^l R \quad (R = I \text{ initially}),

    and the map is the class token's row :math:`R_{0, 1:}` over the patches
    (docs/methods.md). Where the embedding is not the class token's, the row is the
    pool's read-out :math:`\rho R`: the mean of the averaged tokens' rows, or for an
    attention pool (SigLIP) its gradient-weighted attention
    :math:`\rho = \mathrm{mean}_h [\nabla a \odot a]^+` (docs/methods.md §7). The
    reference default uses the last block only. ViT towers only.

    Built on :class:`~captum_iclip.attr.base.CLIPMapAttribution` (Captum's target
    semantics, min-max normalisation, bilinear upsampling); it always reads the
    recognition projection, the one its paper defines the method on.

    Args:
        forward_func: a :class:`~captum_iclip.CLIPSimilarity`; ``target=k`` is prompt k.

    Examples::

        >>> import open_clip, torch
        >>> from captum_iclip import CLIPSimilarity, CheferRelevancy
        >>> model = open_clip.create_model("ViT-B-16").eval()
        >>> sim = CLIPSimilarity(model, open_clip.get_tokenizer("ViT-B-16"), ["a cat", "a dog"])
        >>> CheferRelevancy(sim).attribute(torch.randn(2, 3, 224, 224), target=1).shape
        torch.Size([2, 1, 224, 224])
    """

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        *,
        start_layer: int = -1,
        normalize: Normalize = True,
        interpolate: bool = True,
    ) -> Tensor | tuple[Tensor]:
        r"""
        Args:
            inputs: preprocessed images (N, 3, H, W), H and W divisible by the
                patch size; or a 1-tuple of such a tensor.
            target: the prompt(s) to explain, with Captum's semantics: an int, a
                list or 1-d tensor of N ints, or ``None`` for every prompt.
            start_layer: the first block of the rollout (Python indexing; the
                reference's default -1 is the last block alone).
            normalize: ``True`` min-max normalises each (image, prompt) map to [0, 1] on
                the patch grid, then upsamples; ``"reference"`` upsamples first and
                normalises over the pixels, as Chefer et al.'s code does (docs/methods.md §1);
                ``False`` keeps the relevancy.
            interpolate: upsample bilinearly to (H, W); ``False`` returns the patch grid.

        Returns:
            *Tensor* or *tuple[Tensor]*: (N, 1, H, W) for one target per example,
            (N, K, H, W) for ``target=None``; a tuple if ``inputs`` was a tuple.
        """
        prepared = self.prepare(inputs, target, "recognition")
        images, index, sim = prepared.images, prepared.index, self.similarity
        adapter = sim.adapter
        num_blocks = len(adapter.block_views("CheferRelevancy"))
        start = resolve_layer(start_layer, num_blocks, "start_layer")

        # A class-token pool reads token 0 alone: the last block runs for that query only (same gradients).
        queries = 1 if adapter.pools_class_token else None
        per_image = traced_graph_bytes(adapter, prepared.grid, num_blocks - start, queries, images.dtype)
        with torch.enable_grad(), sim.evaluating():
            # The images go through the recorded blocks in chunks whose graphs fit the memory budget.
            chunks = [
                self._relevancy(images[part], None if index is None else index[part], start, queries, prepared.grid)
                for part in image_chunks(images.shape[0], per_image)
            ]
            maps = torch.cat(chunks, dim=1)
        with torch.no_grad():
            scores = maps.transpose(0, 1)
            return self.output(scores, prepared, normalize=normalize, interpolate=interpolate, upsample="bilinear")

    def _relevancy(
        self, images: Tensor, index: Tensor | None, start: int, queries: int | None, grid: tuple[int, int]
    ) -> Tensor:
        """(k, N, h*w) read-out rows of the rollout of ``images`` (a chunk) for ``index`` or every prompt."""
        patches = grid[0] * grid[1]
        sim = self.similarity
        adapter = sim.adapter
        trace = AttentionTrace(start, parts=True, last_queries=queries)
        adapter.tokens(images, trace=trace)
        # The global embedding of the last block's tokens, and how it reads them (the read-out row).
        pooled = adapter.pool(trace.outputs[-1])
        with full_precision(pooled.embedding.device):  # the norm and the logits in >= float32
            features = F.normalize(upcast(pooled.embedding), dim=-1)
            text = upcast(sim.text_features).to(features.dtype)
            logits = sim.logit_scale.to(features.dtype) * features @ text.t()
        probabilities = [p.detach() for p in trace.probabilities]
        pool_weights = pooled.weights.detach()

        def rollout(gradients: list[Tensor], part: slice) -> Tensor:
            # R = (I + A_last) ... (I + A_first) read out by a row: the row times each factor in turn, from the
            # last block (the relevancy update R <- R + A R, docs/methods.md), never an (L, L) product.
            with full_precision(logits.device):  # the rollout in >= float32 (half-precision rules)
                if pooled.learned:  # an attention pool: its gradient-weighted attention, as every attention
                    row = (upcast(gradients[-1]) * upcast(pool_weights[part])).clamp_(min=0).mean(dim=2)
                    gradients = gradients[:-1]
                else:  # a class token's row, or the mean of the pooled tokens' rows
                    row = upcast(pool_weights[part]).mean(dim=1)[None]
                length = probabilities[0].shape[-1]
                # The pool reads the patches only (its row starts after the prefix tokens), or the last
                # block's first queries only (its row ends with them).
                row = F.pad(row, (0, length - row.shape[-1]) if queries else (length - row.shape[-1], 0))
                for attention, grad in zip(reversed(probabilities), reversed(gradients)):
                    # (k, n, heads, Q, L) -> (k, n, Q, L): the gradient-weighted attention, in place
                    weighted = upcast(grad).mul_(upcast(attention[part])).clamp_(min=0).mean(dim=2)
                    row = row + row[..., : weighted.shape[-2]] @ weighted
                return row[..., 0, -patches:]

        inputs = [*trace.attended, *([pooled.weights] if pooled.learned else [])]
        values = [*trace.values, *([None] if pooled.learned else [])]
        working = images.shape[0] * backward_bytes(adapter, grid, len(trace.outputs), queries, images.dtype)
        return prompt_gradients(logits, inputs, index, rollout, values, working)
