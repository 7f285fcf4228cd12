"""Gradients of one CLIP score per prompt, batched over prompts (LeGrad, Chefer et al.)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: Gradients held at once, in bytes: the prompts are processed in chunks that fit.
GRADIENT_BUDGET = 1 << 30


def prompt_gradients(
    scores: Tensor,
    inputs: Sequence[Tensor],
    index: Tensor | None,
    reduce: Callable[[list[Tensor]], Tensor],
) -> Tensor:
    """Per-prompt gradients of the (N, K) ``scores`` with respect to ``inputs``, reduced to maps.

    Images are independent in a CLIP forward pass, so the gradient of
    ``sum_n scores[n, k]`` with respect to an input holds every image's gradient of
    its own score for prompt k. For every prompt the gradients are taken in batched
    backward passes over chunks of prompts, each chunk's gradients reduced at once so
    that a thousand prompts never hold a thousand (N, heads, L, L) gradients.

    Args:
        scores: (N, K) image-prompt scores.
        inputs: tensors with a leading batch dimension N that ``scores`` depends on.
        index: one prompt per image (N,), or ``None`` for every prompt.
        reduce: maps the gradients of a chunk of k prompts, one (k, N, ...) tensor
            per input, to (k, N, ...) maps.

    Returns:
        (1, N, ...) maps for ``index`` (a single backward pass), (K, N, ...) for every prompt.
    """
    n, k = scores.shape
    inputs = list(inputs)
    if index is not None:
        one_hot = torch.zeros_like(scores)
        one_hot[torch.arange(n, device=scores.device), index.to(scores.device)] = 1
        return reduce([grad[None] for grad in torch.autograd.grad(scores, inputs, grad_outputs=one_hot)])
    per_prompt = sum(t.numel() * t.element_size() for t in inputs)
    chunk = max(1, min(k, GRADIENT_BUDGET // max(per_prompt, 1)))
    eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
    maps = []
    for start in range(0, k, chunk):
        one_hots = eye[start : start + chunk, None, :].expand(-1, n, k)
        grads = torch.autograd.grad(
            scores, inputs, grad_outputs=one_hots, is_grads_batched=True, retain_graph=start + chunk < k
        )
        maps.append(reduce(list(grads)))
    return torch.cat(maps)
