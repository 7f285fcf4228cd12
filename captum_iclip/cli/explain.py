"""``captum-iclip explain``: score images against prompts, print the scores, draw a grid of ITSM maps; with
``--text-method``, also print and draw how much each word of each prompt makes it match each image."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from captum_iclip._io import check_output_file
from captum_iclip.attr.text import TEXT_METHODS, colour_legend
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
    p.add_argument(
        "--text-method",
        choices=TEXT_METHODS,
        default=None,
        help="also explain each prompt's words for each image by this method (Grad-ECLIP's text relevance, "
        "Chefer et al.'s text rollout, Integrated Gradients on the token embeddings or M2IB's text information "
        "bottleneck), printed and drawn to --text-out (default: none)",
    )
    p.add_argument(
        "--text-out",
        default=None,
        help="figure of the words' relevance, with --text-method (default: --out with '-words' before its extension)",
    )
    p.set_defaults(func=explain)


def text_figure_path(out: str) -> str:
    """The default ``--text-out``: ``--out`` with ``-words`` before its extension (maps.png -> maps-words.png)."""
    path = Path(out)
    return str(path.with_name(f"{path.stem}-words{path.suffix}"))


def explain(args: argparse.Namespace) -> int:
    """Run ``captum-iclip explain`` on parsed options; returns the exit status."""
    from captum_iclip.attr.itsm import ITSMAttribution
    from captum_iclip.similarity import CLIPSimilarity
    from captum_iclip.viz import attribution_grid, denormalize

    prompts = prompts_from_args(args)
    check_output_file(args.out, "--out")
    if args.text_out is not None and args.text_method is None:
        raise ValueError(f"--text-out: expected --text-method with it (the words it draws), got {args.text_out!r}")
    text_out = None
    if args.text_method is not None:
        text_out = args.text_out or text_figure_path(args.out)
        check_output_file(text_out, "--text-out")
    loaded = load_model_from_args(args)
    sim = CLIPSimilarity(loaded.model, loaded.tokenizer, prompts, templates=loaded.templates, output="probs")
    adapter = sim.adapter
    if args.text_method is not None:
        adapter.text_tower()  # a model whose text tower the text side does not read fails before any work
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
    if args.text_method is not None:
        explain_words(sim, batch, args.images, args.text_method, text_out, templates=loaded.templates)
    return 0


def explain_words(sim, batch: torch.Tensor, paths: list[str], method: str, out: str, *, templates=None) -> None:
    """Print each prompt's words with their relevance for each image (:func:`~captum_iclip.attr.text.explain_text`)
    and draw them to ``out`` (:func:`~captum_iclip.viz.word_relevance_figure`)."""
    from captum_iclip.attr.text import explain_text
    from captum_iclip.viz import word_relevance_figure

    if templates:
        print("words: each prompt is explained as written (the model's prompt templates are not applied)")
    rows = []
    for i, path in enumerate(paths):
        results = explain_text(sim, batch[i : i + 1], method)
        print(f"{path}: words by {method}")
        for result in results:
            words = " ".join(f"{token}({value:+.3f})" for token, value in zip(result.tokens, result.relevance.tolist()))
            print(f"  {result.text}: {words}")
            rows.append((f"{Path(path).name}: {result.text}", result.tokens, result.relevance))
    word_relevance_figure(rows, title=f"words by {method}: {colour_legend(method)}", path=out)
    print(f"wrote {out}")
