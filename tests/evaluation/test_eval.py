"""``captum-iclip eval`` end to end on a tiny VOC-style export of the procedural world.

The model is a tiny random open_clip ViT (2 blocks, 8-px patches, 32-px input)
registered from a model-config JSON and saved as a checkpoint, so the command
line, in this process and under ``torchrun`` in a subprocess, loads exactly
the model the in-process API is given.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from captum_iclip import CLIPSimilarity, ITSMAttribution
from captum_iclip.cli.eval import main
from captum_iclip.datasets import build_dataset
from captum_iclip.evaluation.config import TASKS
from captum_iclip.evaluation.methods import build_method
from captum_iclip.evaluation.metrics import LocalizationMetrics, SegmentationMetrics
from captum_iclip.evaluation.run import (
    EvalConfig,
    _segmentation_labels,
    class_prompts,
    evaluate,
    shard_indices,
)
from captum_iclip.evaluation.tasks import TASK_TYPES
from captum_iclip.world import export_voc
from captum_iclip.zoo import make_preprocess

MODEL_NAME = "tiny-eval-vit"
MODEL_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
RESOLUTION = 32
TOLERANCE = 3
NUM_IMAGES = 6


@pytest.fixture(autouse=True)
def _one_thread():
    # Two threads on a loaded 2-core machine are an order of magnitude slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The VOC-style export, and the tiny model's config JSON and checkpoint."""
    folder = tmp_path_factory.mktemp("eval")
    root = export_voc(folder / "voc", NUM_IMAGES, size=64)
    config = folder / f"{MODEL_NAME}.json"
    config.write_text(json.dumps(MODEL_CONFIG))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL_NAME).eval()
    checkpoint = folder / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    return {"root": root, "config": config, "checkpoint": checkpoint, "model": model}


@pytest.fixture(scope="module")
def dataset(files):
    return build_dataset("voc", files["root"])


@pytest.fixture(scope="module")
def sim(files, dataset) -> CLIPSimilarity:
    return CLIPSimilarity(files["model"], open_clip.get_tokenizer(MODEL_NAME), class_prompts(dataset))


def _cli_args(files, out, methods="raw,mmp,gradcam"):
    return [
        "--dataset",
        "voc",
        "--root",
        str(files["root"]),
        "--model-config",
        str(files["config"]),
        "--model",
        MODEL_NAME,
        "--checkpoint",
        str(files["checkpoint"]),
        "--device",
        "cpu",
        "--method",
        methods,
        "--task",
        "localization,segmentation,faithfulness",
        "--pointing-tolerance",
        str(TOLERANCE),
        "--batch-size",
        "2",
        "--faithfulness-samples",
        "2",
        "--faithfulness-perturbations",
        "2",
        "--examples",
        "2",
        "--no-progress",
        "--out",
        str(out),
    ]


def _without_timing(results: dict) -> dict:
    return {name: {k: v for k, v in entry.items() if k != "timing"} for name, entry in results["methods"].items()}


