"""The evaluation tasks as objects: localization, open-vocabulary segmentation, faithfulness.

Each task holds its metrics, sees every batch of the shard (:meth:`update`), adds
its statistics over the ranks (:meth:`finish`) and gives its part of a method's
results (:meth:`entry`). :func:`~captum_iclip.evaluation.run.evaluate` runs the
tasks the configuration asks for; the metrics are defined in docs/methods.md §5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from captum_iclip._io import finite_or_null
from captum_iclip.attr.itsm import ITSMAttribution
from captum_iclip.datasets import SegmentationDataset
from captum_iclip.distributed import rank_and_world
from captum_iclip.evaluation.config import EvalConfig
from captum_iclip.evaluation.data import (
    _Clock,
    _gather_records,
    _largest_class,
    _scored_classes,
    _short_side_size,
    shard_indices,
)
from captum_iclip.evaluation.faithfulness import (
    PROTOCOL_FILLS,
    ROAD_ORDERS,
    ROAD_PERCENTAGES,
    confidence_change,
    deletion_curve,
    fill_image,
    infidelity_score,
    insertion_curve,
    patch_perturbation,
    road_scores,
    sensitivity_score,
)
from captum_iclip.evaluation.methods import method_info
from captum_iclip.evaluation.metrics import (
    LocalizationMetrics,
    SegmentationMetrics,
    bootstrap_mean,
    segment_from_maps,
    sliding_window,
)
from captum_iclip.preprocess import to_model_input
from captum_iclip.similarity import CLIPSimilarity


@dataclass
class EvalContext:
    """What the tasks of one evaluation share."""

    config: EvalConfig  # with the resolution resolved
    sim: CLIPSimilarity
    dataset: SegmentationDataset
    runners: dict[str, Any]  # method name -> fn(images, targets)
    window: int
    stride: int
    show: bool  # progress bars (rank 0)
    clock: _Clock
    seconds: dict[str, float] = field(default_factory=dict)  # "<method>/<task>" -> seconds on this rank

    @property
    def device(self) -> torch.device:
        return self.sim.adapter.parameter.device

    @property
    def dtype(self) -> torch.dtype:
        return self.sim.adapter.parameter.dtype


@dataclass
class EvalBatch:
    """One batch of the shard: dataset indices, square model inputs, labels and original images."""

    indices: Sequence[int]
    inputs: Sequence[Tensor]
    images: Tensor  # the inputs stacked on the model's device and dtype
    labels: Sequence[np.ndarray]
    originals: Sequence[Image.Image]


def _mean(values: list[float]) -> float:
    """The mean, NaN for no values (``null`` in the results)."""
    return float(np.mean(values)) if values else math.nan


class LocalizationTask:
    """Explanation mIoU, mSC and pointing game of every method's map of each (image, class present) pair."""

    name = "localization"

    def __init__(self, ctx: EvalContext) -> None:
        config = ctx.config
        self.metrics = {
            name: LocalizationMetrics.for_dataset(
                ctx.dataset, theta=config.theta, pointing_tolerance=config.pointing_tolerance
            )
            for name in config.methods
        }
        self.examples: list[dict] = []  # rank 0's first images with a scored class, for the overlays
        self.rank, world = rank_and_world()
        if config.bootstrap:
            if world > 1:
                raise ValueError(f"bootstrap: expected one process (intervals need every image's figures), got {world}")
            for metric in self.metrics.values():
                metric.record_images()

    def update(self, ctx: EvalContext, batch: EvalBatch) -> None:
        pairs, batch_maps = _localize_batch(
            ctx.runners, self.metrics, batch.images, batch.labels, ctx.config.batch_size, ctx.clock, ctx.seconds
        )
        wanted = ctx.config.examples - len(self.examples)
        if self.rank == 0 and wanted > 0:
            self.examples += _examples(pairs, batch_maps, batch.indices, batch.labels, batch.originals)[:wanted]

    def finish(self, ctx: EvalContext) -> None:
        for metric in self.metrics.values():
            metric.all_reduce()

    def entry(self, name: str, ctx: EvalContext) -> dict[str, Any]:
        metric = self.metrics[name]
        scores = metric.compute()
        names = ctx.dataset.class_names
        intervals = {}
        if ctx.config.bootstrap:
            keys = ("miou", "msc", "pointing")
            found = metric.bootstrap(keys, resamples=ctx.config.bootstrap, seed=ctx.config.seed)
            intervals = {f"{key}_ci": [finite_or_null(bound) for bound in found[key]] for key in keys}
        return {
            "miou": finite_or_null(scores["miou"]),
            "msc": finite_or_null(scores["msc"]),
            "pointing": finite_or_null(scores["pointing"]),
            **intervals,
            "pairs": scores["pairs"],
            "per_class": {
                names[c]: {
                    "iou": iou,
                    "msc": scores["per_class_msc"].get(c),
                    "pointing": scores["per_class_pointing"][c],
                }
                for c, iou in scores["per_class_iou"].items()
            },
        }


