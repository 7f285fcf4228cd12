"""Hardening of the loader: weights options are never ignored, it loads only what it supports.

Each test failed on the code before its fix (the hardening passes: one test per defect an adversarial
review found). Models are tiny random architectures (conftest) or the bundled shapes-tiny model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import _tiny_open_clip_config, one_error_line
from PIL import Image
from transformers import BertConfig, BertModel, CLIPConfig, CLIPImageProcessor, CLIPModel

import captum_iclip
from captum_iclip import zoo
from captum_iclip.cli import main as cli_main
from captum_iclip.loading.loader import WeightsUnavailableError


def test_weights_options_are_never_ignored(tmp_path, capsys):
    from captum_iclip.loading.loader import load_clip

    with pytest.raises(ValueError, match="pretrained: expected it together with model_name"):
        load_clip(None, "openai")
    with pytest.raises(ValueError, match="checkpoint: expected it together with model_name"):
        load_clip(None, checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(
        ValueError,
        match="model_name: expected with pretrained .* got 'RN50' without weights; pass .*random_weights=True",
    ):
        load_clip("RN50")
    tiny = _tiny_open_clip_config(tmp_path).stem
    assert isinstance(load_clip(tiny, random_weights=True).model, open_clip.model.CLIP)  # the explicit opt-in
    if "shapes-tiny" in zoo.available():
        with pytest.raises(
            ValueError,
            match=r"checkpoint: expected it together with an open_clip .* got the bundled model 'shapes-tiny'",
        ):
            load_clip("shapes-tiny", checkpoint=str(tmp_path / "x.pt"))
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    assert (
        cli_main(
            [
                "explain",
                str(image),
                "--prompts",
                "a",
                "--checkpoint",
                str(tmp_path / "missing.pt"),
                "--out",
                str(tmp_path / "o.png"),
            ]
        )
        == 2
    )
    assert one_error_line(capsys, "captum-iclip explain").startswith(
        "--checkpoint: expected it together with model_name"
    )
    assert cli_main(["explain", str(image), "--prompts", "a", "--model", "RN50", "--out", str(tmp_path / "o.png")]) == 2
    assert "--random-weights" in one_error_line(capsys, "captum-iclip explain")


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
