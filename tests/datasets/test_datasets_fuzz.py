"""Seeded fuzzing of the readers: the dataset readers (VOC, COCO, folder) and the training CSV with one file
damaged at random (truncated, bytes flipped, emptied, replaced, deleted, a BOM, a colour label, a label of the
wrong size or with unknown classes, a broken annotation).

Building the reader and reading every sample either works and gives well-formed samples, or raises
``ValueError`` / ``OSError`` naming the damaged file. The training CSV never raises on a damaged image: it
skips it. Seeds are fixed, so a failure reproduces; the case count keeps the module at a few seconds.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from captum_iclip.datasets import COCOInstances, FolderDataset, VOCSegmentation
from captum_iclip.training.data import CsvImageTextDataset

READER_CASES = 24  # per reader


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _image(rng: np.random.Generator, height: int = 6, width: int = 8) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _label(rng: np.random.Generator, classes: int, height: int = 6, width: int = 8) -> np.ndarray:
    return rng.integers(0, classes, (height, width)).astype(np.uint8)


def make_voc(root: Path, rng: np.random.Generator) -> tuple[Callable[[], Any], list[Path]]:
    voc = root / "VOCdevkit" / "VOC2012"
    files = []
    for stem in ("a", "b"):
        _png(voc / "JPEGImages" / f"{stem}.jpg", _image(rng))
        label = Image.fromarray(_label(rng, 21), mode="P")
        label.putpalette(list(range(256)) * 3)
        (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        label.save(voc / "SegmentationClass" / f"{stem}.png")
        files += [voc / "JPEGImages" / f"{stem}.jpg", voc / "SegmentationClass" / f"{stem}.png"]
    split = voc / "ImageSets" / "Segmentation" / "val.txt"
    split.parent.mkdir(parents=True)
    split.write_text("a\nb\n")
    return lambda: VOCSegmentation(root), [split] + files


def make_folder(root: Path, rng: np.random.Generator) -> tuple[Callable[[], Any], list[Path]]:
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("background\ncircle\nsquare\n")
    files = [root / "classes.txt"]
    for stem in ("a", "b"):
        _png(root / "images" / f"{stem}.png", _image(rng))
        _png(root / "masks" / f"{stem}.png", _label(rng, 3))
        files += [root / "images" / f"{stem}.png", root / "masks" / f"{stem}.png"]
    return lambda: FolderDataset(root), files


def make_coco(root: Path, rng: np.random.Generator) -> tuple[Callable[[], Any], list[Path]]:
    images, annotations = [], []
    files = []
    for image_id in (1, 2):
        name = f"{image_id:012d}.jpg"
        _png(root / "val2017" / name, _image(rng))
        files.append(root / "val2017" / name)
        images.append({"id": image_id, "file_name": name, "height": 6, "width": 8})
        annotations.append(
            {
                "id": image_id,
                "image_id": image_id,
                "category_id": 3,
                "iscrowd": 0,
                "area": 12.0,
                "bbox": [1, 1, 4, 3],
                "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]],
            }
        )
    path = root / "annotations" / "instances_val2017.json"
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 3, "name": "car", "supercategory": "vehicle"}],
            }
        )
    )
    return lambda: COCOInstances(root), [path] + files


READERS = {"voc": make_voc, "folder": make_folder, "coco": make_coco}


def damage(path: Path, rng: random.Random) -> str:
    """Damage one file at random; returns what was done."""
    data = path.read_bytes()
    kinds = ["truncate", "flip bytes", "empty", "random bytes", "delete", "bom"]
    if path.suffix == ".png":
        kinds += ["colour image", "wrong size", "sixteen bit", "values 200"]
    if path.suffix == ".json":
        kinds += ["drop a field", "wrong type"]
    kind = rng.choice(kinds)
    if kind == "truncate":
        path.write_bytes(data[: rng.randrange(1, max(2, len(data) - 1))])
    elif kind == "flip bytes":
        mutable = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            mutable[rng.randrange(len(mutable))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(mutable))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random bytes":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))))
    elif kind == "delete":
        path.unlink()
    elif kind == "bom":
        path.write_bytes(b"\xef\xbb\xbf" + data)
    elif kind == "colour image":
        Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(path)
    elif kind == "wrong size":
        Image.fromarray(np.zeros((5, 8), dtype=np.uint8)).save(path)
    elif kind == "sixteen bit":
        Image.fromarray(np.full((6, 8), 1000, dtype=np.uint16)).save(path)
    elif kind == "values 200":
        Image.fromarray(np.full((6, 8), 200, dtype=np.uint8)).save(path)
    elif kind == "drop a field":
        content = json.loads(data)
        section = rng.choice(["images", "annotations"])
        entry = content[section][0]
        entry.pop(rng.choice(sorted(entry)))
        path.write_text(json.dumps(content))
    elif kind == "wrong type":
        content = json.loads(data)
        content["annotations"][0]["segmentation"] = "not a polygon"
        path.write_text(json.dumps(content))
    return kind


def check_sample(dataset, index: int) -> None:
    image, label, name = dataset[index]
    assert image.mode == "RGB" and isinstance(name, str)
    assert label.dtype == np.int64 and label.shape == (image.height, image.width)
    assert (((label >= 0) & (label < dataset.num_classes)) | (label == 255)).all()


@pytest.mark.parametrize("reader", sorted(READERS))
def test_readers_with_a_damaged_file_read_well_or_name_it(tmp_path, reader):
    rng = random.Random(sum(map(ord, reader)))
    seen = {"read": 0, "refused": 0}
    for case in range(READER_CASES):
        root = tmp_path / f"{reader}-{case}"
        build, files = READERS[reader](root, np.random.default_rng(case))
        victim = (
            files[0] if case % 3 == 0 else rng.choice(files[1:])
        )  # files[0]: the index (split, classes, annotations)
        kind = damage(victim, rng)
        label = f"{reader} case {case}: {kind} {victim.relative_to(root)}"
        try:
            dataset = build()
            for index in range(len(dataset)):
                check_sample(dataset, index)
        except (ValueError, OSError) as error:
            assert victim.name in str(error), f"{label}: the error does not name the file: {error!r}"
            seen["refused"] += 1
        else:
            seen["read"] += 1
        shutil.rmtree(root)
    assert seen["refused"] > 0, seen


def test_training_csv_skips_damaged_images_and_names_a_damaged_table(tmp_path):
    rng = random.Random(7)

    def preprocess(image):
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)

    for case in range(8):
        root = tmp_path / f"csv-{case}"
        generator = np.random.default_rng(case)
        for stem in ("a", "b", "c"):
            _png(root / "images" / f"{stem}.png", _image(generator))
        table = root / "train.csv"
        table.write_text("filepath\ttitle\n" + "".join(f"images/{s}.png\t{s} shape\n" for s in "abc"))
        victim = rng.choice([table, root / "images" / "a.png", root / "images" / "b.png"])
        kind = damage(victim, rng)
        label = f"case {case}: {kind} {victim.name}"
        try:
            dataset = CsvImageTextDataset(table, preprocess)
        except ValueError as error:
            assert victim == table and (table.name in str(error) or "csv_" in str(error)), f"{label}: {error!r}"
            continue
        for index in range(len(dataset)):
            sample = dataset[index]  # never raises: an unreadable image is skipped (None) and counted
            if sample is not None:
                image, caption = sample
                assert image.shape[0] == 3 and image.dtype == torch.uint8 and isinstance(caption, str), label
