"""Dense features of the CLIP vision adapters (docs/methods.md §1, §2).

* parity: the global token of the dense path is the library's own image embedding;
* geometry: any input size divisible by the patch size, positional embeddings
  resampled bilinearly (known answers on constructed embeddings);
* architecture surgery: each family against a literal re-implementation of the
  docs/methods.md §2 text, on tiny models with generic (jittered) weights.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from conftest import make_images
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch import nn

from captum_iclip import CLIPSimilarity
from captum_iclip.models import get_adapter
from captum_iclip.models.base import interpolate_pos_embed
from captum_iclip.models.hf_clip import HFCLIPAdapter
from captum_iclip.models.open_clip_towers import OpenCLIPResNetAdapter, OpenCLIPViTAdapter


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@contextmanager
def native_grid(model: CLIP, grid: tuple):
    """Let an open_clip ViT's own forward run at ``grid`` for the duration of the block.

    Its positional embedding is swapped for the bilinear resampling of the original
    one, so the library's ``encode_image`` at the new size is the reference for the
    adapter running the *original* model at that size.
    """
    visual = model.visual
    original = visual.positional_embedding
    visual.positional_embedding = nn.Parameter(interpolate_pos_embed(original, grid), requires_grad=False)
    try:
        yield model
    finally:
        visual.positional_embedding = original


# --- adapter selection -----------------------------------------------------------------
def test_get_adapter_picks_the_family(vit_b16, rn50, hf_clip):
    assert isinstance(get_adapter(vit_b16), OpenCLIPViTAdapter)
    assert isinstance(get_adapter(rn50), OpenCLIPResNetAdapter)
    assert isinstance(get_adapter(hf_clip), HFCLIPAdapter)


def test_get_adapter_rejects_a_plain_module():
    with pytest.raises(
        TypeError, match=r"model: expected one of .*, got the model type torch\.nn\.modules\.linear\.Linear"
    ) as err:
        get_adapter(nn.Linear(4, 4))
    assert "VisionTransformer" in str(err.value) and "transformers.CLIPModel" in str(err.value)


def test_get_adapter_rejects_an_attention_pool_in_open_clips_timm_head():
    """timm towers are supported (tests/models/test_timm_towers.py); open_clip's own attention pool on a
    timm CNN ('abs_attn') has no dense rule here and is refused by name."""
    timm_clip = CLIP(
        embed_dim=8,
        vision_cfg=CLIPVisionCfg(
            timm_model_name="resnet18", timm_model_pretrained=False, timm_pool="abs_attn", timm_proj="", image_size=160
        ),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=64, width=16, heads=2, layers=1),
    )
    with pytest.raises(
        TypeError,
        match=r"model: expected an open_clip timm tower pooled by its trunk .*, got ResNet \(resnet18\) with",
    ):
        get_adapter(timm_clip)


# --- parity with the libraries -------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("name", ["vit_b16", "vit_b32", "rn50"])
def test_open_clip_global_token_is_encode_image(name, request):
    model = request.getfixturevalue(name)
    batch = 2 if name == "vit_b32" else 1  # one batch of two checks that examples stay apart
    images = make_images(batch, 3, 224, 224)
    dense = get_adapter(model).dense_features(images)
    grid = 224 // 32 if name != "vit_b16" else 224 // 16
    assert dense.shape == (batch, 1 + grid * grid, model.visual.output_dim)
    assert relative_error(dense[:, 0], model.encode_image(images)) < 1e-5


@torch.no_grad()
def test_hf_global_token_is_get_image_features(hf_clip):
    images = make_images(1, 3, 224, 224)
    dense = get_adapter(hf_clip).dense_features(images)
    expected = hf_clip.get_image_features(pixel_values=images)
    expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
    assert dense.shape == (1, 1 + 14 * 14, 512)
    assert relative_error(dense[:, 0], expected) < 1e-5


@torch.no_grad()
def test_open_clip_patch_tokens_are_the_projected_library_tokens(vit_b32):
    """Every token, not only the global one: F = ln_post(Z) @ proj (docs/methods.md §1)."""
    images = make_images(1, 3, 224, 224, seed=1)
    visual = vit_b32.visual
    visual.output_tokens = True
    try:
        _, tokens = visual(images)
    finally:
        visual.output_tokens = False
    dense = get_adapter(vit_b32).dense_features(images)
    assert relative_error(dense[:, 1:], tokens @ visual.proj) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("size", [(448, 448), (224, 320)], ids=["448", "224x320"])
def test_vit_b16_off_native_size_matches_a_resized_library_model(vit_b16, size):
    """At another size the adapter equals the library run with the bilinearly resized embedding."""
    grid = (size[0] // 16, size[1] // 16)
    images = make_images(1, 3, *size, seed=2)
    dense = get_adapter(vit_b16).dense_features(images)
    assert dense.shape == (1, 1 + grid[0] * grid[1], 512)
    with native_grid(vit_b16, grid):
        reference = vit_b16.encode_image(images)
    assert relative_error(dense[:, 0], reference) < 1e-5


# --- positional-embedding interpolation (known answers) ---------------------------------
def test_interpolate_pos_embed_is_the_identity_at_the_native_grid():
    pos = torch.randn(1 + 3 * 3, 5)
    assert interpolate_pos_embed(pos, (3, 3)) is pos
    rect = torch.randn(1 + 2 * 3, 5)
    assert interpolate_pos_embed(rect, (2, 3), native_grid=(2, 3)) is rect


def test_interpolate_pos_embed_is_bilinear_with_the_class_position_kept():
    # A 2x2 grid holding f(r, c) = 10 r + c in channel 0 and a constant in channel 1.
    cls_pos = torch.tensor([[7.0, -7.0]])
    patch_pos = torch.tensor([[0.0, 3.0], [1.0, 3.0], [10.0, 3.0], [11.0, 3.0]])
    resized = interpolate_pos_embed(torch.cat([cls_pos, patch_pos]), (4, 4))
    assert resized.shape == (17, 2)
    assert torch.equal(resized[0], cls_pos[0])
    # align_corners=False, 2 -> 4: sample points at -0.25, 0.25, 0.75, 1.25, clamped to the edges.
    coords = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected = 10 * coords[:, None] + coords[None, :]
    torch.testing.assert_close(resized[1:, 0].reshape(4, 4), expected)
    torch.testing.assert_close(resized[1:, 1], torch.full((16,), 3.0))
    # Non-square target: rows stay, columns are resampled.
    wide = interpolate_pos_embed(torch.cat([cls_pos, patch_pos]), (2, 4))[1:, 0].reshape(2, 4)
    torch.testing.assert_close(wide, 10 * torch.tensor([0.0, 1.0])[:, None] + coords[None, :])


def test_interpolate_pos_embed_rejects_a_wrong_native_grid():
    with pytest.raises(ValueError, match="pos_embed"):
        interpolate_pos_embed(torch.randn(1 + 6, 4), (2, 2))
    with pytest.raises(ValueError, match="pos_embed"):
        interpolate_pos_embed(torch.randn(1 + 6, 4), (2, 2), native_grid=(2, 2))


# --- architecture surgery against literal re-implementations of docs/methods.md §2 -------------------
def value_value_attention(value: torch.Tensor, num_heads: int, scale: float, unit_norm: bool) -> torch.Tensor:
    """softmax(v v^T * scale) v, one head at a time, heads concatenated."""
    head_dim = value.shape[-1] // num_heads
    outputs = []
    for head in range(num_heads):
        v = value[..., head * head_dim : (head + 1) * head_dim]
        if unit_norm:
            v = v / v.norm(dim=-1, keepdim=True)
        weights = torch.softmax(v @ v.transpose(-1, -2) * scale, dim=-1)
        outputs.append(weights @ v)
    return torch.cat(outputs, dim=-1)


def literal_open_clip_vit_surgery(model: CLIP, images: torch.Tensor, depth: int) -> torch.Tensor:
    visual = model.visual
    blocks = list(visual.transformer.resblocks)
    x_ori = visual._embeds(images)  # the library's own patch + class + position embedding, ln_pre
    for block in blocks[: len(blocks) - depth]:
        x_ori = block(x_ori)
    x_new = x_ori
    for block in blocks[len(blocks) - depth :]:
        width = x_ori.shape[-1]
        attn = block.attn
        value = block.ln_1(x_ori) @ attn.in_proj_weight[2 * width :].T + attn.in_proj_bias[2 * width :]
        head_dim = width // attn.num_heads
        x_new = x_new + attn.out_proj(value_value_attention(value, attn.num_heads, head_dim**-0.5, False))
        x_ori = block(x_ori)  # the original path: attention and MLP, unchanged
    tokens = torch.cat([x_ori[:, :1], x_new[:, 1:]], dim=1)
    return visual.ln_post(tokens) @ visual.proj


@torch.no_grad()
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_open_clip_vit_surgery_matches_the_spec(tiny_vit, depth):
    images = make_images(2, 3, 8, 8, seed=3)
    expected = literal_open_clip_vit_surgery(tiny_vit, images, depth)
    actual = get_adapter(tiny_vit).dense_features(images, surgery_depth=depth)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actual[:, 0], tiny_vit.encode_image(images), rtol=1e-5, atol=1e-6)


def literal_hf_surgery(model, images: torch.Tensor, depth: int) -> torch.Tensor:
    vision = model.vision_model
    layers = list(vision.encoder.layers)
    x_ori = vision.pre_layrnorm(vision.embeddings(images))
    for layer in layers[: len(layers) - depth]:
        x_ori = layer(x_ori, None)
    x_new = x_ori
    for layer in layers[len(layers) - depth :]:
        attn = layer.self_attn
        value = attn.v_proj(layer.layer_norm1(x_ori))
        head_dim = value.shape[-1] // attn.num_heads
        x_new = x_new + attn.out_proj(value_value_attention(value, attn.num_heads, head_dim**-0.5, False))
        x_ori = layer(x_ori, None)
    tokens = torch.cat([x_ori[:, :1], x_new[:, 1:]], dim=1)
    return model.visual_projection(vision.post_layernorm(tokens))


@torch.no_grad()
@pytest.mark.parametrize("depth", [1, 2])
def test_hf_surgery_matches_the_spec(tiny_hf, depth):
    images = make_images(2, 3, 8, 8, seed=4)
    expected = literal_hf_surgery(tiny_hf, images, depth)
    actual = get_adapter(tiny_hf).dense_features(images, surgery_depth=depth)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_resnet_pool_surgery_matches_the_spec(tiny_resnet):
    visual = tiny_resnet.visual
    pool = visual.attnpool
    images = make_images(2, 3, 64, 64, seed=5)
    feature_map = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
    patches = feature_map.flatten(2).transpose(1, 2)
    tokens = torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1) + pool.positional_embedding
    head_dim = pool.v_proj.out_features // pool.num_heads
    surgery = pool.c_proj(value_value_attention(pool.v_proj(tokens), pool.num_heads, 8 * head_dim**-0.5, True))
    expected = torch.cat([visual.attnpool(feature_map)[:, None], surgery[:, 1:]], dim=1)

    actual = get_adapter(tiny_resnet).dense_features(images, surgery_depth=1)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_resnet_dense_pool_queries_every_position(tiny_resnet):
    """Without surgery, position i is the pool's output with i as the query (docs/methods.md §1)."""
    visual = tiny_resnet.visual
    pool = visual.attnpool
    images = make_images(1, 3, 64, 64, seed=6)
    feature_map = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
    patches = feature_map.flatten(2).transpose(1, 2)
    tokens = torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1) + pool.positional_embedding
    head_dim = pool.v_proj.out_features // pool.num_heads
    q, k, v = pool.q_proj(tokens), pool.k_proj(tokens), pool.v_proj(tokens)
    heads = []
    for head in range(pool.num_heads):
        part = slice(head * head_dim, (head + 1) * head_dim)
        weights = torch.softmax(q[..., part] @ k[..., part].transpose(-1, -2) * head_dim**-0.5, dim=-1)
        heads.append(weights @ v[..., part])
    expected = pool.c_proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(get_adapter(tiny_resnet).dense_features(images), expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("name", ["vit_b32", "rn50", "hf_clip"])
def test_surgery_changes_the_patches_but_not_the_global_token(name, request):
    adapter = get_adapter(request.getfixturevalue(name))
    images = make_images(1, 3, 224, 224, seed=7)
    raw = adapter.dense_features(images)
    surgery = adapter.dense_features(images, surgery_depth=6)
    torch.testing.assert_close(surgery[:, 0], raw[:, 0], rtol=1e-5, atol=1e-6)
    assert relative_error(surgery[:, 1:], raw[:, 1:]) > 0.1


def test_dense_features_rejects_an_unknown_projection(vit_b32):
    with pytest.raises(ValueError, match="projection"):
        get_adapter(vit_b32).dense_features(make_images(1, 3, 224, 224), projection="text")
    with pytest.raises(
        ValueError, match=r"projection: expected 'recognition' \('interpretability' is for a DualProjectionCLIP"
    ):
        get_adapter(vit_b32).dense_features(make_images(1, 3, 224, 224), projection="interpretability")


@torch.no_grad()
def test_hf_prompts_are_embedded_by_get_text_features(hf_clip, hf_tokenizer):
    prompts = ["a cat", "a red car"]
    sim = CLIPSimilarity(hf_clip, hf_tokenizer, prompts)
    batch = hf_tokenizer(prompts, padding=True, return_tensors="pt")
    expected = hf_clip.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
    torch.testing.assert_close(sim.text_features, F.normalize(expected, dim=-1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(sim.text_features[0], sim.text_features[1], atol=1e-3)
