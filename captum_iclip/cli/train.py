"""``captum-iclip train`` (also ``python -m captum_iclip.train``): the command line of
:func:`captum_iclip.training.iclip.train`; every option's default is :class:`TrainConfig`'s."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from captum_iclip._io import json_text
from captum_iclip.cli.common import DEVICE_HELP, HelpFormatter, run_command, split_debug, with_option_names
from captum_iclip.training.iclip import DATASET_TYPES, MODES, OBJECTIVES, PRECISIONS, TrainConfig, train


def build_parser() -> argparse.ArgumentParser:
    """The ``captum-iclip train`` / ``python -m captum_iclip.train`` argument parser."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="captum-iclip train",
        formatter_class=HelpFormatter,
        description="ICLIP training (masked max pooling on a dual projection). Run under torchrun for several "
        "processes. Without --dino the MMP mask is every patch.",
    )
    data = parser.add_argument_group("data (open_clip formats)")
    data.add_argument("--train-data", help="CSV/TSV file or webdataset shards, e.g. 'dir/shard-{000000..000003}.tar'")
    data.add_argument(
        "--dataset-type",
        choices=DATASET_TYPES,
        default=defaults.dataset_type,
        help="format of --train-data: %(choices)s; auto: webdataset when it ends in .tar, else CSV",
    )
    data.add_argument("--csv-img-key", default=defaults.csv_img_key, help="CSV column of the image paths")
    data.add_argument("--csv-caption-key", default=defaults.csv_caption_key, help="CSV column of the captions")
    data.add_argument("--csv-separator", default=defaults.csv_separator, help="CSV field separator")
    data.add_argument("--train-num-samples", type=int, help="samples per epoch (webdataset; default: counted)")
    data.add_argument("--workers", type=int, default=defaults.workers, help="data-loader workers per rank")
    data.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or console log")
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="open_clip architecture or bundled model name")
    model.add_argument("--pretrained", help="open_clip pretrained tag")
    model.add_argument("--checkpoint", help="local open_clip weights file for --model")
    model.add_argument("--hf-model", help="Hugging Face CLIP id or folder")
    model.add_argument("--model-config", help="open_clip model-config JSON (registered under its file stem)")
    model.add_argument("--from-scratch", action="store_true", help="random initialisation, no weights loaded")
    objective = parser.add_argument_group("objective")
    objective.add_argument(
        "--mode",
        choices=MODES,
        default=defaults.mode,
        help="what trains: projection (the new projection only; recognition stays bit-identical), last-k "
        "(also the last --unlock-blocks vision blocks), full (everything)",
    )
    objective.add_argument("--unlock-blocks", type=int, default=defaults.unlock_blocks, help="k for --mode last-k")
    objective.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=defaults.objective,
        help="'clip': the plain CLIP loss alone (pretraining)",
    )
    objective.add_argument(
        "--rec-weight", type=float, help="λ of the recognition term (default 1; 0 in projection mode)"
    )
    objective.add_argument("--dino", help="timm name, Hugging Face id/folder or tiny-DINO path; 'none': all patches")
    objective.add_argument("--dino-checkpoint", help="weights file for a timm --dino name")
    objective.add_argument("--tau", type=float, default=defaults.tau, help="DINO attention mass kept")
    objective.add_argument("--mask-cache", help="folder of cached masks (keyed by image content)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per rank")
    optim.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over --train-data")
    optim.add_argument("--lr", type=float, default=defaults.lr, help="AdamW peak learning rate (cosine schedule)")
    optim.add_argument("--wd", type=float, default=defaults.wd, help="AdamW weight decay")
    optim.add_argument("--beta1", type=float, default=defaults.beta1, help="AdamW beta1")
    optim.add_argument("--beta2", type=float, default=defaults.beta2, help="AdamW beta2")
    optim.add_argument("--eps", type=float, default=defaults.eps, help="AdamW epsilon")
    optim.add_argument("--warmup", type=int, default=defaults.warmup, help="linear warm-up steps")
    optim.add_argument("--grad-clip-norm", type=float, help="clip the gradient norm to this (default: no clipping)")
    optim.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=defaults.precision,
        help="%(choices)s; auto: bf16 autocast on GPUs that support it, else fp16 with a GradScaler, fp32 on CPU",
    )
    optim.add_argument("--seed", type=int, default=defaults.seed, help="seed of every random number generator")
    optim.add_argument(
        "--device", default=defaults.device, help=DEVICE_HELP + ", or auto: each rank's GPU when there is one, else cpu"
    )
    _add_output_arguments(parser, defaults)
    return parser


def _add_output_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", default=defaults.output_dir, help="folder of final.pt, checkpoints/, log.jsonl")
    output.add_argument("--log-every", type=int, default=defaults.log_every, help="log period (steps)")
    output.add_argument("--save-every", type=int, default=defaults.save_every, help="checkpoint period (steps)")
    output.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        help="continue from output_dir/checkpoints/latest.pt (if any) or from PATH",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``captum-iclip train``: parse ``argv``, train, return the exit status."""
    argv, debug = split_debug(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def run() -> int:
        stats = with_option_names(lambda: train(TrainConfig(**vars(args))))
        if int(os.environ.get("RANK", "0")) == 0:
            print(json_text(stats, indent=2))
        return 0

    return run_command("captum-iclip train", run, debug or None)