def test_evaluate_writes_results_that_match_a_direct_computation(tmp_path, sim, dataset):
    config = EvalConfig(
        "voc",
        "unused",
        methods=["raw", "surgery", "mmp"],
        tasks=["localization", "segmentation", "faithfulness"],
        pointing_tolerance=TOLERANCE,
        batch_size=4,
        faithfulness_samples=3,
        faithfulness_perturbations=2,
        examples=2,
        out=str(tmp_path),
        progress=False,
    )
    results = evaluate(config, sim, dataset=dataset, model_name=MODEL_NAME)

    # Direct computation for `raw`: image by image, through the public pieces.
    preprocess = make_preprocess(RESOLUTION, sim.adapter.image_mean, sim.adapter.image_std)
    run = build_method("raw", sim)
    itsm = ITSMAttribution(sim)
    localization = LocalizationMetrics(dataset.num_classes, pointing_tolerance=TOLERANCE)
    segmentation = SegmentationMetrics(dataset.num_classes)
    pairs = 0
    for image, label, _ in dataset:
        x = preprocess(image)[None]
        classes = [int(c) for c in np.unique(label) if c not in (0, 255)]
        pairs += len(classes)
        maps = run(x.expand(len(classes), -1, -1, -1), torch.tensor(classes))
        localization.update(maps[:, 0], classes, label)
        scores = itsm.attribute(x, normalize=False)
        scores = torch.nn.functional.interpolate(scores, size=label.shape, mode="bilinear", align_corners=False)
        segmentation.update(scores[0].argmax(0), label)
    expected, expected_segmentation = localization.compute(), segmentation.compute()
    raw = results["methods"]["raw"]
    assert raw["pairs"] == pairs == expected["pairs"]
    assert raw["miou"] == expected["miou"]
    assert raw["msc"] == expected["msc"]
    assert raw["pointing"] == expected["pointing"]
    assert raw["segmentation"]["miou"] == expected_segmentation["miou"]
    assert raw["segmentation"]["pixels"] == NUM_IMAGES * 64 * 64
    assert raw["segmentation"]["background"] == "prompt"

    for name, entry in results["methods"].items():
        assert 0 <= entry["miou"] <= 100 and -100 <= entry["msc"] <= 100 and 0 <= entry["pointing"] <= 100
        assert entry["faithfulness"]["samples"] == 3
        assert entry["faithfulness"]["infidelity"] >= 0 and entry["faithfulness"]["sensitivity"] >= 0
        assert set(entry["per_class"]) <= set(dataset.class_names[1:])
        assert (entry["segmentation"] is None) == (name == "mmp")  # segmentation is for ITSM methods

    written = json.loads((tmp_path / "results.json").read_text())
    assert written["methods"] == json.loads(json.dumps(results["methods"]))
    assert written["resolution"] == RESOLUTION and written["world_size"] == 1
    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == ["raw", "surgery", "mmp"]
    assert float(rows[0]["miou"]) == raw["miou"]
    table = (tmp_path / "results.md").read_text().splitlines()
    assert len([line for line in table if line.startswith("| ")]) == 1 + 3
    assert len(list((tmp_path / "examples").glob("*.png"))) == 2
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the chart of the figures


def test_metrics_chart_draws_each_methods_figures_and_intervals_in_its_colour():
    from matplotlib.colors import to_rgba

    from captum_iclip.evaluation.methods import REGISTRY, method_colour
    from captum_iclip.viz import metrics_chart

    rows = [
        {
            "title": "raw ITSM",
            "colour": REGISTRY["raw"].colour,
            "figures": {"mIoU": (8.6, 7.8, 9.4), "mSC": (9.4, 7.7, 11.1)},
        },
        {"title": "mine", "colour": None, "figures": {"mIoU": (5.0, None, None), "mSC": (None, None, None)}},
    ]
    fig = metrics_chart(rows)
    miou, msc = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["mIoU", "mSC"]
    assert [label.get_text() for label in miou.get_yticklabels()] == ["raw ITSM", "mine"]
    points = [line for line in miou.lines if line.get_marker() == "o"]
    assert [(p.get_xdata()[0], p.get_ydata()[0]) for p in points] == [(8.6, 1), (5.0, 0)]  # first method on top
    assert points[0].get_color() == REGISTRY["raw"].colour
    caps = sorted(x for line in miou.lines if line.get_marker() == "|" for x in line.get_xdata())
    assert caps == pytest.approx([7.8, 9.4])  # only the first method has an interval
    assert len([line for line in msc.lines if line.get_marker() == "o"]) == 1  # an undefined mean is not drawn
    assert "black" not in {info.colour for info in REGISTRY.values()} and method_colour("my_fn") == "black"
    assert len({to_rgba(info.colour) for info in REGISTRY.values()}) == len(REGISTRY)  # one colour per method
    with pytest.raises(ValueError, match="rows: expected every row to name the figures"):
        metrics_chart([rows[0], {"title": "x", "colour": None, "figures": {"mIoU": (1.0, None, None)}}])


def test_sliding_window_with_one_window_equals_the_whole_image(sim, dataset):
    common = dict(methods=["surgery"], tasks=["segmentation"], out=None, progress=False, resolution=RESOLUTION)
    whole = evaluate(EvalConfig("voc", "unused", **common), sim, dataset=dataset)
    one_window = evaluate(EvalConfig("voc", "unused", slide=True, window=RESOLUTION, **common), sim, dataset=dataset)
    assert one_window["methods"]["surgery"]["segmentation"] == whole["methods"]["surgery"]["segmentation"]
    # Larger inputs, 3 x 3 overlapping windows: still a full, valid segmentation.
    slid = evaluate(
        EvalConfig("voc", "unused", **{**common, "resolution": 64}, slide=True, window=32, stride=16),
        sim,
        dataset=dataset,
    )
    assert slid["segmentation_window"] == {"window": 32, "stride": 16}
    assert slid["methods"]["surgery"]["segmentation"]["pixels"] == NUM_IMAGES * 64 * 64


