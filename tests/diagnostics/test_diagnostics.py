"""The diagnostics of why a model's maps prefer the background (issue: the miniature and diagnostics)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import TINY_TEXT, _seeded, make_images
from open_clip.model import CLIP, CLIPVisionCfg
from PIL import Image
from transformers import CLIPModel

from captum_iclip import CLIPSimilarity, DualProjectionCLIP, ITSMAttribution, zoo
from captum_iclip.cli import main as cli_main
from captum_iclip.diagnostics import (
    TERMS,
    Diagnostics,
    foreground_fractions,
    itsm_decomposition,
    run_tower,
    shared_direction_removed_maps,
    token_norm_ratios,
)
from captum_iclip.evaluation.metrics import LocalizationMetrics

GRID = 4  # 16x16 images, 4-px patches


@pytest.fixture(scope="module")
def hf_vit(small_hf) -> CLIPModel:
    """The small Hugging Face CLIP with a projection bias, so that the decomposition's constant term is not
    only the norm's."""
    model = copy.deepcopy(small_hf)
    with torch.no_grad():
        model.visual_projection.bias = torch.nn.Parameter(0.1 * torch.randn(8))
    return model


def _text(k: int = 3, seed: int = 23) -> torch.Tensor:
    return torch.randn(k, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["open_clip", "hf", "dual"])
def sim(request, small_vit, hf_vit):
    model = {"open_clip": small_vit, "hf": hf_vit}.get(request.param)
    if request.param == "dual":
        model = DualProjectionCLIP(small_vit)
        with torch.no_grad():
            model.interpretability_head.weight.add_(0.2 * torch.randn_like(model.interpretability_head.weight))
    return CLIPSimilarity(model, text_features=_text())


