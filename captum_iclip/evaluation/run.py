"""``captum-iclip eval``: benchmarks of the explanation methods on segmentation datasets (SPEC §5).

Three tasks, each run for every requested method of
:mod:`captum_iclip.evaluation.methods`:

* ``localization``: for every image and every class present in its ground
  truth (background and ignore excluded), the method's map for that class's
  prompt is scored by :class:`~captum_iclip.evaluation.metrics.LocalizationMetrics`
  (explanation mIoU, mSC, pointing game).
* ``segmentation`` (ITSM methods ``raw``, ``surgery``, ``iclip``): the
  unnormalised similarities of *all* prompts from one pass
  (``ITSMAttribution.attribute(x, target=None, normalize=False)``), per-pixel
  argmax, scored by :class:`~captum_iclip.evaluation.metrics.SegmentationMetrics`.
  Background: with ``background_threshold`` the background prompt's map is left
  out and pixels whose best score is below the threshold become background;
  without it the background prompt (when the dataset has one) competes in the
  argmax like any class. Surgery's feature correction always uses every prompt.
* ``faithfulness``: Captum infidelity and max-sensitivity on a fixed sample of
  images (evenly spaced over the dataset), one target per image: its largest
  scored class. Infidelity uses
  :func:`~captum_iclip.evaluation.faithfulness.patch_perturbation` (patches of
  the model's patch size, each replaced by the dataset mean with probability
  0.25; Captum's optimal scaling β); sensitivity uses Captum's default
  perturbation (uniform in the L∞ ball of radius 0.02 in normalised input
  units). Both are seeded per image, so they do not depend on sharding.

Geometry (no crop anywhere, so maps stay aligned with the labels):

* localization, faithfulness and segmentation without ``slide``: the whole
  image is resized (bicubic) to ``resolution`` × ``resolution`` and normalised
  with the model's mean/std; the methods' maps come at that input size (patch
  grids upsampled bilinearly, ``align_corners=False``) and are brought back to
  the label's size by bilinear interpolation — the inverse of the resize
  geometry, aspect ratio included.
* segmentation with ``slide``: the image keeps its aspect ratio, its short side
  resized to ``resolution`` (each side rounded to a multiple of the patch
  size); ``window`` × ``window`` crops every ``stride`` pixels give patch-grid
  similarities that :func:`~captum_iclip.evaluation.metrics.sliding_window`
  upsamples to each crop and averages, and the result is resized bilinearly
  to the label's size. With one window covering the input this is exactly the
  path without ``slide``.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) rank ``r`` takes the
batches ``r, r + K, ...`` of the dataset in order (:func:`shard_indices`; with
``--batch-size 1``, images ``r, r + K, ...``), so every batch holds the same
images as in one process and batched kernels round alike. The metrics'
integer sums are added with ``all_reduce`` (gloo on CPU, nccl on GPU) and the
faithfulness scores gathered and averaged in dataset order: the numbers equal
a single-process run with the same batch size, exactly (given deterministic
kernels; on GPU, cuDNN/cuBLAS may need ``torch.use_deterministic_algorithms``).
Only rank 0 writes files.

Outputs in ``out``, written atomically by rank 0: ``results.json`` (config,
and per method: ``miou``, ``msc``, ``pointing``, per-class scores,
``segmentation``, ``faithfulness``, ``timing``), ``results.csv`` (one row per
method), ``results.md`` (a table) and ``examples/*.png`` (overlays).

Examples::

    captum-iclip eval --dataset voc --root data/VOCdevkit --method raw,surgery,mmp \\
        --model ViT-B-16 --pretrained openai --resolution 448 --task localization,segmentation
    torchrun --nproc-per-node 2 -m captum_iclip.evaluation.run --dataset voc --root data/world_voc \\
        --method raw,iclip,mmp --pointing-tolerance 3 --out runs/eval
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from captum_iclip._io import atomic_write_text, check_output_folder
from captum_iclip.attr.itsm import ITSMAttribution
from captum_iclip.datasets import DATASETS, SegmentationDataset, build_dataset
from captum_iclip.demo import METHOD_TITLES, label_colours
from captum_iclip.evaluation.faithfulness import infidelity_score, patch_perturbation, sensitivity_score
from captum_iclip.evaluation.methods import METHODS, available_methods, build_method
from captum_iclip.evaluation.metrics import (
    LocalizationMetrics,
    SegmentationMetrics,
    segment_from_maps,
    sliding_window,
)
from captum_iclip.similarity import CLIPSimilarity

__all__ = [
    "EvalConfig", "SEGMENTATION_VARIANTS", "TASKS", "build_parser", "class_prompts", "evaluate", "main",
    "results_markdown", "shard_indices", "write_results",
]

TASKS = ("localization", "segmentation", "faithfulness")
SEGMENTATION_VARIANTS = {
    "raw": ("raw", "recognition"),
    "surgery": ("surgery", "recognition"),
    "iclip": ("raw", "interpretability"),
}
"""ITSM ``(variant, projection)`` of the methods that give every prompt's map in one pass."""

