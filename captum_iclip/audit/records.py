"""What an audit stores per image, and how it finds, keys and measures images.

Every audited image leaves one small JSON record in ``out/records/``. Its name is
the image's *key*: a readable slug of the file name plus a digest of the file's
bytes and of the audit settings (model weights, prompts, methods, top-k, mask
source, preprocessing). A rerun with the same settings finds the record and
skips the image; changing any setting changes every key, so stale results are
never reused. Records are written atomically, after the image files they name,
so a killed run leaves either a complete record or none.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_iclip._io import atomic_write_text, json_text

RECORD_SCHEMA = 2  # 2: records hold the content digest of their file ("content")
RECORDS_DIR = "records"
IMAGES_DIR = "images"
# Files a folder is searched for (a corrupt file with one of these suffixes is reported, not skipped).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def find_images(specs: Sequence[str]) -> list[Path]:
    """Expand folders, glob patterns and file names into a sorted list of files.

    Args:
        specs: each a folder (its image files, recursively, by suffix), a glob
            pattern (``"shots/*.jpg"``, ``"**"`` recurses; every matching file) or a
            file name. Symbolic links with an image suffix are kept even when they
            dangle or loop, so that the audit reports them as unreadable.

    Returns:
        The files, without duplicates, sorted by path.

    Raises:
        ValueError: ``specs`` is empty, a pattern matches no file, or a name is
            neither a file nor a folder (nor a link).

    Examples::

        >>> find_images(["photos/"])            # doctest: +SKIP
        [PosixPath('photos/a.png'), PosixPath('photos/b.jpg')]
    """
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    if not specs:
        raise ValueError(f"images: expected at least one folder, glob pattern or file, got {specs!r}")
    found = set()
    for spec in specs:
        spec = str(spec)
        if os.path.isdir(spec):
            found.update(
                p
                for p in Path(spec).rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or p.is_symlink())
            )
        elif glob.has_magic(spec):
            matches = [Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p) or os.path.islink(p)]
            if not matches:
                raise ValueError(
                    f"images: expected a glob pattern that matches files, got {spec!r}, which matches none"
                )
            found.update(matches)
        elif os.path.lexists(spec):
            found.add(Path(spec))
        else:
            raise ValueError(f"images: expected an existing file or folder, got {spec} (nothing there)")
    return sorted(found)


def skipped_files(specs: Sequence[str]) -> list[Path]:
    """The files of the folders in ``specs`` that :func:`find_images` leaves out (no image suffix), sorted."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    skipped = set()
    for spec in specs:
        if os.path.isdir(str(spec)):
            skipped.update(p for p in Path(spec).rglob("*") if p.suffix.lower() not in IMAGE_SUFFIXES and p.is_file())
    return sorted(skipped)


def is_inside(path: Path, folder: Path) -> bool:
    """Whether the file ``path`` lies in ``folder`` (an absolute, resolved path), following the links
    of its folders but not of the file itself (which may dangle or loop)."""
    try:
        parent = Path(os.path.abspath(path)).parent.resolve()
    except (OSError, RuntimeError):  # a loop in the folders above the file
        return False
    return parent == folder or folder in parent.parents


def source_unchanged(record: dict[str, Any]) -> bool:
    """Whether the file a record was made from still exists with the same bytes."""
    try:
        return record.get("content") is not None and hash_file(Path(record["source"])) == record["content"]
    except (OSError, KeyError, TypeError):
        return False


