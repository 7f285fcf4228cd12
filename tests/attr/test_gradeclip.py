"""GradECLIPAttribution against a literal re-implementation of Grad-ECLIP's reference code (Cyang-Zhao/Grad-Eclip).

The reference (``grad_eclip_image.ipynb``: ``clip_encode_dense`` with ``n=1``, ``attention_layer``, ``sim_qk``,
``grad_eclip``) is re-written below one image and one prompt at a time, in the reference's (L, C) layout, on the
library's own modules: the last block recomputed from its in-projection with the reference's attention, the
gradient of the cosine with respect to that attention's output, its class-token row as channel weights, the
min-max normalised cosine of the class query with the patch keys, and the rectified channel sum.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TEXT, _seeded, make_images
from open_clip.model import CLIP, CLIPVisionCfg
from transformers import CLIPModel

from captum_iclip import CLIPSimilarity, GradECLIPAttribution
from captum_iclip.attr._utils import minmax_normalize
from captum_iclip.evaluation.methods import build_method, method_info


class LastBlock:
    """The library's modules of a CLIP's vision tower as the reference reads them, for one image (L, C)."""

    def __init__(self, model) -> None:
        self.hf = isinstance(model, CLIPModel)
        self.model = model
        tower = model.vision_model if self.hf else model.visual
        self.blocks = list(tower.encoder.layers if self.hf else tower.transformer.resblocks)
        self.block = self.blocks[-1]

    def tokens_before_last(self, image):
        """The reference's ``clip_encode_dense`` up to the last block, at the native resolution."""
        if self.hf:
            vision = self.model.vision_model
            x = vision.pre_layrnorm(vision.embeddings(image[None]))
            for layer in self.blocks[:-1]:
                x = layer(x, None)
            return x[0]
        visual = self.model.visual
        x = visual.conv1(image[None])
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
        x = visual.ln_pre(x + visual.positional_embedding)
        return torch.nn.Sequential(*self.blocks[:-1])(x)[0]

    def qkv(self, x):
        block = self.block
        if self.hf:
            tokens = block.layer_norm1(x)
            return block.self_attn.q_proj(tokens), block.self_attn.k_proj(tokens), block.self_attn.v_proj(tokens)
        return F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)

    def out_proj(self, x):
        return (self.block.self_attn if self.hf else self.block.attn).out_proj(x)

    def mlp(self, x):
        return self.block.mlp(self.block.layer_norm2(x) if self.hf else self.block.ln_2(x))

    def image_embedding(self, x):
        if self.hf:
            return self.model.visual_projection(self.model.vision_model.post_layernorm(x))
        return self.model.visual.ln_post(x) @ self.model.visual.proj

    @property
    def heads(self) -> int:
        return (self.block.self_attn if self.hf else self.block.attn).num_heads


def reference_attention_layer(q, k, v, num_heads):
    """The reference's ``attention_layer`` for one image: scaled dot-product attention of ``num_heads`` heads."""
    length, width = q.shape
    head_dim = width // num_heads
    q = q * head_dim**-0.5
    q, k, v = (t.reshape(length, num_heads, head_dim).transpose(0, 1) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(1, 2), dim=-1)
    return (weights @ v).transpose(0, 1).reshape(length, width)


def literal_grad_eclip(parts: LastBlock, image, text, num_heads):
    """The reference's map (h*w,) of one image for one (normalised) prompt embedding."""
    with torch.enable_grad():
        x_in = parts.tokens_before_last(image).detach().requires_grad_(True)
        q, k, v = parts.qkv(x_in)
        attn_output = reference_attention_layer(q, k, v, num_heads)
        x = parts.out_proj(attn_output) + x_in
        x = x + parts.mlp(x)
        cosine = F.normalize(parts.image_embedding(x)[0], dim=-1) @ text
        grad = torch.autograd.grad(cosine, attn_output)[0]
    grad_cls = grad[:1]
    sim_qk = (F.normalize(q[:1], dim=-1) * F.normalize(k[1:], dim=-1)).sum(-1)
    sim_qk = (sim_qk - sim_qk.min()) / (sim_qk.max() - sim_qk.min())
    return F.relu((grad_cls * v[1:] * sim_qk[:, None]).sum(-1)).detach()


