"""Bad input to ITSMAttribution fails early with an error that names the argument and what was expected."""

from __future__ import annotations

import pytest
import torch
from conftest import make_images

from captum_iclip import CLIPSimilarity, ITSMAttribution


@pytest.fixture(scope="module")
def itsm(sim_b32) -> ITSMAttribution:
    return ITSMAttribution(sim_b32)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return make_images(1, 3, 224, 224, seed=30)


class NoForward:
    """Fails a test if the vision tower runs: bad input must be rejected before any work."""

    def __init__(self, model) -> None:
        self.handle = model.visual.conv1.register_forward_pre_hook(self._fail)

    @staticmethod
    def _fail(module, args):
        raise AssertionError("the image encoder ran on invalid input")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize(
    "images, error, message",
    [
        (
            make_images(3, 224, 224),
            ValueError,
            r"inputs: expected a 4-D tensor \(N, 3, H, W\), got shape \(3, 224, 224\)",
        ),
        (make_images(1, 1, 224, 224), ValueError, r"inputs: expected 3 colour channels"),
        (
            make_images(1, 3, 224, 230),
            ValueError,
            r"inputs: expected an image size divisible by .* patch size 32x32 .*, got 224x230",
        ),
        (make_images(0, 3, 224, 224), ValueError, r"inputs: expected at least one image, got an empty batch"),
        (
            make_images(1, 3, 224, 224).double(),
            TypeError,
            r"inputs: expected images of the model's dtype torch.float32 .*, got torch.float64",
        ),
        (torch.zeros(1, 3, 224, 224, dtype=torch.uint8), TypeError, r"inputs: expected a floating-point tensor"),
        (
            torch.empty(1, 3, 224, 224, device="meta"),
            ValueError,
            r"inputs: expected images on the model's device cpu .*, got meta",
        ),
        (make_images(1, 3, 224, 224).numpy(), TypeError, r"inputs: expected a torch.Tensor"),
    ],
    ids=["rank", "channels", "not divisible", "empty batch", "float64", "uint8", "device", "numpy"],
)
def test_bad_images(vit_b32, sim_b32, itsm, images, error, message):
    with NoForward(vit_b32):
        with pytest.raises(error, match=message):
            itsm.attribute(images, target=0)
        with pytest.raises(error, match=message):
            sim_b32(images)


@pytest.mark.parametrize(
    "target, message",
    [
        (3, r"target: expected prompt indices in 0..2 \(3 prompts\), got 3"),
        (-1, r"target: expected prompt indices in 0..2 .*, got -1"),
        ([0, 1], r"target: expected one prompt index per example \(1\), got 2"),
        ((0, 1), r"target: expected a prompt index \(the output is \(N, K\)\), got the tuple"),
    ],
    ids=["too large", "negative", "wrong length", "tuple"],
)
def test_bad_target(vit_b32, itsm, image, target, message):
    with NoForward(vit_b32), pytest.raises(ValueError, match=message):
        itsm.attribute(image, target=target)


def test_unknown_variant(vit_b32, itsm, image):
    with (
        NoForward(vit_b32),
        pytest.raises(
            ValueError,
            match=r"variant: expected one of \('plain', 'surgery', 'maskclip', 'clearclip', 'sclip', 'naclip'\), "
            r"got 'gradcam'",
        ),
    ):
        itsm.attribute(image, variant="gradcam")


@pytest.mark.parametrize(
    "depth, error, message",
    [
        (13, ValueError, r"surgery_depth: expected 0..12 \(the tower has 12 blocks\), got 13"),
        (-1, ValueError, r"surgery_depth: expected 0..12"),
        (2.0, TypeError, r"surgery_depth: expected an int, got float"),
    ],
    ids=["too deep", "negative", "float"],
)
def test_bad_surgery_depth(vit_b32, itsm, image, depth, error, message):
    with NoForward(vit_b32), pytest.raises(error, match=message):
        itsm.attribute(image, variant="surgery", surgery_depth=depth)


def test_negative_surgery_depth_on_a_resnet(tiny_resnet):
    sim = CLIPSimilarity(tiny_resnet, text_features=torch.randn(2, 8))
    with NoForward(tiny_resnet), pytest.raises(ValueError, match=r"surgery_depth: expected a non-negative int, got -1"):
        ITSMAttribution(sim).attribute(make_images(1, 3, 64, 64), variant="surgery", surgery_depth=-1)


def test_unknown_projection(vit_b32, itsm, image):
    with (
        NoForward(vit_b32),
        pytest.raises(
            ValueError, match=r"projection: expected one of \('auto', 'recognition', 'interpretability'\), got 'text'"
        ),
    ):
        itsm.attribute(image, projection="text")


def test_itsm_needs_a_clip_similarity(vit_b32):
    with pytest.raises(
        TypeError, match=r"forward_func: expected a captum_iclip.CLIPSimilarity \(ITSMAttribution reads"
    ):
        ITSMAttribution(vit_b32)


def test_single_prompt_surgery_without_a_tokenizer(vit_b32, image):
    sim = CLIPSimilarity(vit_b32, text_features=torch.randn(1, 512))
    with (
        NoForward(vit_b32),
        pytest.raises(ValueError, match=r"tokenizer: expected a tokenizer to embed prompts .*, got None"),
    ):
        ITSMAttribution(sim).attribute(image, variant="surgery")
