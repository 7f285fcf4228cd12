"""Throughput of ``captum-iclip eval --benchmark voc21`` against a plain loop of the tower over the same windows.

On ``--images`` random images of ``--size`` (VOC's typical 375 x 500 by default), written as a VOC 2012
tree in a temporary folder, with a randomly initialised open_clip ``--model`` (default ``ViT-B-16``; the
cost does not depend on the weights):

* ``eval``: :func:`captum_iclip.evaluation.benchmark_run.run_benchmark` for one method, SCLIP's voc21
  protocol (short side 336, 224-px windows every 112 px, 56 class names, logit scale 65, probability and
  area thresholds 0.1): reading and resizing the images, the windows through the method's dense
  features, the logits at the labels' size, the decision and the metrics;
* ``plain loop``: the same resized inputs cut into the same windows, put through the tower in the same
  passes (the windows of ``--batch-size`` images, at most 32 a pass, as ``eval`` groups them), the
  method's own dense features (``adapter.dense_features`` with its last-block path or surgery depth:
  what the method costs the tower, as ``encode_image`` costs a zero-shot prediction), nothing else; the
  inputs are prepared before timing.

The text side is one random unit vector per class name (56): the image side's cost does not depend on
them, and embedding the 56 × 80 template prompts through ViT-B-16's text tower takes longer on a small CPU
than the measurement (the reference segmentors, like ``eval``, embed them once before the images).
Each figure is the median of ``--repeats`` rounds after a warm-up, the two timed in turn
(:mod:`timing`). Printed: one row per method with both throughputs in images/s and their ratio
(plain / eval, i.e. how much slower the whole evaluation is than the tower alone).

Usage::

    python benchmarks/bench_benchmark.py --threads 1 --images 4 --repeats 3
    python benchmarks/bench_benchmark.py --device cuda --images 64 --batch-size 16 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from timing import time_rounds

from captum_iclip import CLIPSimilarity, get_adapter
from captum_iclip.datasets import build_dataset
from captum_iclip.evaluation.benchmark_run import run_benchmark
from captum_iclip.evaluation.benchmarks import class_queries, protocol_input, protocol_settings
from captum_iclip.evaluation.config import EvalConfig
from captum_iclip.evaluation.methods import method_info
from captum_iclip.evaluation.metrics import _window_starts
from captum_iclip.models.attention import PATH_VARIANTS, dense_path

METHODS = "raw,surgery,maskclip,clearclip,sclip,naclip"


def write_voc(root: Path, images: int, height: int, width: int) -> Path:
    """A VOC 2012 tree of random JPEGs and palette labels."""
    rng = np.random.default_rng(0)
    base = root / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    ids = [f"{index:06d}" for index in range(images)]
    for sample in ids:
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            base / "JPEGImages" / f"{sample}.jpg"
        )
        label = Image.fromarray(rng.integers(0, 21, (height, width), dtype=np.uint8), mode="P")
        label.putpalette(list(range(256)) * 3)
        label.save(base / "SegmentationClass" / f"{sample}.png")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return base


def plain_loop(sim, dataset, method: str, settings, batch_size: int):
    """The tower alone over the protocol's windows, in eval's passes (inputs prepared beforehand)."""
    adapter = sim.adapter
    variant = method_info(method).itsm[0]
    options = {"path": dense_path(variant)} if variant in PATH_VARIANTS else {}
    if variant == "surgery":
        options = {"surgery_depth": min(6, adapter.num_blocks // 2)}
    batches = []
    for first in range(0, len(dataset), batch_size):
        windows = []
        for index in range(first, min(first + batch_size, len(dataset))):
            x = protocol_input(dataset[index][0], settings, adapter.image_mean, adapter.image_std)
            x = x.to(adapter.parameter)
            height, width = x.shape[-2:]
            windows += [
                x[:, top : top + 224, left : left + 224]
                for top in _window_starts(height, 224, settings.stride)
                for left in _window_starts(width, 224, settings.stride)
            ]
        batches += [torch.stack(windows[start : start + 32]) for start in range(0, len(windows), 32)]

    def run():
        with torch.no_grad():
            for windows in batches:
                adapter.dense_features(windows, **options)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture (random weights)")
    parser.add_argument("--methods", default=METHODS, help="comma-separated ITSM methods (default: %(default)s)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", default="375x500", help="image height x width (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per batch (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip: "no pretrained weights" is what we want
    torch.manual_seed(0)
    model = open_clip.create_model(args.model).eval().to(args.device)
    queries, _ = class_queries("voc21")
    sim = CLIPSimilarity(model, text_features=torch.randn(len(queries), get_adapter(model).embed_dim))
    settings = protocol_settings("voc21")
    height, width = (int(side) for side in args.size.split("x"))
    with tempfile.TemporaryDirectory() as folder:
        root = write_voc(Path(folder), args.images, height, width)
        dataset = build_dataset("voc", root)
        print(
            f"eval --benchmark voc21 vs the tower alone: {args.model} (random weights), {args.images} images of "
            f"{height}x{width}, batch {args.batch_size}, {args.device}, {torch.get_num_threads()} thread(s)",
            flush=True,
        )
        print("| method | eval images/s | plain loop images/s | ratio (plain / eval) |\n|---|---:|---:|---:|")
        for method in args.methods.split(","):
            config = EvalConfig(
                "voc",
                str(root),
                methods=[method],
                tasks=["segmentation"],
                benchmark="voc21",
                batch_size=args.batch_size,
                out=None,
                progress=False,
            )
            timings = time_rounds(
                {
                    "eval": lambda config=config: run_benchmark(config, sim, dataset=dataset),
                    "plain": plain_loop(sim, dataset, method, settings, args.batch_size),
                },
                args.repeats,
                args.device,
                progress=False,
            )
            ours, plain = (args.images / timings[key][0] for key in ("eval", "plain"))
            print(f"| {method} | {ours:.3f} | {plain:.3f} | {plain / ours:.3f} |", flush=True)


if __name__ == "__main__":
    main()
