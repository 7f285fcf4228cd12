"""ViT blocks seen through their parts, and the block loop that every dense method shares.

Training-free dense methods for CLIP (CLIP Surgery, GEM, MaskCLIP, SCLIP, ClearCLIP,
NACLIP) change what the last blocks of a ViT compute for the patch tokens, and the
gradient methods (LeGrad, Chefer et al.'s relevancy) read the attention probabilities
of the last blocks. They all need the same parts of a pre-norm block:

    x <- x + ls_1(OutProj(Attn(q, k, v)))      with q, k, v the projections of ln_1(x)
    x <- x + ls_2(MLP(ln_2(x)))

A :class:`BlockView` exposes those parts for one block of one model family (open_clip
``ResidualAttentionBlock`` / ``CustomResidualAttentionBlock``, Hugging Face
``CLIPEncoderLayer`` / ``SiglipEncoderLayer``, timm ``Block`` / ``EvaBlock``), and
:func:`run_blocks` is the one block loop of every ViT tower: the plain path (the library's
own blocks), an optional second path through the last blocks (:class:`DensePath`,
docs/methods.md), and an optional record of the attention probabilities
(:class:`AttentionTrace`). The tokens are the ``prefix`` tokens (class and register
tokens; none in SigLIP) followed by the patches, row-major over the patch grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_iclip._precision import full_precision, upcast

Grid = tuple[int, int]


class BlockView:
    """The parts of one pre-norm transformer block (see the module docstring).

    Heads are split as (N, heads, L, head_dim) everywhere, tokens are batch-first
    (N, L, C).
    """

    num_heads: int
    scale: float
    #: What the block is, when the view does not know its parts (``""`` when it does). Its ``forward``
    #: still runs (the plain path); the second paths and attention records refuse it (:func:`check_parts`).
    unsupported: str = ""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        """The library's own block on batch-first tokens (bit-identical to its forward)."""
        raise NotImplementedError

    def ln_1(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def qkv(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Query, key and value heads of ``tokens`` (the ln_1 output), each (N, heads, L, head_dim)."""
        raise NotImplementedError

    def attention_branch(self, heads: Tensor) -> Tensor:
        """What the attention adds to the residual stream, from attended heads (N, heads, L, head_dim)."""
        raise NotImplementedError

    def mlp_branch(self, x: Tensor) -> Tensor:
        """What the MLP adds to the residual stream: ls_2(MLP(ln_2(x)))."""
        raise NotImplementedError

    #: The attention's submodules that the parts call through ``__call__`` (the others do not run).
    called_attention_parts = frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "ln_q", "ln_k", "ln_inner"})

    def bypassed_modules(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of the modules whose ``forward`` does not run when the block is computed from its
        parts: the block, its attention and the attention's submodules the parts do not call (e.g. its
        dropout). The parts call the others (norms, projections, MLP, layer scales) through ``__call__``."""
        for name in ("attn", "self_attn"):
            attention = getattr(self.block, name, None)
            if attention is not None:
                break
        else:
            return [("", self.block)]
        inner = [
            (f"{name}.{child}" if child else name, module)
            for child, module in attention.named_modules()
            if child.split(".")[0] not in self.called_attention_parts
        ]
        return [("", self.block), *inner]

    @staticmethod
    def split_heads(x: Tensor, num_heads: int) -> Tensor:
        n, length, channels = x.shape
        return x.reshape(n, length, num_heads, channels // num_heads).transpose(1, 2)

    @staticmethod
    def merge_heads(x: Tensor) -> Tensor:
        n, heads, length, head_dim = x.shape
        return x.transpose(1, 2).reshape(n, length, heads * head_dim)


class OpenCLIPBlockView(BlockView):
    """An open_clip ``ResidualAttentionBlock`` (``nn.MultiheadAttention``) or
    ``CustomResidualAttentionBlock`` (open_clip ``Attention``)."""

    def __init__(self, block: nn.Module, batch_first: bool = True) -> None:
        super().__init__(block)
        self.batch_first = batch_first
        attn = block.attn
        self.num_heads = attn.num_heads
        self.scale = (attn.in_proj_weight.shape[1] // attn.num_heads) ** -0.5

    def forward(self, x: Tensor) -> Tensor:
        if self.batch_first:
            return self.block(x)
        return self.block(x.transpose(0, 1)).transpose(0, 1)

    def ln_1(self, x: Tensor) -> Tensor:
        return self.block.ln_1(x)

    def qkv(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn = self.block.attn
        if getattr(attn, "logit_scale", None) is not None or getattr(attn, "head_scale", None) is not None:
            raise TypeError(
                "model: expected blocks with softmax(q k^T / sqrt(d)) attention (the dense attention methods'), "
                "got scaled-cosine or head-scaled attention"
            )
        q, k, v = F.linear(tokens, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (self.split_heads(t, self.num_heads) for t in (q, k, v))
        # open_clip's custom Attention may normalise q and k per head (qk_norm).
        if hasattr(attn, "ln_q"):
            q, k = attn.ln_q(q), attn.ln_k(k)
        return q, k, v

    def attention_branch(self, heads: Tensor) -> Tensor:
        block, attn = self.block, self.block.attn
        out = self.merge_heads(heads)
        # open_clip's custom blocks may normalise the heads' output before out_proj ...
        inner_norm = getattr(attn, "ln_inner", None)
        if inner_norm is not None:
            out = inner_norm(out)
        out = attn.out_proj(out)
        # ... and the attention's output before the layer scale.
        if hasattr(block, "ln_attn"):
            out = block.ln_attn(out)
        return block.ls_1(out)

    def mlp_branch(self, x: Tensor) -> Tensor:
        return self.block.ls_2(self.block.mlp(self.block.ln_2(x)))


class HFBlockView(BlockView):
    """A Hugging Face ``CLIPEncoderLayer``, ``SiglipEncoderLayer`` or ``Siglip2EncoderLayer`` (the same parts)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer)
        attn = layer.self_attn
        self.num_heads = attn.num_heads
        self.scale = attn.scale

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x, None)

    def ln_1(self, x: Tensor) -> Tensor:
        return self.block.layer_norm1(x)

    def qkv(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn = self.block.self_attn
        return tuple(self.split_heads(proj(tokens), self.num_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    def attention_branch(self, heads: Tensor) -> Tensor:
        return self.block.self_attn.out_proj(self.merge_heads(heads))

    def mlp_branch(self, x: Tensor) -> Tensor:
        return self.block.mlp(self.block.layer_norm2(x))


class TimmBlockView(BlockView):
    """A timm ``Block`` with ``Attention`` (VisionTransformer: SigLIP, SigLIP 2) or ``EvaBlock`` with
    ``EvaAttention`` (Eva: EVA02).

    ``rope`` is an ``EvaBlock``'s rotary embedding for the patch grid: it turns the queries and keys of
    the tokens after the attention's ``num_prefix_tokens``, as ``EvaAttention`` does. Other kinds of
    block (post-norm, parallel, gated or differential attention, timm's ``AttentionRope``) run whole
    on the plain path only (:attr:`BlockView.unsupported`).
    """

    #: The norms and projections are called through ``__call__``, the dropouts are not. (EVA's fused qkv
    #: with biases is applied by ``F.linear`` on its weight, here as in timm's own forward.)
    called_attention_parts = frozenset({"qkv", "q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "norm", "proj"})

    def __init__(self, block: nn.Module, rope: Tensor | None = None) -> None:
        super().__init__(block)
        from timm.layers import Attention
        from timm.models.eva import EvaAttention, EvaBlock
        from timm.models.vision_transformer import Block

        attn = block.attn
        self.eva = type(block) is EvaBlock
        expected = EvaAttention if self.eva else Attention
        if type(block) not in (Block, EvaBlock) or type(attn) is not expected or attn.gate is not None:
            gated = " (gated)" if getattr(attn, "gate", None) is not None else ""
            self.unsupported = (
                f"a {type(block).__name__} with {type(attn).__name__}{gated}; the view knows the parts of the "
                "pre-norm, ungated timm Block with Attention and EvaBlock with EvaAttention"
            )
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.rope = rope

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x, rope=self.rope) if self.eva else self.block(x)

    def ln_1(self, x: Tensor) -> Tensor:
        return self.block.norm1(x)

    def qkv(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn = self.block.attn
        n, length, _ = tokens.shape
        if attn.qkv is None:  # an EvaAttention with separate projections
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            q, k, v = (self.split_heads(proj(tokens), self.num_heads) for proj in projections)
        else:
            bias = getattr(attn, "q_bias", None)
            if bias is None:
                qkv = attn.qkv(tokens)
            else:  # EVA's fused qkv without a key bias
                bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
                qkv = attn.qkv(tokens) + bias if attn.qkv_bias_separate else F.linear(tokens, attn.qkv.weight, bias)
            q, k, v = qkv.reshape(n, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if self.rope is not None:
            from timm.layers import apply_rot_embed_cat

            prefix, half = attn.num_prefix_tokens, attn.rotate_half
            q, k = (
                torch.cat([t[:, :, :prefix], apply_rot_embed_cat(t[:, :, prefix:], self.rope, half=half)], dim=2)
                for t in (q, k)
            )
            q, k = q.type_as(v), k.type_as(v)
        return q, k, v

    def attention_branch(self, heads: Tensor) -> Tensor:
        block, attn = self.block, self.block.attn
        out = attn.proj(attn.norm(self.merge_heads(heads)))
        if self.eva:
            return block.drop_path1(out if block.gamma_1 is None else block.gamma_1 * out)
        return block.drop_path1(block.ls1(out))

    def mlp_branch(self, x: Tensor) -> Tensor:
        block = self.block
        out = block.mlp(block.norm2(x))
        if self.eva:
            return block.drop_path2(out if block.gamma_2 is None else block.gamma_2 * out)
        return block.drop_path2(block.ls2(out))


# ----------------------------------------------------------------------------------
# Second paths and attention records
# ----------------------------------------------------------------------------------
@dataclass
class AttentionInputs:
    """What a path's attention sees in one block.

    Attributes:
        q, k, v: the block's query, key and value heads of ``tokens``, (N, heads, L, head_dim).
        tokens: the block's ln_1 output on the original path, (N, L, C).
        scale: the block's softmax scale (``head_dim ** -0.5`` for CLIP).
        grid: the patch grid (h, w).
        prefix: the tokens before the patches (class and register tokens; 0 for SigLIP), L = prefix + h*w.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    tokens: Tensor
    scale: float
    grid: Grid
    prefix: int


Attend = Callable[[AttentionInputs], Tensor]


@dataclass(frozen=True)
class DensePath:
    """A second path through the last ``depth`` blocks that gives the patch tokens.

    In each of those blocks the path attends with ``attend`` over the q/k/v of the
    *original* path's ln_1 output and passes the result through the block's output
    projection. With ``residual`` the path adds that to its own stream (which starts
    as the input of its first block), otherwise the stream restarts from it; with
    ``mlp`` the block's MLP follows, with its residual. The global embedding always
    comes from the original path (its class token, or every token it pools), so it
    stays the model's image embedding. Without ``residual`` the attend may give another
    number of tokens than it is given (ProxyCLIP's, on its proxy's patch grid); the patch
    tokens of the path are then those.

    Examples: CLIP Surgery is ``DensePath(6, value-value attention, residual=True,
    mlp=False)``; ClearCLIP is ``DensePath(1, query-query attention, residual=False,
    mlp=False)`` (docs/methods.md).
    """

    depth: int
    attend: Attend
    residual: bool = True
    mlp: bool = False


@dataclass
class AttentionTrace:
    """Record the attention probabilities and outputs of the blocks from ``start`` on.

    Those blocks are computed from their parts with explicit probabilities
    ``softmax(q k^T * scale)`` (N, heads, L, L), so a gradient can be taken with respect
    to them; earlier blocks run without autograd. With ``detach`` every recorded block
    starts from a detached input, so that the gradient of a score read at block l
    reaches only block l's attention (LeGrad) instead of all earlier ones (rollout).

    With ``parts`` each recorded block's input, its q/k/v heads and its attended heads
    ``probabilities @ v`` (the attention's output before the output projection, in the
    graph) are kept as well (Grad-ECLIP). With ``single_head`` the recorded blocks attend
    as one head over all channels, ``softmax(q k^T / sqrt(C))`` on the merged q and k
    (Grad-ECLIP's reference computes its last blocks so): another model than the one the
    library runs, which only Grad-ECLIP's ``single_head=True`` asks for.

    With ``last_queries`` the last block of the tower computes the first ``last_queries``
    queries only (its probabilities are (N, heads, last_queries, L), its output
    (N, last_queries, C)): a class-token pool reads token 0 alone, and each token of a
    block's output depends on its own query only, so a score read through that pool has
    the same gradients while the last block's backward pass runs for one token (Chefer).

    Attributes:
        probabilities: one (N, heads, L, L) tensor per recorded block.
        outputs: one (N, L, C) block output per recorded block.
        inputs, queries, keys, values, attended: with ``parts``, one per recorded block: its
            (N, L, C) input and its (N, heads, L, head_dim) heads (one head of C with ``single_head``).
    """

    start: int
    detach: bool = False
    parts: bool = False
    single_head: bool = False
    last_queries: int | None = None
    probabilities: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    inputs: list[Tensor] = field(default_factory=list)
    queries: list[Tensor] = field(default_factory=list)
    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    attended: list[Tensor] = field(default_factory=list)


_HOOK_KINDS = {
    "_forward_pre_hooks": "forward pre-hook",
    "_forward_hooks": "forward hook",
    "_backward_pre_hooks": "backward pre-hook",
    "_backward_hooks": "backward hook",
}


def check_parts(views: Sequence[BlockView], indices: range, why: str) -> None:
    """Refuse the blocks that a method would compute from their parts when their view cannot
    (:attr:`BlockView.unsupported`), with :func:`check_unhooked`'s arguments.

    Raises:
        NotImplementedError: naming the first such block and what was expected.
    """
    for index in indices:
        reason = views[index].unsupported
        if reason:
            raise NotImplementedError(
                f"model: expected blocks that the block loop can compute from their parts ({why}), got block "
                f"{index} of {len(views)}: {reason}"
            )


def check_unhooked(views: Sequence[BlockView], indices: range, why: str) -> None:
    """Refuse hooks on the blocks that a method computes from their parts (their hooks would not run).

    The plain path runs every other block through its ``__call__``, so their hooks (ablations,
    activation patching) act as they do in the model's own forward. A block computed from its
    parts (a second path, an attention record) bypasses its own and its attention's hooks: the
    map would explain another model than the one ``sim(x)`` scores, so that is refused.

    Args:
        views: the tower's blocks.
        indices: the blocks computed from their parts.
        why: what computes them, and the argument that moves it (for the message).

    Raises:
        ValueError: naming the first hooked block and the kind of hook.
    """
    for index in indices:
        view = views[index]
        for name, module in view.bypassed_modules():
            kind = next((label for attr, label in _HOOK_KINDS.items() if getattr(module, attr, None)), None)
            if kind is None:
                continue
            where = f", on its {name} ({type(module).__name__})" if name else ""
            raise ValueError(
                f"model: expected no hooks on the blocks this method computes from their parts ({why}), got a "
                f"{kind} on block {index} of {len(views)} ({type(view.block).__name__}{where}): the hook would not "
                "run and the map would explain another model than the one sim(x) scores; remove the hook, or "
                "choose a depth or start layer that leaves that block to the plain path"
            )


def explicit_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``softmax(q k^T * scale + mask) v`` of heads (N, heads, Q or L, head_dim), with the probabilities
    (N, heads, Q, L) it computes explicitly, so that a gradient can be taken with respect to them.

    The probabilities (and so their gradients) are in at least float32: a half-precision attention
    logit of magnitude 8 is resolved to 0.03 only (half-precision rules, docs/methods.md).
    """
    with full_precision(q.device):
        logits = (upcast(q) * scale) @ upcast(k).transpose(-1, -2)
        probabilities = torch.softmax(logits if mask is None else logits + mask.to(logits.dtype), dim=-1)
    return probabilities.to(v.dtype) @ v, probabilities


def _traced_block(
    view: BlockView, x: Tensor, trace: AttentionTrace, mask: Tensor | None = None, queries: int | None = None
) -> Tensor:
    """One recorded block computed from its parts; with ``queries`` for its first ``queries`` queries only."""
    if trace.detach or not trace.outputs:
        # A fresh leaf, so that the probabilities are in a graph even for a frozen model.
        x = x.detach().requires_grad_(True)
    block_input = x
    q, k, v = view.qkv(view.ln_1(x))
    scale = view.scale
    if trace.single_head:
        q, k, v = (BlockView.merge_heads(t)[:, None] for t in (q, k, v))
        scale = q.shape[-1] ** -0.5
    if queries is not None:
        q, x = q[:, :, :queries], x[:, :queries]
    attended, probabilities = explicit_attention(q, k, v, scale, mask)
    x = x + view.attention_branch(attended)
    x = x + view.mlp_branch(x)
    trace.probabilities.append(probabilities)
    trace.outputs.append(x)
    if trace.parts:
        for record, value in zip(
            (trace.inputs, trace.queries, trace.keys, trace.values, trace.attended), (block_input, q, k, v, attended)
        ):
            record.append(value)
    return x


def _block_from_qkv(view: BlockView, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """The original block, reusing q/k/v already computed for a path; ``x`` may hold the
    first queries only (then q holds the same ones). ``mask`` is added to the attention logits."""
    mask = None if mask is None else mask.to(q.dtype)
    x = x + view.attention_branch(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=view.scale))
    return x + view.mlp_branch(x)


def run_blocks(
    views: Sequence[BlockView],
    x: Tensor,
    grid: Grid,
    *,
    prefix: int,
    global_tokens: int | None,
    path: DensePath | None = None,
    trace: AttentionTrace | None = None,
    tap: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The block loop shared by every ViT family.

    The plain path runs the library's blocks through their ``__call__`` (their hooks run); the
    blocks a ``path`` or a ``trace`` computes from their parts must have none (:func:`check_unhooked`)
    and be known to their view (:func:`check_parts`).

    Args:
        views: the tower's blocks, first to last.
        x: (N, prefix + h*w, C) tokens entering the first block: the prefix tokens, then the patches.
        grid: the patch grid (h, w).
        prefix: the tokens before the patches (class and register tokens; 0 for SigLIP).
        global_tokens: with a ``path``, how many leading tokens of the original path the global embedding
            reads after the last block: 1 for a class-token pool (the original path's last block then
            runs for that query alone), ``None`` for every token (a mean or attention pool).
        path: a second path through the last ``path.depth`` blocks for the patch tokens.
        trace: record the attention of the blocks from ``trace.start`` on.
        tap: applied to the tokens entering the last block of the plain path (the
            Grad-CAM tap of the adapters).

    Raises:
        ValueError: a block computed from its parts has a hook.
        NotImplementedError: a block computed from its parts is of a kind its view does not know.

    Returns:
        The original path's tokens after the last block, (N, prefix + h*w, C) (only the first
        ``global_tokens`` with a ``path``), and the patch tokens of ``path`` (N, h*w, C), or as many
        as the path gives (see :class:`DensePath`); ``None`` without one.
    """
    depth = path.depth if path is not None else 0
    n_plain = len(views) - depth
    if path is not None and trace is not None:
        raise ValueError("trace: expected None with a second path (they cannot be combined), got an AttentionTrace")
    if trace is not None:
        why = f"the attention record from block {trace.start} on: LeGrad's layer_index, Chefer's start_layer"
        check_parts(views, range(trace.start, n_plain), why)
        check_unhooked(views, range(trace.start, n_plain), why)
    if path is not None:
        why = f"a second path through the last {depth} blocks: GEM's depth, CLIP Surgery, the ITSM path variants"
        check_parts(views, range(n_plain, len(views)), why)
        check_unhooked(views, range(n_plain, len(views)), why)
    for index, view in enumerate(views[:n_plain]):
        if index == n_plain - 1 and tap is not None:
            x = tap(x)
        if trace is not None and index >= trace.start:
            x = _traced_block(view, x, trace, queries=trace.last_queries if index == n_plain - 1 else None)
        elif trace is not None:
            with torch.no_grad():
                x = view.forward(x)
        else:
            x = view.forward(x)
    if path is None:
        return x, None

    stream = x
    for index, view in enumerate(views[n_plain:]):
        tokens = view.ln_1(x)
        q, k, v = view.qkv(tokens)
        branch = view.attention_branch(path.attend(AttentionInputs(q, k, v, tokens, view.scale, grid, prefix)))
        stream = stream + branch if path.residual else branch
        if path.mlp:
            stream = stream + view.mlp_branch(stream)
        if index < depth - 1 or global_tokens is None:
            x = _block_from_qkv(view, x, q, k, v)
        else:
            # After the last block the global embedding reads the first tokens of the original path only.
            x = _block_from_qkv(view, x[:, :global_tokens], q[:, :, :global_tokens], k, v)
    return x, stream[:, prefix:]


def run_text_blocks(views: Sequence[BlockView], x: Tensor, mask: Tensor, trace: AttentionTrace | None = None) -> Tensor:
    """The block loop of a text tower: every block computed from its parts, with an additive attention mask.

    The families' text blocks take their masks in forms of their own (open_clip an (L, L) mask,
    Hugging Face a 4-d one), so every block runs from its parts here, with ``mask`` added to the
    attention logits; the blocks must have no hooks (:func:`check_unhooked`). Without a trace
    the whole loop is differentiable (Integrated Gradients on the token embeddings); with one,
    the blocks from ``trace.start`` on are recorded and the earlier ones run without autograd,
    as in :func:`run_blocks`.

    Args:
        views: the text tower's blocks, first to last.
        x: (K, L, C) token and position embeddings.
        mask: additive mask broadcastable to (K, heads, L, L): 0 where a query may attend to a key,
            -inf where not (causal, and padding keys).
        trace: record the attention of the blocks from ``trace.start`` on.

    Returns:
        (K, L, C) tokens after the last block.
    """
    check_unhooked(views, range(len(views)), "a text tower, whose blocks the text-side explanations run from parts")
    for index, view in enumerate(views):
        if trace is not None and index >= trace.start:
            x = _traced_block(view, x, trace, mask)
            continue
        with torch.no_grad() if trace is not None else nullcontext():
            x = _block_from_qkv(view, x, *view.qkv(view.ln_1(x)), mask)
    return x