class SegmentationTask:
    """Open-vocabulary segmentation by the ITSM methods: per-pixel argmax over every prompt's similarity."""

    name = "segmentation"

    def __init__(self, ctx: EvalContext) -> None:
        dataset = ctx.dataset
        self.methods = [name for name in ctx.config.methods if method_info(name).itsm]
        self.metrics = {name: SegmentationMetrics(dataset.num_classes, dataset.ignore_index) for name in self.methods}
        self.itsm = ITSMAttribution(ctx.sim)

    def update(self, ctx: EvalContext, batch: EvalBatch) -> None:
        for name in self.methods:
            variant, projection = method_info(name).itsm
            started = ctx.clock()
            for image, square_input, label in zip(batch.originals, batch.inputs, batch.labels):
                scores = _segment_image(ctx, self.itsm, variant, projection, image, square_input)
                predicted = _segmentation_labels(scores, label.shape, ctx.dataset, ctx.config.background_threshold)
                self.metrics[name].update(predicted.cpu(), label)
            key = f"{name}/segmentation"
            ctx.seconds[key] = ctx.seconds.get(key, 0.0) + ctx.clock() - started

    def finish(self, ctx: EvalContext) -> None:
        for metric in self.metrics.values():
            metric.all_reduce()

    def entry(self, name: str, ctx: EvalContext) -> dict[str, Any]:
        if name not in self.metrics:
            return {"segmentation": None}
        scores, names, dataset = self.metrics[name].compute(), ctx.dataset.class_names, ctx.dataset
        background = (
            "threshold"
            if ctx.config.background_threshold is not None
            else "prompt"
            if dataset.background_index is not None
            else "none"
        )
        return {
            "segmentation": {
                "miou": finite_or_null(scores["miou"]),
                "pixel_accuracy": finite_or_null(scores["pixel_accuracy"]),
                "mean_accuracy": finite_or_null(scores["mean_accuracy"]),
                "per_class_iou": {names[c]: iou for c, iou in scores["per_class_iou"].items()},
                "pixels": scores["pixels"],
                "background": background,
            }
        }


class FaithfulnessTask:
    """The faithfulness metrics of ``config.faithfulness_metrics`` on a fixed sample of images, one target per
    image: Captum's infidelity and max-sensitivity, deletion and insertion curves, confidence drop and
    increase, ROAD (docs/methods.md §5 and §5.1).

    It runs after the pass over the batches (:meth:`finish`), on its own sample.
    """

    name = "faithfulness"

    def __init__(self, ctx: EvalContext) -> None:
        self.records: list[dict] = []
        if ctx.config.faithfulness_score == "cosine" and ctx.sim.output != "cosine":
            raise ValueError(
                "faithfulness_score: expected 'probability' for a CLIPSimilarity whose output is "
                f"{ctx.sim.output!r} (the cosine is read from a cosine output), got 'cosine'"
            )

    def update(self, ctx: EvalContext, batch: EvalBatch) -> None:
        """Nothing per batch: the sample is drawn over the whole dataset."""

    def finish(self, ctx: EvalContext) -> None:
        config = ctx.config
        metric = LocalizationMetrics.for_dataset(
            ctx.dataset, theta=config.theta, pointing_tolerance=config.pointing_tolerance
        )
        sample = _faithfulness_sample(ctx.dataset, config.faithfulness_samples, metric)
        records = _faithfulness_records(ctx, sample)
        self.records = _gather_records(records)

    def entry(self, name: str, ctx: EvalContext) -> dict[str, Any]:
        config = ctx.config
        computed = set(config.faithfulness_metrics)
        records = [r for r in self.records if r["method"] == name]
        figures = {key: None for keys in FAITHFULNESS_FIGURES.values() for key in keys}
        intervals = {}
        for metric, keys in FAITHFULNESS_FIGURES.items():
            if metric not in computed:
                continue
            for key in keys:
                values = [r[key] for r in records]
                figures[key] = finite_or_null(float(np.nanmean(values)) if np.isfinite(values).any() else math.nan)
                if config.bootstrap:
                    bounds = bootstrap_mean(values, resamples=config.bootstrap, seed=config.seed)
                    intervals[f"{key}_ci"] = [finite_or_null(bound) for bound in bounds]
        fills = _fill_kinds(config.faithfulness_fill)
        curves = {
            f"{kind}_curve": (
                {
                    "fill": fills[kind],
                    "fractions": records[0][f"{kind}_fractions"],
                    "scores": np.mean([r[f"{kind}_scores"] for r in records], axis=0).tolist(),
                }
                if kind in computed and records
                else None
            )
            for kind in ("deletion", "insertion")
        }
        road = (
            {
                "percentages": list(ROAD_PERCENTAGES),
                "noise": ROAD_NOISE,
                **{
                    order: np.mean([r[f"road_{order}_scores"] for r in records], axis=0).tolist()
                    for order in ROAD_ORDERS
                },
            }
            if "road" in computed and records
            else None
        )
        per_image_keys = ["index", "name", "target"] + [
            key for metric in config.faithfulness_metrics for key in FAITHFULNESS_FIGURES[metric]
        ]
        return {
            "faithfulness": {
                "metrics": list(config.faithfulness_metrics),
                "score": config.faithfulness_score,
                **figures,
                **intervals,
                **curves,
                "road_curves": road,
                "samples": len(records),
                "per_image": [finite_or_null({key: r[key] for key in per_image_keys}) for r in records],
            }
        }

    def seconds(self, name: str) -> float:
        return sum(r["seconds"] for r in self.records if r["method"] == name)


