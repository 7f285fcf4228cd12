"""Dense features of Hugging Face ``SiglipModel`` (SigLIP, Zhai et al., 2023, arXiv 2303.15343)
and ``Siglip2Model`` (SigLIP 2).

The vision tower is a ViT without a class token whose embedding is pooled by a
multihead attention with one learned probe (the MAP head). The dense rule is the
one of docs/methods.md §8 ("Dense features of other towers"): each patch goes through
the pooling head as if the probe attended only to it, ``y_i = out_proj(v_i)``, then
the head's residual MLP ``y_i + mlp(layernorm(y_i))``. The adapter's tokens live in
the value space of that attention: entry 0 is the probe's attention-weighted sum of
values, entry ``i`` the value of patch ``i``, so one position-wise head makes entry 0
the model's own ``get_image_features`` exactly.

The encoder layers run through the shared block loop (:func:`~captum_iclip.models.blocks.run_blocks`;
their parts are CLIP's, :class:`~captum_iclip.models.blocks.HFBlockView`) with no prefix token, so CLIP
Surgery (arXiv 2304.05653), GEM, LeGrad, Chefer et al.'s relevancy and the ITSM path variants work on
them; the probe's attention reads every token of the original path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from captum_iclip.models.base import (
    HFVisionGeometry,
    Pooled,
    ViTAdapter,
    hf_text_features,
    multihead_attention,
    multihead_projections,
)
from captum_iclip.models.blocks import BlockView, HFBlockView

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


class ProbeHead(nn.Module):
    """SigLIP's attention-pooling head applied to every position as if it were the pooled value.

    ``forward`` maps (N, L, C) value vectors to (N, L, D): ``out_proj``, then the
    head's residual MLP. The modules are the model's own in the adapter and deep
    copies in the interpretability head of a :class:`~captum_iclip.DualProjectionCLIP`.
    """

    def __init__(self, out_proj: nn.Linear, layernorm: nn.LayerNorm, mlp: nn.Module) -> None:
        super().__init__()
        self.out_proj = out_proj
        self.layernorm = layernorm
        self.mlp = mlp

    def forward(self, values: Tensor) -> Tensor:
        y = self.out_proj(values)
        return y + self.mlp(self.layernorm(y))


class HFSiglipAdapter(HFVisionGeometry, ViTAdapter):
    family = "transformers SiglipModel"

    def __init__(self, model: nn.Module, interpretability_head: nn.Module | None = None) -> None:
        super().__init__(model, interpretability_head)
        self.vision = model.vision_model
        if not getattr(self.vision, "use_head", True) or getattr(self.vision, "head", None) is None:
            raise TypeError(
                "model: expected a SiglipModel vision tower with its pooling head, got vision_use_head=False"
            )
        pool = self.vision.head
        self.head = ProbeHead(pool.attention.out_proj, pool.layernorm, pool.mlp)

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return SIGLIP_MEAN

    @property
    def image_std(self) -> tuple[float, float, float]:
        return SIGLIP_STD

    @property
    def embed_dim(self) -> int:
        return self.vision.config.hidden_size

    @property
    def parameter(self) -> Tensor:
        return self.vision.embeddings.patch_embedding.weight

    @property
    def num_blocks(self) -> int:
        return len(self.vision.encoder.layers)

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    @property
    def pools_class_token(self) -> bool:
        return False

    @property
    def global_tokens(self) -> int | None:
        return None

    def block_views(self, method: str = "this method", grid: tuple[int, int] | None = None) -> list[BlockView]:
        return [HFBlockView(layer) for layer in self.vision.encoder.layers]

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch and position embeddings (N, h*w, C) of ``images`` and their patch grid."""
        emb = self.vision.embeddings
        x = emb.patch_embedding(images)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        if x.shape[1] == emb.num_positions:
            return x + emb.position_embedding.weight, grid
        # The model's own (bicubic) resampling, as with interpolate_pos_encoding=True.
        return x + emb.interpolate_pos_encoding(x, images.shape[-2], images.shape[-1]), grid

    def final_norm(self, tokens: Tensor) -> Tensor:
        return self.vision.post_layernorm(tokens)

    def final_tokens(self, x: Tensor, patches: Tensor | None) -> Tensor:
        # The probe reads every token of the original path; the patches' values come from the second path's.
        x = self.final_norm(x)
        attention = self.vision.head.attention
        pooled, _ = multihead_attention(attention, self._probe(x), x)
        _, _, (w_v, b_v) = multihead_projections(attention)
        values = nn.functional.linear(x if patches is None else self.final_norm(patches), w_v, b_v)
        return torch.cat([pooled, values], dim=1)

    def pool(self, tokens: Tensor) -> Pooled:
        x = self.final_norm(tokens)
        pooled, probabilities = multihead_attention(self.vision.head.attention, self._probe(x), x, explicit=True)
        return Pooled(self.project_global(pooled), probabilities, True)

    def _probe(self, x: Tensor) -> Tensor:
        """The head's learned probe (N, 1, C), the query of its attention pool."""
        return self.vision.head.probe.expand(x.shape[0], -1, -1)

    def project(self, tokens: Tensor, surgery: bool = False) -> Tensor:
        return self.head(tokens)

    def project_global(self, tokens: Tensor) -> Tensor:
        return self.head(tokens[:, :1])[:, 0]

    def text_inputs(self, prompts: Sequence[str], tokenizer: Callable) -> dict[str, Tensor]:
        # SigLIP's text tower was trained on max-length padded sequences without an attention
        # mask (its pooled token is the last one), so only the token ids are passed.
        batch = tokenizer(list(prompts), padding="max_length", truncation=True, return_tensors="pt")
        return {"input_ids": batch["input_ids"].to(self.parameter.device)}

    def text_features(self, inputs: dict[str, Tensor]) -> Tensor:
        return hf_text_features(self.model, inputs)

    def make_interpretability_head(self) -> nn.Module:
        return copy.deepcopy(self.head)


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(N, C, H, W) images as SigLIP 2's processor flattens them: (N, h*w, p*p*C), patches
    row-major, each patch row-major over its pixels with the channels last."""
    n, c, height, width = images.shape
    h, w = height // patch_size, width // patch_size
    patches = images.reshape(n, c, h, patch_size, w, patch_size).permute(0, 2, 4, 3, 5, 1)
    return patches.reshape(n, h * w, patch_size * patch_size * c)


class HFSiglip2Adapter(HFSiglipAdapter):
    """Hugging Face ``Siglip2Model`` (SigLIP 2, Tschannen et al., 2025, arXiv 2502.14786).

    Its NaFlex vision tower embeds flattened patches with a linear layer and resizes its
    square grid of position embeddings to each image's patch grid (bilinear, antialiased,
    the model's own ``resize_positional_embeddings``). Images here are full (no padding
    patches), so the model's own embedding is ``get_image_features(patchify(x),
    pixel_attention_mask=ones, spatial_shapes=(h, w))``. Everything after the embedding
    is SigLIP's, with the same dense rule.
    """

    family = "transformers Siglip2Model"

    @property
    def patch_size(self) -> tuple[int, int]:
        p = self.vision.config.patch_size
        return (p, p)

    @property
    def image_size(self) -> tuple[int, int]:
        """The square input whose patch grid is the position-embedding grid."""
        side = self.vision.embeddings.position_embedding_size * self.vision.config.patch_size
        return (side, side)

    @property
    def parameter(self) -> Tensor:
        return self.vision.embeddings.patch_embedding.weight

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        emb = self.vision.embeddings
        grid = (images.shape[-2] // emb.patch_size, images.shape[-1] // emb.patch_size)
        x = emb.patch_embedding(patchify(images, emb.patch_size))
        size = emb.position_embedding_size
        shapes = torch.tensor([grid] * images.shape[0], device=images.device)
        positions = emb.resize_positional_embeddings(
            emb.position_embedding.weight.reshape(size, size, -1), shapes, max_length=grid[0] * grid[1]
        )
        return x + positions, grid

    def own_image_inputs(self, images: Tensor) -> dict[str, Tensor]:
        """What SigLIP 2's image processor gives for full images: flattened patches, a mask
        with every patch valid, and each image's patch grid."""
        patch = self.patch_size[0]
        n, _, height, width = images.shape
        grid = (height // patch, width // patch)
        return {
            "pixel_values": patchify(images, patch),
            "pixel_attention_mask": torch.ones(n, grid[0] * grid[1], dtype=torch.long, device=images.device),
            "spatial_shapes": torch.tensor([grid] * n, device=images.device),
        }

    def text_inputs(self, prompts: Sequence[str], tokenizer: Callable) -> dict[str, Tensor]:
        # SigLIP 2 was trained on lowercased text padded to its full length (64 tokens; its model card).
        length = self.model.config.text_config.max_position_embeddings
        batch = tokenizer(
            [p.lower() for p in prompts], padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"].to(self.parameter.device)}
