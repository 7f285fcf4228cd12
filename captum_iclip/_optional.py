"""Dependencies that only one command needs, installed with an extra (``pip install "captum-iclip[EXTRA]"``)."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {
    "webdataset": "train",  # ICLIP training on webdataset shards, world export to shards
    "pycocotools": "coco",  # the COCO readers
}


def require(module: str, feature: str) -> ModuleType:
    """Import ``module``, or fail with the command that installs it.

    Args:
        module: a module of :data:`EXTRAS` (or a submodule of one, e.g. ``"pycocotools.coco"``).
        feature: what needs it, for the message (e.g. ``"--dataset coco"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        extra = EXTRAS[module.split(".")[0]]
        raise ImportError(
            f"{feature}: expected the optional dependency {module.split('.')[0]!r}, got none installed; "
            f'install it with pip install "captum-iclip[{extra}]"'
        ) from error
