"""Hardening of the dataset readers.

Each test failed on the code before its fix (the hardening passes: one test per defect an adversarial
review found). Models are tiny random architectures (conftest) or the bundled shapes-tiny model.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def test_class_list_with_a_utf8_bom_keeps_its_background(tmp_path):
    from captum_iclip.datasets import FolderDataset

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.array([[0, 1, 1, 0]] * 4, dtype=np.uint8)).save(tmp_path / "masks" / "a.png")
    (tmp_path / "classes.txt").write_text("\ufeffbackground\ncat\n", encoding="utf-8")
    dataset = FolderDataset(tmp_path)
    assert dataset.class_names == ["background", "cat"]
    assert dataset.background_index == 0 and dataset.foreground_classes == [1]
