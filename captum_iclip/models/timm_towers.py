"""Dense features of open_clip ``TimmModel`` towers: SigLIP, SigLIP 2, EVA02, ConvNeXt, FastViT.

open_clip wraps a timm *trunk* (``visual.trunk``) and an optional projection head
(``visual.head``). The trunk's own pooling decides how the dense features are
defined; the rule is the same for every kind (docs/methods.md §8, "Dense features of
other towers"): **each position goes through the pooling head as if it were the
pooled vector**, so the global entry is the model's own image embedding and every
other entry lives in the same space.

* token pooling (EVA02): final norm, then ``fc_norm``, the trunk's head and open_clip's
  head applied to every token;
* average pooling (``global_pool="avg"`` ViT/EVA, ConvNeXt, FastViT, ResNet trunks):
  the head that follows the pooling applied to every position; the global entry is
  the head applied to the true average;
* attention pooling with a learned latent query (SigLIP's MAP head, timm
  ``AttentionPoolLatent``): the position's own value vector replaces the
  attention-weighted sum of values, ``y_i = proj(v_i)``, then the head's residual
  MLP ``y_i + mlp(norm(y_i))``, then ``fc_norm`` and the projections.

For the MAP head the adapter's tokens live in the *value* space of the pooling
attention: entry 0 is the attention-weighted sum of the values (what the latent
query pools), entry ``i`` the value of patch ``i``; one position-wise head then
maps all of them, which makes entry 0 the model's embedding exactly.

The ViT and EVA trunks run through the shared block loop
(:func:`~captum_iclip.models.blocks.run_blocks`, one :class:`~captum_iclip.models.blocks.TimmBlockView`
per block, EVA's rotary embedding applied to the queries and keys of the patches): CLIP Surgery (Li et
al., 2023, arXiv 2304.05653), GEM, LeGrad, Chefer et al.'s relevancy and the ITSM path variants work on
them as on open_clip's ViT. Convolutional trunks have no attention to change and raise
``NotImplementedError`` (surgery) or ``TypeError`` (the block-loop methods).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from captum_iclip.models.base import Pooled, ViTAdapter, fixed_pool_weights
from captum_iclip.models.blocks import BlockView, TimmBlockView, explicit_attention
from captum_iclip.models.open_clip_towers import OpenCLIPAdapter


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _last_linear_out(module: nn.Module) -> int | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


class PositionwiseHead(nn.Module):
    """The pooling head of a timm tower applied to every position as if it were the pooled vector.

    ``forward`` maps (N, L, C) tokens to (N, L, D) embeddings. The modules are the
    model's own (shared) in the adapter, and deep copies in the interpretability
    head of a :class:`~captum_iclip.DualProjectionCLIP`.

    Args:
        kind: ``"map"`` (tokens are value vectors of a latent attention pool),
            ``"vit"`` (tokens are pooled-like vectors of a ViT/EVA trunk) or
            ``"conv"`` (channel vectors of a convolutional trunk).
        pool_tail: the latent pool's ``proj``, ``norm`` and ``mlp`` (``"map"`` only).
        trunk_head: ``fc_norm`` and ``head`` of a ViT/EVA trunk, or the trunk's
            pooling head module(s) of a CNN (run on 1x1 maps, where pooling is the identity).
        clip_head: open_clip's ``visual.head`` (dropout, linear or MLP projection).
    """

    def __init__(
        self, kind: str, trunk_head: nn.Module, clip_head: nn.Module, pool_tail: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.kind = kind
        self.pool_tail = pool_tail
        self.trunk_head = trunk_head
        self.clip_head = clip_head

    def forward(self, tokens: Tensor) -> Tensor:
        x = tokens
        if self.kind == "map":
            x = self.pool_tail.proj(x)
            if self.pool_tail.mlp is not None:
                x = x + self.pool_tail.mlp(self.pool_tail.norm(x))
        if self.kind == "conv":
            n, length, channels = x.shape
            x = self.trunk_head(x.reshape(n * length, channels, 1, 1)).reshape(n, length, -1)
        else:
            x = self.trunk_head(x)
        return self.clip_head(x)


class ConvPoolHead(nn.Module):
    """A CNN trunk's pooling head as one module: ``head`` (timm ``ClassifierHead`` /
    ``NormMlpClassifierHead``, whose pooling comes first) or ``global_pool`` then ``fc`` (ResNet)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x.flatten(1)


