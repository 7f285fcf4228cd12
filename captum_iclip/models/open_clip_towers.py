"""Dense features of open_clip's own towers: ``VisionTransformer`` (any patch size, any input size divisible by it;
class-token, average or attention pooling) and ``ModifiedResNet`` (RN50, RN101, RN50x4, ...), docs/methods.md §1, §2.

:class:`OpenCLIPAdapter` is also the base of the timm towers (:mod:`~captum_iclip.models.timm_towers`): the
preprocessing statistics and the text tower are open_clip's for every open_clip model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_iclip._precision import project
from captum_iclip.models.attention import self_value_attention
from captum_iclip.models.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Pooled,
    VisionAdapter,
    ViTAdapter,
    fixed_pool_weights,
    interpolate_pos_embed,
    multihead_attention,
    multihead_projections,
)
from captum_iclip.models.blocks import AttentionTrace, BlockView, DensePath, OpenCLIPBlockView
from captum_iclip.models.text import OpenCLIPTextTower


# ----------------------------------------------------------------------------------
# open_clip VisionTransformer
# ----------------------------------------------------------------------------------
class TokenProjection(nn.Module):
    """``x @ weight`` on every token: the ViT projection as a module (open_clip's ``proj``)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())

    def forward(self, tokens: Tensor) -> Tensor:
        return project(tokens, self.weight)


class OpenCLIPAdapter(VisionAdapter):
    """What the open_clip towers share: preprocessing statistics, the text tower, the stem."""

    def __init__(self, model: nn.Module, interpretability_head: nn.Module | None = None) -> None:
        super().__init__(model, interpretability_head)
        self.visual = model.visual

    @property
    def image_mean(self):
        return tuple(getattr(self.visual, "image_mean", None) or OPENAI_CLIP_MEAN)

    @property
    def image_std(self):
        return tuple(getattr(self.visual, "image_std", None) or OPENAI_CLIP_STD)

    @property
    def parameter(self) -> Tensor:
        return self.visual.conv1.weight

    def text_inputs(self, prompts: Sequence[str], tokenizer: Callable) -> Tensor:
        # open_clip's tokenizers (its BPE one and its wrapper of Hugging Face ones) pad to the context length.
        return tokenizer(list(prompts)).to(self.parameter.device)

    def text_features(self, inputs: Tensor) -> Tensor:
        return self.model.encode_text(inputs)

    def text_tower(self) -> OpenCLIPTextTower:
        return OpenCLIPTextTower(self.model)


class OpenCLIPViTAdapter(ViTAdapter, OpenCLIPAdapter):
    family = "open_clip VisionTransformer"

    def __init__(self, model: nn.Module, interpretability_head: nn.Module | None = None) -> None:
        super().__init__(model, interpretability_head)
        visual = model.visual
        self.pooling = _open_clip_pooling(visual)
        if visual.proj is None:
            raise TypeError("model: expected an open_clip ViT with a projection, got proj=None")

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.visual.patch_size)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.visual.image_size)

    @property
    def embed_dim(self) -> int:
        return self.visual.proj.shape[1]

    @property
    def num_blocks(self) -> int:
        return len(self.visual.transformer.resblocks)

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        visual = self.visual
        x = visual.conv1(images)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + interpolate_pos_embed(visual.positional_embedding, grid, visual.grid_size).to(x.dtype)
        # Patch dropout is skipped on purpose: a dense map needs every patch.
        return visual.ln_pre(x), grid

    def block_views(self, method: str = "this method", grid: tuple[int, int] | None = None) -> list[BlockView]:
        batch_first = getattr(self.visual.transformer, "batch_first", True)
        return [OpenCLIPBlockView(block, batch_first) for block in self.visual.transformer.resblocks]

    def final_norm(self, tokens: Tensor) -> Tensor:
        # With an attention pool, ln_post normalises the pool's output, not the tokens.
        return tokens if self.pooling == "attention" else self.visual.ln_post(tokens)

    @property
    def pools_class_token(self) -> bool:
        return self.pooling == "tok"

    @property
    def global_tokens(self) -> int | None:
        return None if self.pooling == "avg" else 1

    def final_tokens(self, x: Tensor, patches: Tensor | None) -> Tensor:
        """The class token, or for a mean pool the mean of the original path's normed patches ``x[:, 1:]``
        (so that a second path's patches never enter the global embedding), then the patches, normed.

        An attention pool's output is narrower than the tokens and has no slot among them: with a second
        path its global embedding reads the class token and that path's patches
        (:attr:`exact_global_with_path`)."""
        if self.pooling != "avg":
            return super().final_tokens(x, patches)
        normed = self.final_norm(x)
        patches = normed[:, 1:] if patches is None else self.final_norm(patches)
        return torch.cat([self._mean(normed)[:, None], patches], dim=1)

    @property
    def exact_global_with_path(self) -> bool:
        return self.pooling != "attention"

    def _mean(self, normed: Tensor) -> Tensor:
        """(N, C) the mean pool of normed tokens (N, L, C): their patches, before the projection."""
        if normed.shape[1] < 2:
            raise ValueError(f"tokens: pool_type={self.pooling!r} pools the patch tokens, got none")
        return normed[:, 1:].mean(dim=1)

    def project(self, tokens: Tensor, surgery: bool = False) -> Tensor:
        if self.pooling != "attention":  # the class token or the mean of the patches, then the patches
            return project(tokens, self.visual.proj)
        # Index 0 stays the pooled embedding (== encode_image); each patch through the pool's value path.
        patches = attention_pool_value_path(self.visual, tokens[:, 1:])
        return torch.cat([self.project_global(tokens)[:, None], patches], dim=1)

    def project_global(self, tokens: Tensor) -> Tensor:
        if self.pooling != "attention":
            return project(tokens[:, 0], self.visual.proj)
        if tokens.shape[1] < 2:
            raise ValueError(f"tokens: pool_type={self.pooling!r} pools the patch tokens, got none")
        return project(self.visual.ln_post(self.visual.attn_pool(tokens))[:, 0], self.visual.proj)

    def pool(self, tokens: Tensor) -> Pooled:
        if self.pooling != "attention":
            normed = self.final_norm(tokens)
            weights = fixed_pool_weights(tokens, None if self.pooling == "tok" else 1)
            return Pooled(
                project(normed[:, 0] if self.pooling == "tok" else self._mean(normed), self.visual.proj),
                weights,
                False,
            )
        # The embedding is the pool's first query's output: its attention over the tokens, explicitly.
        pooler = self.visual.attn_pool
        keys = pooler.ln_k(tokens)
        query = pooler.ln_q(pooler.query[:1]).expand(tokens.shape[0], 1, -1)
        pooled, probabilities = multihead_attention(pooler.attn, query, keys, explicit=True)
        embedding = project(self.visual.ln_post(pooler.attn.out_proj(pooled))[:, 0], self.visual.proj)
        return Pooled(embedding, probabilities, True)

    def make_interpretability_head(self) -> nn.Module:
        if self.pooling == "attention":
            return AttentionPoolValueProjection(self.visual)
        return TokenProjection(self.visual.proj)


