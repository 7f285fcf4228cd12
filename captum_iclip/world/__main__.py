"""``python -m captum_iclip.world``: the ``captum-iclip world`` command (see :mod:`captum_iclip.cli.world`)."""

from captum_iclip.cli.common import run_command, split_debug
from captum_iclip.cli.world import main

argv, debug = split_debug(None)
raise SystemExit(run_command("python -m captum_iclip.world", lambda: main(argv), debug or None))
