"""DINO mask sources with register tokens: timm DINOv2-reg4 (VisionTransformer), timm DINOv3 (Eva with
rotary embeddings), Hugging Face Dinov2WithRegistersModel and DINOv3ViTModel.

Random weights, real architectures cut to 2 blocks. The [CLS] attention of
:func:`cls_attention` is checked against the attention probabilities the model's own
(non-fused) attention computes, read with a hook; registers must be left out of the
map, and masks land on a CLIP grid of another patch size.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import _seeded, make_images
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, DINOv3ViTConfig, DINOv3ViTModel

from captum_iclip.masks import DINOMaskProvider, cls_attention, top_mass_mask


def timm_dino(name: str):
    return _seeded(
        lambda: timm.create_model(
            name,
            pretrained=False,
            num_classes=0,
            dynamic_img_size=True,
            depth=2,
            img_size=56 if "dinov2" in name else 64,
        ),
        seed=12,
        jitter=0.05,
    )


@pytest.fixture(scope="module")
def dinov2_reg4():
    return timm_dino("vit_small_patch14_reg4_dinov2")


@pytest.fixture(scope="module")
def dinov3():
    return timm_dino("vit_small_patch16_dinov3")


@torch.no_grad()
def own_cls_attention(model, images: torch.Tensor) -> torch.Tensor:
    """The last block's softmax probabilities as its own unfused attention computes them."""
    attn = model.blocks[-1].attn
    captured = {}
    handle = attn.attn_drop.register_forward_hook(lambda module, args, output: captured.setdefault("p", output))
    fused = attn.fused_attn
    attn.fused_attn = False
    try:
        model.forward_features(images)
    finally:
        attn.fused_attn = fused
        handle.remove()
    return captured["p"]  # (N, heads, T, T)


@pytest.mark.parametrize("name, registers", [("dinov2_reg4", 4), ("dinov3", 4)])
def test_timm_register_models_leave_the_registers_out(name, registers, request):
    model = request.getfixturevalue(name)
    assert model.num_prefix_tokens == 1 + registers
    patch = model.patch_embed.patch_size[0]
    images = make_images(2, 3, 4 * patch, 6 * patch, seed=13)  # not the native size: resampled positions
    attention = cls_attention(model, images)
    probs = own_cls_attention(model, images)
    prefix = 1 + registers
    expected = probs[:, :, 0, prefix:].mean(dim=1).reshape(2, 4, 6)
    torch.testing.assert_close(attention, expected, rtol=0, atol=1e-6)
    # What is missing from the map is exactly the attention to [CLS] and the registers.
    to_prefix = probs[:, :, 0, :prefix].sum(dim=-1).mean(dim=1)
    torch.testing.assert_close(attention.flatten(1).sum(dim=1) + to_prefix, torch.ones(2), rtol=0, atol=1e-5)
    assert (to_prefix > 0).all()


def hf_dino(kind: str):
    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        num_register_tokens=4,
        attn_implementation="eager",
    )
    if kind == "dinov2":
        return _seeded(lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(patch_size=8, **common)), seed=14)
    return _seeded(lambda: DINOv3ViTModel(DINOv3ViTConfig(patch_size=8, **common)), seed=15)


@pytest.mark.parametrize("kind", ["dinov2", "dinov3"])
def test_hugging_face_register_models(kind):
    model = hf_dino(kind)
    images = make_images(1, 3, 32, 32, seed=16)
    attention = cls_attention(model, images)
    with torch.no_grad():
        probs = model(pixel_values=images, output_attentions=True).attentions[-1]
    assert probs.shape[-1] == 1 + 4 + 16  # [CLS], 4 registers, 4x4 patches
    torch.testing.assert_close(attention.flatten(1), probs[:, :, 0, 5:].mean(dim=1), rtol=0, atol=0)


def test_masks_from_a_patch_14_model_on_a_patch_16_clip_grid(dinov2_reg4):
    """DINOv2 sees 56x56 (4x4 patches of 14 px); the CLIP grid of a 96x96 input with 16-px
    patches is 6x6: the attention is resampled to it before the top-mass threshold."""
    provider = DINOMaskProvider(dinov2_reg4, tau=0.6, image_size=56)
    images = make_images(2, 3, 96, 96, seed=17)
    mask = provider(images, (6, 6))
    assert mask.shape == (2, 36) and mask.dtype == torch.bool
    attention = provider.attention(images)
    assert attention.shape == (2, 4, 4)
    resampled = F.interpolate(attention[:, None], size=(6, 6), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(mask, top_mass_mask(resampled.clamp_min(0), 0.6))
    kept = (resampled.flatten(1) * mask).sum(dim=1) / resampled.flatten(1).sum(dim=1)
    assert (kept >= 0.6).all() and (mask.sum(dim=1) < 36).all()


def test_dinov3_checkpoint_by_timm_name(tmp_path):
    """A DINOv3 checkpoint in the original layout (``storage_tokens``, ``ls1.gamma``) loads through
    DINOMaskProvider(name, checkpoint=...), which maps it with timm's Eva key mapping."""
    source = _seeded(lambda: timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0), seed=18)
    original = {
        k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma"): v
        for k, v in source.state_dict().items()
    }
    assert "storage_tokens" in original and "blocks.0.ls1.gamma" in original
    path = tmp_path / "dinov3.pth"
    torch.save({"model": original}, path)
    provider = DINOMaskProvider("vit_small_patch16_dinov3", checkpoint=str(path), image_size=32)
    loaded = provider.model.state_dict()
    for name, value in source.state_dict().items():
        assert torch.equal(loaded[name], value), name
    assert provider(make_images(1, 3, 32, 32, seed=19), (2, 2)).shape == (1, 4)
