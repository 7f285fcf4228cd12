"""The interface every dense adapter of a CLIP vision tower has (docs/methods.md §1, §2), and what the families share.

One adapter per model family turns a CLIP model into the same small interface:

* ``tokens(images, surgery_depth)`` runs the tower up to its final projection and
  returns one feature per position: the global token first, then every patch
  (row-major over the patch grid);
* ``project(tokens)`` applies the recognition projection to every token, so that
  ``project(tokens(x))[:, 0]`` equals the library's own ``encode_image(x)``;
* ``text_inputs(prompts, tokenizer)`` (the family's tokenization, for explaining and training alike),
  ``text_features(inputs)``, ``encode_text(prompts, tokenizer)`` and ``logit_scale`` give the text side.

An optional *interpretability head* (the second projection of ICLIP, docs/methods.md §4) can
be attached; ``dense_features(..., projection="interpretability")`` then projects
the patch tokens with it while the global token keeps the recognition projection.

Every ViT family (open_clip, Hugging Face CLIP and SigLIP, open_clip's timm ViT and EVA trunks) runs
through one block loop (:class:`ViTAdapter`, :func:`~captum_iclip.models.blocks.run_blocks`) over
per-family block views, so CLIP Surgery, the attention variants of the other dense methods
(:mod:`captum_iclip.models.attention`), the attention records of LeGrad and Chefer et al. and the
Grad-CAM tap are written once for all of them.

The families live in their own modules (:mod:`~captum_iclip.models.open_clip_towers`,
:mod:`~captum_iclip.models.hf_clip`, :mod:`~captum_iclip.models.hf_siglip`,
:mod:`~captum_iclip.models.timm_towers`); :mod:`~captum_iclip.models.registry` picks one by the model's type.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_iclip._precision import upcast
from captum_iclip.models.attention import surgery_path
from captum_iclip.models.blocks import AttentionTrace, BlockView, DensePath, explicit_attention, run_blocks
from captum_iclip.models.text import TEXT_TOWERS, TextTower

#: The projections of the patch tokens a map can be drawn from (see :meth:`VisionAdapter.resolve_projection`).
PROJECTIONS = ("auto", "recognition", "interpretability")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: The towers of the block-loop methods (GEM, LeGrad, Chefer et al., the ITSM path variants): every ViT
#: tower runs through the one block loop (:func:`~captum_iclip.models.blocks.run_blocks`).
BLOCK_LOOP_TOWERS = (
    "a ViT tower (open_clip VisionTransformer or timm ViT/EVA trunk, transformers CLIPModel, SiglipModel or "
    "Siglip2Model)"
)
#: What the methods that read the class token's own attention need (Grad-ECLIP).
CLASS_TOKEN_TOWERS = (
    "a ViT tower whose embedding is its class token (open_clip VisionTransformer, transformers CLIPModel, a timm "
    "ViT/EVA trunk with token pooling)"
)


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
    def tap_patches(self, x: Tensor, grid: tuple[int, int], prefix: int = 1) -> Tensor:
        """Route the patch tokens of (N, prefix + h*w, C) through :attr:`grid_tap` as an (N, C, h, w) map;
        the ``prefix`` tokens before them (class and register tokens) pass unchanged."""
        n, _, c = x.shape
        patches = self.tap_grid(x[:, prefix:].transpose(1, 2).reshape(n, c, *grid))
        return torch.cat([x[:, :prefix], patches.flatten(2).transpose(1, 2)], dim=1)

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

    def block_views(self, method: str = "this method", grid: tuple[int, int] | None = None) -> list[BlockView]:
        """The tower's transformer blocks as block views (:class:`~captum_iclip.models.blocks.BlockView`), for the
        patch grid ``grid`` (the tower's own by default; it matters to rotary embeddings only).

        Raises:
            TypeError: naming ``method`` where the tower has no transformer blocks (ResNets).
        """
        raise TypeError(
            f"model: {method} expected a ViT tower (it changes or reads the attention of the last "
            f"transformer blocks), got a {self.family} tower"
        )

    def final_norm(self, tokens: Tensor) -> Tensor:
        """The tower's last normalisation (ln_post / post_layernorm / timm's norm) on every token."""
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

    @property
    def exact_global_with_path(self) -> bool:
        """Whether the global entry of the dense features (index 0) stays the tower's own embedding when a
        second path gives the patches (CLIP Surgery's feature surgery reads it)."""
        return True

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

    def resolve_projection(self, projection: str) -> str:
        """``projection`` as ``"recognition"`` or ``"interpretability"``: ``"auto"`` is the interpretability
        projection when the model has one (a DualProjectionCLIP), else the recognition one.

        Raises:
            ValueError: for a name outside :data:`PROJECTIONS`, or ``"interpretability"`` without a head.
        """
        if projection not in PROJECTIONS:
            raise ValueError(f"projection: expected one of {PROJECTIONS}, got {projection!r}")
        if projection == "auto":
            return "interpretability" if self.interpretability_head is not None else "recognition"
        if projection == "interpretability" and self.interpretability_head is None:
            raise ValueError(
                "projection: expected 'recognition' ('interpretability' is for a DualProjectionCLIP model), "
                "got 'interpretability'"
            )
        return projection

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
                the recognition projection); ``"auto"`` is the second when the model has a head.
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
        projection = self.resolve_projection(projection)
        # ``path`` only when given: adapters of towers without transformer blocks need not know it.
        tokens = self.tokens(images, surgery_depth=surgery_depth, **({"path": path} if path is not None else {}))
        if projection == "recognition":
            return self.project(tokens, surgery=surgery_depth > 0)
        global_feature = self.project_global(tokens)
        patches = self.interpretability_head(tokens)[:, 1:]
        return torch.cat([global_feature[:, None], patches], dim=1)

    # --- text side ------------------------------------------------------------------
    def text_inputs(self, prompts: Sequence[str], tokenizer: Callable) -> Tensor | dict[str, Tensor]:
        """The text tower's inputs for ``prompts``, on the model's device: the family's one tokenization rule.

        Explaining (:meth:`encode_text`) and ICLIP training (``training.iclip.train_step``) both
        tokenize here, so that a trained model is explained with the text it was trained on.
        """
        raise NotImplementedError

    def text_features(self, inputs: Tensor | dict[str, Tensor]) -> Tensor:
        """The text tower's (K, D) embeddings, not normalised, of what :meth:`text_inputs` gives."""
        raise NotImplementedError

    def encode_text(self, prompts: Sequence[str], tokenizer: Callable) -> Tensor:
        return self.text_features(self.text_inputs(prompts, tokenizer))

    def text_tower(self) -> TextTower:
        """The text tower through its parts (:class:`~captum_iclip.models.text.TextTower`), for the
        text-side explanations.

        Raises:
            TypeError: where the family's text tower is not a causal CLIP one pooled at its end-of-text token.
        """
        raise TypeError(f"model: the text-side explanations expected {TEXT_TOWERS}, got a {self.family} model")

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()

    def make_interpretability_head(self) -> nn.Module:
        """A new projection for the patch tokens, initialised as a copy of the recognition one."""
        raise NotImplementedError


