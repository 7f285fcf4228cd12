"""Seeded fuzzing: every odd input gets a clear error or a correct result, never a silently wrong one.

* prompts and templates of ``CLIPSimilarity`` (strings, tuples, unicode,
  overlong texts, callables; single strings, empty lists, non-strings);
* ``attribute()`` of ITSM (raw, surgery) and masked max pooling on a tiny random
  dual-projection ViT, with random image batches (dtype, rank, channels, size,
  batch, non-finite values, tuples), targets (ints, floats, booleans, lists,
  tensors, NumPy values, strings) and MMP masks (boolean, 0/1, fractional, NaN,
  wrong grids and counts). An oracle that knows which forms are valid decides:
  a valid case must return exactly the reference map (computed once on the
  canonical input, by another path); an invalid one must raise ``ValueError`` or
  ``TypeError`` whose message names an argument that was invalid.
* The dataset readers (VOC, COCO, folder) and the training CSV with one file
  damaged at random (truncated, bytes flipped, emptied, replaced, deleted, a BOM,
  a colour label, a label of the wrong size or with unknown classes, a broken
  annotation): building the reader and reading every sample either works and
  gives well-formed samples, or raises ``ValueError`` / ``OSError`` naming the
  damaged file. The training CSV never raises on a damaged image: it skips it.

Seeds are fixed, so a failure reproduces; the case count keeps the module at a few seconds.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_images
from PIL import Image

from captum_iclip import CLIPSimilarity, DualProjectionCLIP, ITSMAttribution, MaskedMaxPoolingAttribution
from captum_iclip.datasets import COCOInstances, FolderDataset, VOCSegmentation
from captum_iclip.training.data import CsvImageTextDataset

Tensor = torch.Tensor

PROMPTS = ["a cat", "a dog", "a car"]
N, SIZE, GRID = 2, 8, 2  # tiny_vit: 8-px images, 4-px patches
ATTRIBUTE_CASES = 300
READER_CASES = 24  # per reader


# ============================================================================ attribute()
@dataclass
class Part:
    """One argument of a case: its value, whether it is valid, and what it means when it is."""

    value: Any
    valid: bool
    meaning: Any = None


def image_part(rng: random.Random, base: Tensor) -> tuple[str, Part]:
    kinds = {
        "batch": lambda: Part(base, True, slice(None)),
        "first image": lambda: Part(base[:1], True, slice(0, 1)),
        "tuple": lambda: Part((base,), True, slice(None)),
        "pair of tensors": lambda: Part((base, base), False),
        "float64": lambda: Part(base.double(), False),
        "float16": lambda: Part(base.half(), False),
        "uint8": lambda: Part((base * 40 + 128).clamp(0, 255).to(torch.uint8), False),
        "int64": lambda: Part(base.long(), False),
        "rank 3": lambda: Part(base[0], False),
        "rank 5": lambda: Part(base[None], False),
        "1 channel": lambda: Part(base[:, :1], False),
        "4 channels": lambda: Part(torch.cat([base, base[:, :1]], 1), False),
        "size 6x8": lambda: Part(base[..., :6, :], False),
        "empty batch": lambda: Part(base[:0], False),
        "NaN pixel": lambda: Part(
            base.clone().index_put_((torch.tensor(0), torch.tensor(1)), torch.tensor(float("nan"))), False
        ),
        "inf pixel": lambda: Part(torch.where(base > 2, torch.inf, base), bool((base <= 2).all()), slice(None)),
        "numpy": lambda: Part(base.numpy(), False),
        "list": lambda: Part(base.tolist(), False),
    }
    # Valid forms half of the time, so that both outcomes are exercised.
    name = rng.choice(["batch", "first image", "tuple"]) if rng.random() < 0.5 else rng.choice(list(kinds))
    return name, kinds[name]()


def target_part(rng: random.Random, batch: int) -> tuple[str, Part]:
    index = [rng.randrange(3) for _ in range(batch)]
    kinds = {
        "None": lambda: Part(None, True, None),
        "int": lambda: Part(index[0], True, [index[0]] * batch),
        "numpy int": lambda: Part(np.int64(index[0]), True, [index[0]] * batch),
        "0-d tensor": lambda: Part(torch.tensor(index[0]), True, [index[0]] * batch),
        "list": lambda: Part(list(index), True, index),
        "1-d tensor": lambda: Part(torch.tensor(index), True, index),
        "numpy array": lambda: Part(np.array(index), True, index),
        "int out of range": lambda: Part(3, False),
        "negative int": lambda: Part(-1, False),
        "list too long": lambda: Part(index + [0], False),
        "list out of range": lambda: Part([5] * batch, False),
        "float": lambda: Part(index[0] + 0.5, False),
        "whole float": lambda: Part(float(index[0]), False),
        "float tensor": lambda: Part(torch.tensor(index, dtype=torch.float32), False),
        "bool": lambda: Part(True, False),
        "string": lambda: Part("0", False),
        "tuple": lambda: Part((0, 1), False),
        "list of floats": lambda: Part([float(i) for i in index], False),
    }
    name = rng.choice(list(kinds)[:7]) if rng.random() < 0.5 else rng.choice(list(kinds))
    return name, kinds[name]()


def mask_part(rng: random.Random, batch: int) -> tuple[str, Part]:
    bits = torch.tensor([[rng.random() < 0.5 for _ in range(GRID * GRID)] for _ in range(batch)])
    grid = bits.reshape(batch, GRID, GRID)
    everything = torch.ones(batch, GRID * GRID, dtype=torch.bool)
    kinds = {
        "None": lambda: Part(None, True, everything),
        "bool grid": lambda: Part(grid, True, bits | ~bits.any(1, keepdim=True)),
        "0/1 floats": lambda: Part(grid.float(), True, bits | ~bits.any(1, keepdim=True)),
        "0/1 ints": lambda: Part(grid.long(), True, bits | ~bits.any(1, keepdim=True)),
        "flat bool": lambda: Part(bits, True, bits | ~bits.any(1, keepdim=True)),
        "one for all": lambda: Part(grid[:1], True, (bits[:1] | ~bits[:1].any(1, keepdim=True)).expand(batch, -1)),
        "all false": lambda: Part(torch.zeros_like(grid), True, everything),
        "fractions": lambda: Part(grid.float() * 0.5, bool(not bits.any()), everything),
        "NaN": lambda: Part(torch.full((batch, GRID, GRID), float("nan")), False),
        "wrong grid": lambda: Part(torch.ones(batch, GRID + 1, GRID + 1, dtype=torch.bool), False),
        "wrong count": lambda: Part(torch.ones(batch, GRID * GRID + 1, dtype=torch.bool), False),
        "wrong batch": lambda: Part(torch.ones(batch + 1, GRID, GRID, dtype=torch.bool), False),
        "rank 4": lambda: Part(grid[:, None], False),
        "numbers 2": lambda: Part(grid.long() * 2, bool(not bits.any()), everything),
    }
    name = rng.choice(list(kinds)[:7]) if rng.random() < 0.5 else rng.choice(list(kinds))
    return name, kinds[name]()


@pytest.fixture(scope="module")
def fuzz_sim(tiny_vit, tiny_tokenizer) -> CLIPSimilarity:
    return CLIPSimilarity(DualProjectionCLIP(tiny_vit), tiny_tokenizer, PROMPTS)


def test_attribute_gives_a_clear_error_or_the_correct_map(fuzz_sim):
    base = make_images(N, 3, SIZE, SIZE, seed=11)
    itsm, mmp = ITSMAttribution(fuzz_sim), MaskedMaxPoolingAttribution(fuzz_sim)
    methods = {
        "raw": lambda x, t, m: itsm.attribute(x, target=t),
        "surgery": lambda x, t, m: itsm.attribute(x, target=t, variant="surgery"),
        "mmp": lambda x, t, m: mmp.attribute(x, target=t, mask=m),
    }
    # References, by another path: every prompt at once on the canonical batch; for MMP, a provider per mask.
    reference = {name: methods[name](base, None, None) for name in ("raw", "surgery")}

    def expected(method: str, rows: slice, index: list[int] | None, mask: Tensor) -> Tensor:
        if method == "mmp":
            maps = MaskedMaxPoolingAttribution(fuzz_sim, mask_provider=mask).attribute(base[rows], target=None)
        else:
            maps = reference[method][rows]
        if index is None:
            return maps
        return maps[torch.arange(maps.shape[0]), torch.tensor(index)][:, None]

    rng = random.Random(2024)
    outcomes = {"map": 0, "error": 0}
    for case in range(ATTRIBUTE_CASES):
        method = rng.choice(list(methods))
        image_name, images = image_part(rng, base)
        batch = N if not images.valid or images.meaning == slice(None) else 1
        target_name, target = target_part(rng, batch)
        mask_name, mask = mask_part(rng, batch) if method == "mmp" else ("None", Part(None, True, None))
        parts = {"inputs": images, "target": target, "mask": mask}
        label = f"case {case}: {method}, inputs={image_name}, target={target_name}, mask={mask_name}"
        try:
            out = methods[method](images.value, target.value, mask.value)
        except (ValueError, TypeError) as error:
            invalid = [name for name, part in parts.items() if not part.valid]
            assert invalid, f"{label}: valid input refused: {error!r}"
            assert any(name in str(error) for name in invalid), f"{label}: the message names none of {invalid}: {error}"
            outcomes["error"] += 1
            continue
        assert all(part.valid for part in parts.values()), f"{label}: invalid input accepted"
        maps = out[0] if isinstance(images.value, tuple) else out
        assert isinstance(out, tuple) == isinstance(images.value, tuple), label
        want = expected(method, images.meaning, target.meaning, mask.meaning)
        assert maps.shape == want.shape and torch.isfinite(maps).all(), label
        torch.testing.assert_close(maps, want, msg=lambda m, label=label: f"{label}: {m}")
        outcomes["map"] += 1
    assert min(outcomes.values()) > ATTRIBUTE_CASES // 5, outcomes  # both outcomes well exercised


def test_prompts_and_templates_give_a_clear_error_or_the_right_embeddings(tiny_vit, tiny_tokenizer):
    texts = ["a cat", "", "ünïcödé ✓", "a " * 40 + "dog", "x"]
    prompt_forms = {
        "list": lambda r: Part(r.sample(texts, r.randint(1, 3)), True),
        "tuple": lambda r: Part(tuple(r.sample(texts, 2)), True),
        "string": lambda r: Part("a cat", False),
        "empty list": lambda r: Part([], False),
        "with an int": lambda r: Part(["a cat", 3], False),
        "with None": lambda r: Part([None], False),
        "with bytes": lambda r: Part([b"a cat"], False),
    }
    template_forms = {
        "None": lambda r: Part(None, True),
        "list": lambda r: Part(["a photo of {}.", "{}"][: r.randint(1, 2)], True),
        "callable": lambda r: Part([lambda p: f"art of {p}"], True),
        "no placeholder": lambda r: Part(["a photo of"], True),
        "string": lambda r: Part("a photo of {}.", False),
        "empty list": lambda r: Part([], False),
        "with an int": lambda r: Part(["{}", 7], False),
    }
    rng = random.Random(5)
    for case in range(40):
        prompt_name, prompts = rng.choice(list(prompt_forms.items()))
        template_name, templates = rng.choice(list(template_forms.items()))
        prompts, templates = prompts(rng), templates(rng)
        label = f"case {case}: prompts={prompt_name}, templates={template_name}"
        try:
            sim = CLIPSimilarity(tiny_vit, tiny_tokenizer, prompts.value, templates=templates.value)
        except (ValueError, TypeError) as error:
            invalid = [n for n, part in (("prompts", prompts), ("templates", templates)) if not part.valid]
            assert invalid and any(n in str(error) for n in invalid), f"{label}: {error!r}"
            continue
        assert prompts.valid and templates.valid, f"{label}: invalid input accepted"
        # Each row is that prompt's own embedding: prompts embedded one by one give the same rows.
        one_by_one = torch.cat([sim.encode_prompts([p]) for p in prompts.value])
        torch.testing.assert_close(sim.text_features, one_by_one, msg=lambda m, label=label: f"{label}: {m}")
        assert sim.prompts == list(prompts.value)


# ============================================================================ readers
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