def hash_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks (raises ``OSError`` if it cannot be read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_module(module: nn.Module) -> str:
    """SHA-256 of a module's class, parameter and buffer names and bytes (e.g. a model's weights)."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def settings_digest(settings: dict[str, Any]) -> str:
    """A short digest of the JSON-serialisable audit settings."""
    return hashlib.sha256(json_text(settings, sort_keys=True).encode()).hexdigest()[:16]


def image_key(path: Path, content: str, settings: str) -> str:
    """The record name of the file ``path`` with content digest ``content`` under ``settings``.

    The digest covers the content and the settings only; the slug of the file
    name is there for people browsing ``records/`` and ``images/``.
    """
    digest = hashlib.sha256(f"{content}|{settings}".encode()).hexdigest()[:20]
    return f"{slug(path.stem)[:40]}-{digest}"


def slug(text: str) -> str:
    """``text`` reduced to letters, digits, ``_`` and ``-`` (safe in file names and URLs)."""
    return _SLUG_UNSAFE.sub("_", text).strip("_") or "x"


def record_path(out_dir: Path, key: str) -> Path:
    return out_dir / RECORDS_DIR / f"{key}.json"


def write_record(out_dir: Path, record: dict[str, Any]) -> Path:
    """Store ``record`` atomically as ``out_dir/records/<key>.json``."""
    return atomic_write_text(record_path(out_dir, record["key"]), json_text(record, indent=1) + "\n")


def _files_of(record: dict[str, Any]) -> Iterable[Any]:
    if record.get("thumbnail"):
        yield record["thumbnail"]
    for entry in record.get("top", []):
        for cell in entry["maps"].values():
            yield cell["overlay"]


def is_report_file(out_dir: Path, name: Any) -> bool:
    """Whether ``name`` (read from a record) is the relative name of an existing file in ``out_dir/images``.

    A record is data that may have been edited or copied from elsewhere: a name that is absolute, holds
    ``..`` or a backslash, or leads (through links) out of the report folder is refused, so that the
    report never links to (or reuses) a file outside it.
    """
    if not isinstance(name, str) or "\\" in name or not name.startswith(f"{IMAGES_DIR}/"):
        return False
    parts = Path(name).parts
    if Path(name).is_absolute() or any(part in ("..", ".") for part in parts) or len(parts) < 2:
        return False
    target = out_dir / name
    try:
        return target.is_file() and is_inside(target.resolve(), (out_dir / IMAGES_DIR).resolve())
    except (OSError, RuntimeError):
        return False


def load_record(out_dir: Path, key: str) -> dict[str, Any] | None:
    """The stored record of ``key``, or ``None`` (recompute it) if absent, unreadable, malformed, or naming an
    image that is missing or not a file of the report's ``images`` folder (:func:`is_report_file`)."""
    try:
        record = json.loads(record_path(out_dir, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("schema") != RECORD_SCHEMA or record.get("key") != key:
        return None
    try:
        if not all(is_report_file(out_dir, name) for name in _files_of(record)):
            return None
    except (AttributeError, KeyError, TypeError):  # a "top" or "maps" entry of another shape
        return None
    return record


def load_records(out_dir: Path, settings: str) -> list[dict[str, Any]]:
    """Every valid record in ``out_dir/records`` made under ``settings``, sorted by file name."""
    records = []
    for path in sorted((out_dir / RECORDS_DIR).glob("*.json")):
        record = load_record(out_dir, path.stem)
        if record is not None and record.get("settings") == settings:
            records.append(record)
    return sorted(records, key=lambda r: (r["name"].lower(), r["source"]))


def count_foreign_records(out_dir: Path, settings: str) -> int:
    """Records in ``out_dir/records`` from other settings (shown as a note, never mixed in)."""
    count = 0
    for path in (out_dir / RECORDS_DIR).glob("*.json"):
        try:
            count += json.loads(path.read_text()).get("settings") != settings
        except (OSError, ValueError, AttributeError):
            count += 1
    return count


def background_fraction(maps: Tensor, foreground: Tensor) -> Tensor:
    """Share of each map's mass that lies outside the foreground.

    The map is min-max normalised to [0, 1] first (as it is drawn), so its mass
    is ``sum(m)`` with ``m = (map - min) / (max - min)``; the foreground mask,
    given on the patch grid, is upsampled to the map with nearest neighbours
    (each patch covers its own pixels). The result is
    ``sum(m * background) / sum(m)``.

    Args:
        maps: (N, 1, H, W) or (N, H, W) attribution maps.
        foreground: (N, h, w) boolean masks on the patch grid.

    Returns:
        (N,) float64 fractions in [0, 1]; NaN for a constant map (no mass).

    Examples::

        >>> maps = torch.zeros(1, 1, 4, 4); maps[..., 2:] = 1.0   # mass in the right half
        >>> left = torch.tensor([[[True, False], [True, False]]])
        >>> background_fraction(maps, left)
        tensor([1.], dtype=torch.float64)
    """
    if maps.dim() == 4:
        if maps.shape[1] != 1:
            raise ValueError(f"maps: expected one map per image (N, 1, H, W), got shape {tuple(maps.shape)}")
        maps = maps[:, 0]
    if maps.dim() != 3:
        raise ValueError(f"maps: expected (N, 1, H, W) or (N, H, W), got shape {tuple(maps.shape)}")
    if foreground.dim() != 3 or foreground.shape[0] != maps.shape[0]:
        raise ValueError(f"foreground: expected ({maps.shape[0]}, h, w) masks, got shape {tuple(foreground.shape)}")
    maps = maps.detach().float()
    mass = maps - maps.flatten(1).min(dim=1).values[:, None, None]
    (height, width), (rows, cols) = maps.shape[-2:], foreground.shape[-2:]
    if height % rows == 0 and width % cols == 0:
        # Nearest upsampling by an integer factor: sum the mass over each patch's pixels instead.
        mass = mass.reshape(-1, rows, height // rows, cols, width // cols).sum(dim=(2, 4))
        background = ~foreground.to(device=mass.device, dtype=torch.bool)
    else:
        background = F.interpolate((~foreground.bool())[:, None].float(), size=(height, width), mode="nearest")[:, 0]
        background = background.to(mass.device) > 0.5
    mass = mass.flatten(1).to(torch.float64)
    total = mass.sum(dim=1)
    outside = (mass * background.flatten(1)).sum(dim=1)
    # The min-max span cancels in the ratio; constant maps have no mass to place.
    return torch.where(total > 0, outside / total.clamp_min(torch.finfo(torch.float64).tiny), torch.nan)
