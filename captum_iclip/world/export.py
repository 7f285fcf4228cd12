"""Write world scenes to disk in open_clip and Pascal VOC 2012 layouts.

Two exporters:

* ``export_image_text`` writes an image-text training set that open_clip's
  training script reads directly: ``images/*.png`` plus a tab-separated
  ``train.csv`` (columns ``filepath`` and ``title``; use ``--csv-img-key
  filepath --csv-caption-key title``, the tab separator is open_clip's default)
  and/or webdataset shards ``shards/shard-NNNNNN.tar`` holding ``KEY.png`` and
  ``KEY.txt``. CSV paths are relative to the CSV's folder; open_clip opens them
  relative to the working directory, so launch training from ``out_dir`` (or
  pass ``absolute_paths=True``).
* ``export_voc`` writes a segmentation split laid out exactly like VOC 2012
  (``JPEGImages``, palette ``SegmentationClass`` PNGs with the VOC colour map,
  ``ImageSets/Segmentation/<split>.txt``) plus ``class_names.txt`` and
  ``captions.json``.

Every file is written to a hidden temporary name in its final folder and moved
into place with ``os.replace``, so an interrupted export never leaves a
truncated file under a final name.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from captum_iclip._io import atomic_write, atomic_write_bytes, atomic_write_text, json_text
from captum_iclip.world.generator import HELDOUT_SEED_START, TRAIN_SEED_START, class_names, generate_scene

__all__ = ["export_image_text", "export_voc", "sample_name", "voc_colormap"]

PathLike = str | os.PathLike
_TEXT_FORMATS = ("csv", "wds")


def voc_colormap(num_colours: int = 256) -> np.ndarray:
    """The Pascal VOC label colour map.

    Class ``i`` gets the colour whose bits are the bits of ``i`` spread over
    the three channels, most significant first (so 1 is dark red, 255 the
    ignore colour ``(224, 224, 192)``).

    Args:
        num_colours: Number of entries, at most 256.

    Returns:
        ``(num_colours, 3)`` uint8 array.

    Examples:
        >>> voc_colormap()[[0, 1, 15, 255]].tolist()
        [[0, 0, 0], [128, 0, 0], [192, 128, 128], [224, 224, 192]]
    """
    if not 1 <= num_colours <= 256:
        raise ValueError(f"num_colours: expected in [1, 256], got {num_colours}")
    index = np.arange(num_colours)
    colours = np.zeros((num_colours, 3), np.int64)
    for shift in range(8):
        for channel in range(3):
            bit = (index >> (3 * shift + channel)) & 1
            colours[:, channel] |= bit << (7 - shift)
    return colours.astype(np.uint8)


def sample_name(seed: int) -> str:
    """File stem (and webdataset key) of the scene with this seed, e.g. ``world_00000042``."""
    return f"world_{seed:08d}"


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _seeds(seed: int, n: int, desc: str) -> Iterable[int]:
    return tqdm(range(seed, seed + n), desc=desc, unit="scene", total=n)


def export_image_text(
    out_dir: PathLike,
    n: int,
    *,
    seed: int = TRAIN_SEED_START,
    size: int = 96,
    formats: tuple[str, ...] = _TEXT_FORMATS,
    shard_size: int = 1000,
    absolute_paths: bool = False,
) -> dict:
    """Export ``n`` scenes as an open_clip image-text training set.

    Args:
        out_dir: Output folder, created if missing.
        n: Number of scenes; scene ``i`` has seed ``seed + i``.
        seed: First seed (train seeds start at 0).
        size: Image side in pixels.
        formats: Any of ``"csv"`` (``images/*.png`` + ``train.csv``) and
            ``"wds"`` (``shards/shard-NNNNNN.tar``).
        shard_size: Samples per webdataset shard.
        absolute_paths: Write absolute image paths in ``train.csv`` instead of
            paths relative to ``out_dir``.

    Returns:
        A dict with ``num_samples``, ``csv`` (path or ``None``), ``shards``
        (list of paths) and ``wds_url`` (brace pattern for open_clip's
        ``--train-data``, or ``None``).

    Examples:
        >>> info = export_image_text("/tmp/world_text", 8, formats=("wds",))  # doctest: +SKIP
        >>> info["wds_url"]  # doctest: +SKIP
        '/tmp/world_text/shards/shard-{000000..000000}.tar'
    """
    n = _check_count("n", n, 0)
    seed = _check_count("seed", seed, 0)
    shard_size = _check_count("shard_size", shard_size, 1)
    if isinstance(formats, str):
        raise TypeError(f"formats: expected a sequence of format names, got the string {formats!r}")
    unknown = set(formats) - set(_TEXT_FORMATS)
    if unknown or not formats:
        raise ValueError(f"formats: expected a non-empty subset of {_TEXT_FORMATS}, got {tuple(formats)!r}")
    out = Path(out_dir)
    image_dir, shard_dir = out / "images", out / "shards"
    if "csv" in formats:
        image_dir.mkdir(parents=True, exist_ok=True)
    if "wds" in formats:
        shard_dir.mkdir(parents=True, exist_ok=True)

    shards: list[Path] = []
    writer = _shard_writer(shard_dir, shard_size, shards) if "wds" in formats and n > 0 else None
    rows: list[tuple[str, str]] = []
    try:
        for scene_seed in _seeds(seed, n, "export image-text"):
            scene = generate_scene(scene_seed, size)
            key = sample_name(scene_seed)
            png = _png_bytes(scene.pil())
            if writer is not None:
                writer.write({"__key__": key, "png": png, "txt": scene.caption})
            if "csv" in formats:
                image_path = image_dir / f"{key}.png"
                atomic_write_bytes(image_path, png)
                listed_path = image_path.resolve() if absolute_paths else image_path.relative_to(out)
                rows.append((listed_path.as_posix(), scene.caption))
    except BaseException:
        if writer is not None:
            # Close the open shard without publishing it, then drop it.
            unfinished = writer.fname
            writer.post = None
            writer.close()
            Path(unfinished).unlink(missing_ok=True)
        raise
    if writer is not None:
        writer.close()

    csv_path = _write_csv(out / "train.csv", rows) if "csv" in formats else None
    wds_url = None
    if shards:
        wds_url = str(shard_dir / f"shard-{{{0:06d}..{len(shards) - 1:06d}}}.tar")
    return {"num_samples": n, "csv": csv_path, "shards": shards, "wds_url": wds_url}


def _shard_writer(shard_dir: Path, shard_size: int, shards: list[Path]):
    """A webdataset ``ShardWriter`` whose shards appear under their final name only when complete."""
    from captum_iclip._optional import require

    def publish_shard(partial: str) -> None:
        # ".shard-000000.tar.partial" -> "shard-000000.tar"
        final = Path(partial).with_name(Path(partial).name[1 : -len(".partial")])
        os.replace(partial, final)
        shards.append(final)

    return require("webdataset", "world export to webdataset shards").ShardWriter(
        str(shard_dir / ".shard-%06d.tar.partial"), maxcount=shard_size, post=publish_shard, verbose=0
    )


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    """open_clip's tab-separated ``filepath``/``title`` table, written atomically."""
    text = io.StringIO()
    table = csv.writer(text, delimiter="\t", lineterminator="\n")
    table.writerow(("filepath", "title"))
    table.writerows(rows)
    atomic_write_text(path, text.getvalue())
    return path


def export_voc(
    root: PathLike,
    n: int,
    *,
    seed: int = HELDOUT_SEED_START,
    size: int = 96,
    split: str = "val",
) -> Path:
    """Export ``n`` scenes as a Pascal VOC 2012-style segmentation split.

    Writes ``JPEGImages/NAME.jpg`` (quality 95),
    ``SegmentationClass/NAME.png`` (mode ``"P"``, VOC colour map, index =
    class id, 255 = ignore), ``ImageSets/Segmentation/<split>.txt``,
    ``class_names.txt`` (line ``i`` names class ``i``, background first) and
    ``captions.json`` (name -> caption).

    Args:
        root: Dataset root, created if missing.
        n: Number of scenes; scene ``i`` has seed ``seed + i``.
        seed: First seed (held-out seeds start at 10_000_000).
        size: Image side in pixels.
        split: Split name, used for the image-set file.

    Returns:
        The dataset root as a ``Path``.

    Examples:
        >>> root = export_voc("/tmp/world_voc", 4)  # doctest: +SKIP
        >>> (root / "ImageSets/Segmentation/val.txt").read_text().split()[0]  # doctest: +SKIP
        'world_10000000'
    """
    n = _check_count("n", n, 0)
    seed = _check_count("seed", seed, 0)
    if not isinstance(split, str) or not split or os.sep in split or split.startswith("."):
        raise ValueError(f"split: expected a plain file stem such as 'val', got {split!r}")
    root = Path(root)
    jpeg_dir, label_dir, set_dir = root / "JPEGImages", root / "SegmentationClass", root / "ImageSets" / "Segmentation"
    for folder in (jpeg_dir, label_dir, set_dir):
        folder.mkdir(parents=True, exist_ok=True)
    palette = voc_colormap().reshape(-1).tolist()

    names: list[str] = []
    captions: dict[str, str] = {}
    for scene_seed in _seeds(seed, n, f"export VOC {split}"):
        scene = generate_scene(scene_seed, size)
        name = sample_name(scene_seed)
        label = Image.frombytes("P", scene.label.shape[::-1], scene.label.tobytes())
        label.putpalette(palette)
        atomic_write(
            jpeg_dir / f"{name}.jpg", lambda handle, scene=scene: scene.pil().save(handle, format="JPEG", quality=95)
        )
        atomic_write(label_dir / f"{name}.png", lambda handle, label=label: label.save(handle, format="PNG"))
        names.append(name)
        captions[name] = scene.caption

    atomic_write_text(set_dir / f"{split}.txt", "".join(f"{name}\n" for name in names))
    atomic_write_text(root / "class_names.txt", "".join(f"{name}\n" for name in class_names()))
    atomic_write_text(root / "captions.json", json_text(captions, indent=1, sort_keys=True))
    return root