TASK_TYPES = {task.name: task for task in (LocalizationTask, SegmentationTask, FaithfulnessTask)}
"""Task name -> task class, in the order they run (:data:`~captum_iclip.evaluation.config.TASKS`)."""


# --------------------------------------------------------------------------- the tasks' computations
PATCH_DROP_PROB = 0.25
"""Probability that the infidelity perturbation replaces a patch by the dataset mean."""


SENSITIVITY_RADIUS = 0.02
"""L∞ radius of the max-sensitivity perturbations, in normalised input units."""


REMOVAL_STEPS = {"steps": 100, "score_every": 10, "fraction": 0.5}
"""Grad-ECLIP's deletion and insertion steps: 100 steps over half the image, the score read every 10."""


ROAD_NOISE = 0.01
"""ROAD's imputation noise, in [0, 1] pixel units (divided by the model's std per channel)."""


FAITHFULNESS_FIGURES = {
    "infidelity": ("infidelity",),
    "sensitivity": ("sensitivity",),
    "deletion": ("deletion_auc",),
    "insertion": ("insertion_auc",),
    "confidence": ("confidence_drop", "confidence_increase"),
    "road": ("road_morf", "road_lerf"),
}
"""The per-image figures of each faithfulness metric, averaged over the sample in the results."""


def _segment_image(
    ctx: EvalContext, itsm: ITSMAttribution, variant: str, projection: str, image: Image.Image, square_input: Tensor
) -> Tensor:
    """(K, H', W') unnormalised similarities of every prompt on one image, at the model input's size, by
    ``itsm``'s ``variant`` and ``projection``; ``square_input`` is the image as the other tasks see it.

    Like the localization maps, the patch grid is first upsampled to the input
    (for each window of ``ctx``'s, by :func:`sliding_window`), then resized to the label.
    """

    def dense(crop: Tensor, interpolate: bool = False) -> Tensor:
        return itsm.attribute(
            crop, target=None, variant=variant, projection=projection, normalize=False, interpolate=interpolate
        )

    if not ctx.config.slide:
        return dense(square_input[None].to(ctx.device, ctx.dtype), interpolate=True)[0]
    adapter = ctx.sim.adapter
    size = _short_side_size(image, ctx.config.resolution, adapter.patch_size[0])
    x = to_model_input(
        image,
        size,
        torch.tensor(adapter.image_mean).reshape(3, 1, 1),
        torch.tensor(adapter.image_std).reshape(3, 1, 1),
    )
    return sliding_window(dense, x[None].to(ctx.device, ctx.dtype), ctx.window, ctx.stride)[0]


def _segmentation_labels(
    scores: Tensor, label_shape: tuple[int, int], dataset: SegmentationDataset, background_threshold: float | None
) -> Tensor:
    """Per-pixel class ids at the label's size from (K, H', W') similarities (K = num_classes)."""
    scores = F.interpolate(scores[None].float(), size=label_shape, mode="bilinear", align_corners=False)[0]
    if background_threshold is None:
        return segment_from_maps(scores)
    foreground = dataset.foreground_classes
    return segment_from_maps(
        scores[foreground],
        classes=foreground,
        background_index=dataset.background_index,
        background_threshold=background_threshold,
    )


