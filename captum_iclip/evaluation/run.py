"""Benchmarks of the explanation methods on segmentation datasets (docs/methods.md §5).

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
  units). The same sample also gets the removal metrics of docs/methods.md
  §5.1 (``faithfulness_metrics``): deletion and insertion curves and their
  AUC (Grad-ECLIP's 100 steps over half the image, scored every 10; fills of
  ``faithfulness_fill``), confidence drop and increase (M2IB), and ROAD's MoRF
  and LeRF scores (noisy linear imputation at 10 %, ..., 90 %), all reading
  the target's ``faithfulness_score``. The sample runs in batches of
  ``batch_size`` sharded like the dataset's, every draw seeded by the batch's
  first image, so the figures do not depend on sharding.

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
    torchrun --nproc-per-node 2 -m captum_iclip.eval --dataset voc --root data/world_voc \\
        --method raw,iclip,mmp --pointing-tolerance 3 --out runs/eval
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, replace
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from captum_iclip.datasets import SegmentationDataset, build_dataset
from captum_iclip.distributed import rank_and_world
from captum_iclip.evaluation.benchmark_run import evaluate_benchmark
from captum_iclip.evaluation.config import TASKS, EvalConfig
from captum_iclip.evaluation.data import (
    _Clock,
    _collate,
    _ShardImages,
    _sum_over_ranks,
    shard_indices,
)
from captum_iclip.evaluation.methods import available_methods, build_method, requirement
from captum_iclip.evaluation.report import results_markdown, write_results
from captum_iclip.evaluation.tasks import TASK_TYPES, EvalBatch, EvalContext, _segmentation_labels
from captum_iclip.similarity import CLIPSimilarity

__all__ = [
    "EvalConfig",
    "TASKS",
    "class_prompts",
    "evaluate",
    "results_markdown",
    "run_evaluation",
    "shard_indices",
    "write_results",
    "_segmentation_labels",
]


def class_prompts(dataset: SegmentationDataset, bundle: Any = None) -> list[str]:
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


# --------------------------------------------------------------------------- evaluation
def evaluate(
    config: EvalConfig,
    sim: CLIPSimilarity,
    *,
    dataset: SegmentationDataset | None = None,
    mask_provider: Any = None,
    model_name: str = "",
) -> dict:
    """Evaluate ``config.methods`` on ``config.tasks``; the API behind ``captum-iclip eval``.

    Runs on this process's shard when a ``torch.distributed`` process group is
    initialised (every rank must call it), on the whole dataset otherwise.

    Args:
        config: What to evaluate. With ``config.benchmark`` set, the benchmark's protocol runs instead
            (:func:`~captum_iclip.evaluation.benchmark_run.evaluate_benchmark`).
        sim: The forward function, with one prompt per class id of the dataset
            (see :func:`class_prompts`), on the device to run on; for a benchmark, one per class
            name (:func:`~captum_iclip.evaluation.benchmarks.benchmark_similarity`).
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
    if config.benchmark is not None:
        # The training-free segmentation protocol (docs/benchmarks.md) has its own run.
        return evaluate_benchmark(config, sim, dataset=dataset, model_name=model_name)
    results, examples, dataset = run_evaluation(
        config, sim, dataset=dataset, mask_provider=mask_provider, model_name=model_name
    )
    if rank_and_world()[0] == 0 and config.out is not None:
        write_results(results, config.out, examples, dataset)
    return results


def run_evaluation(
    config: EvalConfig,
    sim: CLIPSimilarity,
    *,
    dataset: SegmentationDataset | None = None,
    mask_provider: Any = None,
    model_name: str = "",
) -> tuple[dict, list[dict], SegmentationDataset]:
    """:func:`evaluate` without writing: the results, rank 0's example records and the dataset."""
    began_wall = time.perf_counter()
    if dataset is None:
        dataset = build_dataset(config.dataset, config.root, config.split, config.limit)
    ctx = _context(config, sim, dataset, mask_provider)
    tasks = [task(ctx) for name, task in TASK_TYPES.items() if name in ctx.config.tasks]
    _run_batches(ctx, [task for task in tasks if task.name != "faithfulness"])
    for task in tasks:
        task.finish(ctx)
    results = _results(ctx, tasks, model_name)
    results["wall_seconds"] = time.perf_counter() - began_wall
    results["timing_context"] = {
        "device": str(ctx.device),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "batch_size": config.batch_size,
    }
    localization = next((task for task in tasks if task.name == "localization"), None)
    return results, (localization.examples if localization else []), dataset