class HFVisionGeometry:
    """Patch and input size of a Hugging Face vision tower (``self.vision.embeddings``), for its adapters."""

    @property
    def patch_size(self) -> tuple[int, int]:
        p = self.vision.embeddings.patch_size
        return (p, p)

    @property
    def image_size(self) -> tuple[int, int]:
        s = self.vision.embeddings.image_size
        return (s, s)


def hf_text_features(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """A Hugging Face model's ``get_text_features`` (a tensor, or an output whose ``pooler_output`` it is)."""
    out = model.get_text_features(**inputs)
    return out if isinstance(out, Tensor) else out.pooler_output


def multihead_projections(attention: nn.MultiheadAttention) -> list[tuple[Tensor, Tensor | None]]:
    """The (weight, bias) of the query, key and value projections of an ``nn.MultiheadAttention``."""
    if attention._qkv_same_embed_dim:
        weights = attention.in_proj_weight.chunk(3)
    else:
        weights = (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
    biases = (None,) * 3 if attention.in_proj_bias is None else attention.in_proj_bias.chunk(3)
    return list(zip(weights, biases))


def multihead_attention(
    attention: nn.MultiheadAttention, query: Tensor, keys: Tensor, *, explicit: bool = False
) -> tuple[Tensor, Tensor | None]:
    """An ``nn.MultiheadAttention`` of ``query`` (N, Q, C) over ``keys`` (N, L, C'), batch-first, up to its
    ``out_proj``: the fused kernel, or with ``explicit`` the probabilities computed explicitly
    (:func:`~captum_iclip.models.blocks.explicit_attention`).

    Returns:
        The attention-weighted sum of the values (N, Q, C), heads merged, before ``out_proj``; and the
        probabilities (N, heads, Q, L) with ``explicit``, else ``None``.
    """
    (w_q, b_q), (w_k, b_k), (w_v, b_v) = multihead_projections(attention)
    heads = attention.num_heads
    q = BlockView.split_heads(F.linear(query, w_q, b_q), heads)
    k, v = (BlockView.split_heads(F.linear(keys, w, b), heads) for w, b in ((w_k, b_k), (w_v, b_v)))
    if explicit:
        out, probabilities = explicit_attention(q, k, v, q.shape[-1] ** -0.5)
    else:
        out, probabilities = F.scaled_dot_product_attention(q, k, v), None
    return BlockView.merge_heads(out), probabilities


class Pooled(NamedTuple):
    """How a tower's global embedding reads the tokens leaving a block (LeGrad's layer scores and
    Chefer et al.'s read-out row, docs/methods.md §7, §8).

    Attributes:
        embedding: (N, D) the global embedding of those tokens: the tower's final norm, pool and projection.
        weights: (N, heads, 1, L') how much each of the last L' tokens weighs in the pooled vector: an
            attention pool's probabilities (per head, computed explicitly, so in the autograd graph), or the
            fixed weights of a class-token pool (one-hot at token 0, L' = L) or of a mean pool (uniform over
            the averaged tokens).
        learned: whether ``weights`` are an attention pool's probabilities.
    """

    embedding: Tensor
    weights: Tensor
    learned: bool


def fixed_pool_weights(tokens: Tensor, first: int | None) -> Tensor:
    """The (N, 1, 1, L) weights of a pool that is no attention: one-hot at token 0 (``first=None``, a class
    token), else uniform over the tokens from ``first`` on (a mean), zero before."""
    n, length, _ = tokens.shape
    weights = tokens.new_zeros(n, 1, 1, length)
    if first is None:
        weights[..., 0] = 1
    else:
        weights[..., first:] = 1 / (length - first)
    return weights


class ViTAdapter(VisionAdapter):
    """What the ViT families share: one block loop over their block views (:class:`BlockView`).

    A family gives :meth:`embed` (patch, prefix and position embeddings, pre-norm),
    :meth:`block_views`, :attr:`num_prefix_tokens`, :meth:`final_tokens` (the final norm and the
    pool's token layout) and :meth:`pool`; :meth:`tokens` is then the same for all of them, so CLIP
    Surgery and every attention variant is written once
    (:func:`~captum_iclip.models.blocks.run_blocks`).
    """

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches entering the blocks (the class token; registers; none in SigLIP)."""
        return 1

    @property
    def blocks_in_parts(self) -> bool:
        """Whether the block loop can compute every block from its parts (:attr:`BlockView.unsupported`), as the
        second paths (CLIP Surgery, GEM, the ITSM path variants) and attention records (LeGrad, Chefer) do."""
        return not any(view.unsupported for view in self.block_views())

    @property
    def has_surgery(self) -> bool:
        return self.blocks_in_parts

    @property
    def global_tokens(self) -> int | None:
        """How many leading tokens of the original path :meth:`final_tokens` reads after the last block when a
        second path gives the patches (:func:`~captum_iclip.models.blocks.run_blocks`): the class token (1), or
        ``None`` for every token (SigLIP's attention pool, timm's average)."""
        return 1

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Tokens (N, prefix + h*w, C) entering the first block, and the patch grid (h, w)."""
        raise NotImplementedError

    def final_tokens(self, x: Tensor, patches: Tensor | None) -> Tensor:
        """The adapter's tokens (N, 1 + h*w, C) from the original path's tokens ``x`` after the last block
        and the patch tokens (N, h*w, C) of a second path (``None`` without one): the global token, then
        the patches. By default the final norm of the class token and the patches."""
        if patches is not None:
            x = torch.cat([x[:, :1], patches], dim=1)
        return self.final_norm(x)

    def pool(self, tokens: Tensor) -> Pooled:
        """The global embedding of the tokens (N, L, C) leaving a block and how it reads them (:class:`Pooled`).

        At the last block's output its embedding is the tower's own; by default the class token's.
        """
        return Pooled(self.project_global(self.final_norm(tokens)), fixed_pool_weights(tokens, None), False)

    @property
    def pools_class_token(self) -> bool:
        """Whether the global embedding reads the class token (token 0) alone, not a mean or attention pool."""
        return True

    def layer_pool(self, tokens: Tensor) -> Pooled:
        """LeGrad's global embedding of the tokens (N, L, C) leaving an intermediate block: the tower's
        :meth:`pool`, applied to their mean when it reads a class token (an intermediate class token has
        not gathered the image yet; LeGrad's rule for CLIP, docs/methods.md §7)."""
        return self.pool(tokens.mean(dim=1, keepdim=True) if self.pools_class_token else tokens)

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
        prefix = self.num_prefix_tokens
        x, patches = run_blocks(
            self.block_views(grid=grid),
            x,
            grid,
            prefix=prefix,
            global_tokens=self.global_tokens,
            path=path,
            trace=trace,
            tap=lambda t: self.tap_patches(t, grid, prefix),
        )
        return self.final_tokens(x, patches)
