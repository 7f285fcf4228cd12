"""The bundle's recipe (``python -m captum_iclip.zoo.train``) at tiny scale, its data tools and the
recipe-selection rules (``python -m captum_iclip.zoo.select``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from captum_iclip import zoo
from captum_iclip.loading import bundled
from captum_iclip.masks import DINOMaskProvider, cls_attention
from captum_iclip.training.dino import DINOConfig, _comparable, build_backbone
from captum_iclip.world import TRAIN_SEED_START
from captum_iclip.zoo import select
from captum_iclip.zoo import train as recipe


def test_rendered_world_is_the_same_in_several_processes_and_from_its_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "_CHUNK", 5)  # several chunks, so their order matters
    serial = recipe.RenderedWorld(TRAIN_SEED_START, 12, size=48, progress=False, caption_colour_prob=0.3)
    parallel = recipe.RenderedWorld(
        TRAIN_SEED_START, 12, size=48, progress=False, caption_colour_prob=0.3, workers=2, cache_dir=tmp_path
    )
    assert np.array_equal(serial.images, parallel.images)
    assert serial.captions == parallel.captions
    cached = recipe.RenderedWorld(
        TRAIN_SEED_START, 12, size=48, progress=False, caption_colour_prob=0.3, cache_dir=tmp_path
    )
    assert isinstance(cached.images, np.memmap)
    assert np.array_equal(serial.images, cached.images) and serial.captions == cached.captions
    image, caption = cached[7]
    assert torch.equal(image, serial[7][0]) and caption == serial.captions[7]
    # Another recipe (other caption probability) is another cache entry, not a stale hit.
    other = recipe.RenderedWorld(
        TRAIN_SEED_START, 12, size=48, progress=False, caption_colour_prob=0.9, cache_dir=tmp_path
    )
    assert np.array_equal(other.images, serial.images) and other.captions != serial.captions


def test_rendered_world_rejects_bad_arguments():
    with pytest.raises(ValueError, match="length: expected at least 1"):
        recipe.RenderedWorld(0, 0, progress=False)
    with pytest.raises(ValueError, match="workers: expected a non-negative"):
        recipe.RenderedWorld(0, 2, progress=False, workers=-1)


def test_cached_tokenizer_gives_the_tokenizers_ids():
    tokenizer = open_clip.SimpleTokenizer(context_length=32)
    cached = recipe.CachedTokenizer(tokenizer)
    texts = ["a red circle", "a star on grass", "a red circle"]
    assert torch.equal(cached(texts), tokenizer(texts))
    assert len(cached.rows) == 2
    assert torch.equal(cached("a star on grass"), tokenizer(["a star on grass"]))


@pytest.fixture(scope="module")
def tiny_dino():
    torch.manual_seed(0)
    config = DINOConfig(image_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    return build_backbone(config).eval()


def _timm_cls_attention_maps(model, images):
    """Each block's [CLS]-to-patch attention as timm's own unfused attention computes it (hooked)."""
    captured = []
    hooks = []
    for block in model.blocks:
        block.attn.fused_attn = False  # timm then materialises the probabilities and passes them to attn_drop
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, args, out: captured.append(out)))
    try:
        model.forward_features(images)
    finally:
        for hook, block in zip(hooks, model.blocks):
            hook.remove()
            block.attn.fused_attn = True
    return [probs[:, :, 0, model.num_prefix_tokens :].mean(1) for probs in captured]


def test_cls_attention_of_chosen_blocks(tiny_dino):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        last = cls_attention(tiny_dino, images)
        per_block = [cls_attention(tiny_dino, images, (b,)) for b in range(3)]
        pair = cls_attention(tiny_dino, images, (2, 0))
        literal = [m.reshape(2, 4, 4) for m in _timm_cls_attention_maps(tiny_dino, images)]
    assert torch.equal(last, per_block[2])
    for b in range(3):
        torch.testing.assert_close(per_block[b], literal[b], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pair, (per_block[0] + per_block[2]) / 2, rtol=1e-6, atol=1e-7)
    for bad in ((), (3,), (-4,), [True], "1"):
        with pytest.raises(ValueError, match="blocks: expected"):
            cls_attention(tiny_dino, images, bad)


def test_mask_provider_reads_its_blocks(tiny_dino):
    provider = DINOMaskProvider(tiny_dino, tau=0.4, blocks=(1,))
    assert provider.blocks == (1,) and "blocks=(1,)" in provider.extra_repr()
    assert DINOMaskProvider(tiny_dino).blocks == (2,)  # the last block, as in DINO
    assert provider.cache_fingerprint() != DINOMaskProvider(tiny_dino, tau=0.4).cache_fingerprint()
    images = torch.randn(2, 3, 32, 32)
    x = images * provider.scale + provider.shift
    torch.testing.assert_close(provider.attention(images), cls_attention(tiny_dino, x, (1,)))


def test_dino_device_is_a_runtime_setting():
    assert _comparable(DINOConfig(device="cpu")) == _comparable(DINOConfig(device="cuda"))
    assert "device" not in _comparable(DINOConfig())


def test_iclip_mode_names_and_the_bundled_pick():
    from captum_iclip.training.iclip import parse_mode

    assert [parse_mode(m) for m in ("projection", "last-1", "last-2", "full")] == [
        ("projection", 1),
        ("last-k", 1),
        ("last-k", 2),
        ("full", 1),
    ]
    for bad in ("last-0", "last-", "last-k", "head"):
        with pytest.raises(ValueError, match="mode: expected 'projection', 'full' or 'last-<k>'"):
            parse_mode(bad)
    with pytest.raises(SystemExit):
        recipe.main(["--iclip-mode", "last-x", "--stages", "bundle"])
    # The bundle ships the configuration the study's pre-registered rule picked.
    picked = json.loads((Path(__file__).parents[2] / "docs/study/results.json").read_text())["picked_iclip"]
    assert (picked["mode"], picked["mask_source"]) == (recipe.ICLIP_MODE, recipe.ICLIP_MASKS)


def test_selection_rules_on_constructed_candidates():
    assert select.block_sets(4) == [(0,), (1,), (2,), (3,), (0, 1), (2, 3), (0, 1, 2, 3)]
    big = {"clip": "big", "single_object": 90.0, "vision_params": 3}
    small = {"clip": "small", "single_object": 89.2, "vision_params": 1}
    assert select.choose_clip([big, small])["clip"] == "small"  # within a point: the smaller tower
    assert select.choose_clip([big, dict(small, single_object=88.9)])["clip"] == "big"
    none, five = {"templates": None, "top1_any": 89.8}, {"templates": ["{}"] * 5, "top1_any": 90.2}
    many = {"templates": ["{}"] * 28, "top1_any": 90.4}
    assert select.choose_templates([none, five, many]) is five  # within half a point: the fewest templates
    assert select.choose_templates([none, dict(five, top1_any=89.8), many]) is many
    assert select.choose_templates([dict(none, top1_any=90.0), many])["templates"] is None
    assert list(select.template_candidates()) == ["T0", "T1", "T2"]
    assert select.template_candidates()["T2"] == recipe.prompt_templates()  # the bundle's are the picked set


TINY_RECIPE = [
    "--train-scenes", "64", "--dino-scenes", "32", "--clip-epochs", "1", "--clip-batch-size", "16",
    "--vision-layers", "1", "--vision-width", "64", "--dino-steps", "2", "--dino-batch-size", "4",
    "--iclip-batch-size", "16", "--tau", "0.5", "--dino-blocks", "0,-1",
    "--recognition-scenes", "20", "--mask-scenes", "10", "--threads", "1", "--no-progress",
]  # fmt: skip


def test_the_recipe_runs_every_stage_resumes_and_writes_a_loadable_bundle(tmp_path, monkeypatch):
    work, weights = tmp_path / "work", tmp_path / "weights"
    argv = ["--work-dir", str(work), "--out", str(weights / "tiny"), *TINY_RECIPE]
    assert recipe.main(argv) == 0
    config = json.loads((weights / "tiny" / "config.json").read_text())
    assert config["model_config"]["vision_cfg"]["layers"] == 1 and config["model_config"]["vision_cfg"]["width"] == 64
    assert config["tau"] == 0.5 and config["dino_blocks"] == [0, -1]
    assert config["iclip_head"] == {"mode": recipe.ICLIP_MODE, "masks": recipe.ICLIP_MASKS}
    assert config["training"]["clip"]["steps"] == 4 and config["training"]["iclip"]["steps"] == 4
    assert config["training"]["dino"]["steps"] == 2
    assert config["training"]["recognition"]["scenes"] == 20

    # Rerunning skips every finished stage and the rendering (the world is cached).
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*.pt")}
    monkeypatch.setattr(recipe, "_render", lambda *a: pytest.fail("the cached world was rendered again"))
    assert recipe.main(["--stages", "clip,dino,iclip", *argv]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in work.rglob("*.pt")}

    # The bundle loads like the shipped one and reproduces its recorded figures.
    monkeypatch.setattr(bundled, "WEIGHTS_DIR", weights)
    bundle = zoo.load("tiny")
    assert bundle.mask_provider.tau == 0.5 and bundle.mask_provider.blocks == (0, 5)  # six DINO blocks
    figures = recipe.bundle_figures(
        bundle.clip, bundle.tokenizer, bundle.mask_provider, bundle.prompts, bundle.templates, 20, 10
    )
    assert figures["recognition"]["confusion"] == config["training"]["recognition"]["confusion"]
    assert figures["dino_masks"]["dino_iou"] == pytest.approx(config["training"]["dino_masks"]["dino_iou"], abs=1e-6)


def test_mask_quality_reuses_precomputed_attention_for_every_tau(tiny_dino):
    from captum_iclip.models.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from captum_iclip.world import generate_scene
    from captum_iclip.zoo.quality import mask_quality

    scenes = [generate_scene(10_000_000 + i, size=32) for i in range(4)]
    preprocess = zoo.make_preprocess(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    provider = DINOMaskProvider(tiny_dino, blocks=(1,))
    attention = provider.attention(torch.stack([preprocess(s.image) for s in scenes]))
    for tau in (0.3, 0.6):
        provider.tau = tau
        assert mask_quality(provider, scenes, preprocess, (4, 4), attention) == mask_quality(
            provider, scenes, preprocess, (4, 4)
        )
