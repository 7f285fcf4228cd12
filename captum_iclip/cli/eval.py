"""``captum-iclip eval`` (also ``python -m captum_iclip.eval``): the command line of
:func:`captum_iclip.evaluation.run.evaluate`; what it measures is told in :mod:`captum_iclip.evaluation.run`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch.distributed as dist

from captum_iclip.cli.common import (
    HelpFormatter,
    add_model_arguments,
    check_model_arguments,
    load_model_from_args,
    run_command,
    split_debug,
    with_option_names,
)
from captum_iclip.datasets import DATASETS, SegmentationDataset, build_dataset
from captum_iclip.distributed import rank_and_world
from captum_iclip.evaluation.benchmarks import BENCHMARKS, PROTOCOLS, benchmark_similarity
from captum_iclip.evaluation.config import FAITHFULNESS_METRICS, FAITHFULNESS_SCORES, TASKS, EvalConfig
from captum_iclip.evaluation.data import _init_distributed
from captum_iclip.evaluation.faithfulness import FILLS
from captum_iclip.evaluation.methods import method_names
from captum_iclip.evaluation.report import results_markdown
from captum_iclip.evaluation.run import class_prompts, evaluate
from captum_iclip.similarity import CLIPSimilarity

# The first line of ``captum-iclip eval --help``.
DESCRIPTION = (
    "``captum-iclip eval``: benchmarks of the explanation methods on segmentation datasets (docs/methods.md §5)."
)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The ``captum-iclip eval`` argument parser; each option's default is :class:`EvalConfig`'s, and its
    destination the field's name (:func:`_run` builds the config from them)."""
    defaults = {field.name: field.default for field in fields(EvalConfig)}
    parser = argparse.ArgumentParser(prog="captum-iclip eval", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument(
        "--dataset",
        default=None,
        choices=sorted(DATASETS),
        help="dataset reader: %(choices)s (required unless --benchmark names it)",
    )
    parser.add_argument("--root", required=True, help="dataset folder")
    parser.add_argument(
        "--benchmark",
        default=defaults["benchmark"],
        choices=sorted(BENCHMARKS),
        help="run the training-free open-vocabulary segmentation protocol on this benchmark (docs/benchmarks.md): "
        "%(choices)s; the ITSM --method values only",
    )
    parser.add_argument(
        "--protocol",
        default=defaults["protocol"],
        choices=PROTOCOLS,
        help="--benchmark: whose settings, %(choices)s (default: %(default)s)",
    )
    parser.add_argument(
        "--pamr",
        type=int,
        default=defaults["pamr"],
        metavar="STEPS",
        help="--benchmark: PAMR refinement steps on the logits (default: none; NACLIP's repository runs 10)",
    )
    parser.add_argument("--split", default=defaults["split"], help="split name (default: the reader's)")
    parser.add_argument(
        "--method",
        dest="methods",
        type=_comma_list,
        default=defaults["methods"],
        help=f"comma-separated methods of {','.join(method_names())} (default: raw)",
    )
    parser.add_argument(
        "--task",
        dest="tasks",
        type=_comma_list,
        default=defaults["tasks"],
        help=f"comma-separated tasks of {','.join(TASKS)} (default: localization)",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--dino",
        default=None,
        help="mask source of mmp, and the proxy of proxyclip: timm DINO name, Hugging Face id or folder "
        "(default: the bundled model's DINO, else all patches and no proxyclip)",
    )
    parser.add_argument("--dino-checkpoint", default=None, help="state-dict file for a timm --dino name")
    parser.add_argument("--tau", type=float, default=None, help="DINO attention mass kept (default 0.6)")
    parser.add_argument(
        "--resolution", type=int, default=defaults["resolution"], help="model input side (default: the model's)"
    )
    parser.add_argument("--limit", type=int, default=defaults["limit"], help="evaluate the first N images only")
    parser.add_argument(
        "--batch-size", type=int, default=defaults["batch_size"], help="images per batch (default: %(default)s)"
    )
    _add_measure_arguments(parser, defaults)
    return parser


def _add_measure_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """The options of what is measured and written: the metrics, segmentation, faithfulness, the outputs."""
    parser.add_argument(
        "--theta",
        type=float,
        default=defaults["theta"],
        help="binarisation threshold of the explanation IoU (default: %(default)s)",
    )
    parser.add_argument(
        "--pointing-tolerance",
        type=int,
        default=defaults["pointing_tolerance"],
        help="pointing-game tolerance, label pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--background-threshold",
        type=float,
        default=defaults["background_threshold"],
        help="segmentation: score below which a pixel is background (default: background prompt)",
    )
    parser.add_argument(
        "--slide",
        action="store_true",
        default=defaults["slide"],
        help="segmentation: short side to --resolution, sliding windows of --window",
    )
    parser.add_argument(
        "--window", type=int, default=defaults["window"], help="sliding-window side (default: the model's input)"
    )
    parser.add_argument(
        "--stride", type=int, default=defaults["stride"], help="sliding-window step (default: window / 2)"
    )
    _add_faithfulness_arguments(parser, defaults)
    parser.add_argument(
        "--ig-steps", type=int, default=defaults["ig_steps"], help="integration steps of ig (default: %(default)s)"
    )
    parser.add_argument(
        "--examples", type=int, default=defaults["examples"], help="example overlays to draw (default: %(default)s)"
    )
    parser.add_argument(
        "--workers", type=int, default=defaults["workers"], help="data-loading processes (default: %(default)s)"
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=defaults["bootstrap"],
        help="resamples of 95%% bootstrap intervals over images (default: none)",
    )
    parser.add_argument("--out", default=defaults["out"], help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults["seed"], help="seed of the faithfulness perturbations")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", default=defaults["progress"], help="no progress bars"
    )