def _faithfulness_sample(
    dataset: SegmentationDataset, count: int, metric: LocalizationMetrics
) -> list[tuple[int, int]]:
    """(index, target class) of up to ``count`` evenly spaced images with a scored class."""
    if count == 0 or len(dataset) == 0:
        return []
    indices = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round()})
    sample = []
    for index in indices:
        label = dataset[index][1]
        classes = _scored_classes(label, metric)
        if classes:
            sample.append((index, _largest_class(label, classes)))
    return sample


def _fill_kinds(fill: str) -> dict[str, str]:
    """The fill image of deletion and of insertion for the ``faithfulness_fill`` option."""
    return dict(PROTOCOL_FILLS) if fill == "protocol" else {"deletion": fill, "insertion": fill}


def _score_function(sim: CLIPSimilarity, score: str) -> Any:
    """The forward function the removal metrics read: the prompts' probabilities, or the cosine output."""
    if score == "cosine":
        return sim
    return lambda images: sim.probabilities(sim(images))


def _faithfulness_records(ctx: EvalContext, sample: list[tuple[int, int]]) -> list[dict]:
    """This rank's share of the per-image faithfulness figures of ``sample``: its batches ``rank, rank + K, ...``
    of ``batch_size`` images (:func:`~captum_iclip.evaluation.data.shard_indices`), so every batch holds the
    same images in any sharding. Every random draw is seeded by the batch's first image, the same for
    every method: the methods are compared on the same perturbations, fills and noise."""
    sim, runners, dataset, config, device = ctx.sim, ctx.runners, ctx.dataset, ctx.config, ctx.device
    rank, world = rank_and_world()
    adapter = sim.adapter
    mean = torch.tensor(adapter.image_mean, dtype=torch.float32).reshape(3, 1, 1)
    std = torch.tensor(adapter.image_std, dtype=torch.float32).reshape(3, 1, 1)
    size = (config.resolution, config.resolution)
    mine = [sample[position] for position in shard_indices(len(sample), config.batch_size, rank, world)]
    records = []
    clock = _Clock(device)
    bar = tqdm(total=len(mine) * len(runners), desc="faithfulness", unit="map", disable=not ctx.show)
    for start in range(0, len(mine), config.batch_size):
        batch = mine[start : start + config.batch_size]
        items = [dataset[index] for index, _ in batch]
        x = torch.stack([to_model_input(image, size, mean, std) for image, _, _ in items]).to(device, ctx.dtype)
        targets = [target for _, target in batch]
        seed = config.seed * 1_000_003 + batch[0][0]
        fills = _fill_images(x, config.faithfulness_fill, adapter, seed)
        for method, run in runners.items():
            began = clock()
            figures = _faithfulness_figures(ctx, run, x, targets, fills, seed)
            seconds = (clock() - began) / len(batch)
            for i, ((index, target), (_, _, name)) in enumerate(zip(batch, items)):
                record = {"index": index, "name": name, "method": method, "target": target, "seconds": seconds}
                records.append(record | {key: value[i] for key, value in figures.items()})
            bar.update(len(batch))
    bar.close()
    return records


def _fill_images(x: Tensor, fill: str, adapter: Any, seed: int) -> dict[str, Tensor]:
    """Deletion's and insertion's fill images of a batch (one random draw, shared when both are random)."""
    kinds = _fill_kinds(fill)
    images = {
        kind: fill_image(x, kind, adapter.image_mean, adapter.image_std, generator=torch.Generator().manual_seed(seed))
        for kind in set(kinds.values())
    }
    return {use: images[kind] for use, kind in kinds.items()}


