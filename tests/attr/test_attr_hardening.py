"""Hardening of the attribution methods: targets, MMP deltas and per-call masks.

Each test failed on the code before its fix (the hardening passes: one test per defect an adversarial
review found). Models are tiny random architectures (conftest) or the bundled shapes-tiny model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_images

from captum_iclip import CLIPSimilarity, DualProjectionCLIP, ITSMAttribution, MaskedMaxPoolingAttribution

PROMPTS = ["a cat", "a dog", "a car"]


@pytest.fixture(scope="module")
def tiny_sim(tiny_vit, tiny_tokenizer) -> CLIPSimilarity:
    return CLIPSimilarity(DualProjectionCLIP(tiny_vit), tiny_tokenizer, PROMPTS)


@pytest.mark.parametrize(
    "target",
    [torch.tensor(1.5), 1.5, [0.0, 1.0], torch.tensor([0.0, 1.0]), True, torch.tensor(True)],
    ids=["tensor", "float", "list", "float tensor", "bool", "bool tensor"],
)
def test_float_and_bool_targets_are_refused(tiny_sim, target):
    images = make_images(2, 3, 8, 8, seed=1)
    for method in (ITSMAttribution(tiny_sim), MaskedMaxPoolingAttribution(tiny_sim)):
        with pytest.raises(TypeError, match="target: expected"):
            method.attribute(images, target=target)
    itsm = ITSMAttribution(tiny_sim)
    assert torch.equal(itsm.attribute(images, target=torch.tensor(1)), itsm.attribute(images, target=[1, 1]))
    assert torch.equal(itsm.attribute(images, target=np.int64(2)), itsm.attribute(images, target=2))


def test_mmp_delta_is_that_of_the_returned_attributions(tiny_sim):
    mmp = MaskedMaxPoolingAttribution(tiny_sim)
    images = make_images(2, 3, 8, 8, seed=2)
    raw, raw_delta = mmp.attribute(images, target=[0, 2], return_convergence_delta=True)
    scores = raw.flatten(1).sum(1).double() + raw_delta.double()  # the pooled scores S_k
    assert raw_delta.abs().max() < 1e-5  # completeness
    for interpolate in (True, False):
        norm, delta = mmp.attribute(
            images, target=[0, 2], normalize=True, interpolate=interpolate, return_convergence_delta=True
        )
        assert torch.allclose(delta.double(), scores - norm.flatten(1).sum(1).double(), atol=1e-5)
        assert delta.abs().min() > 1e-3  # a normalised map does not sum to the score, and the delta says so


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.full((2, 2, 2), 0.5), "only 0 and 1"),
        (torch.tensor([[[1.0, float("nan")], [1.0, 0.0]]] * 2), "only 0 and 1"),
        (torch.ones(2, 3, 3, dtype=torch.bool), r"grid \(3, 3\)"),
        (torch.ones(2, 5, dtype=torch.bool), "5 patches"),
        (torch.ones(3, 4, dtype=torch.bool), r"expected a batch of 3 images \(one per fixed mask\)"),
    ],
    ids=["fractional", "nan", "wrong grid", "wrong count", "wrong batch"],
)
def test_mmp_per_call_mask_is_checked(tiny_sim, mask, message):
    mmp = MaskedMaxPoolingAttribution(tiny_sim)
    images = make_images(2, 3, 8, 8, seed=3)
    with pytest.raises(ValueError, match=message):
        mmp.attribute(images, target=0, mask=mask)
    good = torch.tensor([[[True, False], [False, True]]]).expand(2, -1, -1)
    assert torch.equal(
        mmp.attribute(images, target=0, mask=good.float()),
        MaskedMaxPoolingAttribution(tiny_sim, mask_provider=good).attribute(images, target=0),
    )