class TimmTowerAdapter(OpenCLIPAdapter):
    """What the open_clip ``TimmModel`` towers share: the trunk, open_clip's head, the output size."""

    def __init__(self, model: nn.Module, interpretability_head: nn.Module | None = None) -> None:
        super().__init__(model, interpretability_head)
        self.trunk = self.visual.trunk
        if "pool" in self.visual.head._modules:
            raise TypeError(
                "model: expected an open_clip timm tower pooled by its trunk (token, average or latent-attention "
                f"(MAP) pooling), got {self.model_name} with an attention pool in open_clip's head "
                f"({type(self.visual.head.pool).__name__})"
            )

    @property
    def model_name(self) -> str:
        config = getattr(self.trunk, "pretrained_cfg", None) or {}
        return f"{type(self.trunk).__name__} ({config.get('architecture', 'timm')})"

    @property
    def parameter(self) -> Tensor:
        return next(self.trunk.parameters())

    @property
    def image_size(self) -> tuple[int, int]:
        return _pair(self.visual.image_size)

    @property
    def embed_dim(self) -> int:
        out = _last_linear_out(self.visual.head)
        if out is not None:
            return out
        if getattr(self.trunk, "num_classes", 0):
            return self.trunk.num_classes
        return getattr(self.trunk, "head_hidden_size", None) or self.trunk.num_features

    def project(self, tokens: Tensor, surgery: bool = False) -> Tensor:
        return self.head(tokens)

    def project_global(self, tokens: Tensor) -> Tensor:
        return self.head(tokens[:, :1])[:, 0]

    def make_interpretability_head(self) -> nn.Module:
        return copy.deepcopy(self.head)