def _faithfulness_figures(
    ctx: EvalContext, run: Any, x: Tensor, targets: list[int], fills: dict[str, Tensor], seed: int
) -> dict[str, list]:
    """One method's figures of one batch, per metric of ``config.faithfulness_metrics``: name -> one value
    (or list) per image."""
    config, sim = ctx.config, ctx.sim
    metrics, chunk = config.faithfulness_metrics, config.batch_size
    score = _score_function(sim, config.faithfulness_score)
    index = torch.tensor(targets, device=x.device)
    torch.manual_seed(seed)  # a method that draws sees the same numbers in any sharding and method order
    maps = run(x, index).detach()
    figures: dict[str, list] = {}
    if "infidelity" in metrics:
        torch.manual_seed(seed)
        perturb = patch_perturbation(sim.adapter.patch_size[0], drop_prob=PATCH_DROP_PROB)
        figures["infidelity"] = infidelity_score(
            sim, maps, x, targets, perturb_func=perturb, n_perturb_samples=config.faithfulness_perturbations
        ).tolist()
    if "sensitivity" in metrics:
        torch.manual_seed(seed)
        figures["sensitivity"] = sensitivity_score(
            run,
            x,
            targets,
            perturb_radius=SENSITIVITY_RADIUS,
            n_perturb_samples=config.faithfulness_perturbations,
            max_examples_per_batch=chunk,
        ).tolist()
    for kind, curve in (("deletion", deletion_curve), ("insertion", insertion_curve)):
        if kind in metrics:
            # Without gradients, every step of the batch's images in one pass (11 x batch_size images).
            found = curve(score, x, maps, index, fill=fills[kind], **REMOVAL_STEPS)
            figures[f"{kind}_auc"] = found.auc.tolist()
            figures[f"{kind}_scores"] = found.scores.tolist()
            figures[f"{kind}_fractions"] = [found.fractions.tolist()] * len(targets)
    if "confidence" in metrics:
        change = confidence_change(score, x, maps, index)
        figures["confidence_drop"] = change.drop.tolist()
        figures["confidence_increase"] = (100.0 * change.increase.double()).tolist()
    if "road" in metrics:
        noise = [ROAD_NOISE / s for s in sim.adapter.image_std]
        for k, order in enumerate(ROAD_ORDERS):
            scores = road_scores(
                score,
                x,
                maps,
                index,
                order=order,
                noise_std=noise,
                generator=torch.Generator().manual_seed(seed + k),
                max_examples_per_batch=chunk * len(ROAD_PERCENTAGES),  # every share of the batch in one solve
            )
            figures[f"road_{order}"] = scores.mean(dim=1).tolist()
            figures[f"road_{order}_scores"] = scores.tolist()
    return figures


def _localize_batch(
    runners: dict[str, Any],
    metrics: dict[str, LocalizationMetrics],
    images: Tensor,
    labels: Sequence[np.ndarray],
    chunk: int,
    clock: _Clock,
    seconds: dict[str, float],
) -> tuple[list[tuple[int, int]], dict[str, Tensor]]:
    """Score every method's maps of the (image, class) pairs of a batch.

    Each image is repeated once per scored class present in its label; the
    pairs are explained ``chunk`` at a time (bounding the memory of ``ig`` and
    ``occlusion``), the same chunks in any sharding.

    Returns:
        The pairs ``(image position, class)`` and each method's (P, 1, H, W) maps.
    """
    some_metric = next(iter(metrics.values()))
    pairs = [(i, c) for i, label in enumerate(labels) for c in _scored_classes(label, some_metric)]
    if not pairs:
        return pairs, {}
    pair_image = torch.tensor([i for i, _ in pairs], device=images.device)
    pair_class = torch.tensor([c for _, c in pairs], device=images.device)
    batch_maps = {}
    for name, run in runners.items():
        started = clock()
        maps = torch.cat(
            [
                run(images[pair_image[start : start + chunk]], pair_class[start : start + chunk]).detach()
                for start in range(0, len(pairs), chunk)
            ]
        ).float()
        seconds[f"{name}/localization"] = seconds.get(f"{name}/localization", 0.0) + clock() - started
        for i, label in enumerate(labels):
            rows = (pair_image == i).nonzero().flatten()
            if len(rows):
                metrics[name].update(maps[rows, 0], pair_class[rows].cpu(), label)
        batch_maps[name] = maps
    return pairs, batch_maps


def _examples(
    pairs: list[tuple[int, int]],
    batch_maps: dict[str, Tensor],
    indices: Sequence[int],
    labels: Sequence[np.ndarray],
    originals: Sequence[Image.Image],
) -> list[dict]:
    """Example records of a batch: per image with a scored class, its largest class's maps."""
    examples = []
    for i, label in enumerate(labels):
        rows = [row for row, (image, _) in enumerate(pairs) if image == i]
        if rows:
            classes = [pairs[row][1] for row in rows]
            row = rows[classes.index(_largest_class(label, classes))]
            examples.append(
                {
                    "image": originals[i],
                    "label": label,
                    "index": indices[i],
                    "class": pairs[row][1],
                    "maps": {name: maps[row].cpu() for name, maps in batch_maps.items()},
                }
            )
    return examples
