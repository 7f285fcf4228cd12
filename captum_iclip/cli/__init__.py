"""The ``captum-iclip`` command.

Subcommands: ``explain`` (attribute images against prompts and draw the maps),
``demo`` (the main job on the bundled offline models), ``train`` (ICLIP training),
``eval`` (benchmarks), ``world`` (the procedural world's exports), ``audit`` (HTML
audit reports) and ``diagnose`` (why a model's maps prefer the background). Each
lives in its own module of this package; this one only dispatches.
"""

from __future__ import annotations

import argparse
import importlib

from captum_iclip.cli import common, demo, explain
from captum_iclip.cli.common import HelpFormatter, run_command, split_debug

# Subcommands with a parser of their own: name -> module with main(argv), imported when the command runs
# (``captum-iclip explain`` does not pay for the trainer's imports).
DELEGATED = {
    "train": "captum_iclip.cli.train",
    "eval": "captum_iclip.cli.eval",
    "world": "captum_iclip.cli.world",
    "audit": "captum_iclip.cli.audit",
    "diagnose": "captum_iclip.cli.diagnose",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captum-iclip",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
        epilog="Errors are one line with exit status 2; --debug (anywhere on the command line) shows their traceback.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    explain.add_parser(sub)
    demo.add_parser(sub)
    for name in DELEGATED:
        sub.add_parser(name, help=f"see captum-iclip {name} --help", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv, debug = split_debug(argv)
    previous, common.DEBUG = common.DEBUG, debug or common.DEBUG
    try:
        if argv and argv[0] in DELEGATED:
            module = importlib.import_module(DELEGATED[argv[0]])
            return run_command(f"captum-iclip {argv[0]}", lambda: module.main(argv[1:]))
        args = build_parser().parse_args(argv)
        return run_command(f"captum-iclip {args.command}", lambda: args.func(args))
    finally:
        common.DEBUG = previous