def _open_clip_pooling(visual: nn.Module) -> str:
    """``"tok"`` (class token), ``"avg"`` (mean of the patch tokens) or ``"attention"`` (a learned-query
    attention pool, open_clip's ``attentional_pool=True``, whose first query's output is the embedding)."""
    if getattr(visual, "attn_pool", None) is not None:
        if getattr(visual, "attn_pool_contrastive", None) is not None or visual.pool_type != "tok":
            raise TypeError(
                "model: expected an open_clip ViT whose attentional pool gives the embedding as its first "
                f"query (attentional_pool=True), got attentional_pool={visual.attn_pool_type!r}, "
                f"pool_type={visual.pool_type!r}"
            )
        return "attention"
    if getattr(visual, "pool_type", "tok") not in ("tok", "avg") or getattr(visual, "final_ln_after_pool", False):
        raise TypeError(
            "model: expected an open_clip ViT with pool_type 'tok' or 'avg' and final_ln_after_pool=False, got "
            f"pool_type={visual.pool_type!r}, final_ln_after_pool={getattr(visual, 'final_ln_after_pool', False)}"
        )
    return visual.pool_type


def attention_pool_value_path(visual: nn.Module, tokens: Tensor) -> Tensor:
    """Each token through an attention pool as if the query attended to it alone: the pool's key norm,
    value and output projections, then ``ln_post`` and ``proj`` (the ViT analogue of the ResNet
    attention pool's per-position projection, :class:`PositionwisePoolProjection`)."""
    attention = visual.attn_pool.attn
    _, _, (weight, bias) = multihead_projections(attention)
    values = attention.out_proj(F.linear(visual.attn_pool.ln_k(tokens), weight, bias))
    return project(visual.ln_post(values), visual.proj)


