"""Hardening of the commands: their errors are one line naming the argument, no bare codec message.

Each test failed on the code before its fix (the hardening passes: one test per defect an adversarial
review found). Models are tiny random architectures (conftest) or the bundled shapes-tiny model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _tiny_open_clip_config, _write_training_csv, one_error_line
from PIL import Image

from captum_iclip import zoo
from captum_iclip.cli import main as cli_main


def _folder_dataset(root: Path, damage: str) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nthing\n")
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(root / "masks" / "a.png")
    (root / ("images" if damage == "image" else "masks") / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


@pytest.mark.parametrize(
    "case",
    [
        "unknown model",
        "cuda without GPU",
        "explain out is a folder",
        "explain resolution",
        "demo zero images",
        "demo out is a file",
        "corrupt open_clip checkpoint",
        "eval corrupt image",
        "eval corrupt mask",
        "train corrupt resume",
        "train cuda without GPU",
        "world zero scenes",
        "world root is a file",
        "audit pretrained without model",
        "eval checkpoint without model",
    ],
)
def test_command_errors_are_one_line_naming_the_argument(tmp_path, capsys, case):
    if "cuda" in case and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    needs_bundle = case in ("explain resolution", "eval corrupt image", "eval corrupt mask")
    if needs_bundle and "shapes-tiny" not in zoo.available():
        pytest.skip("bundle not installed")
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    (tmp_path / "a-file").write_text("x")
    explain = ["explain", str(image), "--prompts", "a,b", "--out", str(tmp_path / "o.png")]
    train = [
        "train",
        "--train-data",
        str(_write_training_csv(tmp_path / "data", 2)),
        "--workers",
        "0",
        "--batch-size",
        "2",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")

    def folder_eval(damage):
        return [
            "eval",
            "--dataset",
            "folder",
            "--root",
            str(_folder_dataset(tmp_path / "ds", damage)),
            "--out",
            str(tmp_path / "e"),
            "--no-progress",
            "--examples",
            "0",
            "--device",
            "cpu",
        ]

    def tiny_model():
        return _tiny_open_clip_config(tmp_path).stem

    cases = {  # case -> (argv, subcommand, what the message says)
        "unknown model": lambda: (explain + ["--model", "no-such-model"], "explain", "--model: expected an open_clip"),
        "cuda without GPU": lambda: (
            explain + ["--device", "cuda"],
            "explain",
            "--device: expected a device this machine has (torch sees no CUDA GPU",
        ),
        "explain out is a folder": lambda: (explain[:-1] + [str(tmp_path)], "explain", "--out: expected a file name"),
        "explain resolution": lambda: (
            explain + ["--resolution", "100"],
            "explain",
            "--resolution: expected a positive multiple of the model's patch size",
        ),
        "demo zero images": lambda: (
            ["demo", "-n", "0", "--out", str(tmp_path / "d")],
            "demo",
            "--num-images: expected at least 1, got 0",
        ),
        "demo out is a file": lambda: (["demo", "--out", str(tmp_path / "a-file")], "demo", "--out: expected a folder"),
        "corrupt open_clip checkpoint": lambda: (
            explain + ["--model", tiny_model(), "--checkpoint", str(bad)],
            "explain",
            "--checkpoint: expected weights of open_clip",
        ),
        "eval corrupt image": lambda: (folder_eval("image"), "eval", "expected a decodable image"),
        "eval corrupt mask": lambda: (folder_eval("mask"), "eval", "label file: expected a decodable image"),
        "train corrupt resume": lambda: (
            train + ["--device", "cpu", "--resume", str(bad)],
            "train",
            f"resume: expected a torch checkpoint of tensors and plain containers, got {bad}",
        ),
        "train cuda without GPU": lambda: (
            train + ["--device", "cuda"],
            "train",
            "device: expected a device this machine has (torch sees no CUDA GPU",
        ),
        "world zero scenes": lambda: (
            ["world", "export-text", "--out", str(tmp_path / "w"), "-n", "0"],
            "world",
            "-n: expected at least 1 scene, got 0",
        ),
        "world root is a file": lambda: (
            ["world", "export-voc", "--root", str(tmp_path / "a-file"), "-n", "1"],
            "world",
            "--root: expected a folder, got the file",
        ),
        "audit pretrained without model": lambda: (
            [
                "audit",
                "--images",
                str(image),
                "--prompts",
                "a,b",
                "--out",
                str(tmp_path / "r"),
                "--pretrained",
                "openai",
            ],
            "audit",
            "--pretrained: expected it together with model_name",
        ),
        "eval checkpoint without model": lambda: (
            ["eval", "--dataset", "folder", "--root", str(tmp_path), "--checkpoint", str(bad)],
            "eval",
            "--checkpoint: expected it together with model_name",
        ),
    }
    argv, prog, expected = cases[case]()
    assert cli_main(argv) == 2
    assert expected in one_error_line(capsys, f"captum-iclip {prog}")
    with pytest.raises(Exception):  # noqa: B017 - whatever the command raised, re-raised
        cli_main(["--debug", *argv])  # --debug keeps the traceback


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
