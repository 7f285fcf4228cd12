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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from captum_iclip.cli.common import (
    HelpFormatter,
    add_model_arguments,
    check_model_arguments,
    load_model_from_args,
    run_command,
    split_debug,
)


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


def _file_inputs(args: argparse.Namespace, loaded, prompts: list[str]):
    """Images (tensors at the model's size) and, with ``--masks``, their binary label maps."""
    from captum_iclip._io import read_image

    images = [loaded.preprocess(read_image(path, "images")) for path in args.images]
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
        masks.append(mask)
    return images, masks


def _run(args: argparse.Namespace) -> int:
    from captum_iclip._io import atomic_write_text, check_output_folder, json_text
    from captum_iclip.diagnostics import Diagnostics
    from captum_iclip.prompts import prompts_from_args
    from captum_iclip.similarity import CLIPSimilarity
    from captum_iclip.viz import denormalize, diagnostics_figure

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
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected at least 1, got {args.batch_size}")
    out = check_output_folder(args.out, "--out")
    check_model_arguments(args)
    loaded = load_model_from_args(args)

    if args.dataset is not None:
        from captum_iclip.datasets import build_dataset
        from captum_iclip.evaluation.run import class_prompts

        dataset = build_dataset(args.dataset, args.root, args.split, args.limit)
        prompts = class_prompts(dataset, loaded.bundle)
        background = dataset.background_index
        options = {
            "num_classes": dataset.num_classes,
            "exclude": () if background is None else (background,),
            "ignore_index": dataset.ignore_index,
        }
        count = len(dataset)
    else:
        prompts = prompts_from_args(args)
        images, masks = _file_inputs(args, loaded, prompts)
        options = {"num_classes": len(prompts) + 1, "classes": list(range(1, len(prompts) + 1))} if masks else {}
        count = len(images)
    if args.target is not None and (args.dataset is not None or args.masks is None):
        raise ValueError("--target: expected only with image files and --masks")
    if args.target is not None and args.target not in prompts:
        raise ValueError(f"--target: expected one of the prompts {prompts}, got {args.target!r}")
    sim = CLIPSimilarity(loaded.model, loaded.tokenizer, prompts, templates=loaded.templates).to(args.device)
    diagnostics = Diagnostics(
        sim,
        projection=args.projection,
        attention_blocks=args.attention_blocks,
        bootstrap=args.bootstrap if options else 0,
        **options,
    )
    dtype, device = sim.adapter.parameter.dtype, sim.adapter.parameter.device
    example = None
    bar = tqdm(total=count, desc="diagnose", disable=args.no_progress)
    for start in range(0, count, args.batch_size):
        stop = min(start + args.batch_size, count)
        if args.dataset is not None:
            items = [dataset[i] for i in range(start, stop)]
            batch = torch.stack([loaded.preprocess(image) for image, _, _ in items])
            labels = [label for _, label, _ in items]
        else:
            batch = torch.stack(images[start:stop])
            labels = None
        batch = batch.to(device, dtype)
        if args.dataset is None and masks is not None:
            with torch.no_grad():
                top = sim(batch).argmax(dim=1).tolist()
            targets = [prompts.index(args.target)] * len(top) if args.target is not None else top
            labels = [mask.astype(np.int64) * (1 + k) for mask, k in zip(masks[start:stop], targets)]
        measured = diagnostics.update(batch, labels)
        if example is None:
            first = denormalize(batch[:1].float().cpu(), sim.adapter.image_mean, sim.adapter.image_std)[0]
            with torch.no_grad():
                k = int(sim(batch[:1]).argmax())
            example = (
                first,
                {name: measured["maps"][name][0, k].cpu() for name in ("itsm", "residual", "attention", "mlp")},
                prompts[k],
            )
        bar.update(stop - start)
    bar.close()

    summary = {"model": loaded.name, "prompts": prompts, **diagnostics.summary()}
    atomic_write_text(out / "diagnostics.json", json_text(summary, indent=1))
    image, maps, prompt = example
    diagnostics_figure(
        summary,
        image=image,
        maps=maps,
        title=f"{loaded.name}: diagnostics (example prompt: {prompt})",
        path=str(out / "diagnostics.png"),
    )
    print(summary_markdown(summary), end="")
    print(f"wrote {out / 'diagnostics.json'} and {out / 'diagnostics.png'}")
    return 0


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
