"""Hardening 2: no model loaded by mistake, no run lost to a NaN, no JSON a strict reader rejects, no
report that links out of its folder, no bare codec message.

(The block-loop methods and model hooks are tested with the other dense methods, in
tests/attr/test_dense_methods.py.)
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, CLIPConfig, CLIPImageProcessor, CLIPModel

import captum_iclip
from captum_iclip._io import load_torch_file
from captum_iclip.loading.loader import WeightsUnavailableError

PACKAGE = Path(captum_iclip.__file__).parent


def strict_json(text: str):
    """``json.loads`` as a strict reader (JavaScript's JSON.parse, jq) parses: no NaN / Infinity."""

    def refuse(token: str):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


# --- 1. load accepts only what it supports ------------------------------------------------------
def _tiny_clip_config() -> CLIPConfig:
    return CLIPConfig(
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            patch_size=8,
            image_size=16,
        ),
        text_config=dict(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        ),
        projection_dim=8,
    )


def _image_processor(folder: Path) -> None:
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)


def test_load_refuses_a_hugging_face_folder_of_another_model_type(tmp_path):
    folder = tmp_path / "bert"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(folder)
    _image_processor(folder)
    with pytest.raises(ValueError, match=r"hf_model: expected a Hugging Face model of type clip, siglip.*'bert'"):
        captum_iclip.load(hf_model=str(folder))
    with pytest.raises(ValueError, match=r"model_type 'bert'"):
        captum_iclip.load(str(folder))  # a folder given as the spec


def test_load_refuses_weights_that_miss_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "clip"
    torch.manual_seed(0)
    CLIPModel(_tiny_clip_config()).save_pretrained(folder)
    _image_processor(folder)
    weights = folder / "model.safetensors"
    state = load_file(weights)
    dropped = sorted(k for k in state if k.startswith("vision_model.encoder."))
    save_file({k: v for k, v in state.items() if k not in dropped}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"hf_model: expected the weights of every parameter of its CLIPModel") as err:
        captum_iclip.load(hf_model=str(folder))
    assert f"miss {len(dropped)} ({dropped[0]}" in str(err.value)


def test_load_gives_its_own_errors_for_empty_folders_names_and_sizes(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"hf_model: expected a Hugging Face model folder .* which has no config.json"):
        captum_iclip.load(hf_model=str(empty))
    (tmp_path / "typeless").mkdir()
    (tmp_path / "typeless" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"hf_model: expected a Hugging Face model whose config.json names"):
        captum_iclip.load(hf_model=str(tmp_path / "typeless"))
    for argument in ("spec", "hf_model"):
        with pytest.raises(ValueError, match=rf"^{argument}: expected a bundled name.*got ''"):
            captum_iclip.load(**{argument: ""})
    for size in (0, -16, True, 1.5):
        with pytest.raises(ValueError, match=r"image_size: expected a positive int"):
            captum_iclip.load("shapes-tiny", image_size=size)
    with pytest.raises(ValueError, match=r"model_name: expected hf-hub:OWNER/NAME"):
        captum_iclip.load("hf-hub:")
    with pytest.raises(ValueError, match=r"pretrained: expected None with an hf-hub: model"):
        captum_iclip.load("hf-hub:someone/some-clip", "openai")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries against an unreachable hub
    with pytest.raises(WeightsUnavailableError, match=r"model_name: expected an open_clip hub model this machine"):
        captum_iclip.load("hf-hub:someone/some-clip")


# --- 2. a run that turns NaN stops, keeps its last good checkpoint, writes strict JSON -----------
def _nan_run_options(tmp_path: Path, lr: str) -> list[str]:
    from test_training import write_csv, write_model_config

    csv_path = write_csv(tmp_path / "data", num_good=4, bad=False)
    return [
        "--train-data",
        str(csv_path),
        "--model-config",
        str(write_model_config(tmp_path)),
        "--from-scratch",
        "--mode",
        "full",
        "--batch-size",
        "2",
        "--epochs",
        "3",
        "--workers",
        "0",
        "--save-every",
        "1",
        "--log-every",
        "1",
        "--warmup",
        "0",
        "--lr",
        lr,
        "--no-progress",
        "--output-dir",
        str(tmp_path / "run"),
    ]