def _add_faithfulness_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """The options of ``--task faithfulness``: the sample, the metrics, the fill and the score."""
    parser.add_argument(
        "--faithfulness-samples",
        type=int,
        default=defaults["faithfulness_samples"],
        help="images in the faithfulness sample (default: %(default)s)",
    )
    parser.add_argument(
        "--faithfulness-perturbations",
        type=int,
        default=defaults["faithfulness_perturbations"],
        help="perturbations per image for infidelity and sensitivity (default: %(default)s)",
    )
    parser.add_argument(
        "--faithfulness-metrics",
        dest="faithfulness_metrics",
        type=_comma_list,
        default=defaults["faithfulness_metrics"],
        help=f"comma-separated faithfulness metrics of {','.join(FAITHFULNESS_METRICS)} (default: all)",
    )
    parser.add_argument(
        "--faithfulness-fill",
        choices=FILLS,
        default=defaults["faithfulness_fill"],
        help="what deletion removes to and insertion starts from: %(choices)s (default: %(default)s, "
        "Grad-ECLIP's random colours for deletion, black for insertion)",
    )
    parser.add_argument(
        "--faithfulness-score",
        choices=FAITHFULNESS_SCORES,
        default=defaults["faithfulness_score"],
        help="score read by deletion, insertion, confidence and ROAD: %(choices)s (default: %(default)s)",
    )


def _load_model(args: argparse.Namespace, dataset: SegmentationDataset) -> tuple[CLIPSimilarity, Any, str]:
    """The forward function, the mask provider of ``mmp`` and the model's name, from the options.

    The model comes from :func:`captum_iclip.load`; the mask provider is ``--dino``'s
    (:func:`captum_iclip.mask_source`) or else the bundled model's own.
    """
    from captum_iclip.loading.loader import mask_source

    if args.tau is not None and not 0.0 < args.tau <= 1.0:
        raise ValueError(f"--tau: expected a value in (0, 1], got {args.tau}")
    loaded = load_model_from_args(args)
    if args.benchmark is not None:  # the benchmark's class names and templates, not the dataset's prompts
        sim = benchmark_similarity(loaded.model, loaded.tokenizer, args.benchmark, args.protocol).to(args.device)
        return sim, None, loaded.name
    prompts = class_prompts(dataset, loaded.bundle)
    sim = CLIPSimilarity(loaded.model, loaded.tokenizer, prompts, templates=loaded.templates).to(args.device)
    mask_provider = loaded.mask_provider
    if mask_provider is not None and args.tau is not None:
        mask_provider.tau = args.tau
    if args.dino is not None:
        mask_provider = with_option_names(
            lambda: mask_source(
                args.dino,
                checkpoint=args.dino_checkpoint,
                tau=0.6 if args.tau is None else args.tau,
                input_mean=sim.adapter.image_mean,
                input_std=sim.adapter.image_std,
                device=args.device,
            )
        )
    return sim, mask_provider, loaded.name


def main(argv: Sequence[str] | None = None) -> int:
    """``captum-iclip eval``: parse ``argv``, evaluate, write the results; returns the exit status.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        0 on success, 2 on bad input.

    Examples:
        >>> main(["--dataset", "voc", "--root", "data/world_voc", "--method", "raw,surgery"])  # doctest: +SKIP
        0
    """
    argv, debug = split_debug(argv)
    args = build_parser().parse_args(argv)
    return run_command("captum-iclip eval", lambda: _run(args), debug or None)


def _benchmark_arguments(args: argparse.Namespace) -> None:
    """``--benchmark`` names its dataset reader and the segmentation task; without it, ``--dataset`` is needed."""
    if args.benchmark is None:
        if args.dataset is None:
            raise ValueError("--dataset: expected a dataset reader (or --benchmark NAME), got none")
        return
    reader = BENCHMARKS[args.benchmark].dataset
    if args.dataset not in (None, reader):
        raise ValueError(
            f"--dataset: expected {reader!r} (or nothing) with --benchmark {args.benchmark}, got {args.dataset!r}"
        )
    args.dataset = reader
    if list(args.tasks) == list(EvalConfig.tasks):  # the default: the benchmark's task instead
        args.tasks = ["segmentation"]


def _run(args: argparse.Namespace) -> int:
    _benchmark_arguments(args)
    check_model_arguments(args)
    args.device = _init_distributed(args.device)
    rank = rank_and_world()[0]
    try:
        config = EvalConfig(**{field.name: getattr(args, field.name) for field in fields(EvalConfig)})
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