# ----------------------------------------------------------------------------------
# ViT and EVA trunks (timm VisionTransformer, Eva)
# ----------------------------------------------------------------------------------
class TimmViTAdapter(ViTAdapter, TimmTowerAdapter):
    """timm ``VisionTransformer`` (SigLIP, SigLIP 2) or ``Eva`` (EVA02) trunk.

    Pooling: the trunk's ``global_pool`` (``"token"`` or ``"avg"``) or its latent
    attention pool (``attn_pool``, SigLIP's MAP head); see the module docstring for
    the dense rule of each.
    """

    def __init__(self, model: nn.Module, interpretability_head: nn.Module | None = None) -> None:
        super().__init__(model, interpretability_head)
        trunk = self.trunk
        self.is_eva = type(trunk).__name__ == "Eva"
        pool = getattr(trunk, "attn_pool", None)
        if pool is not None:
            if type(pool).__name__ != "AttentionPoolLatent":
                raise TypeError(
                    f"model: expected timm's AttentionPoolLatent, got the attention pool {type(pool).__name__} "
                    f"of {self.model_name}"
                )
            if pool.latent_len != 1 or pool.pos_embed is not None:
                raise TypeError(
                    "model: expected a latent attention pool with one latent query and no positional embedding (the "
                    f"dense rule's), got {pool.latent_len} latents"
                    f"{' and a positional embedding' if pool.pos_embed is not None else ''} in {self.model_name}"
                )
            self.pool_kind = "map"
            tail = pool
        elif trunk.global_pool in ("token", "avg"):
            if trunk.global_pool == "token" and getattr(trunk, "cls_token", None) is None:
                raise TypeError(
                    f"model: expected a class token to pool (global_pool='token'), got none in {self.model_name}"
                )
            self.pool_kind = trunk.global_pool
            tail = None
        else:
            raise TypeError(
                "model: expected global_pool 'token', 'avg' or a latent attention pool ('map'), got "
                f"global_pool={trunk.global_pool!r} in {self.model_name}"
            )
        self.family = f"open_clip timm {type(trunk).__name__} ({self.pool_kind} pooling)"
        trunk_head = nn.Sequential(trunk.fc_norm, trunk.head_drop, trunk.head)
        self.head = PositionwiseHead("map" if tail is not None else "vit", trunk_head, self.visual.head, tail)
        self._ropes: dict = {}

    @property
    def patch_size(self) -> tuple[int, int]:
        return _pair(self.trunk.patch_embed.patch_size)

    @property
    def num_blocks(self) -> int:
        return len(self.trunk.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return self.trunk.num_prefix_tokens

    @property
    def pools_class_token(self) -> bool:
        return self.pool_kind == "token"

    @property
    def global_tokens(self) -> int | None:
        return 1 if self.pool_kind == "token" else None

    @property
    def _pool_first(self) -> int:
        """The first token the mean or attention pool reads: timm's Eva pools every token into its latent
        and averages the patches only; a VisionTransformer drops its prefix tokens from both unless told not to."""
        if self.pool_kind == "map":
            include_prefix = self.is_eva or self.trunk.pool_include_prefix
        else:
            include_prefix = not self.is_eva and self.trunk.pool_include_prefix
        return 0 if include_prefix else self.num_prefix_tokens

    # --- embedding and blocks -------------------------------------------------------
    def _rope(self, grid: tuple[int, int]):
        """The EVA rotary embedding for ``grid`` (the trunk's own at its native grid)."""
        rope = self.trunk.rope
        if rope is None:
            return None
        native = tuple(self.trunk.patch_embed.grid_size)
        if grid == native:
            if hasattr(rope, "feat_shape"):
                return rope.get_embed()
            return rope.get_embed(shape=native)
        if getattr(rope, "feat_shape", None) is None:
            return rope.get_embed(shape=grid)
        # A rope cached for the native grid: a copy re-cached for this grid (timm's own update).
        if grid not in self._ropes:
            resized = copy.deepcopy(rope)
            resized.update_feat_shape(list(grid))
            self._ropes = {grid: resized}
        return self._ropes[grid].get_embed()

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch embedding, prefix tokens and positional embedding at any grid, as timm's
        ``_pos_embed`` with ``dynamic_img_size`` (bicubic resampling), without its size check."""
        trunk = self.trunk
        patch_embed = trunk.patch_embed
        x = patch_embed.proj(images)
        grid = tuple(x.shape[-2:])
        x = patch_embed.norm(x.flatten(2).transpose(1, 2))
        pos = trunk.pos_embed
        if pos is not None and grid != tuple(patch_embed.grid_size):
            from timm.layers import resample_abs_pos_embed

            pos = resample_abs_pos_embed(
                pos,
                new_size=grid,
                old_size=patch_embed.grid_size,
                num_prefix_tokens=0 if trunk.no_embed_class else trunk.num_prefix_tokens,
            )
        prefix = [t.expand(x.shape[0], -1, -1) for t in (trunk.cls_token, trunk.reg_token) if t is not None]
        if pos is not None and trunk.no_embed_class:
            x = x + pos
        x = torch.cat([*prefix, x], dim=1)
        if pos is not None and not trunk.no_embed_class:
            x = x + pos
        x = trunk.pos_drop(x)
        return trunk.norm_pre(x), grid

    def block_views(self, method: str = "this method", grid: tuple[int, int] | None = None) -> list[BlockView]:
        blocks = self.trunk.blocks
        rope = self._rope(tuple(grid or self.trunk.patch_embed.grid_size)) if self.is_eva else None
        if rope is not None and getattr(self.trunk, "rope_mixed", False):
            # Mixed-mode rotary embeddings differ per block, as timm's forward passes them.
            return [TimmBlockView(block, rope[i]) for i, block in enumerate(blocks)]
        return [TimmBlockView(block, rope) for block in blocks]

    def final_norm(self, tokens: Tensor) -> Tensor:
        return self.trunk.norm(tokens)

    # --- pooling --------------------------------------------------------------------
    def final_tokens(self, x: Tensor, patches: Tensor | None) -> Tensor:
        x = self.final_norm(x)
        patches = x[:, self.num_prefix_tokens :] if patches is None else self.final_norm(patches)
        if self.pool_kind == "map":
            pooled = nn.functional.scaled_dot_product_attention(*self._latent_qkv(x), scale=self.trunk.attn_pool.scale)
            pooled, patches = BlockView.merge_heads(pooled)[:, 0], self._latent_values(patches)
        elif self.pool_kind == "token":
            pooled = x[:, 0]
        else:
            pooled = x[:, self._pool_first :].mean(dim=1)
        return torch.cat([pooled[:, None], patches], dim=1)

    def pool(self, tokens: Tensor) -> Pooled:
        if self.pool_kind == "token":
            return super().pool(tokens)
        if self.pool_kind == "avg":
            embedding = self.project_global(self.final_tokens(tokens, None))
            return Pooled(embedding, fixed_pool_weights(tokens, self._pool_first), False)
        q, k, v = self._latent_qkv(self.final_norm(tokens))
        pooled, probabilities = explicit_attention(q, k, v, self.trunk.attn_pool.scale)
        return Pooled(self.project_global(BlockView.merge_heads(pooled)), probabilities, True)

    def _latent_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The latent query (N, heads, 1, d) and the keys and values (N, heads, L', d) of the normed
        tokens ``x`` it reads (every token, or the patches: :attr:`_pool_first`), as timm's pool computes them."""
        pool = self.trunk.attn_pool
        keys = x[:, self._pool_first :]
        n, length, _ = keys.shape
        heads, head_dim = pool.num_heads, pool.head_dim
        q = pool.q(pool.latent.expand(n, -1, -1)).reshape(n, 1, heads, head_dim).transpose(1, 2)
        k, v = pool.kv(keys).reshape(n, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return pool.q_norm(q), pool.k_norm(k), v

    def _latent_values(self, patches: Tensor) -> Tensor:
        """The latent pool's value vector of every (normed) patch token."""
        kv = self.trunk.attn_pool.kv
        channels = patches.shape[-1]
        return nn.functional.linear(patches, kv.weight[channels:], None if kv.bias is None else kv.bias[channels:])


# ----------------------------------------------------------------------------------
# Convolutional trunks (ConvNeXt, FastViT, ResNet, ...)
# ----------------------------------------------------------------------------------
class TimmConvAdapter(TimmTowerAdapter):
    """timm convolutional trunk with global pooling (ConvNeXt, FastViT/MobileCLIP, ResNet).

    The trunk's features (N, C, h, w) are the positions; the pooling head (its norm,
    if the norm follows the pooling, and its projection) runs on each position as on
    a 1x1 map, where average, max and avg-max pooling are the identity. The global
    entry is the head on the trunk's own pooled vector.
    """

    SURGERY_REASON = (
        "CLIP Surgery adds a value-value path to the last blocks of a ViT/EVA trunk, whose tokens are pooled "
        "after them; this trunk is convolutional (or a convolution-attention hybrid) pooled by averaging"
    )

    def __init__(self, model: nn.Module, interpretability_head: nn.Module | None = None) -> None:
        super().__init__(model, interpretability_head)
        trunk = self.trunk
        head = getattr(trunk, "head", None)
        if head is not None and hasattr(head, "global_pool"):
            self.pool, pool_head = head.global_pool, ConvPoolHead(head)
        elif hasattr(trunk, "global_pool") and hasattr(trunk, "fc"):
            self.pool, pool_head = trunk.global_pool, ConvPoolHead(trunk.global_pool, trunk.fc)
        else:
            raise TypeError(
                "model: expected a timm trunk with a pooling head (head.global_pool, or global_pool and fc), "
                f"got {self.model_name}"
            )
        pool_type = getattr(self.pool, "pool_type", "avg")
        if pool_type not in ("avg", "max", "avgmax", "fast", "fastavg", "fastmax", "fastavgmax"):
            raise TypeError(f"model: expected avg, max or avgmax pooling, got {pool_type!r} in {self.model_name}")
        self.family = f"open_clip timm {type(trunk).__name__} ({pool_type} pooling)"
        self.head = PositionwiseHead("conv", pool_head, self.visual.head)

    @property
    def patch_size(self) -> tuple[int, int]:
        info = getattr(self.trunk, "feature_info", None)
        reduction = info[-1]["reduction"] if info else 32
        return (reduction, reduction)

    @property
    def has_surgery(self) -> bool:
        return False

    def check_surgery_depth(self, surgery_depth: int) -> None:
        super().check_surgery_depth(surgery_depth)
        if surgery_depth:
            raise NotImplementedError(
                f"variant: expected a variant other than surgery for {self.model_name}, got 'surgery': "
                f"{self.SURGERY_REASON}"
            )

    def tokens(self, images: Tensor, surgery_depth: int = 0) -> Tensor:
        self.check_surgery_depth(surgery_depth)
        features = self.tap_grid(self.trunk.forward_features(images))
        pooled = self.pool(features).flatten(1)
        return torch.cat([pooled[:, None], features.flatten(2).transpose(1, 2)], dim=1)


def timm_tower_adapter(model: nn.Module, interpretability_head: nn.Module | None = None) -> TimmTowerAdapter:
    """The adapter of an open_clip model whose vision tower is a ``TimmModel``: by its trunk, a ViT/EVA or a
    convolutional one."""
    trunk = model.visual.trunk
    if hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed"):
        if type(trunk).__name__ not in ("VisionTransformer", "Eva"):
            raise TypeError(
                "model: expected a timm VisionTransformer (SigLIP), Eva (EVA02) or convolutional trunk, got the "
                f"transformer trunk {type(trunk).__name__}"
            )
        return TimmViTAdapter(model, interpretability_head)
    return TimmConvAdapter(model, interpretability_head)
