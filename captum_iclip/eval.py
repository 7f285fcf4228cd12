"""``python -m captum_iclip.eval``: the evaluation command (``captum-iclip eval``), ready for ``torchrun``.

Examples::

    python -m captum_iclip.eval --dataset world --root heldout --limit 48 --method raw,surgery,mmp
    torchrun --nproc-per-node 4 -m captum_iclip.eval --dataset voc --root VOCdevkit --method raw,mmp

The command line is :mod:`captum_iclip.cli.eval`; what it measures, :mod:`captum_iclip.evaluation.run`.
"""

from __future__ import annotations

import sys

from captum_iclip.cli.eval import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
