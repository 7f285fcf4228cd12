"""Hardening of the mask sources: the cache and the DINO provider.

Each test failed on the code before its fix (the hardening passes: one test per defect an adversarial
review found). Models are tiny random architectures (conftest) or the bundled shapes-tiny model.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_images


def test_corrupt_mask_cache_entry_is_recomputed(tmp_path):
    from captum_iclip.masks import CachedMaskProvider

    calls = []

    def centre(images, grid):
        calls.append(len(images))
        mask = torch.zeros(len(images), *grid, dtype=torch.bool)
        mask[:, 1:, 1:] = True
        return mask

    cached = CachedMaskProvider(centre, tmp_path / "cache", fingerprint="centre")
    images = make_images(2, 3, 8, 8, seed=6)
    expected = cached(images, (2, 2))
    entries = sorted((tmp_path / "cache").rglob("*.pt"))
    entries[0].write_bytes(entries[0].read_bytes()[:20])  # truncated
    torch.save(torch.ones(9, dtype=torch.bool), entries[1])  # a mask of another grid
    with pytest.warns(RuntimeWarning, match="recomputing"):
        again = CachedMaskProvider(centre, tmp_path / "cache", fingerprint="centre")(images, (2, 2))
    assert torch.equal(again, expected) and calls == [2, 2]
    assert torch.equal(CachedMaskProvider(centre, tmp_path / "cache", fingerprint="centre")(images, (2, 2)), expected)
    assert calls == [2, 2]  # rewritten: the third pass reads both from disk


def test_dino_mask_provider_refuses_a_module_that_is_no_vit():
    from captum_iclip.masks import DINOMaskProvider

    with pytest.raises(TypeError, match="model: expected a timm VisionTransformer or a Hugging Face ViT/DINOv2"):
        DINOMaskProvider(torch.nn.Linear(3, 3))
