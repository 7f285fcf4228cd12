"""The readers the segmentation benchmarks add (ADE20K, COCO-Object, PASCAL Context 60, VOC20), on fixtures
written in their real on-disk formats, against known label values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import _write_jpeg, _write_label_png, write_benchmark_dataset

from captum_iclip.datasets import (
    ADE20K,
    ADE20K_CLASSES,
    COCO_OBJECT_CLASSES,
    CONTEXT59_CLASSES,
    VOC_CLASSES,
    COCOObject,
    PascalContext60,
    VOC20Segmentation,
    build_dataset,
)
from captum_iclip.evaluation.benchmarks import BENCHMARKS

RNG = np.random.default_rng(0)


def test_ade20k_ignores_zero_and_shifts_the_150_classes(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    raw = np.array([[0, 1, 2], [150, 13, 255]])
    _write_jpeg(base / "images" / "validation" / "ADE_val_00000001.jpg", RNG, 2, 3)
    _write_label_png(base / "annotations" / "validation" / "ADE_val_00000001.png", raw)
    for root in (tmp_path, base):  # the folder itself or its parent
        dataset = ADE20K(root)
        _, label, name = dataset[0]
        assert name == "ADE_val_00000001"
        np.testing.assert_array_equal(label, [[255, 0, 1], [149, 12, 255]])
    assert dataset.class_names == list(ADE20K_CLASSES) and len(ADE20K_CLASSES) == 150
    assert dataset.class_names[12] == "person" and dataset.background_index is None
    (base / "images" / "validation" / "ADE_val_00000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_val_00000001.jpg"):
        ADE20K(tmp_path)
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        ADE20K(base / "images")


def test_coco_object_keeps_the_things_and_makes_stuff_and_unlabeled_background(tmp_path):
    # Raw stuffthingmaps values (category id - 1): person, stop sign, toothbrush, banner, wood, unlabeled,
    # and 11 (category 12, unused).
    raw = np.array([[0, 12, 89], [91, 181, 255], [11, 0, 0]])
    _write_jpeg(tmp_path / "images" / "val2017" / "000000000139.jpg", RNG, 3, 3)
    label_path = tmp_path / "annotations" / "val2017" / "000000000139.png"
    _write_label_png(label_path, raw)
    # The converted copies (mmseg's and the COCO-Object converter's) beside the raw map are not samples.
    _write_label_png(label_path.with_name("000000000139_instanceTrainIds.png"), raw)
    _write_label_png(label_path.with_name("000000000139_labelTrainIds.png"), raw)
    dataset = COCOObject(tmp_path)
    assert len(dataset) == 1
    _, label, _ = dataset[0]
    np.testing.assert_array_equal(label, [[1, 12, 80], [0, 0, 0], [255, 1, 1]])
    assert dataset.class_names == list(COCO_OBJECT_CLASSES) and len(COCO_OBJECT_CLASSES) == 81
    assert dataset.class_names[12] == "stop sign" and dataset.class_names[80] == "toothbrush"
    assert dataset.background_index == 0 and dataset.foreground_classes == list(range(1, 81))


def _context_root(tmp_path: Path, raw: np.ndarray) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2010"
    _write_jpeg(root / "JPEGImages" / "2008_000002.jpg", RNG, *raw.shape)
    _write_label_png(root / "SegmentationClassContext" / "2008_000002.png", raw)
    split = root / "ImageSets" / "SegmentationContext" / "val.txt"
    split.parent.mkdir(parents=True)
    split.write_text("2008_000002\n")
    return root


def test_pascal_context_60_keeps_zero_as_background(tmp_path):
    _context_root(tmp_path, np.array([[0, 1, 59], [37, 255, 0]]))
    dataset = PascalContext60(tmp_path)
    _, label, _ = dataset[0]
    np.testing.assert_array_equal(label, [[0, 1, 59], [37, 255, 0]])
    assert dataset.class_names == ["background", *CONTEXT59_CLASSES] and dataset.background_index == 0
    assert dataset.class_names[37] == "person"


def test_voc20_ignores_the_background(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    raw = np.array([[0, 1, 15], [20, 255, 0]])
    _write_jpeg(root / "JPEGImages" / "a.jpg", RNG, 2, 3)
    _write_label_png(root / "SegmentationClass" / "a.png", raw, palette=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    dataset = VOC20Segmentation(tmp_path)
    _, label, _ = dataset[0]
    np.testing.assert_array_equal(label, [[255, 0, 14], [19, 255, 255]])  # palette indices, not colours
    assert dataset.class_names == list(VOC_CLASSES[1:]) and dataset.class_names[14] == "person"
    assert dataset.background_index is None


@pytest.mark.parametrize("benchmark", sorted(BENCHMARKS))
def test_the_fixture_writer_gives_what_each_benchmark_reader_reads(tmp_path, benchmark):
    reader = BENCHMARKS[benchmark].dataset
    dataset = build_dataset(reader, write_benchmark_dataset(tmp_path, benchmark, [(9, 12), (16, 8)]))
    assert len(dataset) == 2
    for (image, label, _), size in zip(dataset, [(9, 12), (16, 8)]):
        assert label.shape == size == (image.height, image.width)
        valid = label[label != 255]
        assert valid.size and valid.max() < dataset.num_classes
