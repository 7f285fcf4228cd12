"""Atomic file writes: a killed run never leaves a half-written file under the final name."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Union

import torch

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[IO], Any], mode: str = "wb") -> Path:
    """Call ``write`` on a hidden temporary file in ``path``'s folder, then ``os.replace`` it into place.

    Args:
        path: the final file name (its folder is created).
        write: writes the content to the open file it is given.
        mode: ``"wb"`` or ``"w"`` (text, UTF-8).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    # mkstemp creates the file private (0600); give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            write(handle)
        # Renaming is atomic: a killed process leaves the old file or the new one, never a
        # truncated one. (No fsync: durability across power loss is not the goal, and it
        # costs milliseconds per file in reports that write thousands.)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text), mode="w")


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` made atomic."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))
