"""Dataset readers against small fixtures written in the real on-disk formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from captum_iclip.datasets import (
    CITYSCAPES_CLASSES,
    COCO_STUFF_CLASSES,
    CONTEXT59_CLASSES,
    VOC_CLASSES,
    Cityscapes,
    COCOInstances,
    COCOStuff,
    FolderDataset,
    PascalContext59,
    VOCSegmentation,
    build_dataset,
    class_prompt,
)

RNG = np.random.default_rng(0)


def _write_image(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _write_palette_png(path: Path, label: np.ndarray) -> None:
    """A VOC-style label: palette PNG whose colours differ from the indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    palette = RNG.integers(0, 256, 768, dtype=np.uint8).tolist()
    image.putpalette(palette)
    image.save(path)


def _write_grey_png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)


def _voc_label() -> np.ndarray:
    label = np.zeros((6, 8), dtype=np.int64)
    label[1:4, 2:6] = 8  # cat
    label[0, :] = 255  # object border
    label[5, 7] = 20  # tv monitor
    return label


def _make_voc(base: Path, ids: list[str], label: np.ndarray) -> Path:
    root = base / "VOCdevkit" / "VOC2012"
    for sample_id in ids:
        _write_image(root / "JPEGImages" / f"{sample_id}.jpg", *label.shape)
        _write_palette_png(root / "SegmentationClass" / f"{sample_id}.png", label)
    split = root / "ImageSets" / "Segmentation" / "val.txt"
    split.parent.mkdir(parents=True)
    split.write_text("\n".join(ids) + "\n")
    return root


@pytest.mark.parametrize("level", ["voc2012", "devkit_parent", "voc_parent"])
def test_voc_reads_palette_indices_from_any_root_level(tmp_path, level):
    label = _voc_label()
    voc_root = _make_voc(tmp_path, ["2007_000001", "2007_000002"], label)
    root = {
        "voc2012": voc_root,
        "devkit_parent": tmp_path,
        "voc_parent": voc_root.parent,
    }[level]
    dataset = VOCSegmentation(root, split="val")
    assert len(dataset) == 2
    image, sample_label, name = dataset[1]
    assert name == "2007_000002"
    assert image.mode == "RGB" and image.size == (8, 6)
    assert sample_label.dtype == np.int64
    np.testing.assert_array_equal(sample_label, label)
    assert dataset.class_names == list(VOC_CLASSES) and len(dataset.class_names) == 21
    assert dataset.background_index == 0
    assert dataset.foreground_classes == list(range(1, 21))
    assert dataset.prompts[8] == "a photo of a cat."
    assert dataset.prompts[1] == "a photo of an aeroplane."
    assert dataset.prompts[0] == "a photo of the background."


def test_voc_prefers_2012_over_other_years(tmp_path):
    _make_voc(tmp_path, ["from_2012"], _voc_label())
    other_year = tmp_path / "VOCdevkit" / "VOC2007"
    (other_year / "JPEGImages").mkdir(parents=True)
    (other_year / "SegmentationClass").mkdir()
    assert VOCSegmentation(tmp_path).root.name == "VOC2012"


def test_voc_limit_and_class_names_file(tmp_path):
    voc_root = _make_voc(tmp_path, ["a", "b", "c"], _voc_label())
    names = ["background"] + [f"shape {i}" for i in range(1, 21)]
    (voc_root / "class_names.txt").write_text("\n".join(names) + "\n")
    dataset = VOCSegmentation(tmp_path, limit=2)
    assert [dataset[i][2] for i in range(len(dataset))] == ["a", "b"]
    assert dataset.class_names == names
    assert dataset.prompts[3] == "a photo of a shape 3."
    assert dataset.background_index == 0


def test_voc_class_names_file_without_background(tmp_path):
    voc_root = _make_voc(tmp_path, ["a"], _voc_label())
    names = [f"thing {i}" for i in range(21)]
    (voc_root / "class_names.txt").write_text("\n".join(names))
    dataset = VOCSegmentation(voc_root)
    assert dataset.background_index is None
    assert dataset.foreground_classes == list(range(21))


