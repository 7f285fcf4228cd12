"""Dense features of Hugging Face ``transformers.CLIPModel``: a class-token ViT run by the shared block loop
(:class:`~captum_iclip.models.base.ViTAdapter`), docs/methods.md §1, §2."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from captum_iclip._precision import project
from captum_iclip.models.base import HFVisionGeometry, ViTAdapter, hf_text_features, interpolate_pos_embed
from captum_iclip.models.blocks import BlockView, HFBlockView
from captum_iclip.models.text import HFCLIPTextTower


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


class HFCLIPAdapter(HFVisionGeometry, ViTAdapter):
    family = "transformers CLIPModel"

    def __init__(self, model: nn.Module, interpretability_head: nn.Module | None = None) -> None:
        super().__init__(model, interpretability_head)
        self.vision = model.vision_model

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

    def block_views(self, method: str = "this method", grid: tuple[int, int] | None = None) -> list[BlockView]:
        return [HFBlockView(layer) for layer in self.vision.encoder.layers]

    def final_norm(self, tokens: Tensor) -> Tensor:
        return self.vision.post_layernorm(tokens)

    def project(self, tokens: Tensor, surgery: bool = False) -> Tensor:
        return _linear(tokens, self.model.visual_projection)

    def project_global(self, tokens: Tensor) -> Tensor:
        return _linear(tokens[:, 0], self.model.visual_projection)

    def text_inputs(self, prompts: Sequence[str], tokenizer: Callable) -> dict[str, Tensor]:
        # CLIP's text tower pools at its end-of-text token, so padding to the longest prompt with a mask suffices.
        batch = tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        return {k: v.to(self.parameter.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def text_features(self, inputs: dict[str, Tensor]) -> Tensor:
        return hf_text_features(self.model, inputs)

    def text_tower(self) -> HFCLIPTextTower:
        return HFCLIPTextTower(self.model)

    def make_interpretability_head(self) -> nn.Module:
        return LinearCopy(self.model.visual_projection)