def test_training_stops_at_a_nan_loss_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    from captum_iclip.cli import main

    status = main(["train", *_nan_run_options(tmp_path, "1e6")])
    err = capsys.readouterr().err
    assert status != 0
    assert "loss: expected a finite training loss, got nan" in err and "--resume" in err
    run = tmp_path / "run"
    assert not (run / "final.pt").exists() and not (run / "stats.json").exists()
    checkpoint = load_torch_file(run / "checkpoints" / "latest.pt")
    assert f"latest.pt (step {checkpoint['step']}), is kept" in err
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    for line in (run / "log.jsonl").read_text().splitlines():
        assert isinstance(strict_json(line)["loss"], float)


def test_training_checks_the_weights_before_each_save(tmp_path, monkeypatch):
    from captum_iclip.cli import train as train_command
    from captum_iclip.training import iclip

    real_step = iclip.train_step
    calls = []

    def step_that_breaks_a_weight(parts, images, captions):
        loss = real_step(parts, images, captions)
        calls.append(loss)
        if len(calls) == 2:  # a finite loss, but the update left an infinite weight
            with torch.no_grad():
                parts.trainable[0].view(-1)[0] = float("inf")
        return loss

    monkeypatch.setattr(iclip, "train_step", step_that_breaks_a_weight)
    options = train_command.build_parser().parse_args(_nan_run_options(tmp_path, "1e-3"))
    with pytest.raises(iclip.NonFiniteTrainingError, match=r"model: expected finite weights to checkpoint at step 2"):
        iclip.train(iclip.TrainConfig(**vars(options)))
    assert load_torch_file(tmp_path / "run" / "checkpoints" / "latest.pt")["step"] == 1


def _json_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value
            if isinstance(target, ast.Name) and target.id == "json" and node.func.attr in ("dump", "dumps"):
                yield node


def test_every_json_writer_is_strict():
    from captum_iclip._io import json_text

    # One writer: every JSON the package writes (files, log lines, printed stats) goes through json_text.
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_io.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        offenders += [f"{path.relative_to(PACKAGE)}:{call.lineno}" for call in _json_calls(tree)]
    assert not offenders, f"json.dump(s) outside captum_iclip/_io.py (use json_text): {offenders}"
    text = json_text({"loss": float("nan"), "rates": [1.5, float("inf"), -float("inf")], "n": 2}, indent=1)
    assert strict_json(text) == {"loss": None, "rates": [1.5, None, None], "n": 2}


# --- 4. the audit reads only its own files; its options name their errors -------------------------
def test_audit_recomputes_a_record_whose_files_lie_outside_the_report(tmp_path):
    from test_audit import write_images
    from test_hardening import _audit_kwargs

    from captum_iclip.audit import audit

    images = tmp_path / "photos"
    write_images(images, 2, corrupt=False)
    out = tmp_path / "report"
    kwargs = _audit_kwargs(out)
    audit(images, **kwargs)
    (tmp_path / "secret.png").write_bytes((out / "images").glob("*.png").__next__().read_bytes())
    records = sorted((out / "records").glob("*.json"))
    tampered = json.loads(records[0].read_text())
    tampered["thumbnail"] = "images/../../secret.png"
    records[0].write_text(json.dumps(tampered))
    other = json.loads(records[1].read_text())
    other["top"][0]["maps"]["raw"]["overlay"] = str(tmp_path / "secret.png")  # absolute
    records[1].write_text(json.dumps(other))

    summary = audit(images, **kwargs)
    assert (summary.computed, summary.reused) == (2, 0)
    page = summary.index.read_text(encoding="utf-8")
    assert "secret.png" not in page and "../" not in page
    sources = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert sources and all(s.startswith("images/") for s in sources)


def test_prompts_file_that_is_not_utf8_names_the_option_and_file(tmp_path, capsys):
    from captum_iclip.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a caf\u00e9\na dog\n".encode("latin-1"))
    (tmp_path / "photos").mkdir()
    status = main(
        ["audit", "--images", str(tmp_path / "photos"), "--prompts-file", str(prompts), "--out", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert f"--prompts-file: expected a UTF-8 text file, got {str(prompts)!r}, which is not UTF-8 (line 1)" in err
    assert "codec" not in err