def test_segmentation_background_threshold_known_answer(dataset):
    # Scores per 2 x 2 block of a 4 x 4 label, for every class.
    blocks = torch.full((dataset.num_classes, 2, 2), -1.0)
    blocks[0] = 0.9  # the background prompt wins everywhere without a threshold
    blocks[3, 0, 0], blocks[5, 0, 1], blocks[5, 1, 0] = 0.8, 0.2, 0.7
    scores = blocks.repeat_interleave(2, 1).repeat_interleave(2, 2)
    label = np.zeros((4, 4), dtype=np.int64)
    label[:2, :2], label[2:, :2], label[2:, 2:] = 3, 5, 255
    with_prompt = _segmentation_labels(scores, (4, 4), dataset, None)
    assert torch.equal(with_prompt, torch.zeros(4, 4, dtype=torch.long))
    thresholded = _segmentation_labels(scores, (4, 4), dataset, 0.5)
    expected = torch.tensor([[3, 3, 0, 0], [3, 3, 0, 0], [5, 5, 0, 0], [5, 5, 0, 0]])
    assert torch.equal(thresholded, expected)
    metric = SegmentationMetrics(dataset.num_classes)
    metric.update(thresholded, label)
    # Classes 0, 3, 5 each exactly right on their 4 non-ignored pixels.
    assert metric.compute()["miou"] == 100.0


@pytest.mark.parametrize("size,batch_size,world_size", [(6, 2, 2), (7, 3, 2), (10, 1, 3), (5, 4, 3)])
def test_shards_partition_the_dataset_in_whole_batches(size, batch_size, world_size):
    shards = [shard_indices(size, batch_size, rank, world_size) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))
    single_batches = [list(range(i, min(i + batch_size, size))) for i in range(0, size, batch_size)]
    sharded_batches = [shard[i : i + batch_size] for shard in shards for i in range(0, len(shard), batch_size)]
    assert sorted(sharded_batches) == single_batches


def test_two_gloo_processes_equal_one_process(tmp_path, files):
    assert main(_cli_args(files, tmp_path / "one")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "captum_iclip.eval",
        *_cli_args(files, tmp_path / "two"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert _without_timing(two) == _without_timing(one)
    assert one["methods"]["raw"]["pairs"] > 0 and one["methods"]["raw"]["faithfulness"]["samples"] == 2


def test_bad_input_is_reported(tmp_path, files, sim, dataset, capsys):
    with pytest.raises(ValueError, match="methods"):
        EvalConfig("voc", "unused", methods=["nope"])
    with pytest.raises(ValueError, match="DualProjectionCLIP"):
        evaluate(EvalConfig("voc", "unused", methods=["iclip"], out=None), sim, dataset=dataset)
    with pytest.raises(ValueError, match="resolution"):
        evaluate(EvalConfig("voc", "unused", resolution=36, out=None), sim, dataset=dataset)
    assert main(_cli_args(files, tmp_path, methods="raw,bogus")) == 2
    assert "bogus" in capsys.readouterr().err


def test_the_configuration_names_every_task_in_the_order_they_run():
    """EvalConfig checks task names below the tasks (evaluation/config.py); the task classes carry the same."""
    assert tuple(TASK_TYPES) == TASKS


def test_methods_follow_captums_explanation_function_contract(sim):
    """sensitivity_max calls explanations with a 1-tuple and target=; a tensor returned for a
    tuple input is silently mis-scored by Captum (and fails for batches of 2), so the methods
    must return a 1-tuple then. The score is a max of relative changes, bounded by the largest
    relative change any perturbation in the radius can cause."""
    from captum_iclip.evaluation.faithfulness import sensitivity_score

    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    run = build_method("raw", sim)
    as_tuple = run((images,), target=0)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], run(images, 0))
    torch.manual_seed(0)
    scores = sensitivity_score(run, images, target=0, perturb_radius=0.02, n_perturb_samples=4)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    # Same perturbations, computed by hand for each image.
    torch.manual_seed(0)
    for i in range(2):
        base = run(images[i : i + 1], 0)
        worst = max(
            float(
                (run(images[i : i + 1] + (torch.rand_like(images[i : i + 1]) * 2 - 1) * 0.02, 0) - base).norm()
                / base.norm()
            )
            for _ in range(200)
        )
        assert float(scores[i]) <= worst * 1.5