PATCH_DROP_PROB = 0.25
"""Probability that the infidelity perturbation replaces a patch by the dataset mean."""
SENSITIVITY_RADIUS = 0.02
"""L∞ radius of the max-sensitivity perturbations, in normalised input units."""


@dataclass
class EvalConfig:
    """What to evaluate and how (the model is passed to :func:`evaluate` separately).

    Args:
        dataset: A name of :data:`captum_iclip.datasets.DATASETS` (``"voc"``, ...).
        root: The dataset folder.
        split: Split name; ``None`` is the reader's default.
        methods: Method names of :data:`~captum_iclip.evaluation.methods.METHODS`.
        tasks: Names of :data:`TASKS`.
        resolution: Model input side; ``None`` is the model's own input size.
        limit: Evaluate only the first ``limit`` images.
        batch_size: Images per batch.
        theta: Binarisation threshold of the explanation IoU.
        pointing_tolerance: Pointing-game tolerance, label pixels.
        background_threshold: Segmentation score under which a pixel is background
            (needs a dataset with a background class); ``None``: background prompt.
        slide: Segment with sliding windows on aspect-preserving resizes.
        window: Sliding-window side; ``None`` is the model's own input size.
        stride: Sliding-window step; ``None`` is ``window // 2``.
        faithfulness_samples: Images in the faithfulness sample.
        faithfulness_perturbations: Perturbations per image for infidelity and sensitivity.
        ig_steps: Integration steps of ``ig``.
        seed: Seed of every random draw (faithfulness perturbations).
        examples: Example overlays of the localization maps to draw (rank 0's
            first images with a scored class; needs the localization task).
        workers: DataLoader worker processes.
        out: Output folder; ``None`` writes nothing.
        progress: Show progress bars (rank 0).

    Raises:
        ValueError: On an unknown dataset, method or task, or a value out of range.
    """

    dataset: str
    root: str
    split: Optional[str] = None
    methods: Sequence[str] = ("raw",)
    tasks: Sequence[str] = ("localization",)
    resolution: Optional[int] = None
    limit: Optional[int] = None
    batch_size: int = 8
    theta: float = 0.5
    pointing_tolerance: int = 15
    background_threshold: Optional[float] = None
    slide: bool = False
    window: Optional[int] = None
    stride: Optional[int] = None
    faithfulness_samples: int = 8
    faithfulness_perturbations: int = 8
    ig_steps: int = 16
    seed: int = 0
    examples: int = 4
    workers: int = 0
    out: Optional[str] = "captum-iclip-eval"
    progress: bool = True

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        self.tasks = tuple(self.tasks)
        if self.dataset.lower() not in DATASETS:
            raise ValueError(f"dataset: expected one of {sorted(DATASETS)}, got {self.dataset!r}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: expected distinct names of {METHODS}, got {list(self.methods)}")
        for name in self.methods:
            if name not in METHODS:
                raise ValueError(f"methods: expected names of {METHODS}, got {name!r}")
        if not self.tasks or any(task not in TASKS for task in self.tasks):
            raise ValueError(f"tasks: expected names of {TASKS}, got {list(self.tasks)}")
        for name in ("resolution", "window", "stride", "limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected a positive int or None, got {value!r}")
        for name in ("batch_size", "faithfulness_perturbations", "ig_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name in ("faithfulness_samples", "examples", "workers", "pointing_tolerance"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
        if not 0.0 <= self.theta <= 1.0:
            raise ValueError(f"theta: expected a value in [0, 1], got {self.theta!r}")
        if self.out is not None:
            check_output_folder(self.out, "out")


def class_prompts(dataset: SegmentationDataset, bundle: Any = None) -> List[str]:
    """One prompt per class id of ``dataset``.

    The dataset's own prompts (``"a photo of a {name}."``), except that a bundled
    model trained on the same classes (:mod:`captum_iclip.zoo`) keeps the prompts
    it was trained with for its foreground classes.

    Args:
        dataset: A reader of :mod:`captum_iclip.datasets`.
        bundle: A :class:`~captum_iclip.zoo.ZooBundle`, or ``None``.

    Returns:
        ``dataset.num_classes`` prompts, index = class id.

    Examples:
        >>> class_prompts(build_dataset("voc", "data/world_voc"))[:2]  # doctest: +SKIP
        ['a photo of the background.', 'a photo of a circle.']
    """
    prompts = list(dataset.prompts)
    if bundle is not None and list(bundle.class_names) == list(dataset.class_names):
        for class_id, prompt in zip(dataset.foreground_classes, bundle.prompts):
            prompts[class_id] = prompt
    return prompts


# --------------------------------------------------------------------------- data
def _to_input(image: Image.Image, size: Tuple[int, int], mean: Tensor, std: Tensor) -> Tensor:
    """An RGB image resized (bicubic) to ``size`` = (height, width), as a normalised (3, H, W) tensor."""
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 255.0
    return (array.permute(2, 0, 1) - mean) / std


def _short_side_size(image: Image.Image, short_side: int, multiple: int) -> Tuple[int, int]:
    """(height, width) with the short side at ``short_side``, both rounded to ``multiple``."""
    scale = short_side / min(image.width, image.height)
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (image.height, image.width))


