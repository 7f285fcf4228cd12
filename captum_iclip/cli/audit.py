"""``captum-iclip audit``: the command line of :func:`~captum_iclip.audit.audit`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from captum_iclip.attr.text import TEXT_METHODS
from captum_iclip.audit.run import DEFAULT_METHODS, audit
from captum_iclip.cli.common import (
    HelpFormatter,
    add_model_arguments,
    check_model_arguments,
    domain_messages,
    load_model_from_args,
)


@dataclass
class AuditModel:
    """What an audit needs from a model: the forward function and its preprocessing and masks."""

    sim: Any  # CLIPSimilarity
    preprocess: Callable
    mask_provider: Any
    name: str
    warnings: list[str] = field(default_factory=list)  # what a bundled model knows, prompts outside it


def build_parser() -> argparse.ArgumentParser:
    from captum_iclip.prompts import add_prompt_arguments

    parser = argparse.ArgumentParser(
        prog="captum-iclip audit",
        description="Audit images against prompts and write a self-contained static HTML report (OUT/index.html).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--images",
        required=True,
        nargs="+",
        metavar="DIR_OR_GLOB",
        help="image folders (searched recursively), glob patterns or files",
    )
    add_prompt_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated methods (default {','.join(DEFAULT_METHODS)}; "
        "iclip only for models with an interpretability projection)",
    )
    parser.add_argument("--top-k", type=int, default=3, help="prompts explained per image (default 3)")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument(
        "--low-confidence",
        type=float,
        default=0.5,
        help="flag images whose top-1 probability is below this (default 0.5)",
    )
    parser.add_argument(
        "--background-threshold",
        type=float,
        default=0.5,
        help="flag top-1 maps with more than this share of their mass outside the DINO foreground (default 0.5)",
    )
    parser.add_argument(
        "--text-method",
        choices=TEXT_METHODS,
        default=None,
        help="also colour each explained prompt's words by their relevance for the image, by this method "
        "(default: no words)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of ``--prompts`` or ``--prompts-file`` (:mod:`captum_iclip.prompts`, as every command)."""
    from captum_iclip.prompts import prompts_from_args

    return prompts_from_args(args)


def load_audit_model(args: argparse.Namespace, prompts: list[str]) -> AuditModel:
    """The model of the command's model options (:func:`captum_iclip.load`), with prompts embedded.

    A bundled model (the default) comes with its DINO mask provider, which
    drives ``mmp`` and the background flag; other models have none.
    """
    from captum_iclip.similarity import CLIPSimilarity

    loaded = load_model_from_args(args)
    warnings = domain_messages("captum-iclip audit", loaded, prompts)
    sim = CLIPSimilarity(loaded.model, loaded.tokenizer, prompts, templates=loaded.templates, output="logits").to(
        args.device
    )
    return AuditModel(sim, loaded.preprocess, loaded.mask_provider, loaded.name, warnings)


def main(argv: list[str] | None = None) -> int:
    """Run ``captum-iclip audit`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    from captum_iclip._io import check_output_folder

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    check_output_folder(args.out, "--out")
    check_model_arguments(args)
    prompts = read_prompts(args)
    model = load_audit_model(args, prompts)
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        summary = audit(
            args.images,
            prompts,
            sim=model.sim,
            preprocess=model.preprocess,
            out_dir=args.out,
            methods=methods,
            mask_provider=model.mask_provider,
            top_k=args.top_k,
            batch_size=args.batch_size,
            model_name=model.name,
            low_confidence=args.low_confidence,
            background_threshold=args.background_threshold,
            progress=not args.no_progress,
            warnings=model.warnings,
            text_method=args.text_method,
        )
    except ValueError as error:  # bad input (argument named in the message), not a crash
        raise SystemExit(f"captum-iclip audit: {error}") from error
    print(
        f"audit: {summary.computed} images explained, {summary.reused} reused from records, "
        f"{summary.unreadable} unreadable, {summary.skipped} skipped as not images (both listed in the report)"
    )
    print(f"report: {summary.index}")
    return 0
