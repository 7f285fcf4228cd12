"""Gradients of one CLIP score per prompt, batched over prompts, in bounded memory (LeGrad, Chefer
et al., Grad-ECLIP).

Two budgets bound what these methods hold at once (docs/methods.md §7, "Memory"):

* :data:`GRAPH_BUDGET`, the autograd graph of the blocks whose attention is recorded: the images
  go through those blocks in chunks (:func:`image_chunks`), each with its own graph;
* :data:`GRADIENT_BUDGET`, the prompts' gradients: the prompts share batched backward passes in
  chunks whose gradients fit it, and the gradients of the attention probabilities, the largest
  tensors (heads x queries x keys per image and prompt), are formed from those of the attended
  heads a slice of prompts and images at a time, reduced to maps before the next slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from captum_iclip._precision import full_precision, upcast
from captum_iclip.models.base import ViTAdapter

#: Bytes of gradients held at once: the prompts are processed in chunks that fit.
GRADIENT_BUDGET = 1 << 28
#: Bytes of autograd graph held at once: the images go through the recorded blocks in chunks that fit.
GRAPH_BUDGET = 1 << 29


def _block_sizes(adapter: ViTAdapter, grid: tuple[int, int], dtype: torch.dtype) -> tuple[int, int, int, int]:
    """Heads, channels and tokens of the tower's blocks at patch grid ``grid``, and the element size of ``dtype``."""
    view = adapter.block_views(grid=grid)[-1]
    tokens = adapter.num_prefix_tokens + grid[0] * grid[1]
    return view.num_heads, view.num_heads * round(view.scale**-2), tokens, torch.empty((), dtype=dtype).element_size()


def traced_graph_bytes(
    adapter: ViTAdapter, grid: tuple[int, int], blocks: int, last_queries: int | None, dtype: torch.dtype
) -> int:
    """An upper estimate of the autograd graph one image of patch grid ``grid`` leaves in the tower's last
    ``blocks`` blocks when they are recorded (the last computing its first ``last_queries`` queries, or all).

    Per block: the attention logits and probabilities (2 x heads x queries x keys, kept in at least
    float32) and some 22 token-sized tensors (norms, q/k/v, attended heads, residuals, the MLP's
    four-times-wider hidden layer before and after its activation)."""
    heads, channels, tokens, size = _block_sizes(adapter, grid, dtype)

    def block(queries: int) -> int:
        return 2 * heads * queries * tokens * max(size, 4) + 22 * queries * channels * size

    last = tokens if last_queries is None else last_queries
    return (blocks - 1) * block(tokens) + block(last)


def backward_bytes(
    adapter: ViTAdapter, grid: tuple[int, int], blocks: int, last_queries: int | None, dtype: torch.dtype
) -> int:
    """An upper estimate of what one prompt's backward pass holds at once for one image, beyond its gradients:
    the gradients of one recorded block's activations (the blocks' backward passes follow one another),
    some 12 token-sized tensors (the MLP's hidden layer before and after its activation counting four each)."""
    _, channels, tokens, size = _block_sizes(adapter, grid, dtype)
    queries = tokens if blocks > 1 or last_queries is None else last_queries
    return 12 * queries * channels * max(size, 4)