def _context(config: EvalConfig, sim: CLIPSimilarity, dataset: SegmentationDataset, mask_provider: Any) -> EvalContext:
    """Check the model against the configuration and the dataset; build the methods."""
    if sim.num_prompts != dataset.num_classes:
        raise ValueError(f"sim: expected one prompt per dataset class ({dataset.num_classes}), got {sim.num_prompts}")
    usable = available_methods(sim, mask_provider=mask_provider)
    unavailable = [name for name in config.methods if not usable[name]]
    if unavailable:
        raise ValueError(
            "methods: expected methods that apply to this model, got "
            + "; ".join(f"{name!r} (it needs {requirement(name)})" for name in unavailable)
        )
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
        raise ValueError(
            "background_threshold: expected None (the dataset has no background class), "
            f"got {config.background_threshold!r}"
        )
    torch.manual_seed(config.seed)
    runners = {
        name: build_method(name, sim, mask_provider=mask_provider, ig_steps=config.ig_steps) for name in config.methods
    }
    show = config.progress and rank_and_world()[0] == 0
    return EvalContext(config, sim, dataset, runners, window, stride, show, _Clock(adapter.parameter.device))


def _run_batches(ctx: EvalContext, tasks: list[Any]) -> None:
    """One pass over this rank's shard, every batch handed to every task."""
    if not tasks:
        return
    config, adapter = ctx.config, ctx.sim.adapter
    rank, world = rank_and_world()
    shard = shard_indices(len(ctx.dataset), config.batch_size, rank, world)
    loader = DataLoader(
        _ShardImages(ctx.dataset, shard, config.resolution, adapter.image_mean, adapter.image_std),
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=config.workers,
        collate_fn=_collate,
    )
    bar = tqdm(total=len(shard), desc=f"eval {ctx.dataset.__class__.__name__}", unit="image", disable=not ctx.show)
    for indices, inputs, labels, originals in loader:
        batch = EvalBatch(indices, inputs, torch.stack(inputs).to(ctx.device, ctx.dtype), labels, originals)
        for task in tasks:
            task.update(ctx, batch)
        bar.update(len(labels))
    bar.close()


def _results(ctx: EvalContext, tasks: list[Any], model_name: str) -> dict:
    """The results dictionary (``results.json``), the same on every rank."""
    config, dataset = ctx.config, ctx.dataset
    timing_keys = [f"{name}/{task}" for name in config.methods for task in ("localization", "segmentation")]
    seconds = _sum_over_ranks({key: ctx.seconds.get(key, 0.0) for key in timing_keys}, ctx.device)
    methods = {}
    for name in config.methods:
        entry: dict[str, Any] = {
            "miou": None,
            "msc": None,
            "pointing": None,
            "pairs": None,
            "per_class": None,
            "segmentation": None,
            "faithfulness": None,
        }
        for task in tasks:
            entry.update(task.entry(name, ctx))
        faithfulness = next((task for task in tasks if task.name == "faithfulness"), None)
        localization_seconds = seconds[f"{name}/localization"]
        entry["timing"] = {
            "localization_seconds": localization_seconds,
            "localization_seconds_per_image": (
                localization_seconds / len(dataset) if len(dataset) and "localization" in config.tasks else None
            ),
            "segmentation_seconds": seconds[f"{name}/segmentation"],
            "faithfulness_seconds": faithfulness.seconds(name) if faithfulness else 0.0,
        }
        methods[name] = entry
    return {
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
        "segmentation_window": {"window": ctx.window, "stride": ctx.stride} if config.slide else None,
        "world_size": rank_and_world()[1],
        "prompts": list(ctx.sim.prompts or []),
        "methods": methods,
    }