def test_last_block_parts_sum_to_the_block_and_the_stream_matches_the_tower(sim):
    images = make_images(2, 3, 16, 16)
    adapter = sim.adapter
    with torch.no_grad():
        tower = run_tower(adapter, images, attention_blocks=2)
        own = adapter.final_norm(tower.block_outputs[-1])
        reference = adapter.tokens(images)
    torch.testing.assert_close(own, reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(tower.last.output, tower.block_outputs[-1], atol=1e-6, rtol=0)
    assert len(tower.cls_attention) == 2 and tower.cls_attention[0].shape == (2, 2, GRID * GRID)


def test_decomposition_terms_sum_to_the_itsm_map(sim):
    # "auto": the interpretability projection of the dual model, the recognition one of the others.
    projection = sim.adapter.resolve_projection("auto")
    images = make_images(2, 3, 16, 16, seed=1)
    with torch.no_grad():
        tower = run_tower(sim.adapter, images)
        raw, terms = itsm_decomposition(sim.adapter, tower.last, sim.text_features, projection)
        reference = ITSMAttribution(sim).similarity_maps(
            images, variant="plain", surgery_depth=0, projection=projection
        )
    assert sorted(terms) == sorted(TERMS)
    torch.testing.assert_close(raw, reference.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sum(terms.values()), reference.float(), atol=1e-5, rtol=0)
    # Every term carries part of the map: none is identically zero on a generic model.
    assert all(term.abs().max() > 1e-4 for term in terms.values())


def test_attention_scaling_at_one_is_the_model_and_at_zero_drops_the_attention(sim):
    images = make_images(1, 3, 16, 16, seed=2)
    diagnostics = Diagnostics(sim, alphas=(0.0, 1.0), projection="recognition")
    measured = diagnostics.measure(images)
    torch.testing.assert_close(measured["maps"]["alpha=1"], measured["maps"]["itsm"], atol=1e-6, rtol=0)
    # alpha = 0 by hand: the last block without its attention, its MLP on the residual stream.
    adapter = sim.adapter
    with torch.no_grad():
        tower = run_tower(adapter, images)
        y = tower.last.residual + tower.last.view.mlp_branch(tower.last.residual)
        features = torch.nn.functional.normalize(adapter.project(adapter.final_norm(y))[:, 1:], dim=-1)
        expected = (features @ sim.text_features.t()).transpose(1, 2).reshape(1, -1, GRID, GRID)
    torch.testing.assert_close(measured["maps"]["alpha=0"], expected, atol=1e-5, rtol=0)


def test_a_planted_high_norm_token_is_found(small_vit):
    sim = CLIPSimilarity(small_vit, text_features=_text())
    planted = 5  # patch index (token 6)

    def plant(module, inputs, output):
        output = output.clone()
        output[:, 1 + planted] *= 40.0
        return output

    handle = small_vit.visual.transformer.resblocks[0].register_forward_hook(plant)
    try:
        diagnostics = Diagnostics(sim)
        measured = diagnostics.update(make_images(3, 3, 16, 16, seed=3))
    finally:
        handle.remove()
    ratios = measured["norm_ratios"][0]  # block 0, (N, 16)
    assert ratios.argmax(dim=1).tolist() == [planted] * 3
    assert (ratios.amax(dim=1) > 10).all()
    first = diagnostics.summary()["token_norms"][0]
    assert first["share_above_10"] == pytest.approx(1 / 16)
    assert first["share_above_4"] == pytest.approx(1 / 16)


def test_a_hook_on_a_block_read_from_its_parts_is_refused(small_vit):
    sim = CLIPSimilarity(small_vit, text_features=_text())
    handle = small_vit.visual.transformer.resblocks[-1].register_forward_hook(lambda m, i, o: o * 2)
    try:
        with pytest.raises(ValueError, match="model: expected no hooks on the blocks .* block 2 of 3"):
            Diagnostics(sim).measure(make_images(1, 3, 16, 16))
    finally:
        handle.remove()


def test_token_norm_ratios_known_answer():
    tokens = torch.ones(1, 1 + 4, 3)
    tokens[0, 2] *= 12.0
    ratios = token_norm_ratios([tokens])
    torch.testing.assert_close(ratios, torch.tensor([[[1.0, 12.0, 1.0, 1.0]]]))


def test_uniform_attention_puts_the_foreground_area_on_the_foreground():
    # q = k = 0 in the last block: every query attends uniformly over the 17 tokens, so the class
    # token's patch mass is 16/17 and its foreground share is exactly the foreground's area.
    vision = CLIPVisionCfg(layers=2, width=16, head_width=8, patch_size=4, image_size=16)
    model = _seeded(lambda: CLIP(embed_dim=8, vision_cfg=vision, text_cfg=TINY_TEXT), seed=24, jitter=0.1)
    attn = model.visual.transformer.resblocks[-1].attn
    with torch.no_grad():
        attn.in_proj_weight[:32] = 0
        attn.in_proj_bias[:32] = 0
    sim = CLIPSimilarity(model, text_features=_text(2))
    diagnostics = Diagnostics(sim, num_classes=3, attention_blocks=1)
    labels = [np.zeros((16, 16), dtype=np.int64) for _ in range(2)]
    labels[0][:8, :4] = 1  # two patches of 16
    labels[1][4:12, 4:12] = 2  # four patches
    diagnostics.update(make_images(2, 3, 16, 16, seed=4), labels)
    summary = diagnostics.summary()["cls_attention"]
    assert summary["foreground_area"] == pytest.approx((2 / 16 + 4 / 16) / 2)
    for head in summary["heads"]:
        assert head["patch_mass"] == pytest.approx(16 / 17, abs=1e-6)
        assert head["foreground_share"] == pytest.approx((2 / 16 + 4 / 16) / 2, abs=1e-6)


def test_a_head_that_attends_to_the_border_has_no_foreground_share():
    # The last block's class query sees only keys that a border flag in the position embedding
    # raises: all its attention lands on the 12 border patches of the 4x4 grid.
    vision = CLIPVisionCfg(layers=1, width=16, head_width=16, patch_size=4, image_size=16)
    model = _seeded(lambda: CLIP(embed_dim=8, vision_cfg=vision, text_cfg=TINY_TEXT), seed=25)
    visual = model.visual
    border = torch.ones(GRID, GRID, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    with torch.no_grad():
        visual.conv1.weight.zero_()
        visual.class_embedding.zero_()
        visual.positional_embedding.zero_()
        visual.positional_embedding[0, 0] = 1.0  # the class token's flag
        visual.positional_embedding[1:, 1] = border.flatten().float()  # the border flag
        visual.ln_pre.weight.fill_(1.0)
        visual.ln_pre.bias.zero_()
        block = visual.transformer.resblocks[0]
        block.ln_1.weight.fill_(1.0)
        block.ln_1.bias.zero_()
        attn = block.attn
        attn.in_proj_weight.zero_()
        attn.in_proj_bias.zero_()
        attn.in_proj_weight[0, 0] = 60.0  # q: the class token's flag
        attn.in_proj_weight[16, 1] = 60.0  # k: the border flag
    sim = CLIPSimilarity(model, text_features=_text(2))
    diagnostics = Diagnostics(sim, num_classes=2, attention_blocks=1)
    centre = np.zeros((16, 16), dtype=np.int64)
    centre[4:12, 4:12] = 1  # the 4 inner patches
    measured = diagnostics.update(make_images(1, 3, 16, 16, seed=5), [centre])
    attention = measured["cls_attention"][0, 0, 0].reshape(GRID, GRID)
    assert float(attention[border].sum()) > 0.999
    head = diagnostics.summary()["cls_attention"]["heads"][0]
    assert head["foreground_share"] < 1e-3


def test_shared_direction_removal_is_antisymmetric_for_two_prompts():
    features = torch.nn.functional.normalize(torch.randn(2, 5, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    maps = shared_direction_removed_maps(features, text)
    torch.testing.assert_close(maps[..., 0], -maps[..., 1])
    torch.testing.assert_close(maps[..., 0], features @ (text[0] - text[1]) / 2)
    with pytest.raises(ValueError, match="prompts: expected two prompts or more"):
        shared_direction_removed_maps(features, text[:1])


def test_foreground_fractions_average_over_patch_cells_and_skip_ignored_pixels():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :4, :2] = True
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    valid[0, :4, 2:4] = False  # the rest of the first cell is ignored
    fractions = foreground_fractions(mask, (2, 2), valid)
    torch.testing.assert_close(fractions, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_global_cosine_is_the_cosine_of_each_patch_feature_to_the_embedding(sim):
    images = make_images(2, 3, 16, 16, seed=6)
    measured = Diagnostics(sim).measure(images)
    with torch.no_grad():
        features = torch.nn.functional.normalize(sim.adapter.dense_features(images), dim=-1)
    expected = (features[:, 1:] @ features[:, 0, :, None])[..., 0]  # the recognition projection of both
    torch.testing.assert_close(measured["global_cosine"], expected, atol=1e-6, rtol=0)


def test_bad_input_gets_errors_that_name_the_argument(small_vit, tiny_resnet):
    sim = CLIPSimilarity(small_vit, text_features=_text())
    with pytest.raises(NotImplementedError, match="model: Diagnostics expected a class-token ViT.*ModifiedResNet"):
        Diagnostics(CLIPSimilarity(tiny_resnet, text_features=torch.randn(2, 8)))
    with pytest.raises(ValueError, match=r"attention_blocks: expected 1..3"):
        Diagnostics(sim, attention_blocks=4)
    with pytest.raises(ValueError, match="alphas: expected one finite scale"):
        Diagnostics(sim, alphas=())
    with pytest.raises(ValueError, match=r"classes: expected one class id per prompt \(3\)"):
        Diagnostics(sim, num_classes=4, classes=[1, 2])
    with pytest.raises(ValueError, match="labels: expected label maps exactly when"):
        Diagnostics(sim).update(make_images(1, 3, 16, 16), [np.zeros((16, 16), dtype=np.int64)])
    with pytest.raises(ValueError, match="projection: expected 'recognition'"):
        Diagnostics(sim, projection="interpretability")
    with pytest.raises(ValueError, match="inputs: expected an image size divisible"):
        Diagnostics(sim).measure(make_images(1, 3, 15, 16))


@pytest.fixture(scope="module")
def bundle():
    return zoo.load("shapes-tiny")


def test_raw_map_score_contrast_equals_the_eval_figure(bundle):
    """The diagnostics' ``itsm`` mSC is ``eval``'s ``raw`` mSC: same maps, same metric, same pairs."""
    from captum_iclip.datasets import build_dataset
    from captum_iclip.evaluation.run import class_prompts

    dataset = build_dataset("world", "heldout", limit=12)
    sim = CLIPSimilarity(bundle.dual, bundle.tokenizer, class_prompts(dataset, bundle), templates=bundle.templates)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([bundle.preprocess(image) for image, _, _ in items])
    labels = [label for _, label, _ in items]
    diagnostics = Diagnostics(sim, num_classes=dataset.num_classes)
    diagnostics.update(images, labels)
    reference = LocalizationMetrics.for_dataset(dataset)
    maps = ITSMAttribution(sim).attribute(images, projection="recognition")  # every prompt, normalised, upsampled
    for i, label in enumerate(labels):
        reference.update(maps[i], list(range(dataset.num_classes)), label)
    assert diagnostics.summary()["maps"]["itsm"]["msc"] == pytest.approx(reference.compute()["msc"], abs=1e-4)


def test_shipped_bundle_mechanism_floors(bundle):
    """What the diagnostics show in the shipped bundle, on the first 100 report-range scenes. Measured on
    500 (``captum-iclip diagnose --dataset world --root 13000000 --limit 500``): raw ITSM mSC +10.6
    [9.1, 12.1], residual-stream term +21.5, attention term -19.3, alpha = 5 -2.7, largest norm ratio
    1.55. The last block's attention output alone prefers the background, the residual stream prefers
    the object and wins, and there is no high-norm token."""
    from captum_iclip.datasets import build_dataset
    from captum_iclip.evaluation.run import class_prompts

    dataset = build_dataset("world", "13000000", limit=100)
    sim = CLIPSimilarity(bundle.dual, bundle.tokenizer, class_prompts(dataset, bundle), templates=bundle.templates)
    diagnostics = Diagnostics(sim, num_classes=dataset.num_classes, bootstrap=200)
    items = [dataset[i] for i in range(len(dataset))]
    diagnostics.update(torch.stack([bundle.preprocess(image) for image, _, _ in items]), [lab for _, lab, _ in items])
    summary = diagnostics.summary()
    maps = summary["maps"]
    assert maps["attention"]["msc_ci"][1] < 0  # the attention term prefers the background
    assert maps["residual"]["msc_ci"][0] > 0  # the residual stream prefers the object
    assert maps["residual"]["msc"] > maps["itsm"]["msc"] > 0 > maps["attention"]["msc"]
    assert maps["alpha=5"]["msc"] < maps["itsm"]["msc"] < maps["alpha=0.5"]["msc"]
    assert max(row["max_ratio"] for row in summary["token_norms"]) < 4  # no high-norm token


def test_diagnose_command_on_a_dataset(tmp_path, capsys):
    out = tmp_path / "diag"
    argv = ["diagnose", "--dataset", "world", "--root", "heldout", "--limit", "6", "--bootstrap", "20"]
    assert cli_main([*argv, "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "diagnostics.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert summary["images"] == 6 and summary["maps"]["itsm"]["msc_ci"] is not None
    assert (out / "diagnostics.png").stat().st_size > 0
    assert "| itsm |" in capsys.readouterr().out


def test_diagnose_command_on_files_with_masks(tmp_path, capsys):
    from captum_iclip.world import generate_scene

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    paths = []
    for seed in (10_000_001, 10_000_002):
        scene = generate_scene(seed)
        scene.pil().save(images / f"s{seed}.png")
        Image.fromarray(((scene.label > 0) * 255).astype(np.uint8)).save(masks / f"s{seed}.png")
        paths.append(str(images / f"s{seed}.png"))
    out = tmp_path / "out"
    argv = ["diagnose", *paths, "--prompts", "a circle,a square,a star", "--masks", str(masks)]
    assert cli_main([*argv, "--bootstrap", "0", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "diagnostics.json").read_text())
    assert summary["maps"]["itsm"]["msc"] is not None and summary["global_cosine"]["foreground"] is not None
    capsys.readouterr()
    # Without masks: no scores, the rest still measured.
    assert cli_main(["diagnose", *paths, "--prompts", "a circle,a star", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "diagnostics.json").read_text())["maps"] == {}


def test_diagnose_command_errors(tmp_path, capsys):
    assert cli_main(["diagnose", "--out", str(tmp_path / "o")]) == 2
    assert "images: expected image files or --dataset" in capsys.readouterr().err
    image = tmp_path / "a.png"
    Image.new("RGB", (96, 96)).save(image)
    assert cli_main(["diagnose", str(image), "--prompts", "a star", "--masks", str(tmp_path / "none")]) == 2
    assert "--masks: expected a folder of mask images" in capsys.readouterr().err
    assert cli_main(["diagnose", str(image), "--out", str(tmp_path / "o")]) == 2
    assert "--prompts: expected the prompts" in capsys.readouterr().err
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (48, 48)).save(masks / "a.png")
    argv = ["diagnose", str(image), "--prompts", "a star", "--masks", str(masks), "--out", str(tmp_path / "o")]
    assert cli_main(argv) == 2
    assert "a.png of its image's size 96x96, got 48x48" in capsys.readouterr().err
    Image.new("RGB", (96, 64)).save(image)
    Image.new("L", (96, 64)).save(masks / "a.png")
    assert cli_main(argv) == 2
    assert "--masks: expected square images" in capsys.readouterr().err


def test_bfloat16_model_gives_the_float32_diagnostics(small_vit):
    from captum_iclip.evaluation import map_agreement

    images = make_images(2, 3, 16, 16, seed=7)
    text = _text()
    full = Diagnostics(CLIPSimilarity(small_vit, text_features=text)).measure(images)
    half_model = copy.deepcopy(small_vit).to(torch.bfloat16)
    half = Diagnostics(CLIPSimilarity(half_model, text_features=text)).measure(images.to(torch.bfloat16))
    for name in ("itsm", "residual", "attention", "alpha=5"):
        assert half["maps"][name].dtype == torch.float32
        difference, correlation = map_agreement(full["maps"][name], half["maps"][name])
        assert difference <= 0.05 and correlation >= 0.97, name
