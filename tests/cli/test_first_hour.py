"""The first hour of a new user (issue 24): offline errors in seconds and in the caller's terms, a bundled
model that says what it knows, prompts that mean what was typed, and the smaller points (help texts and
defaults, did-you-mean, upscaled images, skipped files, the demo's table, colour bars, chart units)."""

from __future__ import annotations

import argparse
import json
import re
import socket
import time

import numpy as np
import pytest
from PIL import Image

from captum_iclip import cli
from captum_iclip.loading.loader import WeightsUnavailableError, hub_unreachable, load, mask_source
from captum_iclip.prompts import parse_prompts, read_prompts_file

OFFLINE_S = 5.0


def _timed(call):
    began = time.perf_counter()
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the test inspects it
        return error, time.perf_counter() - began
    raise AssertionError("expected an error")


def _run_cli(argv, capsys):
    began = time.perf_counter()
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err, time.perf_counter() - began


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    from captum_iclip.world import generate_scene

    folder = tmp_path_factory.mktemp("scenes")
    Image.fromarray(generate_scene(10_000_000).image).save(folder / "scene.png")
    return folder / "scene.png"


# --------------------------------------------------------------------------- 2. offline in seconds
def test_offline_open_clip_weights_fail_in_seconds_in_python_terms(network_cut):
    error, seconds = _timed(lambda: load("ViT-B-16", "openai"))
    assert isinstance(error, WeightsUnavailableError)
    assert seconds <= OFFLINE_S, seconds
    message = str(error)
    assert "this machine is offline" in message
    assert "https://huggingface.co/timm/vit_base_patch16_clip_224.openai/resolve/main/open_clip_pytorch_model.bin" in (
        message
    )
    assert 'captum_iclip.load("ViT-B-16", checkpoint="open_clip_pytorch_model.bin")' in message
    assert "random_weights=True" in message
    assert "--checkpoint" not in message and "--random-weights" not in message


def test_offline_hugging_face_and_dino_fail_in_seconds_in_python_terms(network_cut):
    error, seconds = _timed(lambda: load("openai/clip-vit-base-patch16"))
    assert isinstance(error, WeightsUnavailableError) and seconds <= OFFLINE_S
    assert "hf download openai/clip-vit-base-patch16" in str(error)
    assert 'captum_iclip.load(hf_model="clip-vit-base-patch16")' in str(error) and "--hf-model" not in str(error)
    error, seconds = _timed(lambda: mask_source("vit_small_patch16_224.dino"))
    assert isinstance(error, WeightsUnavailableError) and seconds <= OFFLINE_S
    assert 'checkpoint="dino_deitsmall16_pretrain.pth"' in str(error) and "--dino" not in str(error)


def test_a_hub_that_does_not_answer_is_offline_after_the_probe(monkeypatch, tmp_path):
    from huggingface_hub import constants

    def hangs(*args, **kwargs):
        time.sleep(8)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hangs)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    error, seconds = _timed(lambda: load("ViT-B-16", "openai"))
    assert isinstance(error, WeightsUnavailableError) and seconds <= OFFLINE_S, (error, seconds)
    assert "no answer from huggingface.co:443 within 2 s" in str(error)


