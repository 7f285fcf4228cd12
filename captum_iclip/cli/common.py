"""What every ``captum-iclip`` command shares: the help format, ``--debug`` and one-line errors
(:func:`run_command`), the model options and their loading, the messages about a model's domain."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch


class HelpFormatter(argparse.HelpFormatter):
    """The help of every command: each option's default after its text (unless the text states it), so that
    ``--help`` shows what happens when an option is left out."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            default in (None, False, argparse.SUPPRESS)
            or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            or "default" in text.lower()
        ):
            return text
        if isinstance(default, (list, tuple)):
            shown = " ".join(map(str, default))
        else:
            shown = repr(default) if isinstance(default, str) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


DEVICE_HELP = "torch device to run on: cpu, cuda, cuda:1, mps"


def open_images(paths: Sequence[str]):
    """Open images as RGB with the package's one reader (:func:`captum_iclip._io.read_image`);
    its error names the file that cannot be read."""
    from captum_iclip._io import read_image

    return [read_image(path, "images") for path in paths]


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type when it has none)."""
    text = str(error)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: its last line is the error
        lines = [line for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else text
    text = " ".join(text.split())
    if isinstance(error, KeyError) and error.args:
        text = f"KeyError: {error.args[0]!r}"
    return text or type(error).__name__


# Set by ``captum-iclip --debug`` while its command runs: errors keep their traceback.
DEBUG = False


def split_debug(argv: Sequence[str] | None) -> tuple[list[str], bool]:
    """``argv`` (default ``sys.argv[1:]``) without ``--debug``, and whether it was there."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return [arg for arg in argv if arg != "--debug"], "--debug" in argv


def run_command(prog: str, command: Callable[[], int | None], debug: bool | None = None) -> int:
    """Run a command and turn its errors into one line on stderr and exit status 2.

    Bad input raises ``ValueError``/``TypeError`` naming the argument; unreadable files raise
    ``OSError``; a model or file that torch cannot use raises ``RuntimeError``. Each becomes
    ``"<prog>: error: <message>"`` and status 2, with no traceback (``--debug`` shows it).
    ``SystemExit`` with a message (``"name: expected ..."``) is reported the same way;
    argparse's own exits pass through.
    """
    from captum_iclip.loading.loader import WeightsUnavailableError

    debug = DEBUG if debug is None else debug
    try:
        return int(command() or 0)
    except SystemExit as exit_:
        if not isinstance(exit_.code, str):
            raise
        if debug:
            raise
        message = exit_.code
        if message.startswith(f"{prog}: "):
            message = message[len(prog) + 2 :]
        print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, RuntimeError, KeyError, WeightsUnavailableError) as error:
        if debug:
            raise
        print(f"{prog}: error: {one_line(error)} (--debug shows the traceback)", file=sys.stderr)
        return 2


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options shared by the commands that load a CLIP model (read by :func:`load_model_from_args`)."""
    group = parser.add_argument_group("model (default: the bundled offline model shapes-tiny)")
    group.add_argument(
        "--model",
        default=None,
        help="bundled model name, open_clip model name (ViT-B-16, RN50, ...) or Hugging Face id",
    )
    group.add_argument("--pretrained", default=None, help="open_clip pretrained tag, e.g. openai")
    group.add_argument("--hf-model", default=None, help="Hugging Face CLIP model id or local folder")
    group.add_argument("--checkpoint", default=None, help="local open_clip checkpoint file for --model")
    group.add_argument(
        "--random-weights",
        action="store_true",
        help="explain an open_clip --model with its random initialisation (no weights) on purpose",
    )
    group.add_argument(
        "--model-config",
        default=None,
        help="open_clip model-config JSON to register; its file stem becomes the --model name",
    )
    group.add_argument(
        "--iclip",
        default=None,
        metavar="FILE",
        help="ICLIP training output for this model: final.pt (whole model) or interpretability_head.pt",
    )
    group.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help=DEVICE_HELP + " (default: cuda when torch sees a GPU, else cpu)",
    )


# load's argument names -> the options that set them (errors name what the user typed).
_OPTION_OF = {
    "model_name": "--model",
    "model": "--model",
    "spec": "--model",
    "pretrained": "--pretrained",
    "checkpoint": "--checkpoint",
    "hf_model": "--hf-model",
    "device": "--device",
    "random_weights": "--random-weights",
    "model_config": "--model-config",
    "iclip": "--iclip",
    "dino": "--dino",
    "dino_checkpoint": "--dino-checkpoint",
}


def _with_options(call: Callable):
    """Run ``call``; its errors name the command-line options instead of the loader's arguments."""
    from captum_iclip.loading.loader import WeightsUnavailableError

    try:
        return call()
    except (ValueError, WeightsUnavailableError) as error:
        message = getattr(error, "cli_message", None) or str(error)  # the loader's advice in flags
        for name, option in _OPTION_OF.items():
            if message.startswith(f"{name}:"):
                message = option + message[len(name) :]
        raise type(error)(message) from error


def with_option_names(call: Callable):
    """Run ``call`` (a command's use of :func:`captum_iclip.load`); its errors name the options and give their
    advice in flags (``--checkpoint FILE``), not in the loader's Python arguments."""
    return _with_options(call)


def check_model_arguments(args: argparse.Namespace) -> None:
    """The model options' checks of :func:`load_model_from_args`, for commands that load a bundled
    model themselves: no weights option is ignored, the device exists."""
    from captum_iclip.devices import check_device
    from captum_iclip.loading.loader import check_model_options

    _with_options(
        lambda: (
            check_device(args.device),
            check_model_options(args.model, args.pretrained, args.checkpoint, args.hf_model),
        )
    )


def load_model_from_args(args: argparse.Namespace):
    """:func:`captum_iclip.load` on the options of :func:`add_model_arguments`; errors name the options."""
    from captum_iclip.loading.loader import load

    return _with_options(
        lambda: load(
            args.model,
            args.pretrained,
            hf_model=args.hf_model,
            checkpoint=args.checkpoint,
            model_config=getattr(args, "model_config", None),
            device=args.device,
            random_weights=getattr(args, "random_weights", False),
            iclip=getattr(args, "iclip", None),
        )
    )


def domain_messages(prog: str, loaded, prompts: Sequence[str]) -> list[str]:
    """Say once, on stderr, what a bundled model knows (its ``domain``) and which ``prompts`` lie outside its
    classes; returns the messages (the audit page shows them). Nothing for other models."""
    bundle = getattr(loaded, "bundle", None)
    messages = bundle.domain_messages(list(prompts)) if bundle is not None else []
    if len(messages) > 1:
        messages[-1] += "; pass a CLIP trained on your images (--model NAME --pretrained TAG, or --hf-model ID_OR_DIR)"
    for message in messages:
        print(f"{prog}: {message}", file=sys.stderr)
    return messages


def warn_upscaled(prog: str, paths: Sequence[str], images, side) -> list[str]:
    """Say on stderr which images are smaller than the model's input (they are upscaled to it: their maps
    show the upscaling, not detail the image has); returns the messages."""
    side = min(side) if isinstance(side, (tuple, list)) else int(side)
    messages = [
        f"warning: {path} is {image.width}x{image.height} px, upscaled to the model's {side} px input; its map "
        "has no more detail than the image"
        for path, image in zip(paths, images)
        if min(image.size) < side
    ]
    for message in messages:
        print(f"{prog}: {message}", file=sys.stderr)
    return messages