class _ShardImages(Dataset):
    """The images of one shard as (index, model input, label, original image)."""

    def __init__(self, dataset: SegmentationDataset, indices: Sequence[int], resolution: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.dataset, self.indices, self.resolution = dataset, list(indices), resolution
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Tuple[int, Tensor, np.ndarray, Image.Image]:
        index = self.indices[position]
        image, label, _ = self.dataset[index]
        square = (self.resolution, self.resolution)
        return index, _to_input(image, square, self.mean, self.std), label, image


def shard_indices(size: int, batch_size: int, rank: int, world_size: int) -> List[int]:
    """The dataset indices of one rank: batches ``rank, rank + K, ...`` of ``batch_size`` images.

    Striding whole batches (rather than single images) gives every batch the
    same images as in a single-process run, so batched kernels see the same
    inputs and the maps, hence the summed statistics, are bit-identical for
    any number of processes. With ``batch_size=1`` rank ``r`` takes images
    ``r, r + K, ...``.

    Args:
        size: Number of images in the dataset.
        batch_size: Images per batch.
        rank: This process's rank, in ``[0, world_size)``.
        world_size: Number of processes ``K``.

    Returns:
        Ascending indices; the shards of all ranks partition ``range(size)``.

    Examples:
        >>> shard_indices(10, 2, 1, 2)
        [2, 3, 6, 7]
    """
    starts = range(rank * batch_size, size, world_size * batch_size)
    return [index for start in starts for index in range(start, min(start + batch_size, size))]


def _collate(batch: List[tuple]) -> tuple:
    return tuple(zip(*batch))


def _scored_classes(label: np.ndarray, metric: LocalizationMetrics) -> List[int]:
    """Class ids present in ``label`` that the localization metric scores, ascending."""
    present = np.unique(label)
    return [int(c) for c in present if c != metric.ignore_index and int(c) not in metric.exclude]


def _largest_class(label: np.ndarray, classes: Sequence[int]) -> int:
    """The class of ``classes`` with the most pixels in ``label`` (the lowest id on ties)."""
    counts = [int((label == c).sum()) for c in classes]
    return classes[int(np.argmax(counts))]


# --------------------------------------------------------------------------- distribution
def _rank_and_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_distributed(device: str) -> str:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1; returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return f"cuda:{local_rank}"
    dist.init_process_group("gloo")
    return device


def _sum_over_ranks(values: Dict[str, float], device: torch.device) -> Dict[str, float]:
    """Add per-rank floats (timings) over the process group."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return dict(values)
    if dist.get_backend() != "nccl":
        device = torch.device("cpu")
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, tensor.tolist()))


def _gather_records(records: List[dict]) -> List[dict]:
    """Every rank's records, merged and sorted by dataset index."""
    if dist.is_available() and dist.is_initialized():
        gathered: List[List[dict]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, records)
        records = [record for part in gathered for record in part]
    return sorted(records, key=lambda record: record["index"])


class _Clock:
    """Wall seconds that wait for queued GPU work, so timings cover the computation."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


# --------------------------------------------------------------------------- tasks
def _segment_image(itsm: ITSMAttribution, image: Image.Image, square_input: Tensor, config: EvalConfig,
                   variant: str, projection: str, patch: int, window: int, stride: int,
                   dtype: torch.dtype, device: torch.device) -> Tensor:
    """(K, H', W') unnormalised similarities of every prompt on one image, at the model input's size.

    Like the localization maps, the patch grid is first upsampled to the input
    (for each window, by :func:`sliding_window`), then resized to the label.
    """
    def dense(crop: Tensor, interpolate: bool = False) -> Tensor:
        return itsm.attribute(crop, target=None, variant=variant, projection=projection,
                              normalize=False, interpolate=interpolate)

    if not config.slide:
        return dense(square_input[None].to(device, dtype), interpolate=True)[0]
    size = _short_side_size(image, config.resolution, patch)
    x = _to_input(image, size, torch.tensor(itsm.similarity.adapter.image_mean).reshape(3, 1, 1),
                  torch.tensor(itsm.similarity.adapter.image_std).reshape(3, 1, 1))
    return sliding_window(dense, x[None].to(device, dtype), window, stride)[0]


def _segmentation_labels(scores: Tensor, label_shape: Tuple[int, int], dataset: SegmentationDataset,
                         background_threshold: Optional[float]) -> Tensor:
    """Per-pixel class ids at the label's size from (K, H', W') similarities (K = num_classes)."""
    scores = F.interpolate(scores[None].float(), size=label_shape, mode="bilinear", align_corners=False)[0]
    if background_threshold is None:
        return segment_from_maps(scores)
    foreground = dataset.foreground_classes
    return segment_from_maps(scores[foreground], classes=foreground, background_index=dataset.background_index,
                             background_threshold=background_threshold)


def _faithfulness_sample(dataset: SegmentationDataset, count: int,
                         metric: LocalizationMetrics) -> List[Tuple[int, int]]:
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


def _faithfulness_records(sim: CLIPSimilarity, runners: Dict[str, Any], dataset: SegmentationDataset,
                          sample: List[Tuple[int, int]], config: EvalConfig, resolution: int,
                          device: torch.device, show: bool) -> List[dict]:
    """This rank's share (positions ``rank, rank + K, ...``) of the per-image faithfulness scores."""
    rank, world = _rank_and_world()
    adapter = sim.adapter
    mean = torch.tensor(adapter.image_mean, dtype=torch.float32).reshape(3, 1, 1)
    std = torch.tensor(adapter.image_std, dtype=torch.float32).reshape(3, 1, 1)
    perturb = patch_perturbation(adapter.patch_size[0], drop_prob=PATCH_DROP_PROB)
    mine = sample[rank::world]
    records = []
    clock = _Clock(device)
    bar = tqdm(total=len(mine) * len(runners), desc="faithfulness", unit="map", disable=not show)
    for index, target_class in mine:
        image, _, name = dataset[index]
        x = _to_input(image, (resolution, resolution), mean, std)[None].to(device, adapter.parameter.dtype)
        # An int, not a 1-element tensor: Captum repeats only multi-element targets for perturbed copies.
        target = target_class
        for method, run in runners.items():
            began = clock()
            # Seeded per image, so the score does not depend on the shard or the method order.
            torch.manual_seed(config.seed * 1_000_003 + index)
            attributions = run(x, target).detach()
            infidelity = infidelity_score(sim, attributions, x, target, perturb_func=perturb,
                                          n_perturb_samples=config.faithfulness_perturbations)
            torch.manual_seed(config.seed * 1_000_003 + index)
            sensitivity = sensitivity_score(run, x, target,
                                            perturb_radius=SENSITIVITY_RADIUS,
                                            n_perturb_samples=config.faithfulness_perturbations)
            records.append({"index": index, "name": name, "method": method, "target": target_class,
                            "infidelity": float(infidelity[0]), "sensitivity": float(sensitivity[0]),
                            "seconds": clock() - began})
            bar.update(1)
    bar.close()
    return records


def _localize_batch(runners: Dict[str, Any], metrics: Dict[str, LocalizationMetrics], images: Tensor,
                    labels: Sequence[np.ndarray], chunk: int, clock: _Clock,
                    seconds: Dict[str, float]) -> Tuple[List[Tuple[int, int]], Dict[str, Tensor]]:
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
        maps = torch.cat([run(images[pair_image[start:start + chunk]], pair_class[start:start + chunk]).detach()
                          for start in range(0, len(pairs), chunk)]).float()
        seconds[f"{name}/localization"] = seconds.get(f"{name}/localization", 0.0) + clock() - started
        for i, label in enumerate(labels):
            rows = (pair_image == i).nonzero().flatten()
            if len(rows):
                metrics[name].update(maps[rows, 0], pair_class[rows].cpu(), label)
        batch_maps[name] = maps
    return pairs, batch_maps


def _examples(pairs: List[Tuple[int, int]], batch_maps: Dict[str, Tensor], indices: Sequence[int],
              labels: Sequence[np.ndarray], originals: Sequence[Image.Image]) -> List[dict]:
    """Example records of a batch: per image with a scored class, its largest class's maps."""
    examples = []
    for i, label in enumerate(labels):
        rows = [row for row, (image, _) in enumerate(pairs) if image == i]
        if rows:
            classes = [pairs[row][1] for row in rows]
            row = rows[classes.index(_largest_class(label, classes))]
            examples.append({"image": originals[i], "label": label, "index": indices[i], "class": pairs[row][1],
                             "maps": {name: maps[row].cpu() for name, maps in batch_maps.items()}})
    return examples


# --------------------------------------------------------------------------- evaluation
def evaluate(
    config: EvalConfig,
    sim: CLIPSimilarity,
    *,
    dataset: Optional[SegmentationDataset] = None,
    mask_provider: Any = None,
    model_name: str = "",
) -> dict:
    """Evaluate ``config.methods`` on ``config.tasks``; the API behind ``captum-iclip eval``.

    Runs on this process's shard when a ``torch.distributed`` process group is
    initialised (every rank must call it), on the whole dataset otherwise.

    Args:
        config: What to evaluate.
        sim: The forward function, with one prompt per class id of the dataset
            (see :func:`class_prompts`), on the device to run on.
        dataset: The dataset reader; ``None`` builds it from ``config``.
        mask_provider: Foreground masks of ``mmp`` (``None``: all patches).
        model_name: How the results name the model.

    Returns:
        The results (as written to ``results.json``) on every rank: ``config``,
        ``dataset``, ``model``, ``resolution``, ``world_size``, ``prompts``,
        ``wall_seconds`` and ``methods`` = ``{name: {"miou", "msc", "pointing",
        "pairs", "per_class", "segmentation", "faithfulness", "timing"}}``;
        entries of tasks not run (or not defined for the method) are ``None``.

    Raises:
        ValueError: If ``sim`` has no prompt per class, a method does not apply to
            the model (``iclip`` without dual projections), or the resolution,
            window or background threshold do not fit the model or dataset.

    Examples:
        >>> config = EvalConfig("voc", "data/world_voc", methods=["raw", "surgery"], out=None)  # doctest: +SKIP
        >>> evaluate(config, sim)["methods"]["raw"]["miou"]  # doctest: +SKIP
        41.7
    """
    began_wall = time.perf_counter()
    rank, world = _rank_and_world()
    if dataset is None:
        dataset = build_dataset(config.dataset, config.root, config.split, config.limit)
    if sim.num_prompts != dataset.num_classes:
        raise ValueError(f"sim: expected one prompt per dataset class ({dataset.num_classes}), got {sim.num_prompts}")
    unavailable = [name for name in config.methods if not available_methods(sim)[name]]
    if unavailable:
        raise ValueError(f"methods: {unavailable} need a DualProjectionCLIP model (an interpretability projection)")
    adapter = sim.adapter
    patch = adapter.patch_size[0]
    config = replace(config, resolution=config.resolution or adapter.image_size[0])
    window = config.window or adapter.image_size[0]
    stride = config.stride or max(patch, window // 2)
    for name, value in (("resolution", config.resolution), ("window", window)):
        if value % patch:
            raise ValueError(f"{name}: expected a multiple of the patch size {patch}, got {value}")
    if stride > window:
        raise ValueError(f"stride: expected at most the window {window}, got {stride}")
    if config.background_threshold is not None and dataset.background_index is None:
        raise ValueError("background_threshold: the dataset has no background class; leave it unset")
    torch.manual_seed(config.seed)

    device = adapter.parameter.device
    dtype = adapter.parameter.dtype
    show = config.progress and rank == 0
    clock = _Clock(device)
    tasks = set(config.tasks)
    runners = {name: build_method(name, sim, mask_provider=mask_provider, ig_steps=config.ig_steps)
               for name in config.methods}
    localization = {name: LocalizationMetrics.for_dataset(dataset, theta=config.theta,
                                                          pointing_tolerance=config.pointing_tolerance)
                    for name in config.methods}
    segmented = [name for name in config.methods if name in SEGMENTATION_VARIANTS] if "segmentation" in tasks else []
    segmentation = {name: SegmentationMetrics(dataset.num_classes, dataset.ignore_index) for name in segmented}
    itsm = ITSMAttribution(sim)
    seconds: Dict[str, float] = {}
    examples: List[dict] = []

    shard = shard_indices(len(dataset), config.batch_size, rank, world)
    loader = DataLoader(_ShardImages(dataset, shard, config.resolution, adapter.image_mean, adapter.image_std),
                        batch_size=config.batch_size, shuffle=False, num_workers=config.workers,
                        collate_fn=_collate)
    needs_images = bool(tasks & {"localization", "segmentation"})
    bar = tqdm(total=len(shard) if needs_images else 0, desc=f"eval {dataset.__class__.__name__}",
               unit="image", disable=not show)
    for indices, inputs, labels, originals in (loader if needs_images else ()):
        images = torch.stack(inputs).to(device, dtype)
        if "localization" in tasks:
            pairs, batch_maps = _localize_batch(runners, localization, images, labels, config.batch_size,
                                                clock, seconds)
            if rank == 0 and len(examples) < config.examples:
                examples += _examples(pairs, batch_maps, indices, labels, originals)[:config.examples - len(examples)]
        for name in segmented:
            variant, projection = SEGMENTATION_VARIANTS[name]
            started = clock()
            for image, square_input, label in zip(originals, inputs, labels):
                scores = _segment_image(itsm, image, square_input, config, variant, projection, patch,
                                        window, stride, dtype, device)
                predicted = _segmentation_labels(scores, label.shape, dataset, config.background_threshold)
                segmentation[name].update(predicted.cpu(), label)
            seconds[f"{name}/segmentation"] = seconds.get(f"{name}/segmentation", 0.0) + clock() - started
        bar.update(len(labels))
    bar.close()

    faithfulness_records: List[dict] = []
    if "faithfulness" in tasks:
        sample = _faithfulness_sample(dataset, config.faithfulness_samples, localization[config.methods[0]])
        faithfulness_records = _faithfulness_records(sim, runners, dataset, sample, config, config.resolution,
                                                     device, show)
        faithfulness_records = _gather_records(faithfulness_records)

    for metric in (*localization.values(), *segmentation.values()):
        metric.all_reduce()
    timing_keys = [f"{name}/{task}" for name in config.methods for task in ("localization", "segmentation")]
    seconds = _sum_over_ranks({key: seconds.get(key, 0.0) for key in timing_keys}, device)

    results = {
        "config": asdict(config),
        "dataset": {
            "name": config.dataset,
            "root": str(config.root),
            "split": config.split,
            "num_images": len(dataset),
            "class_names": list(dataset.class_names),
            "background_index": dataset.background_index,
        },
        "model": model_name,
        "resolution": config.resolution,
        "segmentation_window": {"window": window, "stride": stride} if config.slide else None,
        "world_size": world,
        "prompts": list(sim.prompts or []),
        "methods": {
            name: _method_results(name, config, dataset, localization[name], segmentation.get(name),
                                  [r for r in faithfulness_records if r["method"] == name], seconds)
            for name in config.methods
        },
    }
    results["wall_seconds"] = time.perf_counter() - began_wall
    if rank == 0 and config.out is not None:
        write_results(results, config.out, examples, dataset)
    return results


def _finite(value: float) -> Optional[float]:
    """JSON has no NaN: undefined means (nothing to average) become ``None``."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _method_results(name: str, config: EvalConfig, dataset: SegmentationDataset, localization: LocalizationMetrics,
                    segmentation: Optional[SegmentationMetrics], records: List[dict],
                    seconds: Dict[str, float]) -> dict:
    """One method's entry of ``results["methods"]``."""
    names = dataset.class_names
    entry: Dict[str, Any] = {"miou": None, "msc": None, "pointing": None, "pairs": None, "per_class": None}
    if "localization" in config.tasks:
        scores = localization.compute()
        entry.update(miou=_finite(scores["miou"]), msc=_finite(scores["msc"]), pointing=_finite(scores["pointing"]),
                     pairs=scores["pairs"])
        entry["per_class"] = {
            names[c]: {"iou": iou, "msc": scores["per_class_msc"].get(c),
                       "pointing": scores["per_class_pointing"][c]}
            for c, iou in scores["per_class_iou"].items()
        }
    entry["segmentation"] = None
    if segmentation is not None:
        scores = segmentation.compute()
        entry["segmentation"] = {
            "miou": _finite(scores["miou"]),
            "pixel_accuracy": _finite(scores["pixel_accuracy"]),
            "mean_accuracy": _finite(scores["mean_accuracy"]),
            "per_class_iou": {names[c]: iou for c, iou in scores["per_class_iou"].items()},
            "pixels": scores["pixels"],
            "background": ("threshold" if config.background_threshold is not None
                           else "prompt" if dataset.background_index is not None else "none"),
        }
    entry["faithfulness"] = None
    if "faithfulness" in config.tasks:
        entry["faithfulness"] = {
            "infidelity": _finite(float(np.mean([r["infidelity"] for r in records])) if records else math.nan),
            "sensitivity": _finite(float(np.mean([r["sensitivity"] for r in records])) if records else math.nan),
            "samples": len(records),
            "per_image": [{key: r[key] for key in ("index", "name", "target", "infidelity", "sensitivity")}
                          for r in records],
        }
    images = len(dataset)
    localization_seconds = seconds.get(f"{name}/localization", 0.0)
    entry["timing"] = {
        "localization_seconds": localization_seconds,
        "localization_seconds_per_image": (
            localization_seconds / images if images and "localization" in config.tasks else None
        ),
        "segmentation_seconds": seconds.get(f"{name}/segmentation", 0.0),
        "faithfulness_seconds": sum(r["seconds"] for r in records),
    }
    return entry


# --------------------------------------------------------------------------- outputs
CSV_COLUMNS = ("method", "miou", "msc", "pointing", "pairs", "segmentation_miou", "segmentation_pixel_accuracy",
               "infidelity", "sensitivity", "localization_seconds_per_image")


def _csv_rows(results: dict) -> List[dict]:
    rows = []
    for name, entry in results["methods"].items():
        segmentation, faithfulness = entry["segmentation"] or {}, entry["faithfulness"] or {}
        rows.append({
            "method": name, "miou": entry["miou"], "msc": entry["msc"], "pointing": entry["pointing"],
            "pairs": entry["pairs"], "segmentation_miou": segmentation.get("miou"),
            "segmentation_pixel_accuracy": segmentation.get("pixel_accuracy"),
            "infidelity": faithfulness.get("infidelity"), "sensitivity": faithfulness.get("sensitivity"),
            "localization_seconds_per_image": entry["timing"]["localization_seconds_per_image"],
        })
    return rows


def results_markdown(results: dict) -> str:
    """``results.md``: one row per method, with a line on what was evaluated.

    Args:
        results: As returned by :func:`evaluate`.

    Returns:
        A Markdown table (missing entries shown as "–").
    """
    def cell(value: Optional[float], digits: int) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    lines = ["| method | mIoU ↑ | mSC ↑ | pointing ↑ | seg. mIoU ↑ | infidelity ↓ | sensitivity ↓ | s / image |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in _csv_rows(results):
        title = METHOD_TITLES.get(row["method"], row["method"])
        lines.append(
            f"| {title} | {cell(row['miou'], 1)} | {cell(row['msc'], 1)} "
            f"| {cell(row['pointing'], 1)} | {cell(row['segmentation_miou'], 1)} | {cell(row['infidelity'], 4)} "
            f"| {cell(row['sensitivity'], 4)} | {cell(row['localization_seconds_per_image'], 4)} |"
        )
    config, data = results["config"], results["dataset"]
    lines += ["", f"{data['num_images']} images of {data['name']} ({data['split'] or 'default split'}), model "
              f"{results['model'] or 'given in-process'} at {results['resolution']} px, θ = {config['theta']}, "
              f"pointing tolerance {config['pointing_tolerance']} px, {results['world_size']} process(es)."]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out: str, examples: Sequence[dict] = (),
                  dataset: Optional[SegmentationDataset] = None) -> Dict[str, Path]:
    """Write ``results.{json,csv,md}`` and the example overlays into ``out``, atomically.

    Args:
        results: As returned by :func:`evaluate`.
        out: Output folder (created).
        examples: Example records (image, label, class, maps per method) to draw.
        dataset: The dataset, naming the classes of the examples.

    Returns:
        The written paths by kind (``json``, ``csv``, ``markdown``, ``example-<index>``).
    """
    from captum_iclip.viz import attribution_grid

    folder = Path(out)
    paths = {"json": folder / "results.json", "csv": folder / "results.csv", "markdown": folder / "results.md"}
    atomic_write_text(paths["json"], json.dumps(results, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(_csv_rows(results))
    atomic_write_text(paths["csv"], buffer.getvalue())
    atomic_write_text(paths["markdown"], results_markdown(results))
    for example in examples:
        methods = list(example["maps"])
        class_name = dataset.class_names[example["class"]] if dataset is not None else str(example["class"])
        path = folder / "examples" / f"{example['index']:06d}.png"
        attribution_grid(
            [example["image"]],
            [[label_colours(example["label"])]
             + [example["maps"][name] for name in methods]],
            column_titles=["ground truth"] + [METHOD_TITLES.get(name, name) for name in methods],
            row_titles=[class_name],
            path=str(path),
        )
        paths[f"example-{example['index']}"] = path
    return paths


# --------------------------------------------------------------------------- command line
def _comma_list(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The ``captum-iclip eval`` argument parser."""
    from captum_iclip.cli import add_model_arguments

    parser = argparse.ArgumentParser(prog="captum-iclip eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--root", required=True, help="dataset folder")
    parser.add_argument("--split", default=None, help="split name (default: the reader's)")
    parser.add_argument("--method", type=_comma_list, default=["raw"],
                        help=f"comma-separated methods of {','.join(METHODS)} (default: raw)")
    parser.add_argument("--task", type=_comma_list, default=["localization"],
                        help=f"comma-separated tasks of {','.join(TASKS)} (default: localization)")
    add_model_arguments(parser)
    parser.add_argument("--dino", default=None,
                        help="mask source of mmp: timm DINO name, Hugging Face id or folder "
                             "(default: the bundled model's DINO, else all patches)")
    parser.add_argument("--dino-checkpoint", default=None, help="state-dict file for a timm --dino name")
    parser.add_argument("--tau", type=float, default=None, help="DINO attention mass kept (default 0.6)")
    parser.add_argument("--resolution", type=int, default=None, help="model input side (default: the model's)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default: %(default)s)")
    parser.add_argument("--theta", type=float, default=0.5, help="binarisation threshold of the explanation IoU (default: %(default)s)")
    parser.add_argument("--pointing-tolerance", type=int, default=15, help="pointing-game tolerance, label pixels (default: %(default)s)")
    parser.add_argument("--background-threshold", type=float, default=None,
                        help="segmentation: score below which a pixel is background (default: background prompt)")
    parser.add_argument("--slide", action="store_true",
                        help="segmentation: short side to --resolution, sliding windows of --window")
    parser.add_argument("--window", type=int, default=None, help="sliding-window side (default: the model's input)")
    parser.add_argument("--stride", type=int, default=None, help="sliding-window step (default: window / 2)")
    parser.add_argument("--faithfulness-samples", type=int, default=8,
                        help="images in the faithfulness sample (default: %(default)s)")
    parser.add_argument("--faithfulness-perturbations", type=int, default=8,
                        help="perturbations per image for infidelity and sensitivity (default: %(default)s)")
    parser.add_argument("--ig-steps", type=int, default=16, help="integration steps of ig (default: %(default)s)")
    parser.add_argument("--examples", type=int, default=4, help="example overlays to draw (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes (default: %(default)s)")
    parser.add_argument("--out", default="captum-iclip-eval", help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the faithfulness perturbations")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _load_model(args: argparse.Namespace, dataset: SegmentationDataset) -> tuple[CLIPSimilarity, Any, str]:
    """The forward function, the mask provider of ``mmp`` and the model's name, from the options.

    The model comes from :func:`captum_iclip.load`; the mask provider is ``--dino``'s
    (:func:`captum_iclip.mask_source`) or else the bundled model's own.
    """
    from captum_iclip.cli import load_model_from_args
    from captum_iclip.models.loading import mask_source

    if args.tau is not None and not 0.0 < args.tau <= 1.0:
        raise ValueError(f"--tau: expected a value in (0, 1], got {args.tau}")
    loaded = load_model_from_args(args)
    prompts = class_prompts(dataset, loaded.bundle)
    sim = CLIPSimilarity(loaded.model, loaded.tokenizer, prompts).to(args.device)
    mask_provider = loaded.mask_provider
    if mask_provider is not None and args.tau is not None:
        mask_provider.tau = args.tau
    if args.dino is not None:
        mask_provider = mask_source(
            args.dino, checkpoint=args.dino_checkpoint, tau=0.6 if args.tau is None else args.tau,
            input_mean=sim.adapter.image_mean, input_std=sim.adapter.image_std, device=args.device,
        )
    return sim, mask_provider, loaded.name


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``captum-iclip eval``: parse ``argv``, evaluate, write the results; returns the exit status.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        0 on success, 2 on bad input.

    Examples:
        >>> main(["--dataset", "voc", "--root", "data/world_voc", "--method", "raw,surgery"])  # doctest: +SKIP
        0
    """
    from captum_iclip.cli import run_command, split_debug

    argv, debug = split_debug(argv)
    args = build_parser().parse_args(argv)
    return run_command("captum-iclip eval", lambda: _run(args), debug or None)


def _run(args: argparse.Namespace) -> int:
    from captum_iclip.cli import check_model_arguments

    check_model_arguments(args)
    args.device = _init_distributed(args.device)
    rank = _rank_and_world()[0]
    try:
        config = EvalConfig(
            dataset=args.dataset, root=args.root, split=args.split, methods=args.method, tasks=args.task,
            resolution=args.resolution, limit=args.limit, batch_size=args.batch_size, theta=args.theta,
            pointing_tolerance=args.pointing_tolerance, background_threshold=args.background_threshold,
            slide=args.slide, window=args.window, stride=args.stride,
            faithfulness_samples=args.faithfulness_samples,
            faithfulness_perturbations=args.faithfulness_perturbations, ig_steps=args.ig_steps, seed=args.seed,
            examples=args.examples, workers=args.workers, out=args.out, progress=not args.no_progress,
        )
        dataset = build_dataset(config.dataset, config.root, config.split, config.limit)
        sim, mask_provider, name = _load_model(args, dataset)
        results = evaluate(config, sim, dataset=dataset, mask_provider=mask_provider, model_name=name)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(results_markdown(results), end="")
        print(f"wrote {Path(config.out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