def test_hf_hub_offline_is_read_at_once(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    began = time.perf_counter()
    assert hub_unreachable() == "HF_HUB_OFFLINE is set"
    assert time.perf_counter() - began < 0.5


def test_offline_command_gives_flags_in_seconds(network_cut, capsys, tmp_path):
    out = str(tmp_path / "maps.png")
    status, _, err, seconds = _run_cli(
        ["explain", "x.png", "--prompts", "a cat", "--model", "ViT-B-16", "--pretrained", "openai", "--out", out],
        capsys,
    )
    assert status == 2 and seconds <= OFFLINE_S, (err, seconds)
    assert err.startswith("captum-iclip explain: error: --pretrained: expected weights of open_clip 'ViT-B-16'")
    assert "--model ViT-B-16 --checkpoint open_clip_pytorch_model.bin" in err and "--random-weights" in err
    assert 'checkpoint="' not in err and "random_weights=True" not in err and "captum_iclip.load" not in err
    status, _, err, _ = _run_cli(["explain", "x.png", "--prompts", "a", "--hf-model", "org/clip", "--out", out], capsys)
    assert status == 2 and "--hf-model clip" in err and "hf_model=" not in err


def test_missing_weights_advice_in_the_callers_terms(capsys, tmp_path):
    with pytest.raises(ValueError) as raised:
        load("ViT-B-16")
    assert "random_weights=True" in str(raised.value) and "--random-weights" not in str(raised.value)
    status, _, err, seconds = _run_cli(
        ["explain", "x.png", "--prompts", "a", "--model", "ViT-B-16", "--out", str(tmp_path / "m.png")], capsys
    )
    assert status == 2 and seconds <= OFFLINE_S
    assert "--pretrained TAG or --checkpoint FILE, or --random-weights" in err and "random_weights=True" not in err


def test_unknown_names_get_did_you_mean():
    with pytest.raises(ValueError, match="got 'ViT-B-61'; did you mean 'ViT-B-16'"):
        load("ViT-B-61", random_weights=True)
    with pytest.raises(ValueError, match="pretrained: expected one of open_clip's tags .* did you mean 'openai'"):
        load("ViT-B-16", "opnai")


# --------------------------------------------------------------------------- 3. out-of-domain honesty
def test_bundle_config_records_its_domain_and_vocabulary():
    from captum_iclip import zoo
    from captum_iclip.zoo.train import world_domain

    config = json.loads((zoo.WEIGHTS_DIR / "shapes-tiny" / "config.json").read_text())
    assert {key: config[key] for key in ("domain", "vocabulary")} == world_domain()
    assert "procedural world" in config["domain"] and len(config["vocabulary"]["classes"]) == 10
    bundle = zoo.load("shapes-tiny")
    assert bundle.prompts_outside(["a red circle", "two stars on grass", "a cat", "an astronaut"]) == [
        "a cat",
        "an astronaut",
    ]
    assert len(bundle.domain_messages(bundle.prompts)) == 1  # the note alone: every prompt is a class


def test_explain_with_the_bundle_warns_about_prompts_outside_it(scene_png, capsys, tmp_path):
    status, out, err, _ = _run_cli(
        ["explain", str(scene_png), "--prompts", "a cat,a circle", "--out", str(tmp_path / "m.png")], capsys
    )
    assert status == 0, err
    assert err.count("is a miniature for the procedural world") == 1
    warning = next(line for line in err.splitlines() if "warning:" in line)
    assert "1 of 2 prompts name none of shapes-tiny's classes" in warning and "'a cat'" in warning
    assert "'a circle'" not in warning


def test_audit_page_shows_the_warning_and_the_skipped_files(scene_png, capsys, tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    (images / "scene.png").write_bytes(scene_png.read_bytes())
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "report"
    status, stdout, err, _ = _run_cli(
        ["audit", "--images", str(images), "--prompts", "a cat,a circle", "--methods", "raw", "--out", str(out)]
        + ["--no-progress"],
        capsys,
    )
    assert status == 0, err
    page = (out / "index.html").read_text()
    assert '<p class="warning">note: shapes-tiny is a miniature for the procedural world' in page
    assert "name none of shapes-tiny&#x27;s classes" in page and "&#x27;a cat&#x27;" in page
    assert "notes.txt" in page and "1 file(s) in the searched folders were skipped" in page
    assert "1 skipped as not images" in stdout


# --------------------------------------------------------------------------- 4. prompts
@pytest.mark.parametrize(
    "text, prompts",
    [
        ("a cat,a dog", ["a cat", "a dog"]),
        ("a cat, a dog", ["a cat", "a dog"]),
        ('"a cat, with a hat",a dog', ["a cat, with a hat", "a dog"]),
        ('"say ""cheese""",a dog', ['say "cheese"', "a dog"]),
        ("a cat, with a hat", ["a cat", "with a hat"]),  # CSV rules: unquoted commas separate
    ],
)
def test_prompts_are_one_csv_record(text, prompts):
    assert parse_prompts(text) == prompts


@pytest.mark.parametrize(
    "text, match",
    [
        ("a cat,,a dog", "empty prompt at position 2 of 3"),
        ("a cat,", "empty prompt at position 2 of 2"),
        (" , ", "comma-separated prompts, e.g."),
        ('"a cat', "CSV quoting"),
        ("a\nb", "on one line"),
    ],
)
def test_empty_or_broken_prompts_are_errors(text, match):
    with pytest.raises(ValueError, match=f"--prompts: expected .*{re.escape(match)}"):
        parse_prompts(text)


def test_prompts_file_utf8_comments_and_errors(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeff# shapes\na cat, with a hat\n\n  un cœur  \n#x\n".encode())
    assert read_prompts_file(path) == ["a cat, with a hat", "un cœur"]
    path.write_bytes(b"a cat\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"--prompts-file: expected a UTF-8 text file, .*\(line 2\)"):
        read_prompts_file(path)
    path.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="--prompts-file: expected at least one prompt line"):
        read_prompts_file(path)
    with pytest.raises(ValueError, match="--prompts-file: expected a readable text file"):
        read_prompts_file(tmp_path / "missing.txt")


def test_every_command_reads_prompts_the_same_way(tmp_path, capsys):
    from captum_iclip.cli import audit as command
    from captum_iclip.prompts import prompts_from_args

    path = tmp_path / "p.txt"
    path.write_text("a cat, with a hat\n")
    explain = cli.build_parser()
    for argv in (["explain", "x.png", "--out", "o.png"], ["--images", "x", "--out", "o"]):
        parser = explain if argv[0] == "explain" else command.build_parser()
        for extra, expected in (
            (["--prompts", '"a cat, with a hat",a dog'], ["a cat, with a hat", "a dog"]),
            (["--prompts-file", str(path)], ["a cat, with a hat"]),
        ):
            assert prompts_from_args(parser.parse_args(argv + extra)) == expected
    status, _, err, _ = _run_cli(["explain", "x.png", "--prompts", "a cat,,a dog", "--out", "o.png"], capsys)
    assert status == 2 and "captum-iclip explain: error: --prompts: expected a non-empty text" in err
    status, _, err, _ = _run_cli(["audit", "--images", "x", "--prompts", "a,", "--out", str(tmp_path / "r")], capsys)
    assert status == 2 and "captum-iclip audit: error: --prompts: expected a non-empty text" in err


# --------------------------------------------------------------------------- 5. the smaller points
def _parsers() -> dict[str, argparse.ArgumentParser]:
    from captum_iclip.cli import audit as command
    from captum_iclip.cli import diagnose, world
    from captum_iclip.cli import eval as evaluation
    from captum_iclip.cli import train as iclip

    return {
        "captum-iclip": cli.build_parser(),
        "train": iclip.build_parser(),
        "eval": evaluation.build_parser(),
        "audit": command.build_parser(),
        "diagnose": diagnose.build_parser(),
        "world": world.build_parser(),
    }


def _walk(parser: argparse.ArgumentParser, name: str):
    yield name, parser, None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                if sub not in cli.DELEGATED:
                    yield from _walk(subparser, f"{name} {sub}")
        elif not isinstance(action, argparse._HelpAction):
            yield name, parser, action


def test_every_option_of_every_command_has_help_and_its_default():
    for command, parser in _parsers().items():
        for name, owner, action in _walk(parser, command):
            if action is None:
                assert owner.description, f"{name}: no description"
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
            shows = owner._get_formatter()._get_help_string(action)
            flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            if action.default not in (None, False) and not flag:
                assert "default" in shows.lower(), f"{name} {action.option_strings}: its default is not shown"
    device = next(
        a for a in cli.build_parser()._subparsers._group_actions[0].choices["demo"]._actions if a.dest == "device"
    )
    assert "torch device" in device.help


def test_small_images_are_upscaled_with_a_warning(tmp_path, capsys):
    path = tmp_path / "tiny.png"
    Image.new("RGB", (10, 10), "red").save(path)
    status, _, err, _ = _run_cli(
        ["explain", str(path), "--prompts", "a circle", "--out", str(tmp_path / "m.png")], capsys
    )
    assert status == 0, err
    assert f"warning: {path} is 10x10 px, upscaled to the model's 96 px input" in err


def test_grid_has_a_colour_bar_and_outlines_the_target():
    from captum_iclip.viz import attribution_grid, label_colours

    label = np.zeros((24, 24), dtype=np.int64)
    label[4:12, 4:12], label[14:20, 14:20] = 1, 2
    image = np.random.default_rng(0).random((24, 24, 3))
    fig = attribution_grid(
        [image], [[label_colours(label), np.random.default_rng(1).random((24, 24))]], target_masks=[label == 2]
    )
    assert len(fig.axes) == 4  # image, ground truth, map, colour bar
    assert "min-max normalised" in fig.axes[-1].get_ylabel()
    assert fig.axes[1].collections, "the target is outlined in the ground truth"
    assert not fig.axes[2].collections


def test_demo_prints_its_table_and_the_chart_has_title_and_units(tmp_path, capsys, monkeypatch):
    from captum_iclip import viz
    from captum_iclip.demo import run_demo

    charts = []
    drawer = viz.metrics_chart
    monkeypatch.setattr(viz, "metrics_chart", lambda rows, **kwargs: charts.append(drawer(rows, **kwargs)))
    run_demo(str(tmp_path / "demo"), num_images=2, methods=("raw",), progress=False)
    out = capsys.readouterr().out
    header = "| method | mIoU ↑ | mSC ↑ | pointing ↑ | deletion AUC ↓ | insertion AUC ↑ | s / image |"
    assert header in out and "| raw ITSM |" in out
    assert "s / image: wall time of each method's map calls (batches of 16) divided by the images" in out
    (chart,) = charts
    assert "Localization on 2 images of world, deletion / insertion on 2 of them" in chart._suptitle.get_text()
    labels = [ax.get_xlabel() for ax in chart.axes]
    assert labels[0] == "explanation mIoU, % (higher is better)"
    titles = [ax.get_title() for ax in chart.axes]
    assert titles == ["mIoU", "mSC", "pointing", "deletion AUC", "insertion AUC"]
    assert all(f"({'lower' if 'deletion' in t else 'higher'} is better)" in x for t, x in zip(titles, labels))
