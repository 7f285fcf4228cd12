"""benchmarks/device.py, the prepared GPU command, in its --quick mode on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from captum_iclip.evaluation.methods import method_names

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _results(folder: Path) -> dict:
    (path,) = folder.glob("*.json")
    assert path.with_suffix(".md").is_file()
    return json.loads(path.read_text())


def test_quick_run_measures_every_method_and_writes_its_table(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "device.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = _results(tmp_path)
    assert results["errors"] == []
    agreement = {(row["method"], row["dtype"]) for row in results["agreement"]}
    assert agreement == {(name, dtype) for name in method_names() for dtype in ("fp16", "bf16", "autocast-bf16")}
    timed = {(row["resolution"], row["prompts"], row["method"]) for row in results["timing"]}
    assert {(32, 1, "encode_image"), (64, 50, "raw"), (32, 1, "occlusion")} <= timed
    assert all(row["images_per_s"] > 0 for row in results["timing"])
    assert results["eval"][0]["images_per_s"] > 0
    assert {row["what"] for row in results["skipped"]} >= {"host-device copies", "CPU ratios"}
    assert "| small-vit | legrad |" in done.stdout and "## Speed and memory" in done.stdout


@pytest.fixture
def device_script(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import device

    return device


def test_a_failing_method_is_recorded_and_the_others_go_on(device_script, tmp_path, monkeypatch):
    real = device_script.build_method

    def build(name, sim, **options):
        if name == "gem":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(name, sim, **options)

    monkeypatch.setattr(device_script, "build_method", build)
    argv = ["--quick", "--methods", "raw,gem", "--resolutions", "32", "--prompts", "1", "--out", str(tmp_path)]
    assert device_script.main(argv) == 0
    results = _results(tmp_path)
    assert {row["method"] for row in results["agreement"]} == {"raw"}
    assert any("gem" in error["what"] and "simulated" in error["error"] for error in results["errors"])
    assert {row["method"] for row in results["timing"]} == {"encode_image", "raw"}


def test_a_spent_budget_skips_every_part_and_still_writes(device_script, tmp_path):
    assert device_script.main(["--quick", "--budget", "0", "--out", str(tmp_path)]) == 0
    results = _results(tmp_path)
    assert not results["agreement"] and not results["timing"]
    assert any("budget" in row["reason"] for row in results["skipped"])
