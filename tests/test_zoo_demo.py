"""The bundled offline models and the demo (issue: the offline default)."""

from __future__ import annotations

import json
import re
import socket

import pytest
import torch

from captum_iclip import CLIPSimilarity, ITSMAttribution, zoo
from captum_iclip.cli import main as cli_main
from captum_iclip.zoo.train import MODEL_CONFIG, dino_foreground_iou, zero_shot_accuracy

# Floor stated in the closing note of the offline-default issue; the measured value is in the
# bundle's config.json ("training"). It sits below the measurement and well above chance, so
# that a broken bundle or loader fails.
ZERO_SHOT_MARGIN_OVER_CHANCE = 10.0  # percentage points
# Floors of the DINO masks, stated in the same closing note: the [CLS] attention puts at least
# 1.5x the objects' share of the image on them (2.12x measured), and the top-60 %-mass masks beat
# the IoU of the trivial "every patch" mask by at least 2 points (3.0 measured; below a centre box).
DINO_ATTENTION_OVER_AREA = 1.5
DINO_IOU_MARGIN_OVER_ALL_PATCHES = 2.0  # percentage points


@pytest.fixture(scope="module")
def bundle():
    if "shapes-tiny" not in zoo.available():
        pytest.fail("the bundled model shapes-tiny is missing from captum_iclip/zoo/weights")
    return zoo.load("shapes-tiny")


def test_bundle_loads_offline(bundle, monkeypatch):
    # No network is needed: any socket use fails the test.
    def no_network(*args, **kwargs):
        raise AssertionError("the bundled model tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    again = zoo.load("shapes-tiny")
    assert again.image_size == MODEL_CONFIG["vision_cfg"]["image_size"]
    assert len(again.prompts) == len(again.class_names) - 1
    sim = CLIPSimilarity(again.dual, again.tokenizer, again.prompts)
    image = again.preprocess(torch.zeros(96, 96, 3, dtype=torch.uint8).numpy())[None]
    maps = ITSMAttribution(sim).attribute(image)
    assert maps.shape == (1, len(again.prompts), 96, 96)


def test_bundle_is_small():
    size = sum(p.stat().st_size for p in (zoo.WEIGHTS_DIR / "shapes-tiny").rglob("*") if p.is_file())
    assert size <= 20 * 2**20


def test_zero_shot_accuracy_is_well_above_chance(bundle):
    result = zero_shot_accuracy(bundle.clip, bundle.tokenizer, num_scenes=200)
    assert result["accuracy"] >= result["chance"] + ZERO_SHOT_MARGIN_OVER_CHANCE, result


def test_dino_masks_prefer_the_objects_and_reproduce_the_recorded_figures(bundle):
    recorded = bundle.info["dino_masks"]
    result = dino_foreground_iou(bundle.mask_provider.model, num_scenes=recorded["scenes"])
    for key in ("dino_iou", "attention_on_objects", "object_area"):
        assert result[key] == pytest.approx(recorded[key], abs=1e-4), key
    assert result["all_patches_iou"] == pytest.approx(recorded["all_patches_iou"], abs=1e-9)
    assert result["attention_on_objects"] >= DINO_ATTENTION_OVER_AREA * result["object_area"], result
    assert result["dino_iou"] >= result["all_patches_iou"] + DINO_IOU_MARGIN_OVER_ALL_PATCHES, result


def test_demo_writes_figure_and_tables(tmp_path):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out), "--num-images", "6", "--no-progress"]) == 0
    for name in ("figure.png", "metrics.json", "metrics.csv", "metrics.md"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "metrics.json").read_text())
    methods = list(summary["methods"])
    assert methods == ["raw", "surgery", "iclip", "mmp", "gradcam", "ig"]
    for row in summary["methods"].values():
        assert -100.0 <= row["msc"] <= 100.0 and 0.0 <= row["miou"] <= 100.0 and row["pairs"] > 0
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The demo is `eval` on the same held-out scenes: the same numbers from the same loop.
    from captum_iclip.demo import DEMO_SEED_OFFSET
    from captum_iclip.world import HELDOUT_SEED_START

    first_seed = str(HELDOUT_SEED_START + DEMO_SEED_OFFSET)
    assert (
        cli_main(
            [
                "eval",
                "--dataset",
                "world",
                "--root",
                first_seed,
                "--limit",
                "6",
                "--batch-size",
                "16",
                "--method",
                "raw,surgery,iclip,mmp",
                "--pointing-tolerance",
                "3",
                "--examples",
                "0",
                "--no-progress",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    for name, entry in evaluated["methods"].items():
        for key in ("miou", "msc", "pointing", "pairs", "per_class"):
            assert entry[key] == summary["methods"][name][key], (name, key)


def test_explain_command_on_the_bundled_model(tmp_path, capsys):
    from captum_iclip.world import generate_scene

    image = tmp_path / "scene.png"
    scene = generate_scene(10_000_123)
    scene.pil().save(image)
    out = tmp_path / "maps.png"
    assert cli_main(["explain", str(image), "--prompts", "a star,a circle", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "a star" in printed and "a circle" in printed and out.stat().st_size > 0


def test_explain_reports_a_missing_image_and_empty_prompts(tmp_path, capsys):
    assert (
        cli_main(["explain", str(tmp_path / "nope.png"), "--prompts", "a cat", "--out", str(tmp_path / "o.png")]) == 2
    )
    assert re.fullmatch(
        r"captum-iclip explain: error: images: no image file at \S+nope.png .*\n", capsys.readouterr().err
    )
    assert cli_main(["explain", str(tmp_path / "nope.png"), "--prompts", " , ", "--out", str(tmp_path / "o.png")]) == 2
    assert re.fullmatch(
        r"captum-iclip explain: error: --prompts: expected comma-separated texts.*\n", capsys.readouterr().err
    )


def test_explain_offline_pretrained_weights_give_a_clear_message(tmp_path, monkeypatch, capsys):
    import open_clip

    from captum_iclip.models import loading

    def unreachable(*args, **kwargs):
        raise RuntimeError("Failed to download (network unreachable)")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", unreachable)
    with pytest.raises(loading.WeightsUnavailableError, match="--checkpoint"):
        loading.load("ViT-B-16", "openai")
    assert (
        cli_main(
            [
                "explain",
                str(tmp_path / "x.png"),
                "--prompts",
                "a cat",
                "--model",
                "ViT-B-16",
                "--pretrained",
                "openai",
                "--out",
                str(tmp_path / "o.png"),
            ]
        )
        == 2
    )
    error = capsys.readouterr().err
    assert "--hf-model" in error and error.count("\n") == 1
