"""``normalize="reference"``: the map methods normalise after upsampling, in the order of the reference code
of GEM, LeGrad and Chefer et al. (docs/methods.md §1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_images

from captum_iclip import (
    CheferRelevancy,
    CLIPSimilarity,
    GEMAttribution,
    ITSMAttribution,
    LeGradAttribution,
    MaskedMaxPoolingAttribution,
)

METHODS = {
    "itsm": lambda sim, **kw: ITSMAttribution(sim).attribute(**kw),
    "surgery": lambda sim, **kw: ITSMAttribution(sim).attribute(variant="surgery", surgery_depth=1, **kw),
    "gem": lambda sim, **kw: GEMAttribution(sim).attribute(depth=2, **kw),
    "legrad": lambda sim, **kw: LeGradAttribution(sim).attribute(**kw),
    "chefer": lambda sim, **kw: CheferRelevancy(sim).attribute(**kw),
    "mmp": lambda sim, **kw: MaskedMaxPoolingAttribution(sim).attribute(**kw),
}


def pixel_minmax(maps: torch.Tensor) -> torch.Tensor:
    """Min-max over the pixels of each (image, prompt) map, as the reference packages write it."""
    low = maps.amin(dim=(2, 3), keepdim=True)
    high = maps.amax(dim=(2, 3), keepdim=True)
    return (maps - low) / (high - low)


@pytest.fixture(scope="module")
def sim(small_vit):
    return CLIPSimilarity(small_vit, text_features=torch.randn(3, 8, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("name", list(METHODS))
def test_reference_is_upsampling_then_minmax(sim, name):
    run, images = METHODS[name], make_images(2, 3, 16, 16, seed=31)
    grid = run(sim, inputs=images, target=[1, 2], normalize=False, interpolate=False)
    if name == "mmp":  # spread: each patch's value divided over its 4x4 pixels
        upsampled = F.interpolate(grid, scale_factor=4, mode="nearest") / 16
    else:
        upsampled = F.interpolate(grid, size=(16, 16), mode="bilinear", align_corners=False)
    reference = run(sim, inputs=images, target=[1, 2], normalize="reference")
    assert (reference - pixel_minmax(upsampled)).abs().max() <= 1e-6
    default = run(sim, inputs=images, target=[1, 2], normalize=True)
    if name == "mmp":  # nearest upsampling keeps every extreme: the orders differ by the spread's 1/16 only
        assert (reference - 16 * default).abs().max() <= 1e-6
    else:  # bilinear upsampling lowers the peaks of the patch grid: the orders differ
        assert (reference - default).abs().max() > 1e-3
    # Without upsampling there is one order only.
    on_grid = run(sim, inputs=images, target=[1, 2], normalize="reference", interpolate=False)
    assert torch.equal(on_grid, run(sim, inputs=images, target=[1, 2], normalize=True, interpolate=False))


@pytest.mark.parametrize("bad", ["grid", 1, None])
def test_bad_normalize_names_the_argument(sim, bad):
    with pytest.raises(ValueError, match=r"normalize: expected True, False or 'reference', got"):
        ITSMAttribution(sim).attribute(make_images(1, 3, 16, 16), normalize=bad)


def test_gem_and_legrad_follow_their_packages_post_processing_on_vit_b16(vit_b16):
    """On a random ViT-B-16 (16-px patches, a 7x7 grid at 112 px), ``normalize="reference"`` equals the
    packages' own post-processing of the patch-grid maps: gem-torch's ``GEMWrapper.forward`` upsamples to the
    image size (``F.interpolate(size=(W, H), mode="bilinear")``) and then ``min_max``es each (image, prompt)
    map; legrad-torch's ``compute_legrad_clip`` upsamples each layer's map by the patch size
    (``scale_factor=patch_size``, bilinear), sums the layers and ``min_max``es the sum."""
    text = F.normalize(torch.randn(2, 512, generator=torch.Generator().manual_seed(3)), dim=-1)
    sim = CLIPSimilarity(vit_b16, text_features=text)
    images = make_images(1, 3, 112, 112, seed=8)

    gem = GEMAttribution(sim)
    grid = gem.attribute(images, normalize=False, interpolate=False)
    expected = pixel_minmax(F.interpolate(grid, size=(112, 112), mode="bilinear"))
    assert (gem.attribute(images, normalize="reference") - expected).abs().max() <= 1e-5
    assert (gem.attribute(images) - expected).abs().max() > 1e-2  # the default order is further off

    legrad = LeGradAttribution(sim)
    grid = legrad.attribute(images, target=1, normalize=False, interpolate=False)
    # Upsampling is linear, so the sum of the upsampled layers is the upsampled sum.
    expected = pixel_minmax(F.interpolate(grid, scale_factor=16, mode="bilinear"))
    assert (legrad.attribute(images, target=1, normalize="reference") - expected).abs().max() <= 1e-5