def image_chunks(num_images: int, bytes_per_image: int, budget: int | None = None) -> Iterator[slice]:
    """Consecutive slices of ``num_images`` images whose graphs fit ``budget`` (default :data:`GRAPH_BUDGET`)
    together; at least one image each."""
    budget = GRAPH_BUDGET if budget is None else budget
    size = max(1, min(num_images, budget // max(bytes_per_image, 1)))
    for start in range(0, num_images, size):
        yield slice(start, min(start + size, num_images))


def _probability_gradients(gradients: Sequence[Tensor], values: Sequence[Tensor | None], images: slice) -> list[Tensor]:
    """The gradients (k, n, heads, Q, L) with respect to the attention probabilities of ``images``: those of
    the attended heads (k, N, heads, Q, head_dim) times the values (N, heads, L, head_dim), as the backward
    pass of ``probabilities @ v`` forms them; a gradient without values already is one."""
    out = []
    for grad, value in zip(gradients, values):
        grad = grad[:, images]
        if value is not None:
            k, n, heads, queries, head_dim = grad.shape
            with full_precision(grad.device):
                # The prompts as more queries of each (image, head): one product per head, no copy of the values.
                rows = upcast(grad).permute(1, 2, 0, 3, 4).reshape(n, heads, k * queries, head_dim)
                grad = (rows @ upcast(value[images]).transpose(-1, -2)).unflatten(2, (k, queries))
                grad = grad.permute(2, 0, 1, 3, 4)
        out.append(grad)
    return out


def _reduced(
    gradients: Sequence[Tensor],
    values: Sequence[Tensor | None],
    reduce: Callable[[list[Tensor], slice], Tensor],
) -> Tensor:
    """``reduce`` over slices of the chunk's prompts and images whose probability gradients fit
    :data:`GRADIENT_BUDGET`, concatenated to (k, N, ...) maps."""
    k, n = gradients[0].shape[:2]
    pair = sum(
        (g[0, 0].numel() if v is None else g[0, 0, ..., 0].numel() * v.shape[-2]) * max(g.element_size(), 4)
        for g, v in zip(gradients, values)
    )  # bytes of one (prompt, image)'s probability gradients
    pairs = max(1, GRADIENT_BUDGET // max(pair, 1))
    images = max(1, min(n, pairs))
    prompts = max(1, min(k, pairs // images))
    rows = []
    for start in range(0, k, prompts):
        chunk = [g[start : start + prompts] for g in gradients]
        parts = [
            reduce(_probability_gradients(chunk, values, slice(i, i + images)), slice(i, i + images))
            for i in range(0, n, images)
        ]
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows)


def prompt_gradients(
    scores: Tensor,
    inputs: Sequence[Tensor],
    index: Tensor | None,
    reduce: Callable[[list[Tensor], slice], Tensor],
    values: Sequence[Tensor | None] | None = None,
    working_bytes: int = 0,
) -> Tensor:
    """Per-prompt gradients of the (N, K) ``scores`` with respect to ``inputs``, reduced to maps.

    Images are independent in a CLIP forward pass, so the gradient of
    ``sum_n scores[n, k]`` with respect to an input holds every image's gradient of
    its own score for prompt k. The prompts share batched backward passes over chunks
    whose gradients fit :data:`GRADIENT_BUDGET`; an input given with ``values`` is a block's
    attended heads ``probabilities @ v``, and ``reduce`` receives the gradient with respect to
    those probabilities, formed a slice of prompts and images at a time, so that a thousand
    prompts never hold a thousand (N, heads, L, L) gradients.

    Args:
        scores: (N, K) image-prompt scores.
        inputs: tensors with a leading batch dimension N that ``scores`` depends on.
        index: one prompt per image (N,), or ``None`` for every prompt.
        reduce: maps the gradients of a slice of k prompts and n images, one (k, n, ...) tensor per
            input, and that slice of the N images, to (k, n, ...) maps.
        values: per input, the values (N, heads, L, head_dim) when the input is attended heads
            (N, heads, Q, head_dim), else ``None``; default ``None`` for every input.
        working_bytes: what one prompt's backward pass holds besides its gradients, for all N images
            (:func:`backward_bytes` times N), counted in the budget of a chunk of prompts.

    Returns:
        (1, N, ...) maps for ``index`` (a single backward pass), (K, N, ...) for every prompt.
    """
    n, k = scores.shape
    inputs = list(inputs)
    values = [None] * len(inputs) if values is None else list(values)
    if index is not None:
        one_hot = torch.zeros_like(scores)
        one_hot[torch.arange(n, device=scores.device), index.to(scores.device)] = 1
        grads = torch.autograd.grad(scores, inputs, grad_outputs=one_hot)
        return _reduced([grad[None] for grad in grads], values, reduce)
    per_prompt = sum(t.numel() * t.element_size() for t in inputs) + working_bytes
    chunk = max(1, min(k, GRADIENT_BUDGET // max(per_prompt, 1)))
    eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
    maps = []
    for start in range(0, k, chunk):
        one_hots = eye[start : start + chunk, None, :].expand(-1, n, k)
        grads = torch.autograd.grad(
            scores, inputs, grad_outputs=one_hots, is_grads_batched=True, retain_graph=start + chunk < k
        )
        maps.append(_reduced(list(grads), values, reduce))
    return torch.cat(maps)
