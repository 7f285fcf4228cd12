"""Hardening of ICLIP training: no code from checkpoints, the bundled model trains, a run that turns NaN
stops and keeps its last good checkpoint.

Each test failed on the code before its fix (the hardening passes: one test per defect an adversarial
review found). Models are tiny random architectures (conftest) or the bundled shapes-tiny model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _write_training_csv, one_error_line, strict_json

from captum_iclip import zoo
from captum_iclip._io import load_torch_file
from captum_iclip.cli import main as cli_main


class _RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_crafted_training_checkpoint_runs_no_code_on_resume(tmp_path):
    from test_training import random_dataset, tiny_vit, tokenizer

    from captum_iclip.training.iclip import CHECKPOINT_FORMAT, TrainConfig, train

    marker = tmp_path / "code-ran"
    crafted = tmp_path / "latest.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "payload": _RunsCode(marker)}, crafted)
    config = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=2, workers=0, resume=str(crafted), device="cpu")
    with pytest.raises(
        ValueError, match=r"resume: expected a torch checkpoint .*, got .*latest\.pt, which cannot be read"
    ):
        train(config, model=tiny_vit(), dataset=random_dataset(4, 32), tokenizer=tokenizer())
    assert not marker.exists()


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    from captum_iclip.training.iclip import _rng_state, _set_rng_state

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.standard_normal()  # a cached Gaussian in NumPy's state
    torch.save(_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    _set_rng_state(load_torch_file(tmp_path / "rng.pt"))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


@pytest.mark.skipif("shapes-tiny" not in zoo.available(), reason="bundle not installed")
@pytest.mark.parametrize("model", [[], ["--model", "shapes-tiny"]], ids=["default", "named"])
def test_train_command_trains_the_bundled_model(tmp_path, capsys, model):
    from captum_iclip import zoo

    csv_path = _write_training_csv(tmp_path / "data", 4)
    out = tmp_path / "run"
    status = cli_main(
        [
            "train",
            "--train-data",
            str(csv_path),
            *model,
            "--batch-size",
            "2",
            "--workers",
            "0",
            "--output-dir",
            str(out),
            "--device",
            "cpu",
            "--lr",
            "1e-2",
        ]
    )
    assert status == 0, capsys.readouterr().err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["steps"] == 2 and stats["samples"] == 4 and stats["mode"] == "projection"
    bundle = zoo.load("shapes-tiny")
    trained = load_torch_file(out / "interpretability_head.pt")["state_dict"]
    before = bundle.dual.interpretability_head.state_dict()
    # One head, the bundle's, trained (not a fresh copy of the projection wrapped around the bundle).
    assert trained.keys() == before.keys()
    assert any(not torch.equal(trained[k], before[k]) for k in trained)
    final = load_torch_file(out / "final.pt")["state_dict"]
    assert not any(k.startswith("clip.clip.") for k in final)
    assert all(torch.equal(final[f"clip.{k}"], v) for k, v in bundle.clip.state_dict().items())


def test_training_where_every_image_is_unreadable_fails(tmp_path, capsys):
    from test_training import write_model_config

    csv_path = _write_training_csv(tmp_path / "data", 4, corrupt=True)
    status = cli_main(
        [
            "train",
            "--train-data",
            str(csv_path),
            "--model-config",
            str(write_model_config(tmp_path)),
            "--from-scratch",
            "--batch-size",
            "2",
            "--workers",
            "0",
            "--output-dir",
            str(tmp_path / "run"),
            "--device",
            "cpu",
        ]
    )
    assert status == 2
    assert one_error_line(capsys, "captum-iclip train").startswith(
        "train_data: expected readable images (check the paths and the image files), got none: 4 skipped"
    )
    assert not (tmp_path / "run" / "final.pt").exists()


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
