"""``captum-iclip diagnose``: the command line of :class:`~captum_iclip.diagnostics.Diagnostics`.

Two ways to give it images:

* files and prompts (``diagnose IMG... --prompts ...``), optionally with ``--masks DIR``: one
  mask image per input image, of the same file stem, any non-zero pixel foreground. The maps of
  each image's ``--target`` prompt (default: its top-1 prompt) are then scored against its mask;
* a dataset of ``captum-iclip eval`` (``--dataset NAME --root R``), whose label maps score every
  (image, class present) pair with one prompt per class, as ``eval`` does.

It writes ``OUT/diagnostics.json`` (the summary) and ``OUT/diagnostics.png`` (the figure) and
prints a short table.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from captum_iclip.cli.common import (
    HelpFormatter,
    add_model_arguments,
    check_model_arguments,
    load_model_from_args,
    run_command,
    split_debug,
)
from captum_iclip.diagnostics import TERMS


def build_parser() -> argparse.ArgumentParser:
    from captum_iclip.datasets import DATASETS
    from captum_iclip.prompts import add_prompt_arguments

    parser = argparse.ArgumentParser(
        prog="captum-iclip diagnose",
        description="Training-free diagnostics of why a model's similarity maps prefer the background "
        "(token norms, last-block decomposition, [CLS] attention, shared direction, attention scaling).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("images", nargs="*", help="image files (or use --dataset)")
    add_prompt_arguments(parser, required=False)  # with image files; a dataset brings its class prompts
    parser.add_argument(
        "--masks",
        default=None,
        metavar="DIR",
        help="folder of foreground masks named like the images (non-zero: object)",
    )
    parser.add_argument(
        "--target", default=None, help="the prompt scored against each mask (default: each image's top-1 prompt)"
    )
    parser.add_argument("--dataset", default=None, choices=sorted(DATASETS), help="a dataset of eval instead of files")
    parser.add_argument("--root", default=None, help="the dataset folder (world: the first seed or 'heldout')")
    parser.add_argument("--split", default=None, help="dataset split (default: the reader's)")
    parser.add_argument("--limit", type=int, default=None, help="the first N dataset images only (default: all)")
    add_model_arguments(parser)
    parser.add_argument(
        "--projection",
        choices=("recognition", "interpretability", "auto"),
        default="recognition",
        help="projection of the maps (default: %(default)s, the model's own)",
    )
    parser.add_argument(
        "--attention-blocks",
        type=int,
        default=2,
        help="last blocks whose [CLS] attention is read (default: %(default)s)",
    )
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="resamples of the mSC intervals; 0: none (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default: %(default)s)")
    parser.add_argument("--out", default="captum-iclip-diagnose", help="output folder (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _read_files(args: argparse.Namespace, loaded):
    """Images (tensors at the model's size) and, with ``--masks``, their binary label maps."""
    from captum_iclip._io import read_image

    originals = [read_image(path, "images") for path in args.images]
    images = [loaded.preprocess(image) for image in originals]
    if args.masks is None:
        return images, None
    folder = Path(args.masks)
    if not folder.is_dir():
        raise ValueError(f"--masks: expected a folder of mask images, got {args.masks}")
    masks = []
    for path in args.images:
        found = sorted(p for p in folder.glob(f"{Path(path).stem}.*") if p.is_file())
        if not found:
            raise ValueError(f"--masks: expected a mask named {Path(path).stem}.* in {folder} for {path}, got none")
        mask = np.asarray(read_image(found[0], "--masks").convert("L")) > 0
        size = originals[len(masks)].size
        if mask.shape[::-1] != size:
            raise ValueError(
                f"--masks: expected {found[0]} of its image's size {size[0]}x{size[1]}, "
                f"got {mask.shape[1]}x{mask.shape[0]}"
            )
        if size[0] != size[1]:
            # A model's preprocessing may crop a non-square image, which the mask would not follow.
            raise ValueError(
                "--masks: expected square images (a crop would move them off their masks), "
                f"got {path} of {size[0]}x{size[1]}"
            )
        masks.append(mask)
    return images, masks


def _check_arguments(args: argparse.Namespace) -> None:
    if bool(args.images) == (args.dataset is not None):
        raise ValueError(
            "images: expected image files or --dataset (one of them), got " + ("both" if args.images else "neither")
        )
    if args.dataset is not None and args.root is None:
        raise ValueError(f"--root: expected the folder of --dataset {args.dataset}, got none")
    if args.images and args.prompts is None and args.prompts_file is None:
        raise ValueError("--prompts: expected the prompts (or --prompts-file) to diagnose the images against, got none")
    if args.dataset is not None and (args.prompts is not None or args.prompts_file is not None):
        raise ValueError("--prompts: expected none with --dataset (its class prompts are used), got some")
    if args.target is not None and (args.dataset is not None or args.masks is None):
        raise ValueError("--target: expected only with image files and --masks")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected at least 1, got {args.batch_size}")


@dataclass
class _Inputs:
    """What the command diagnoses: prompts, the Diagnostics' label options, and a way to read batches."""

    prompts: list[str]
    options: dict
    count: int
    batch: Callable[[int, int], tuple[Tensor, list | None]]  # (start, stop) -> images, labels or None
    masks: list[np.ndarray] | None = None  # file masks: the labels then depend on each image's target


def _dataset_inputs(args: argparse.Namespace, loaded) -> _Inputs:
    from captum_iclip.datasets import build_dataset
    from captum_iclip.evaluation.run import class_prompts

    dataset = build_dataset(args.dataset, args.root, args.split, args.limit)
    background = dataset.background_index
    options = {
        "num_classes": dataset.num_classes,
        "exclude": () if background is None else (background,),
        "ignore_index": dataset.ignore_index,
    }

    def batch(start: int, stop: int):
        items = [dataset[i] for i in range(start, stop)]
        return torch.stack([loaded.preprocess(image) for image, _, _ in items]), [label for _, label, _ in items]

    return _Inputs(class_prompts(dataset, loaded.bundle), options, len(dataset), batch)


def _files_inputs(args: argparse.Namespace, loaded) -> _Inputs:
    from captum_iclip.prompts import prompts_from_args

    prompts = prompts_from_args(args)
    if args.target is not None and args.target not in prompts:
        raise ValueError(f"--target: expected one of the prompts {prompts}, got {args.target!r}")
    images, masks = _read_files(args, loaded)
    # With masks, prompt k explains class k + 1 of a binary label whose foreground is the image's target.
    options = {"num_classes": len(prompts) + 1, "classes": list(range(1, len(prompts) + 1))} if masks else {}
    return _Inputs(prompts, options, len(images), lambda start, stop: (torch.stack(images[start:stop]), None), masks)


def _run(args: argparse.Namespace) -> int:
    from captum_iclip._io import check_output_folder
    from captum_iclip.diagnostics import Diagnostics
    from captum_iclip.similarity import CLIPSimilarity

    _check_arguments(args)
    out = check_output_folder(args.out, "--out")
    check_model_arguments(args)
    loaded = load_model_from_args(args)
    inputs = _dataset_inputs(args, loaded) if args.dataset is not None else _files_inputs(args, loaded)
    sim = CLIPSimilarity(loaded.model, loaded.tokenizer, inputs.prompts, templates=loaded.templates).to(args.device)
    diagnostics = Diagnostics(
        sim,
        projection=args.projection,
        attention_blocks=args.attention_blocks,
        bootstrap=args.bootstrap if inputs.options else 0,
        **inputs.options,
    )
    example = None
    bar = tqdm(total=inputs.count, desc="diagnose", disable=args.no_progress)
    for start in range(0, inputs.count, args.batch_size):
        stop = min(start + args.batch_size, inputs.count)
        images, labels = inputs.batch(start, stop)
        images = images.to(sim.adapter.parameter.device, sim.adapter.parameter.dtype)
        if inputs.masks is not None or example is None:
            with torch.no_grad():
                top = sim(images).argmax(dim=1).tolist()
        if inputs.masks is not None:
            targets = [inputs.prompts.index(args.target)] * len(top) if args.target is not None else top
            labels = [mask.astype(np.int64) * (1 + k) for mask, k in zip(inputs.masks[start:stop], targets)]
        measured = diagnostics.update(images, labels)
        if example is None:
            example = _example(sim, images, measured, top[0], inputs.prompts)
        bar.update(stop - start)
    bar.close()
    _write(out, {"model": loaded.name, "prompts": inputs.prompts, **diagnostics.summary()}, example, loaded.name)
    return 0


def _example(sim, images: Tensor, measured: dict, k: int, prompts: list[str]) -> tuple:
    """The figure's example row: the first image, its top prompt's raw map and the map's terms."""
    from captum_iclip.viz import denormalize

    first = denormalize(images[:1].float().cpu(), sim.adapter.image_mean, sim.adapter.image_std)[0]
    return first, {name: measured["maps"][name][0, k].cpu() for name in ("itsm", *TERMS[:3])}, prompts[k]


def _write(out: Path, summary: dict, example: tuple, model_name: str) -> None:
    from captum_iclip._io import atomic_write_text, json_text
    from captum_iclip.viz import diagnostics_figure

    atomic_write_text(out / "diagnostics.json", json_text(summary, indent=1))
    image, maps, prompt = example
    title = f"{model_name}: diagnostics (example prompt: {prompt})"
    diagnostics_figure(summary, image=image, maps=maps, title=title, path=str(out / "diagnostics.png"))
    print(summary_markdown(summary), end="")
    print(f"wrote {out / 'diagnostics.json'} and {out / 'diagnostics.png'}")


def summary_markdown(summary: dict) -> str:
    """A short Markdown digest of a diagnostics summary."""

    def num(value, digits=2):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [f"{summary['images']} images, {summary['projection']} projection", ""]
    norms = summary["token_norms"]
    lines.append("largest patch-token norm / median, per block: " + ", ".join(num(r["max_ratio"]) for r in norms))
    cosine = summary["global_cosine"]
    if cosine["foreground"] is not None:
        lines.append(
            f"cosine to the global embedding: foreground {num(cosine['foreground'], 3)}, "
            f"background {num(cosine['background'], 3)}"
        )
    if summary["maps"]:
        lines += ["", "| map | mSC | 95 % CI | mIoU | pointing |", "|---|---|---|---|---|"]
        for name, entry in summary["maps"].items():
            ci = entry.get("msc_ci")
            interval = f"[{num(ci[0], 1)}, {num(ci[1], 1)}]" if ci else "–"
            figures = " | ".join(num(entry[key], 1) for key in ("msc", "miou", "pointing"))
            lines.append(f"| {name} | {figures.replace(' | ', f' | {interval} | ', 1)} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``captum-iclip diagnose`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""

    argv, debug = split_debug(argv)
    args = build_parser().parse_args(argv)
    return run_command("captum-iclip diagnose", lambda: _run(args), debug or None)
