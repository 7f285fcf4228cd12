"""``captum-iclip explain``: score images against prompts, print the scores, draw a grid of ITSM maps."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from captum_iclip._io import check_output_file
from captum_iclip.cli.common import (
    HelpFormatter,
    add_model_arguments,
    domain_messages,
    load_model_from_args,
    open_images,
    warn_upscaled,
)
from captum_iclip.preprocess import center_crop_transform
from captum_iclip.prompts import add_prompt_arguments, prompts_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``explain`` subcommand of the ``captum-iclip`` parser."""
    p = sub.add_parser(
        "explain",
        help="attribute images against prompts and write an overlay grid",
        description="Score images against prompts, print the scores and write a grid of ITSM maps (one row per "
        "image, one column per prompt).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("images", nargs="+", help="image files")
    add_prompt_arguments(p)
    add_model_arguments(p)
    p.add_argument(
        "--variant", choices=("plain", "surgery"), default="plain", help="plain ITSM or CLIP Surgery (default: plain)"
    )
    p.add_argument("--resolution", type=int, default=None, help="input size (default: the model's own)")
    p.add_argument("--out", required=True, help="output figure (PNG or PDF, by extension)")
    p.set_defaults(func=explain)


def explain(args: argparse.Namespace) -> int:
    """Run ``captum-iclip explain`` on parsed options; returns the exit status."""
    from captum_iclip.attr.itsm import ITSMAttribution
    from captum_iclip.similarity import CLIPSimilarity
    from captum_iclip.viz import attribution_grid, denormalize

    prompts = prompts_from_args(args)
    check_output_file(args.out, "--out")
    loaded = load_model_from_args(args)
    sim = CLIPSimilarity(loaded.model, loaded.tokenizer, prompts, templates=loaded.templates, output="probs")
    adapter = sim.adapter
    if args.resolution is not None:
        ph, pw = adapter.patch_size
        if args.resolution < 1 or args.resolution % ph or args.resolution % pw:
            raise ValueError(
                f"--resolution: expected a positive multiple of the model's patch size {ph}x{pw}, got {args.resolution}"
            )
    transform = center_crop_transform(args.resolution or adapter.image_size, adapter.image_mean, adapter.image_std)
    pil_images = open_images(args.images)
    domain_messages("captum-iclip explain", loaded, prompts)
    side = args.resolution or adapter.image_size
    warn_upscaled("captum-iclip explain", args.images, pil_images, side)
    batch = torch.stack([transform(image) for image in pil_images]).to(args.device, adapter.parameter.dtype)
    with torch.no_grad():
        probs = sim(batch).cpu()  # the model's own: softmax over prompts (CLIP), sigmoid (SigLIP)
    maps = ITSMAttribution(sim).attribute(batch, variant=args.variant).cpu()

    originals = denormalize(batch.float().cpu(), adapter.image_mean, adapter.image_std)
    rows = []
    for i, path in enumerate(args.images):
        ranked = sorted(zip(prompts, probs[i].tolist()), key=lambda pair: -pair[1])
        print(f"{path}: " + ", ".join(f"{p} {s:.3f}" for p, s in ranked))
        rows.append(f"{Path(path).name}\n{ranked[0][0]} ({ranked[0][1]:.2f})")
    titles = [f"{p} ({args.variant})" for p in prompts]
    attribution_grid(
        list(originals),
        [[m[None] for m in image_maps] for image_maps in maps],
        column_titles=titles,
        row_titles=rows,
        path=args.out,
    )
    print(f"wrote {args.out}")
    return 0
