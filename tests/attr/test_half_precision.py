"""Half precision: every registry method on float16/bfloat16 models and under autocast agrees with
float32 maps of the same weights (docs/methods.md, "Half precision")."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import PROMPTS, _seeded, make_images
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from captum_iclip import CLIPSimilarity, DualProjectionCLIP
from captum_iclip.evaluation import map_agreement
from captum_iclip.evaluation.methods import build_method, method_info, method_names
from captum_iclip.loading.bundled import WEIGHTS_DIR
from captum_iclip.masks import DINOMaskProvider
from captum_iclip.models.tiny_dino import load_tiny_dino

MAX_ABS_DIFF, RANK_CORRELATION = 2e-2, 0.99
# A max per channel (mmp) and a difference of two scores (occlusion) read the half-precision tower's own
# rounding, which no float32 arithmetic after it can undo: a near-tie that it flips moves a channel's share
# to another patch, and one patch's effect on the score is a few units of the tower's last digit. Every
# other method meets the strict bounds (docs/methods.md, "Half precision").
# ProxyCLIP's thresholded affinity sees the proxy's input rounded to the model's dtype (an affinity near
# the threshold moves across it), and M2IB's information reads the tower's tokens at the bottleneck
# (Adam's normalised steps carry their rounding into the gates): bfloat16 moves their maps by ~2.5e-2.
TOWER_LIMITED = {"mmp": (0.3, 0.95), "occlusion": (0.2, 0.95), "proxyclip": (0.05, 0.999), "m2ib": (0.05, 0.999)}
IG_STEPS = 4


@pytest.fixture(scope="module")
def small_vit():
    """A 6-block open_clip ViT (width 192, 16-px patches, 96-px images: a 6x6 grid) with open_clip's own
    random initialisation, as a DualProjectionCLIP so that every registry method applies."""
    vision = CLIPVisionCfg(layers=6, width=192, head_width=32, patch_size=16, image_size=96)
    text = CLIPTextCfg(context_length=16, vocab_size=49408, width=64, heads=2, layers=1)
    return DualProjectionCLIP(_seeded(lambda: CLIP(embed_dim=512, vision_cfg=vision, text_cfg=text), 7))


@pytest.fixture(scope="module")
def proxy():
    """ProxyCLIP's proxy: the bundled tiny DINO, in float32 whatever the CLIP model's dtype."""
    return DINOMaskProvider(load_tiny_dino(WEIGHTS_DIR / "shapes-tiny" / "dino"))


@pytest.fixture(scope="module")
def sims(small_vit, tiny_tokenizer):
    """The float32 model and its bfloat16 and float16 copies, with the same prompts."""
    return {
        dtype: CLIPSimilarity(copy.deepcopy(small_vit).to(dtype), tiny_tokenizer, PROMPTS)
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
    }


@pytest.fixture(scope="module")
def reference(sims, proxy):
    """Every method's float32 maps of two seeded images, one prompt per image."""
    images, target = make_images(2, 3, 96, 96, seed=3), torch.tensor([0, 2])
    float32 = sims[torch.float32]
    maps = {
        name: build_method(name, float32, ig_steps=IG_STEPS, proxy=proxy)(images, target) for name in method_names()
    }
    return images, target, maps


def _bounds(name: str) -> tuple[float, float]:
    return TOWER_LIMITED.get(name, (MAX_ABS_DIFF, RANK_CORRELATION))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", method_names())
def test_half_model_agrees_with_float32(sims, reference, proxy, name, dtype):
    images, target, expected = reference
    maps = build_method(name, sims[dtype], ig_steps=IG_STEPS, proxy=proxy)(images.to(dtype), target)
    assert maps.dtype == torch.float32  # computed after the tower in float32, returned so
    assert torch.isfinite(maps).all()
    max_abs_diff, rank_correlation = map_agreement(expected[name], maps)
    limit, correlation = _bounds(name)
    assert max_abs_diff <= limit and rank_correlation >= correlation, (name, max_abs_diff, rank_correlation)


@pytest.mark.parametrize("name", method_names())
def test_autocast_agrees_with_float32(sims, reference, proxy, name):
    images, target, expected = reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = build_method(name, sims[torch.float32], ig_steps=IG_STEPS, proxy=proxy)(images, target)
    assert maps.dtype == torch.float32
    max_abs_diff, rank_correlation = map_agreement(expected[name], maps)
    limit, correlation = _bounds(name)
    assert max_abs_diff <= limit and rank_correlation >= correlation, (name, max_abs_diff, rank_correlation)


def test_every_prompt_maps_and_scores_are_float32(sims, proxy):
    sim = sims[torch.bfloat16]
    images = make_images(1, 3, 96, 96).to(torch.bfloat16)
    assert sim.text_features.dtype == torch.float32
    assert sim(images).dtype == torch.float32
    for name in method_names():
        if method_info(name).every_prompt:
            maps = build_method(name, sim, proxy=proxy)(images, None)
            assert maps.shape == (1, len(PROMPTS), 96, 96) and maps.dtype == torch.float32, name


def test_images_of_another_dtype_are_refused_naming_the_argument(sims):
    with pytest.raises(TypeError, match=r"inputs: expected images of the model's dtype torch.bfloat16"):
        build_method("raw", sims[torch.bfloat16])(make_images(1, 3, 96, 96), None)


@pytest.mark.parametrize("tower", ["tiny_resnet", "tiny_hf"])
def test_other_towers_run_in_bfloat16(request, tower, tiny_tokenizer, hf_tokenizer):
    model = copy.deepcopy(request.getfixturevalue(tower)).to(torch.bfloat16)
    sim = CLIPSimilarity(model, hf_tokenizer if tower == "tiny_hf" else tiny_tokenizer, PROMPTS)
    size = 64 if tower == "tiny_resnet" else 8
    images = make_images(2, 3, size, size).to(torch.bfloat16)
    for name in method_names():
        if method_info(name).applies_to(sim):
            maps = build_method(name, sim, ig_steps=2)(images, torch.tensor([0, 1]))
            assert maps.dtype == torch.float32 and torch.isfinite(maps).all(), name