def expected_maps(parts, sim, images, heads, grid):
    return torch.stack(
        [
            torch.stack([literal_grad_eclip(parts, image, t, heads).reshape(grid) for t in sim.text_features])
            for image in images
        ]
    )


@pytest.fixture(scope="module", params=["open_clip", "hf"])
def family(request, small_vit, small_hf):
    model = small_vit if request.param == "open_clip" else small_hf
    text = torch.randn(3, 8, generator=torch.Generator().manual_seed(31))
    return CLIPSimilarity(model, text_features=text), LastBlock(model)


@pytest.mark.parametrize("single_head", [False, True])
def test_grad_eclip_matches_its_reference(family, single_head):
    sim, parts = family
    images = make_images(2, 3, 16, 16, seed=32)
    heads = 1 if single_head else parts.heads  # the reference's own call is attention_layer(q, k, v, 1)
    expected = expected_maps(parts, sim, images, heads, (4, 4))
    assert expected.amax(dim=(-2, -1)).min() > 0
    method = GradECLIPAttribution(sim)
    raw = method.attribute(images, single_head=single_head, normalize=False, interpolate=False)
    torch.testing.assert_close(raw, expected, rtol=1e-4, atol=1e-7)
    maps = method.attribute(images, single_head=single_head, interpolate=False)
    assert (maps - minmax_normalize(expected)).abs().max() <= 1e-5
    single = method.attribute(images, target=[2, 0], single_head=single_head, normalize=False, interpolate=False)
    torch.testing.assert_close(single[:, 0], expected[[0, 1], [2, 0]], rtol=1e-4, atol=1e-7)


def test_grad_eclip_matches_its_reference_on_vit_b16(vit_b16, tokenizer):
    sim = CLIPSimilarity(vit_b16, tokenizer, ["a photo of a cat", "a red car"])
    image = make_images(1, 3, 224, 224, seed=33)
    parts = LastBlock(vit_b16)
    expected = expected_maps(parts, sim, image, parts.heads, (14, 14))
    maps = GradECLIPAttribution(sim).attribute(image, interpolate=False)
    assert (maps - minmax_normalize(expected)).abs().max() <= 1e-5


def test_grad_eclip_is_the_registry_method(family):
    sim, _ = family
    images = make_images(2, 3, 16, 16, seed=34)
    info = method_info("gradeclip")
    assert (info.kind, info.needs_vit, info.every_prompt, info.patch_grid) == ("gradient", True, True, True)
    run = build_method("gradeclip", sim)
    direct = GradECLIPAttribution(sim).attribute(images, target=1)
    torch.testing.assert_close(run(images, torch.tensor([1, 1])), direct)
    (as_tuple,) = run((images,), torch.tensor([1, 1]))
    torch.testing.assert_close(as_tuple, direct)
    assert direct.shape == (2, 1, 16, 16) and direct.amin() >= 0 and direct.amax() <= 1


def test_grad_eclip_refuses_what_it_does_not_define(small_vit, tiny_resnet):
    text = torch.randn(2, 8)
    with pytest.raises(TypeError, match="single_head: expected a bool"):
        GradECLIPAttribution(CLIPSimilarity(small_vit, text_features=text)).attribute(
            make_images(1, 3, 16, 16), single_head=1
        )
    with pytest.raises(TypeError, match="GradECLIPAttribution expected a ViT tower"):
        GradECLIPAttribution(CLIPSimilarity(tiny_resnet, text_features=text)).attribute(make_images(1, 3, 64, 64))
    vision = CLIPVisionCfg(layers=1, width=16, head_width=8, patch_size=4, image_size=8, pool_type="avg")
    averaged = _seeded(lambda: CLIP(embed_dim=8, vision_cfg=vision, text_cfg=TINY_TEXT))
    with pytest.raises(NotImplementedError, match="whose embedding is its class token.*mean or attention pool"):
        GradECLIPAttribution(CLIPSimilarity(averaged, text_features=text)).attribute(make_images(1, 3, 8, 8))
