"""``captum-iclip eval --benchmark``: the ITSM methods under a training-free segmentation protocol, over a dataset.

The protocol itself (resize, windows, PAMR, the decision) is :mod:`captum_iclip.evaluation.benchmarks`;
this module runs it over this process's shard of the dataset, for every method, and gathers the
results. Sharding is today's eval's (:func:`~captum_iclip.evaluation.data.shard_indices`): rank ``r``
takes the batches ``r, r + K, ...``, every batch holds the same images in any number of processes,
and the confusion matrices are integer sums added with ``all_reduce``, so 1 and K processes give the
same numbers. The results have the layout of :func:`~captum_iclip.evaluation.run.evaluate`'s, with
``benchmark`` (the settings, the class names) and ``published`` (the rows of ``published.json`` for
the same methods, model and benchmark), which ``results.md`` shows beside ours.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from captum_iclip._io import finite_or_null
from captum_iclip.attr.itsm import ITSMAttribution
from captum_iclip.datasets import SegmentationDataset, build_dataset
from captum_iclip.distributed import rank_and_world
from captum_iclip.evaluation.benchmarks import (
    BENCHMARKS,
    ProtocolSettings,
    class_queries,
    pamr,
    predict_labels,
    protocol_input,
    protocol_logits,
    protocol_settings,
    published_rows,
)
from captum_iclip.evaluation.config import EvalConfig
from captum_iclip.evaluation.data import _Clock, _collate, _sum_over_ranks, shard_indices
from captum_iclip.evaluation.methods import available_methods, method_info, requirement
from captum_iclip.evaluation.metrics import SegmentationMetrics
from captum_iclip.evaluation.report import write_results
from captum_iclip.similarity import CLIPSimilarity

__all__ = ["comparison_lines", "evaluate_benchmark", "run_benchmark"]


class _ProtocolImages(Dataset):
    """The images of one shard as (index, protocol input, label)."""

    def __init__(self, dataset: SegmentationDataset, indices: list[int], settings: ProtocolSettings, mean, std):
        self.dataset, self.indices, self.settings, self.mean, self.std = dataset, indices, settings, mean, std

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, Tensor, np.ndarray]:
        index = self.indices[position]
        image, label, _ = self.dataset[index]
        return index, protocol_input(image, self.settings, self.mean, self.std), label


def _check(config: EvalConfig, sim: CLIPSimilarity, dataset: SegmentationDataset, queries: list[str]) -> None:
    """The model, the methods and the dataset against the benchmark."""
    if sim.num_prompts != len(queries) or (sim.prompts is not None and list(sim.prompts) != queries):
        raise ValueError(
            f"sim: expected one prompt per class name of {config.benchmark!r} ({len(queries)}, "
            f"benchmarks.benchmark_similarity builds it), got {sim.num_prompts}"
        )
    not_itsm = [name for name in config.methods if method_info(name).itsm is None]
    if not_itsm:
        raise ValueError(
            f"methods: expected ITSM methods (the benchmark scores every class name's similarity map), got {not_itsm}"
        )
    unavailable = [name for name in config.methods if not available_methods(sim)[name]]
    if unavailable:
        raise ValueError(
            "methods: expected methods that apply to this model, got "
            + "; ".join(f"{name!r} (it needs {requirement(name)})" for name in unavailable)
        )
    expected = BENCHMARKS[config.benchmark].dataset
    if dataset.num_classes != max(class_queries(config.benchmark, config.protocol)[1]) + 1:
        raise ValueError(
            f"dataset: expected the {expected!r} reader's classes for {config.benchmark!r}, "
            f"got {dataset.num_classes} classes"
        )


def run_benchmark(
    config: EvalConfig, sim: CLIPSimilarity, *, dataset: SegmentationDataset | None = None, model_name: str = ""
) -> tuple[dict, SegmentationDataset]:
    """:func:`evaluate_benchmark` without writing: the results (the same on every rank) and the dataset."""
    began = time.perf_counter()
    if dataset is None:
        dataset = build_dataset(config.dataset, config.root, config.split, config.limit)
    settings = protocol_settings(config.benchmark, config.protocol)
    queries, query_class = class_queries(config.benchmark, config.protocol)
    _check(config, sim, dataset, queries)
    adapter = sim.adapter
    device, dtype, patch = adapter.parameter.device, adapter.parameter.dtype, adapter.patch_size[0]
    itsm = ITSMAttribution(sim)
    metrics = {name: SegmentationMetrics(dataset.num_classes, dataset.ignore_index) for name in config.methods}
    seconds = {name: 0.0 for name in config.methods}
    clock = _Clock(device)
    rank, world = rank_and_world()
    shard = shard_indices(len(dataset), config.batch_size, rank, world)
    loader = DataLoader(
        _ProtocolImages(dataset, shard, settings, adapter.image_mean, adapter.image_std),
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=config.workers,
        collate_fn=_collate,
    )
    show = config.progress and rank == 0
    bar = tqdm(total=len(shard), desc=f"{config.benchmark} ({config.protocol})", unit="image", disable=not show)
    for _, inputs, labels in loader:
        inputs = [x.to(device, dtype) for x in inputs]
        sizes = [label.shape for label in labels]
        for name in config.methods:
            variant, projection = method_info(name).itsm
            started = clock()

            def dense(crops: Tensor, variant: str = variant, projection: str = projection) -> Tensor:
                return itsm.attribute(
                    crops, target=None, variant=variant, projection=projection, normalize=False, interpolate=False
                )

            for x, logits, label in zip(inputs, protocol_logits(dense, inputs, sizes, settings, patch), labels):
                if config.pamr:
                    # PAMR reads the normalised model input, resized to the label (SCLIP's and NACLIP's segmentors).
                    image = torch.nn.functional.interpolate(
                        x[None].float(), size=label.shape, mode="bilinear", align_corners=False
                    )
                    logits = pamr(image, logits[None], config.pamr)[0]
                predicted = predict_labels(logits, query_class, dataset.num_classes, settings)
                metrics[name].update(predicted.cpu(), label)
            seconds[name] += clock() - started
        bar.update(len(labels))
    bar.close()
    for metric in metrics.values():
        metric.all_reduce()
    seconds = _sum_over_ranks(seconds, device)
    results = _results(config, settings, dataset, queries, query_class, metrics, seconds, model_name)
    results["wall_seconds"] = time.perf_counter() - began
    results["timing_context"] = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "batch_size": config.batch_size,
    }
    return results, dataset


def evaluate_benchmark(
    config: EvalConfig, sim: CLIPSimilarity, *, dataset: SegmentationDataset | None = None, model_name: str = ""
) -> dict:
    """Run ``config.methods`` under ``config.protocol``'s settings of ``config.benchmark``; write the results.

    The API behind ``captum-iclip eval --benchmark`` (:func:`~captum_iclip.evaluation.run.evaluate`
    hands a configuration with a benchmark here). Runs on this process's shard when a
    ``torch.distributed`` process group is initialised (every rank must call it).

    Args:
        config: What to evaluate; ``config.benchmark`` set (:func:`~captum_iclip.evaluation.config.EvalConfig`).
        sim: The forward function with one prompt per class name of the benchmark
            (:func:`~captum_iclip.evaluation.benchmarks.benchmark_similarity`), on the device to run on.
        dataset: The dataset reader; ``None`` builds it from ``config``.
        model_name: How the results name the model; ``"ViT-B-16/openai"`` finds the published rows.

    Returns:
        The results (as written to ``results.json``): those of ``evaluate`` (``methods[name]["segmentation"]``
        holds the mIoU), plus ``benchmark`` and ``published``.

    Raises:
        ValueError: If ``sim`` does not embed the benchmark's class names, a method is not an ITSM method
            or does not apply to the model, or the dataset is not the benchmark's.

    Examples:
        >>> config = EvalConfig("voc", "data/VOCdevkit", methods=["sclip"], tasks=["segmentation"], benchmark="voc21")
        >>> evaluate_benchmark(config, benchmark_similarity(model, tokenizer, "voc21"))  # doctest: +SKIP
    """
    results, dataset = run_benchmark(config, sim, dataset=dataset, model_name=model_name)
    if rank_and_world()[0] == 0 and config.out is not None:
        write_results(results, config.out, (), dataset)
    return results


def _results(
    config: EvalConfig,
    settings: ProtocolSettings,
    dataset: SegmentationDataset,
    queries: list[str],
    query_class: list[int],
    metrics: dict[str, SegmentationMetrics],
    seconds: dict[str, float],
    model_name: str,
) -> dict:
    names = dataset.class_names
    methods: dict[str, Any] = {}
    for name, metric in metrics.items():
        scores = metric.compute()
        methods[name] = {
            "miou": None,
            "msc": None,
            "pointing": None,
            "pairs": None,
            "per_class": None,
            "segmentation": {
                "miou": finite_or_null(scores["miou"]),
                "pixel_accuracy": finite_or_null(scores["pixel_accuracy"]),
                "mean_accuracy": finite_or_null(scores["mean_accuracy"]),
                "per_class_iou": {names[c]: iou for c, iou in scores["per_class_iou"].items()},
                "pixels": scores["pixels"],
                "background": "protocol",
            },
            "faithfulness": None,
            "timing": {
                "localization_seconds": 0.0,
                "localization_seconds_per_image": None,
                "segmentation_seconds": seconds[name],
                "images_per_second": len(dataset) / seconds[name] if seconds[name] > 0 else None,
                "faithfulness_seconds": 0.0,
            },
        }
    published = [row for name in config.methods for row in published_rows(name, model_name, config.benchmark)]
    window = f"{settings.window} px windows every {settings.stride} px" if settings.window else "whole images"
    results = {
        "config": asdict(config),
        "benchmark": {
            "name": config.benchmark,
            "protocol": config.protocol,
            "pamr": config.pamr,
            "settings": asdict(settings),
            "queries": queries,
            "query_class": query_class,
            "summary": (
                f"{len(dataset)} images of {config.benchmark} ({BENCHMARKS[config.benchmark].title}), "
                f"{config.protocol} protocol: short side {settings.short_side} px, {window}, logit scale "
                f"{settings.logit_scale:g}, probability threshold {settings.probability_threshold:g}, area threshold "
                f"{settings.area_threshold}, PAMR {config.pamr} steps; model {model_name or 'given in-process'}, "
                f"{rank_and_world()[1]} process(es)."
            ),
        },
        "dataset": {
            "name": config.dataset,
            "root": str(config.root),
            "split": config.split,
            "num_images": len(dataset),
            "class_names": list(names),
            "background_index": dataset.background_index,
        },
        "model": model_name,
        "resolution": settings.short_side,
        "segmentation_window": {"window": settings.window, "stride": settings.stride} if settings.window else None,
        "world_size": rank_and_world()[1],
        "prompts": queries,
        "methods": methods,
        "published": published,
    }
    results["notes"] = comparison_lines(results)
    return results


def comparison_lines(results: dict) -> list[str]:
    """``results.md``'s table of ours beside the published mIoU of the same method, model and benchmark.

    Args:
        results: As :func:`run_benchmark` returns them.

    Returns:
        Markdown lines: one row per (method, published row), or per method without a published row.
    """
    benchmark = results["benchmark"]
    ours_setting = f"{benchmark['protocol']}, PAMR {benchmark['pamr']}"
    lines = [
        "",
        f"Published mIoU beside ours ({results['model'] or 'in-process model'}, {benchmark['name']}):",
        "",
        "| method | ours (" + ours_setting + ") | published | its protocol, PAMR | source |",
        "|---|---:|---:|---|---|",
    ]
    for name, entry in results["methods"].items():
        ours = entry["segmentation"]["miou"]
        shown = "–" if ours is None else f"{ours:.2f}"
        rows = [row for row in results["published"] if row["method"] == name]
        if not rows:
            lines.append(f"| {name} | {shown} | – | – | no published row for this model and benchmark |")
        for row in rows:
            source = row["source"]
            where = f"{source['title']}, {source['table'] or source['where']}"
            lines.append(f"| {name} | {shown} | {row['miou']:.2f} | {row['protocol']}, {row['pamr']} | {where} |")
    return lines