class AttentionPoolValueProjection(nn.Module):
    """Interpretability head of an attention-pooled open_clip ViT: a copy of the pool's value path
    (:func:`attention_pool_value_path`), applied to every token."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.attn_pool = copy.deepcopy(visual.attn_pool)
        self.ln_post = copy.deepcopy(visual.ln_post)
        self.proj = nn.Parameter(visual.proj.detach().clone())

    def forward(self, tokens: Tensor) -> Tensor:
        return attention_pool_value_path(self, tokens)


# ----------------------------------------------------------------------------------
# open_clip ModifiedResNet
# ----------------------------------------------------------------------------------
class PositionwisePoolProjection(nn.Module):
    """The attention pool's value and output projections applied to each position alone.

    This is the ResNet interpretability head (docs/methods.md §4): a copy of ``v_proj`` and
    ``c_proj`` so that every position is projected as if it attended only to itself.
    """

    def __init__(self, v_proj: nn.Linear, c_proj: nn.Linear) -> None:
        super().__init__()
        self.v_proj = nn.Linear(v_proj.in_features, v_proj.out_features)
        self.c_proj = nn.Linear(c_proj.in_features, c_proj.out_features)
        self.v_proj.load_state_dict(v_proj.state_dict())
        self.c_proj.load_state_dict(c_proj.state_dict())

    def forward(self, tokens: Tensor) -> Tensor:
        return self.c_proj(self.v_proj(tokens))


class OpenCLIPResNetAdapter(OpenCLIPAdapter):
    family = "open_clip ModifiedResNet"

    def __init__(self, model: nn.Module, interpretability_head: nn.Module | None = None) -> None:
        super().__init__(model, interpretability_head)
        self.pool = model.visual.attnpool

    @property
    def patch_size(self) -> tuple[int, int]:
        return (32, 32)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.visual.image_size
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    @property
    def embed_dim(self) -> int:
        return self.pool.c_proj.out_features

    def tokens(
        self,
        images: Tensor,
        surgery_depth: int = 0,
        *,
        path: DensePath | None = None,
        trace: AttentionTrace | None = None,
    ) -> Tensor:
        if path is not None or trace is not None:
            self.block_views("path" if path is not None else "trace")  # raises: no transformer blocks
        # A ResNet's surgery lives in its attention pool (see ``project``), not here.
        self.check_surgery_depth(surgery_depth)
        visual = self.visual
        x = visual.stem(images)
        x = visual.layer1(x)
        x = visual.layer2(x)
        x = visual.layer3(x)
        x = visual.layer4(x)
        x = self.tap_grid(x)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        return x + interpolate_pos_embed(self.pool.positional_embedding, grid).to(x.dtype)

    def _heads(self) -> tuple[int, int]:
        num_heads = self.pool.num_heads
        return num_heads, self.pool.v_proj.out_features // num_heads

    def project(self, tokens: Tensor, surgery: bool = False) -> Tensor:
        """The attention pool with every position as a query (docs/methods.md §1).

        With ``surgery`` the patch positions use CLIP Surgery's pool instead:
        q = k = v = the per-head L2-normalised values, scale ``8 / sqrt(head_dim)``;
        the global token keeps the original pooling (docs/methods.md §2).
        """
        pool = self.pool
        num_heads, head_dim = self._heads()
        if surgery:
            # Only the global token needs the original pool here: one query, not 1 + h*w.
            global_feature = self.project_global(tokens)
            # Every token, the mean token included, is a key of the value-value attention.
            value_attention = self_value_attention(pool.v_proj(tokens), num_heads, 8 * head_dim**-0.5, True)
            return torch.cat([global_feature[:, None], pool.c_proj(value_attention[:, 1:])], dim=1)
        n, length, _ = tokens.shape

        def split(t: Tensor) -> Tensor:
            return t.reshape(n, length, num_heads, head_dim).transpose(1, 2)

        q, k, v = split(pool.q_proj(tokens)), split(pool.k_proj(tokens)), split(pool.v_proj(tokens))
        out = F.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5)
        return pool.c_proj(out.transpose(1, 2).reshape(n, length, -1))

    def project_global(self, tokens: Tensor) -> Tensor:
        pool = self.pool
        num_heads, head_dim = self._heads()
        n, length, _ = tokens.shape
        q = pool.q_proj(tokens[:, :1]).reshape(n, 1, num_heads, head_dim).transpose(1, 2)
        k = pool.k_proj(tokens).reshape(n, length, num_heads, head_dim).transpose(1, 2)
        v = pool.v_proj(tokens).reshape(n, length, num_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5)
        return pool.c_proj(out.transpose(1, 2).reshape(n, -1))

    def make_interpretability_head(self) -> nn.Module:
        return PositionwisePoolProjection(self.pool.v_proj, self.pool.c_proj)