def test_voc_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VOCSegmentation(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        VOCSegmentation(tmp_path / "empty")
    voc_root = _make_voc(tmp_path, ["good", "bad"], _voc_label())
    with pytest.raises(FileNotFoundError, match=r"Segmentation[/\\]train\.txt"):
        VOCSegmentation(voc_root, split="train")
    corrupt = voc_root / "JPEGImages" / "bad.jpg"
    corrupt.write_bytes(b"not a jpeg at all")
    dataset = VOCSegmentation(voc_root)
    dataset[0]
    with pytest.raises(OSError, match="bad.jpg"):
        dataset[1]


def test_voc_rejects_out_of_range_and_rgb_labels(tmp_path):
    label = _voc_label()
    label[2, 2] = 42
    voc_root = _make_voc(tmp_path, ["x"], label)
    with pytest.raises(ValueError, match=r"\[42\]"):
        VOCSegmentation(voc_root)[0]
    rgb = np.stack([_voc_label().astype(np.uint8)] * 3, axis=-1)
    Image.fromarray(rgb).save(voc_root / "SegmentationClass" / "x.png")
    with pytest.raises(ValueError, match="mode 'RGB'"):
        VOCSegmentation(voc_root)[0]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (as used for crowds): column-major run lengths, zeros first."""
    flat = mask.flatten(order="F").astype(np.int64)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def _make_coco(root: Path) -> np.ndarray:
    """Two images; the first has a polygon car, an RLE dog over it and a person crowd."""
    height, width = 8, 12
    _write_image(root / "val2017" / "000000000042.jpg", height, width)
    _write_image(root / "val2017" / "000000000007.jpg", 5, 5)
    dog = np.zeros((height, width), dtype=np.uint8)
    dog[3:5, 4:7] = 1
    dog_rle = mask_utils.encode(np.asfortranarray(dog))
    dog_rle["counts"] = dog_rle["counts"].decode("ascii")
    crowd = np.zeros((height, width), dtype=np.uint8)
    crowd[4:8, 8:12] = 1
    annotations = {
        "images": [
            {"id": 42, "file_name": "000000000042.jpg", "height": height, "width": width},
            {"id": 7, "file_name": "000000000007.jpg", "height": 5, "width": 5},
        ],
        # Non-contiguous category ids, listed out of order.
        "categories": [
            {"id": 18, "name": "dog", "supercategory": "animal"},
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 3, "name": "car", "supercategory": "vehicle"},
        ],
        "annotations": [
            {"id": 1, "image_id": 42, "category_id": 3, "iscrowd": 0, "area": 40.0,
             "bbox": [2, 1, 8, 5], "segmentation": [[2, 1, 10, 1, 10, 6, 2, 6]]},
            {"id": 2, "image_id": 42, "category_id": 18, "iscrowd": 0, "area": 6.0,
             "bbox": [4, 3, 3, 2], "segmentation": dog_rle},
            {"id": 3, "image_id": 42, "category_id": 1, "iscrowd": 1, "area": 16.0,
             "bbox": [8, 4, 4, 4], "segmentation": _uncompressed_rle(crowd)},
        ],
    }  # fmt: skip
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(annotations))
    expected = np.zeros((height, width), dtype=np.int64)
    expected[1:6, 2:10] = 2  # car: polygon covers rows 1..5, columns 2..9
    expected[3:5, 4:7] = 3  # dog: smaller, painted over the car
    expected[4:8, 8:12][expected[4:8, 8:12] == 0] = 255  # crowd only where no instance
    return expected


def test_coco_instances_polygon_rle_and_crowd(tmp_path):
    expected = _make_coco(tmp_path)
    dataset = COCOInstances(tmp_path, split="val2017")
    assert dataset.class_names == ["background", "person", "car", "dog"]
    assert dataset.background_index == 0 and dataset.foreground_classes == [1, 2, 3]
    assert len(dataset) == 2
    image, label, name = dataset[0]  # sorted by image id: 7 first
    assert name == "000000000007" and image.size == (5, 5)
    np.testing.assert_array_equal(label, np.zeros((5, 5), dtype=np.int64))
    image, label, name = dataset[1]
    assert name == "000000000042" and image.size == (12, 8)
    np.testing.assert_array_equal(label, expected)
    assert len(COCOInstances(tmp_path, limit=1)) == 1


def test_coco_instances_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        COCOInstances(tmp_path)
    _make_coco(tmp_path)
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{broken")
    with pytest.raises(ValueError, match="instances_val2017.json"):
        COCOInstances(tmp_path)


@pytest.mark.parametrize("layout", ["official", "mmseg"])
def test_coco_stuff_maps_raw_values_to_171_classes(tmp_path, layout):
    raw = np.array([[0, 11, 12, 91], [181, 255, 90, 92]])
    expected = np.array([[0, 255, 11, 80], [170, 255, 255, 81]])
    if layout == "official":
        image_path = tmp_path / "val2017" / "000000000139.jpg"
        label_path = tmp_path / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png"
    else:
        image_path = tmp_path / "images" / "val2017" / "000000000139.jpg"
        label_path = tmp_path / "annotations" / "val2017" / "000000000139.png"
        # mmseg's converted copy sits next to the raw map and must not be a sample.
        _write_grey_png(label_path.with_name("000000000139_labelTrainIds.png"), expected)
    _write_image(image_path, 2, 4)
    _write_grey_png(label_path, raw)
    dataset = COCOStuff(tmp_path, split="val2017")
    assert len(dataset) == 1
    _, label, name = dataset[0]
    assert name == "000000000139"
    np.testing.assert_array_equal(label, expected)
    assert len(COCO_STUFF_CLASSES) == 171
    assert dataset.class_names[11] == "stop sign" and dataset.class_names[80] == "banner"
    assert dataset.background_index is None and len(dataset.foreground_classes) == 171


def test_coco_stuff_missing_labels(tmp_path):
    (tmp_path / "val2017").mkdir()
    with pytest.raises(FileNotFoundError, match="stuffthingmaps_trainval2017"):
        COCOStuff(tmp_path)


def test_pascal_context_59_reduces_zero_label(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2010"
    raw = np.array([[0, 1, 2], [59, 37, 0]])
    _write_image(root / "JPEGImages" / "2008_000002.jpg", 2, 3)
    _write_grey_png(root / "SegmentationClassContext" / "2008_000002.png", raw)
    split = root / "ImageSets" / "SegmentationContext" / "val.txt"
    split.parent.mkdir(parents=True)
    split.write_text("2008_000002\n")
    dataset = PascalContext59(tmp_path, split="val")
    _, label, name = dataset[0]
    assert name == "2008_000002"
    np.testing.assert_array_equal(label, [[255, 0, 1], [58, 36, 255]])
    assert dataset.class_names == list(CONTEXT59_CLASSES) and len(dataset.class_names) == 59
    assert dataset.class_names[36] == "person"
    assert dataset.background_index is None
    with pytest.raises(FileNotFoundError, match=r"SegmentationContext[/\\]train\.txt"):
        PascalContext59(tmp_path, split="train")


def test_cityscapes_tree(tmp_path):
    label = np.array([[0, 18, 255], [13, 11, 2]])
    names = ["frankfurt_000000_000294", "frankfurt_000001_000019", "lindau_000000_000019"]
    for name in names:
        city = name.split("_")[0]
        _write_image(tmp_path / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png", 2, 3)
        _write_grey_png(tmp_path / "gtFine" / "val" / city / f"{name}_gtFine_labelTrainIds.png", label)
    # Other gtFine products in the same folder must not be confused with train ids.
    _write_grey_png(
        tmp_path / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png",
        np.full((2, 3), 33),
    )
    dataset = Cityscapes(tmp_path, split="val")
    assert [dataset[i][2] for i in range(3)] == names
    np.testing.assert_array_equal(dataset[2][1], label)
    assert dataset.class_names == list(CITYSCAPES_CLASSES) and len(dataset.class_names) == 19
    assert dataset.background_index is None
    label_dir = tmp_path / "gtFine" / "val" / "lindau"
    (label_dir / "lindau_000000_000019_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(FileNotFoundError, match="lindau_000000_000019_gtFine_labelTrainIds.png"):
        Cityscapes(tmp_path)[2]
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit[/\\]train"):
        Cityscapes(tmp_path, split="train")


def test_folder_dataset(tmp_path):
    (tmp_path / "classes.txt").write_text("background\nred square\napple\n\n")
    mask = np.array([[0, 1], [2, 255]])
    _write_image(tmp_path / "images" / "b.png", 2, 2)
    _write_image(tmp_path / "images" / "a.JPG", 2, 2)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    _write_grey_png(tmp_path / "masks" / "a.png", mask)
    _write_palette_png(tmp_path / "masks" / "b.png", mask[::-1])
    dataset = FolderDataset(tmp_path)
    assert len(dataset) == 2
    assert dataset.class_names == ["background", "red square", "apple"]
    assert dataset.prompts == [
        "a photo of the background.",
        "a photo of a red square.",
        "a photo of an apple.",
    ]
    assert dataset.background_index == 0 and dataset.foreground_classes == [1, 2]
    np.testing.assert_array_equal(dataset[0][1], mask)
    np.testing.assert_array_equal(dataset[1][1], mask[::-1])
    assert [dataset[i][2] for i in range(2)] == ["a", "b"]
    (tmp_path / "masks" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"masks[/\\]b\.png"):
        FolderDataset(tmp_path)


def test_folder_dataset_bad_class_list(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        FolderDataset(tmp_path)
    (tmp_path / "classes.txt").write_text("cat\n\ndog\n")
    with pytest.raises(ValueError, match="line 2"):
        FolderDataset(tmp_path)


def test_build_dataset(tmp_path):
    _make_voc(tmp_path / "voc", ["a", "b"], _voc_label())
    dataset = build_dataset("VOC", tmp_path / "voc", limit=1)
    assert isinstance(dataset, VOCSegmentation) and len(dataset) == 1
    _make_coco(tmp_path / "coco")
    assert isinstance(build_dataset("coco", tmp_path / "coco"), COCOInstances)
    with pytest.raises(ValueError, match="name: expected one of"):
        build_dataset("imagenet", tmp_path)
    with pytest.raises(ValueError, match=r"split: expected None \(the .* format has no splits\)"):
        build_dataset("folder", tmp_path, split="val")
    with pytest.raises(ValueError, match="limit"):
        build_dataset("voc", tmp_path / "voc", limit=-1)


def test_class_prompt():
    assert class_prompt("orange") == "a photo of an orange."
    assert class_prompt("dog") == "a photo of a dog."
    assert class_prompt("Background") == "a photo of the background."
