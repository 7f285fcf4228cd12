"""Dense image-token features of CLIP vision towers (docs/methods.md §1, §2).

One adapter per model family turns a CLIP model into the same small interface:

* ``tokens(images, surgery_depth)`` runs the tower up to its final projection and
  returns one feature per position: the global token first, then every patch
  (row-major over the patch grid);
* ``project(tokens)`` applies the recognition projection to every token, so that
  ``project(tokens(x))[:, 0]`` equals the library's own ``encode_image(x)``;
* ``encode_text(prompts, tokenizer)`` and ``logit_scale`` give the text side.

An optional *interpretability head* (the second projection of ICLIP, docs/methods.md §4) can
be attached; ``dense_features(..., projection="interpretability")`` then projects
the patch tokens with it while the global token keeps the recognition projection.

The ViT families (open_clip and Hugging Face) share one block loop
(:class:`ViTAdapter`, :func:`~captum_iclip.models.blocks.run_blocks`) over per-family
block views, so CLIP Surgery and the attention variants of the other dense methods
(:mod:`captum_iclip.models.attention`) are written once for both.

Supported families: open_clip ``VisionTransformer`` (any patch size, any input
size divisible by it), open_clip ``ModifiedResNet`` (RN50, RN101, RN50x4, ...) and
Hugging Face ``transformers.CLIPModel`` here; open_clip's timm towers (SigLIP, SigLIP 2,
EVA02, ConvNeXt, FastViT) in :mod:`captum_iclip.models.timm_towers` and Hugging Face
``SiglipModel`` / ``Siglip2Model`` in :mod:`captum_iclip.models.hf_siglip`
(docs/methods.md §8).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_iclip._precision import project, upcast
from captum_iclip.models.attention import self_value_attention, surgery_path
from captum_iclip.models.blocks import AttentionTrace, BlockView, DensePath, HFBlockView, OpenCLIPBlockView, run_blocks

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SUPPORTED_MODELS = (
    "open_clip CLIP/CustomTextCLIP with a VisionTransformer tower",
    "open_clip CLIP/CustomTextCLIP with a ModifiedResNet tower",
    "transformers.CLIPModel",
    "open_clip timm towers (SigLIP, SigLIP 2, EVA02, ConvNeXt, FastViT)",
    "transformers.SiglipModel",
)

#: The one block loop (:func:`~captum_iclip.models.blocks.run_blocks`) reads the global token
#: as token 0 of the original path; what the towers without one lack for the block-loop methods.
BLOCK_LOOP_TOWERS = (
    "a class-token ViT tower run by the shared block loop (open_clip VisionTransformer, transformers.CLIPModel)"
)


def block_loop_unavailable(method: str, model: str, reason: str) -> NotImplementedError:
    """The error of a block-loop method (GEM, LeGrad, Chefer, the ITSM path variants) on a
    transformer tower the block loop does not run, naming the method, the model and why."""
    return NotImplementedError(f"model: {method} expected {BLOCK_LOOP_TOWERS}, got {model}; {reason}")


class GridTap(nn.Identity):
    """Identity on the patch-token grid (N, C, h, w) entering the last block.

    It exists so that Captum's ``LayerGradCam`` (which hooks a module and expects a
    spatial (N, C, h, w) output) can be applied to ViT towers exactly as to ResNets.
    """


def interpolate_pos_embed(
    pos_embed: Tensor, grid: tuple[int, int], native_grid: tuple[int, int] | None = None
) -> Tensor:
    """Resize a (1 + h0*w0, C) positional embedding to ``grid`` (docs/methods.md §1).

    The class position is kept; patch positions are resampled bilinearly
    (``align_corners=False``). At the native grid the embedding is returned as is,
    so the library's own forward pass is reproduced exactly.

    Args:
        pos_embed: (1 + h0*w0, C) embedding, class position first, patches row-major.
        grid: the target patch grid (h, w).
        native_grid: the grid (h0, w0) the embedding was trained for; ``None``
            means square (h0 = w0 = sqrt of the number of patch positions).

    Returns:
        The (1 + h*w, C) embedding for ``grid``.

    Examples::

        >>> pos = torch.randn(1 + 14 * 14, 768)
        >>> interpolate_pos_embed(pos, (14, 20)).shape
        torch.Size([281, 768])
    """
    n_patches = pos_embed.shape[0] - 1
    if native_grid is None:
        side = int(round(math.sqrt(n_patches)))
        native_grid = (side, side)
    native_grid = tuple(int(g) for g in native_grid)
    if native_grid[0] * native_grid[1] != n_patches:
        raise ValueError(
            f"pos_embed: expected {native_grid[0] * native_grid[1]} patch positions (native grid {native_grid}), "
            f"got {n_patches}"
        )
    if tuple(grid) == native_grid:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:1], pos_embed[1:]
    patch_pos = patch_pos.reshape(1, *native_grid, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=grid, mode="bilinear", align_corners=False)
    patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
    return torch.cat([cls_pos, patch_pos], dim=0)


def check_depth(depth: int, num_blocks: int | None, name: str = "surgery_depth") -> None:
    """``depth`` must be an int in 0..num_blocks (any int >= 0 when ``num_blocks`` is None)."""
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"{name}: expected an int, got {type(depth).__name__}")
    if num_blocks is None:
        if depth < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {depth}")
    elif not 0 <= depth <= num_blocks:
        raise ValueError(f"{name}: expected 0..{num_blocks} (the tower has {num_blocks} blocks), got {depth}")


class VisionAdapter:
    """Common interface of the dense CLIP vision adapters.

    Args:
        model: the CLIP model (image and text towers).
        interpretability_head: optional module applied to the patch tokens
            instead of the recognition projection (ICLIP, docs/methods.md §4).
    """

    family: str = ""

    def __init__(self, model: nn.Module, interpretability_head: nn.Module | None = None) -> None:
        self.model = model
        self.interpretability_head = interpretability_head
        self.grid_tap = GridTap()

    # --- geometry -------------------------------------------------------------------
    @property
    def patch_size(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def image_size(self) -> tuple[int, int]:
        """The resolution the tower was built for."""
        raise NotImplementedError

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return OPENAI_CLIP_MEAN

    @property
    def image_std(self) -> tuple[float, float, float]:
        return OPENAI_CLIP_STD

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        ph, pw = self.patch_size
        if height % ph or width % pw:
            raise ValueError(
                f"inputs: expected an image size divisible by the {self.family} patch size {ph}x{pw} (resize "
                f"to a multiple, e.g. {ph * max(1, round(height / ph))}x{pw * max(1, round(width / pw))}), "
                f"got {height}x{width}"
            )
        return height // ph, width // pw

    @property
    def embed_dim(self) -> int:
        """Dimension D of the joint image-text embedding."""
        raise NotImplementedError

    @property
    def parameter(self) -> Tensor:
        """A parameter of the vision tower, to read its device and dtype."""
        raise NotImplementedError

    @property
    def num_blocks(self) -> int | None:
        """Transformer blocks that architecture surgery can reach; ``None`` where the
        surgery is a single switch (the ResNet attention pool: any depth > 0 turns it on)."""
        return None

    @property
    def has_surgery(self) -> bool:
        """Whether CLIP Surgery (docs/methods.md §2) is defined on this tower."""
        return True

    def check_surgery_depth(self, surgery_depth: int) -> None:
        """Raise ``TypeError``/``ValueError`` naming ``surgery_depth`` if it does not fit the tower."""
        check_depth(surgery_depth, self.num_blocks)

    def check_images(self, images: Tensor, name: str = "inputs") -> tuple[int, int]:
        """Validate a batch of images and return its patch grid size."""
        if not isinstance(images, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor of shape (N, 3, H, W), got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor (N, 3, H, W), got shape {tuple(images.shape)}")
        if images.shape[1] != 3:
            raise ValueError(f"{name}: expected 3 colour channels in dim 1, got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError(f"{name}: expected at least one image, got an empty batch")
        param = self.parameter
        if images.device != param.device:
            raise ValueError(
                f"{name}: expected images on the model's device {param.device} (move one of them), got {images.device}"
            )
        if not images.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor (a preprocessed image), got {images.dtype}")
        if images.dtype != param.dtype:
            raise TypeError(
                f"{name}: expected images of the model's dtype {param.dtype} (cast one of them), got {images.dtype}"
            )
        return self.grid_size(images.shape[-2], images.shape[-1])

    # --- image side -----------------------------------------------------------------
    def tap_patches(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """Route the patch tokens of (N, 1 + h*w, C) through :attr:`grid_tap` as an (N, C, h, w) map."""
        n, _, c = x.shape
        patches = self.tap_grid(x[:, 1:].transpose(1, 2).reshape(n, c, *grid))
        return torch.cat([x[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)

    def tap_grid(self, grid_map: Tensor) -> Tensor:
        """An (N, C, h, w) map through :attr:`grid_tap`, tapped in at least float32 so that Grad-CAM's
        channel sums are (half-precision rules, docs/methods.md); returned in its own dtype."""
        return self.grid_tap(upcast(grid_map)).to(grid_map.dtype)

    def tokens(
        self,
        images: Tensor,
        surgery_depth: int = 0,
        *,
        path: DensePath | None = None,
        trace: AttentionTrace | None = None,
    ) -> Tensor:
        """Pre-projection tokens (N, 1 + h*w, C): global token first, then patches.

        ``path`` (a second path through the last blocks, e.g. ClearCLIP's) and
        ``trace`` (a record of the last blocks' attention) need a transformer
        tower; see :class:`ViTAdapter`.
        """
        raise NotImplementedError

    def block_views(self, method: str = "this method") -> list[BlockView]:
        """The tower's transformer blocks as block views (:class:`~captum_iclip.models.blocks.BlockView`).

        Raises:
            TypeError: naming ``method`` where the tower has no transformer blocks (ResNets).
        """
        raise TypeError(
            f"model: {method} expected a ViT tower (it changes or reads the attention of the last "
            f"transformer blocks), got a {self.family} tower"
        )

    def final_norm(self, tokens: Tensor) -> Tensor:
        """The tower's last normalisation (ln_post / post_layernorm) on every token."""
        raise NotImplementedError

    def project(self, tokens: Tensor, surgery: bool = False) -> Tensor:
        """Recognition projection of every token: (N, L, C) -> (N, L, D).

        ``surgery`` selects CLIP Surgery's projection where a family has one of
        its own (the ResNet attention pool); transformers do their surgery in
        :meth:`tokens`.
        """
        raise NotImplementedError

    def project_global(self, tokens: Tensor) -> Tensor:
        """Recognition projection of the global token alone: (N, L, C) -> (N, D)."""
        return self.project(tokens)[:, 0]

    def encode_image(self, images: Tensor) -> Tensor:
        """The recognition image embedding, equal to the library's ``encode_image``."""
        return self.project_global(self.tokens(images))

    def own_image_inputs(self, images: Tensor) -> dict[str, Tensor]:
        """The keyword inputs of a Hugging Face model's ``get_image_features`` for (N, 3, H, W) images."""
        return {"pixel_values": images}

    def own_image_features(self, images: Tensor) -> Tensor:
        """The model's own image embedding (N, D) by its own forward: open_clip's ``encode_image``,
        or Hugging Face's ``get_image_features`` on :meth:`own_image_inputs`."""
        if hasattr(self.model, "encode_image"):
            return self.model.encode_image(images)
        out = self.model.get_image_features(**self.own_image_inputs(images))
        return out if isinstance(out, Tensor) else out.pooler_output

    def dense_features(
        self,
        images: Tensor,
        *,
        surgery_depth: int = 0,
        projection: str = "recognition",
        path: DensePath | None = None,
    ) -> Tensor:
        """Projected features of every token (N, 1 + h*w, D), unnormalised.

        Args:
            images: (N, 3, H, W) preprocessed images.
            surgery_depth: number of final blocks run with CLIP Surgery's dual
                paths (docs/methods.md §2); 0 runs the plain tower.
            projection: ``"recognition"`` projects every token with the model's
                own projection; ``"interpretability"`` projects the patch tokens
                with the attached interpretability head (the global token keeps
                the recognition projection).
            path: a second path through the last blocks for the patch tokens
                (MaskCLIP, SCLIP, ClearCLIP, NACLIP, GEM: see
                :mod:`captum_iclip.models.attention`); ViT towers only.

        Returns:
            (N, 1 + h*w, D) features; index 0 is the global token and equals
            the library's ``encode_image(images)``.

        Raises:
            ValueError: for an unknown ``projection`` or an out-of-range ``surgery_depth``.

        Examples::

            >>> adapter = get_adapter(open_clip.create_model("ViT-B-16"))
            >>> adapter.dense_features(torch.randn(1, 3, 224, 320)).shape
            torch.Size([1, 281, 512])
        """
        # Checked before the (expensive) tower runs.
        if projection not in ("recognition", "interpretability"):
            raise ValueError(f"projection: expected 'recognition' or 'interpretability', got {projection!r}")
        if projection == "interpretability" and self.interpretability_head is None:
            raise ValueError(
                "projection: expected 'recognition' ('interpretability' is for a DualProjectionCLIP model), "
                "got 'interpretability'"
            )
        # ``path`` only when given: adapters of towers without transformer blocks need not know it.
        tokens = self.tokens(images, surgery_depth=surgery_depth, **({"path": path} if path is not None else {}))
        if projection == "recognition":
            return self.project(tokens, surgery=surgery_depth > 0)
        global_feature = self.project_global(tokens)
        patches = self.interpretability_head(tokens)[:, 1:]
        return torch.cat([global_feature[:, None], patches], dim=1)

    # --- text side ------------------------------------------------------------------
    def encode_text(self, prompts: Sequence[str], tokenizer: Callable) -> Tensor:
        raise NotImplementedError

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()

    def make_interpretability_head(self) -> nn.Module:
        """A new projection for the patch tokens, initialised as a copy of the recognition one."""
        raise NotImplementedError


class ViTAdapter(VisionAdapter):
    """What the ViT families share: one block loop over their block views (:class:`BlockView`).

    A family gives :meth:`embed` (patch, class and position embeddings, pre-norm),
    :meth:`block_views` and :meth:`final_norm`; :meth:`tokens` is then the same for
    all of them, so CLIP Surgery and every attention variant is written once
    (:func:`~captum_iclip.models.blocks.run_blocks`).
    """

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Tokens (N, 1 + h*w, C) entering the first block, and the patch grid (h, w)."""
        raise NotImplementedError

    def tokens(
        self,
        images: Tensor,
        surgery_depth: int = 0,
        *,
        path: DensePath | None = None,
        trace: AttentionTrace | None = None,
    ) -> Tensor:
        self.check_surgery_depth(surgery_depth)
        if surgery_depth:
            if path is not None:
                raise ValueError(
                    f"path: expected None with surgery_depth={surgery_depth} (one second path), got {path!r}"
                )
            path = surgery_path(surgery_depth)
        if path is not None:
            check_depth(path.depth, self.num_blocks, "path.depth")
        if trace is not None:
            check_depth(trace.start, self.num_blocks - 1, "trace.start")
        x, grid = self.embed(images)
        x = run_blocks(self.block_views(), x, grid, path=path, trace=trace, tap=lambda t: self.tap_patches(t, grid))
        return self.final_norm(x)


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

    def encode_text(self, prompts: Sequence[str], tokenizer: Callable) -> Tensor:
        text = tokenizer(list(prompts)).to(self.parameter.device)
        return self.model.encode_text(text)


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

    def block_views(self, method: str = "this method") -> list[BlockView]:
        batch_first = getattr(self.visual.transformer, "batch_first", True)
        return [OpenCLIPBlockView(block, batch_first) for block in self.visual.transformer.resblocks]

    def final_norm(self, tokens: Tensor) -> Tensor:
        # With an attention pool, ln_post normalises the pool's output, not the tokens.
        return tokens if self.pooling == "attention" else self.visual.ln_post(tokens)

    def project(self, tokens: Tensor, surgery: bool = False) -> Tensor:
        if self.pooling == "tok":
            return project(tokens, self.visual.proj)
        # Index 0 stays the pooled embedding (== encode_image); each patch is projected on its own.
        if self.pooling == "avg":
            patches = project(tokens[:, 1:], self.visual.proj)
        else:
            patches = attention_pool_value_path(self.visual, tokens[:, 1:])
        return torch.cat([self.project_global(tokens)[:, None], patches], dim=1)

    def project_global(self, tokens: Tensor) -> Tensor:
        if self.pooling == "tok":
            return project(tokens[:, 0], self.visual.proj)
        if tokens.shape[1] < 2:
            raise ValueError(f"tokens: pool_type={self.pooling!r} pools the patch tokens, got none")
        if self.pooling == "avg":
            return project(tokens[:, 1:].mean(dim=1), self.visual.proj)
        return project(self.visual.ln_post(self.visual.attn_pool(tokens))[:, 0], self.visual.proj)

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
    dim = attention.embed_dim
    if attention._qkv_same_embed_dim:
        weight = attention.in_proj_weight[2 * dim :]
    else:
        weight = attention.v_proj_weight
    bias = attention.in_proj_bias[2 * dim :] if attention.in_proj_bias is not None else None
    values = attention.out_proj(F.linear(visual.attn_pool.ln_k(tokens), weight, bias))
    return project(visual.ln_post(values), visual.proj)


class AttentionPoolValueProjection(nn.Module):
    """Interpretability head of an attention-pooled open_clip ViT: a copy of the pool's value path
    (:func:`attention_pool_value_path`), applied to every token."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        import copy

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


# ----------------------------------------------------------------------------------
# Hugging Face CLIPModel
# ----------------------------------------------------------------------------------
class LinearCopy(nn.Linear):
    """A copy of an ``nn.Linear`` (the HF ``visual_projection``) as the interpretability head."""

    def __init__(self, source: nn.Linear) -> None:
        super().__init__(source.in_features, source.out_features, bias=source.bias is not None)
        self.load_state_dict(source.state_dict())

    def forward(self, tokens: Tensor) -> Tensor:
        return _linear(tokens, self)


def _linear(tokens: Tensor, linear: nn.Linear) -> Tensor:
    """An ``nn.Linear`` projection of tokens in at least float32 (:func:`~captum_iclip._precision.project`)."""
    return project(tokens, linear.weight.t(), linear.bias)


class HFCLIPAdapter(ViTAdapter):
    family = "transformers CLIPModel"

    def __init__(self, model: nn.Module, interpretability_head: nn.Module | None = None) -> None:
        super().__init__(model, interpretability_head)
        self.vision = model.vision_model

    @property
    def patch_size(self) -> tuple[int, int]:
        p = self.vision.embeddings.patch_size
        return (p, p)

    @property
    def image_size(self) -> tuple[int, int]:
        s = self.vision.embeddings.image_size
        return (s, s)

    @property
    def embed_dim(self) -> int:
        return self.model.visual_projection.out_features

    @property
    def parameter(self) -> Tensor:
        return self.vision.embeddings.patch_embedding.weight

    @property
    def num_blocks(self) -> int:
        return len(self.vision.encoder.layers)

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        emb = self.vision.embeddings
        x = emb.patch_embedding(images)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([emb.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = x + interpolate_pos_embed(emb.position_embedding.weight, grid).to(x.dtype)
        return self.vision.pre_layrnorm(x), grid

    def block_views(self, method: str = "this method") -> list[BlockView]:
        return [HFBlockView(layer) for layer in self.vision.encoder.layers]

    def final_norm(self, tokens: Tensor) -> Tensor:
        return self.vision.post_layernorm(tokens)

    def project(self, tokens: Tensor, surgery: bool = False) -> Tensor:
        return _linear(tokens, self.model.visual_projection)

    def project_global(self, tokens: Tensor) -> Tensor:
        return _linear(tokens[:, 0], self.model.visual_projection)

    def encode_text(self, prompts: Sequence[str], tokenizer: Callable) -> Tensor:
        batch = tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        batch = {k: v.to(self.parameter.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        out = self.model.get_text_features(**batch)
        return out if isinstance(out, Tensor) else out.pooler_output

    def make_interpretability_head(self) -> nn.Module:
        return LinearCopy(self.model.visual_projection)


def get_adapter(model: nn.Module) -> VisionAdapter:
    """Pick the dense adapter for ``model``.

    Args:
        model: an open_clip CLIP model (ViT, ModifiedResNet or timm tower: SigLIP,
            EVA02, ConvNeXt, ...), a Hugging Face ``CLIPModel`` or ``SiglipModel``, or
            a :class:`~captum_iclip.DualProjectionCLIP` wrapping one.

    Returns:
        The adapter. A ``DualProjectionCLIP`` gives its inner model's adapter with
        its interpretability head attached.

    Raises:
        TypeError: for any other kind of model, naming its type and the supported ones.
    """
    head = None
    inner = getattr(model, "interpretability_head", None)
    if inner is not None and hasattr(model, "clip"):
        model, head = model.clip, inner
    # The families with their own modules: open_clip timm towers, Hugging Face SigLIP.
    from captum_iclip.models.hf_siglip import hf_siglip_adapter
    from captum_iclip.models.timm_towers import timm_tower_adapter

    for find in (timm_tower_adapter, hf_siglip_adapter):
        adapter = find(model, head)
        if adapter is not None:
            return adapter
    visual = getattr(model, "visual", None)
    if visual is not None:
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import VisionTransformer

        if isinstance(visual, VisionTransformer):
            return OpenCLIPViTAdapter(model, head)
        if isinstance(visual, ModifiedResNet):
            return OpenCLIPResNetAdapter(model, head)
        raise TypeError(
            f"model: expected one of {', '.join(SUPPORTED_MODELS)}, got the vision tower "
            f"{type(visual).__module__}.{type(visual).__name__}"
        )
    try:
        from transformers import CLIPModel
    except ImportError:  # pragma: no cover - transformers is a core dependency
        CLIPModel = ()
    if CLIPModel and isinstance(model, CLIPModel):
        return HFCLIPAdapter(model, head)
    raise TypeError(
        f"model: expected one of {', '.join(SUPPORTED_MODELS)}, got the model type "
        f"{type(model).__module__}.{type(model).__name__}"
    )
