"""ProxyCLIP against a literal re-implementation of its reference (mc-lan/ProxyCLIP), and its arguments.

The reference (``proxyclip_segmentor.py``'s ``forward_feature`` for a DINO proxy and its open_clip
``VisionTransformer.forward`` / ``custom_attn``) is written below on the library's own modules, one crop at a
time without its sliding window, in the layout it uses (sequence first in the last block). The CLIP towers are
random open_clip and Hugging Face ViTs with 12-px patches (an 8 x 8 grid at 96 px); the proxy is the bundled
tiny DINO (8-px patches: a 12 x 12 grid), so the values are resampled between the two grids.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TEXT, _seeded, make_images
from open_clip.model import CLIP, CLIPVisionCfg
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers import CLIPConfig, CLIPModel

from captum_iclip import CLIPSimilarity, ProxyCLIPAttribution
from captum_iclip.attr._utils import minmax_normalize
from captum_iclip.evaluation.methods import available_methods, build_method
from captum_iclip.loading.bundled import WEIGHTS_DIR
from captum_iclip.masks import CachedMaskProvider, DINOMaskProvider, FixedMaskProvider
from captum_iclip.models.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from captum_iclip.models.tiny_dino import load_tiny_dino


@pytest.fixture(scope="module")
def dino():
    return load_tiny_dino(WEIGHTS_DIR / "shapes-tiny" / "dino")


def _open_clip_vit() -> CLIP:
    vision = CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=12, image_size=96)
    return _seeded(lambda: CLIP(embed_dim=8, vision_cfg=vision, text_cfg=TINY_TEXT), seed=41, jitter=0.1)


def _hf_vit() -> CLIPModel:
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        vision_config={**vision, "patch_size": 12, "image_size": 96}, text_config=text, projection_dim=8
    )
    return _seeded(lambda: CLIPModel(config), seed=42, jitter=0.1)


@pytest.fixture(scope="module", params=["open_clip", "hf"])
def clip(request):
    return _open_clip_vit() if request.param == "open_clip" else _hf_vit()


def literal_proxyclip(model, dino, images, text, beta=1.2, gamma=3.0):
    """The reference's logits (N, K, I, J) on the proxy grid and upsampled to the input (N, K, H, W)."""
    n, _, height, width = images.shape
    # The proxy's input: the CLIP normalisation undone (UnNormalize), ImageNet's applied (Normalize).
    pixels = images * torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1) + torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    proxy_input = (pixels - torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_DEFAULT_STD
    ).view(1, 3, 1, 1)
    patch = dino.patch_embed.patch_size[0]
    big_i, big_j = height // patch, width // patch
    # get_intermediate_layers(x)[0]: the last block's tokens through the final norm; [CLS] dropped.
    feat = dino.forward_features(proxy_input)
    ex_feats = feat[:, 1:, :].reshape(n, big_i, big_j, -1).permute(0, 3, 1, 2)

    hf = isinstance(model, CLIPModel)
    if hf:
        vision = model.vision_model
        x = vision.pre_layrnorm(vision.embeddings(images))
        blocks = list(vision.encoder.layers)
        for blk in blocks[:-1]:
            x = blk(x, None)
        last = blocks[-1]
        attn, ln_1 = last.self_attn, last.layer_norm1
        weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        num_heads, out_proj, grid_patch = attn.num_heads, attn.out_proj, vision.embeddings.patch_size
    else:
        visual = model.visual
        assert visual.transformer.batch_first
        x = visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(n, -1, -1), x], dim=1)
        x = visual.ln_pre(x + visual.positional_embedding)
        blocks = list(visual.transformer.resblocks)
        for blk in blocks[:-1]:
            x = blk(x)
        last = blocks[-1]
        attn, ln_1 = last.attn, last.ln_1
        weight, bias, num_heads, out_proj = attn.in_proj_weight, attn.in_proj_bias, attn.num_heads, attn.out_proj
        grid_patch = visual.patch_size[0]
    token_size = (height // grid_patch, width // grid_patch)

    # custom_attn on ln_1(x), sequence first.
    t = ln_1(x).permute(1, 0, 2)
    _, bsz, embed_dim = t.size()
    head_dim = embed_dim // num_heads
    q, k, v = F.linear(t, weight, bias).chunk(3, dim=-1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    _, _, big_h, big_w = ex_feats.shape
    q_k = F.normalize(ex_feats.flatten(2, 3), dim=1)
    similarity = torch.einsum("b c m, b c n -> b m n", q_k, q_k)
    similarity = (similarity - similarity.mean(dim=(1, 2), keepdim=True) * beta) * gamma
    similarity[similarity < 0.0] = float("-inf")
    mask = similarity.to(q.dtype).unsqueeze(1).repeat(1, num_heads, 1, 1)
    mask = mask.reshape(bsz * num_heads, mask.shape[2], mask.shape[3])
    attn_weights = F.softmax(mask, dim=-1)
    v = v[:, 1:, :].reshape(bsz * num_heads, token_size[0], token_size[1], head_dim).permute(0, 3, 1, 2)
    v = F.interpolate(v, size=(big_h, big_w), mode="bilinear", align_corners=False)
    v = v.permute(0, 2, 3, 1).reshape(bsz * num_heads, big_h * big_w, head_dim)
    attn_output = torch.bmm(attn_weights, v)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    x = out_proj(attn_output).permute(1, 0, 2)

    if hf:
        image_features = model.visual_projection(model.vision_model.post_layernorm(x))
    else:
        image_features = model.visual.ln_post(x) @ model.visual.proj
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    logits = (image_features @ text.T).permute(0, 2, 1).reshape(n, -1, big_i, big_j)
    return logits, F.interpolate(logits, size=(height, width), mode="bilinear")


@torch.no_grad()
def test_proxyclip_matches_its_reference(clip, dino):
    text = torch.randn(3, 8, generator=torch.Generator().manual_seed(43))
    sim = CLIPSimilarity(clip, text_features=text)
    images = make_images(2, 3, 96, 96, seed=44)
    logits, upsampled = literal_proxyclip(clip, dino, images, sim.text_features)
    proxyclip = ProxyCLIPAttribution(sim, dino)
    grid = proxyclip.attribute(images, normalize=False, interpolate=False)
    assert grid.shape == (2, 3, 12, 12) and logits.std() > 1e-3
    torch.testing.assert_close(grid, logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(proxyclip.attribute(images, normalize=False), upsampled, rtol=0, atol=1e-5)
    normalized = proxyclip.attribute(images, interpolate=False)
    assert (normalized - minmax_normalize(logits)).abs().max() <= 1e-5
    picked = proxyclip.attribute(images, target=[2, 0], normalize=False, interpolate=False)
    torch.testing.assert_close(picked[:, 0], logits[[0, 1], [2, 0]], rtol=0, atol=1e-5)


@torch.no_grad()
def test_a_threshold_above_the_self_affinity_leaves_each_patch_attending_to_itself(dino):
    sim = CLIPSimilarity(_open_clip_vit(), text_features=torch.randn(2, 8))
    proxyclip = ProxyCLIPAttribution(sim, dino)
    images = make_images(2, 3, 96, 96, seed=48)
    proxyclip.attribute(images)
    assert proxyclip.num_lowered_thresholds == 0
    # beta * mean affinity > 1: the reference's weights would be NaN; here A = I, as an argmax (huge gamma) gives.
    lowered = proxyclip.attribute(images, beta=40.0, interpolate=False)
    assert proxyclip.num_lowered_thresholds == 2 and torch.isfinite(lowered).all()
    argmax = proxyclip.attribute(images, gamma=1e4, interpolate=False)
    torch.testing.assert_close(lowered, argmax, rtol=0, atol=1e-4)
    assert not torch.allclose(lowered, proxyclip.attribute(images, interpolate=False), atol=1e-2)


@torch.no_grad()
def test_a_provider_a_cached_provider_and_a_backbone_give_the_same_proxy(dino, tmp_path):
    sim = CLIPSimilarity(_open_clip_vit(), text_features=torch.randn(2, 8))
    images = make_images(1, 3, 96, 96, seed=45)
    expected = ProxyCLIPAttribution(sim, dino).attribute(images)
    provider = DINOMaskProvider(dino, input_mean=OPENAI_CLIP_MEAN, input_std=OPENAI_CLIP_STD)
    assert torch.equal(ProxyCLIPAttribution(sim, provider).attribute(images), expected)
    cached = CachedMaskProvider(provider, tmp_path)
    assert ProxyCLIPAttribution(sim, cached).proxy is provider
    # The registry builds it with the mask source's DINO, and leaves it out without one.
    assert available_methods(sim)["proxyclip"] is False
    assert available_methods(sim, mask_provider=cached)["proxyclip"] is True
    assert torch.equal(build_method("proxyclip", sim, mask_provider=cached)(images, torch.tensor([1])), expected[:, 1:])
    with pytest.raises(ValueError, match=r"got 'proxyclip' \(it needs a proxy vision model \(a DINO mask source"):
        build_method("proxyclip", sim)
    with pytest.raises(ValueError, match=r"got 'proxyclip' \(it needs a proxy vision model"):
        build_method("proxyclip", sim, mask_provider=FixedMaskProvider(torch.ones(1, 64, dtype=torch.bool)))


@torch.no_grad()
def test_a_size_the_proxy_patch_does_not_divide_is_resized_to_the_nearest_multiple(dino):
    sim = CLIPSimilarity(_open_clip_vit(), text_features=torch.randn(2, 8))
    proxyclip = ProxyCLIPAttribution(sim, dino)
    assert proxyclip.proxy_size(96, 96) == (96, 96)
    assert proxyclip.proxy_size(84, 108) == (88, 112)  # 10.5 and 13.5 proxy patches round up to 11 and 14
    assert proxyclip.proxy_size(83, 4) == (80, 8)  # the nearest multiple, at least one patch
    images = make_images(1, 3, 84, 108, seed=46)
    assert proxyclip.attribute(images, interpolate=False).shape == (1, 2, 11, 14)
    assert proxyclip.attribute(images).shape == (1, 2, 84, 108)


def test_bad_arguments_name_the_argument(dino, tiny_resnet):
    sim = CLIPSimilarity(_open_clip_vit(), text_features=torch.randn(2, 8))
    proxyclip = ProxyCLIPAttribution(sim, dino)
    images = make_images(1, 3, 96, 96, seed=47)
    for argument, value in (("beta", -0.1), ("beta", True), ("gamma", 0), ("gamma", float("nan"))):
        with pytest.raises(ValueError, match=rf"{argument}: expected a finite number"):
            proxyclip.attribute(images, **{argument: value})
    for proxy, what in (("vit_small_patch16_224.dino", "str"), (FixedMaskProvider(torch.ones(1, 4)), "FixedMask")):
        with pytest.raises(TypeError, match=rf"proxy: expected a DINOMaskProvider .*got {what}"):
            ProxyCLIPAttribution(sim, proxy)
    with pytest.raises(TypeError, match=r"proxy: expected a DINO backbone .*got Linear"):
        ProxyCLIPAttribution(sim, torch.nn.Linear(2, 2))
    resnet = CLIPSimilarity(tiny_resnet, text_features=torch.randn(2, 8))
    with pytest.raises(TypeError, match=r"model: ProxyCLIPAttribution expected a ViT tower"):
        ProxyCLIPAttribution(resnet, dino).attribute(make_images(1, 3, 64, 64))
