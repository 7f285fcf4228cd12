"""Grad-ECLIP: the gradient of the score with respect to the class token's attention output, spread over the
keys by a loosened query-key similarity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from captum._utils.typing import TargetType
from captum.log import log_usage
from torch import Tensor

from captum_iclip._precision import full_precision, upcast
from captum_iclip.attr._prompt_grads import prompt_gradients
from captum_iclip.attr._utils import Normalize
from captum_iclip.attr.base import CLIPMapAttribution
from captum_iclip.models.base import CLASS_TOKEN_TOWERS
from captum_iclip.models.blocks import AttentionTrace, BlockView


def loosened_similarity(queries: Tensor, keys: Tensor, valid: Tensor | None = None) -> Tensor:
    """Grad-ECLIP's loosened attention: the cosine of each query with each key over all channels, min-max
    normalised over the keys to [0, 1] (docs/methods.md §7).

    Args:
        queries: (..., Q, C) query rows (heads merged).
        keys: (..., L, C) keys (heads merged).
        valid: optional (..., Q or 1, L) booleans: the keys the min and max run over (the others get 0).

    Returns:
        (..., Q, L) weights; a query whose cosines are all equal gives zeros.
    """
    cosine = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).transpose(-1, -2)
    if valid is None:
        low, high = cosine.amin(dim=-1, keepdim=True), cosine.amax(dim=-1, keepdim=True)
    else:
        low = cosine.masked_fill(~valid, float("inf")).amin(dim=-1, keepdim=True)
        high = cosine.masked_fill(~valid, float("-inf")).amax(dim=-1, keepdim=True)
    weights = (cosine - low) / (high - low).clamp_min(torch.finfo(cosine.dtype).tiny)
    return weights if valid is None else weights.masked_fill(~valid, 0)


class GradECLIPAttribution(CLIPMapAttribution):
    r"""Grad-ECLIP (Zhao et al., ICML 2024, "Gradient-based Visual Explanation for
    Transformer-based CLIP", reference code Cyang-Zhao/Grad-Eclip).

    In the last block, with :math:`o` the class token's attention output (the heads
    merged, before the output projection), :math:`v_i` the values and :math:`q_0, k_i`
    the class token's query and the keys (all channels), the explained score is the
    cosine :math:`s_k = \cos(f_0, t_k)` of the image embedding and prompt k, and

    .. math:: w = \partial s_k / \partial o, \qquad
              \lambda_i = \mathrm{minmax}_i\,\cos(q_0, k_i), \qquad
              m_i = \big[\lambda_i \textstyle\sum_c w_c\, v_{i,c}\big]^+

    over the patches i (docs/methods.md §7): the channel weights :math:`w` say which
    channels of the attention output raise the score, the values say how much of each
    channel a patch brings, and the min-max normalised query-key cosine, a loosened
    softmax, says how much the class token draws from it. One forward pass serves every
    prompt and image; the prompts share one batched backward pass through the class
    token's path of the last block only. Class-token ViT towers only.

    Built on :class:`~captum_iclip.attr.base.CLIPMapAttribution` (Captum's target
    semantics, min-max normalisation, bilinear upsampling); it always reads the
    recognition projection, the one its paper defines the method on.

    Args:
        forward_func: a :class:`~captum_iclip.CLIPSimilarity`; ``target=k`` is prompt k.

    Examples::

        >>> import open_clip, torch
        >>> from captum_iclip import CLIPSimilarity, GradECLIPAttribution
        >>> model = open_clip.create_model("ViT-B-16").eval()
        >>> sim = CLIPSimilarity(model, open_clip.get_tokenizer("ViT-B-16"), ["a cat", "a dog"])
        >>> GradECLIPAttribution(sim).attribute(torch.randn(2, 3, 224, 224), target=0).shape
        torch.Size([2, 1, 224, 224])
    """

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        *,
        single_head: bool = False,
        normalize: Normalize = True,
        interpolate: bool = True,
    ) -> Tensor | tuple[Tensor]:
        r"""
        Args:
            inputs: preprocessed images (N, 3, H, W), H and W divisible by the
                patch size; or a 1-tuple of such a tensor.
            target: the prompt(s) to explain, with Captum's semantics: an int, a
                list or 1-d tensor of N ints, or ``None`` for every prompt.
            single_head: compute the last block's attention as one head over all
                channels, as the reference code does (its published maps). That is
                another model than the one ``sim(x)`` scores; the default ``False``
                keeps the model's heads, so the explained cosine is the model's.
            normalize: ``True`` min-max normalises each (image, prompt) map to [0, 1] on the
                patch grid, ``"reference"`` after upsampling (docs/methods.md §1);
                ``False`` keeps the rectified sums.
            interpolate: upsample bilinearly to (H, W); ``False`` returns the patch grid.

        Returns:
            *Tensor* or *tuple[Tensor]*: (N, 1, H, W) for one target per example,
            (N, K, H, W) for ``target=None``; a tuple if ``inputs`` was a tuple.
        """
        if not isinstance(single_head, bool):
            raise TypeError(f"single_head: expected a bool, got {type(single_head).__name__}")
        prepared = self.prepare(inputs, target, "recognition")
        images, index, sim = prepared.images, prepared.index, self.similarity
        adapter = sim.adapter
        views = adapter.block_views("GradECLIPAttribution")
        if not adapter.pools_class_token:
            raise NotImplementedError(
                f"model: GradECLIPAttribution expected {CLASS_TOKEN_TOWERS}, got {adapter.family}, whose embedding "
                "is a mean or attention pool: Grad-ECLIP reads the class token's attention output"
            )
        prefix = adapter.num_prefix_tokens

        # The whole tower without autograd; the last block's parts are recorded.
        trace = AttentionTrace(len(views) - 1, parts=True, single_head=single_head)
        with torch.no_grad(), sim.evaluating():
            adapter.tokens(images, trace=trace)
            with full_precision(images.device):
                queries, keys = (upcast(BlockView.merge_heads(t)) for t in (trace.queries[0], trace.keys[0]))
                weights = loosened_similarity(queries[:, :1], keys[:, prefix:])[:, 0]  # (N, h*w)
                values = upcast(BlockView.merge_heads(trace.values[0]))[:, prefix:]  # (N, h*w, C)

        # The score depends on the class token's attention output through the class token's own path only
        # (its residual, MLP, final norm and projection), so the prompts' gradients need no other token.
        view = views[-1]
        with torch.enable_grad(), sim.evaluating():
            attended = trace.attended[0][:, :, :1].detach().requires_grad_(True)  # (N, heads, 1, head_dim)
            x = trace.inputs[0][:, :1].detach() + view.attention_branch(attended)
            x = x + view.mlp_branch(x)
            feature = adapter.project_global(adapter.final_norm(x))
            with full_precision(feature.device):  # the norm and the scores in >= float32
                feature = F.normalize(upcast(feature), dim=-1)
                scores = feature @ upcast(sim.text_features).to(feature.dtype).t()

            def channel_map(gradients: list[Tensor], part: slice) -> Tensor:
                # (k, n, heads, 1, head_dim) -> (k, n, C) channel weights -> (k, n, h*w) rectified maps
                with full_precision(scores.device):
                    grad = upcast(gradients[0]).flatten(2)
                    mixed = torch.einsum("knc,nlc->knl", grad.to(values.dtype), values[part])
                    return (mixed * weights[part]).clamp_min(0)

            maps = prompt_gradients(scores, [attended], index, reduce=channel_map)
        with torch.no_grad():
            return self.output(
                maps.transpose(0, 1), prepared, normalize=normalize, interpolate=interpolate, upsample="bilinear"
            )
