"""ITSMAttribution (docs/methods.md §1) and its training-free correction (docs/methods.md §2).

Run on a random-weight open_clip ViT-B-32 (a 7x7 patch grid keeps the CPU cost
low); tests/models/test_adapters.py checks the dense features of every supported family.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPTS, make_images

from captum_iclip import CLIPSimilarity, ITSMAttribution
from captum_iclip.attr import feature_surgery
from captum_iclip.attr._utils import target_indices

K = len(PROMPTS)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return make_images(2, 3, 224, 224, seed=10)


@pytest.fixture(scope="module")
def itsm(sim_b32) -> ITSMAttribution:
    return ITSMAttribution(sim_b32)


@pytest.fixture(scope="module")
def raw_patch_scores(itsm, images) -> torch.Tensor:
    """(N, K, 7, 7) raw cosines for every prompt."""
    return itsm.attribute(images, normalize=False, interpolate=False)


@pytest.fixture(scope="module")
def surgery_patch_scores(itsm, images) -> torch.Tensor:
    return itsm.attribute(images, variant="surgery", normalize=False, interpolate=False)


@pytest.fixture(scope="module")
def default_maps(itsm, images) -> torch.Tensor:
    return itsm.attribute(images)


class EncoderCalls:
    """Counts forward passes through a module and whether autograd was on during them."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls, self.grad_enabled = 0, []
        self.handle = module.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        self.calls += 1
        self.grad_enabled.append(torch.is_grad_enabled())

    def __enter__(self) -> EncoderCalls:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def postprocess_by_hand(scores: torch.Tensor, size) -> torch.Tensor:
    low = scores.amin(dim=(-2, -1), keepdim=True)
    high = scores.amax(dim=(-2, -1), keepdim=True)
    return F.interpolate((scores - low) / (high - low), size=size, mode="bilinear", align_corners=False)


# --- shapes and Captum target semantics ----------------------------------------------------
def test_target_none_gives_every_prompt(default_maps, raw_patch_scores):
    assert default_maps.shape == (2, K, 224, 224)
    assert raw_patch_scores.shape == (2, K, 7, 7)


@pytest.mark.parametrize(
    "target, prompts",
    [(1, [1, 1]), ([2, 0], [2, 0]), (torch.tensor([0, 2]), [0, 2])],
    ids=["int", "list", "tensor"],
)
def test_one_target_per_example_is_that_slice_of_every_prompt(itsm, images, default_maps, target, prompts):
    maps = itsm.attribute(images, target=target)
    assert maps.shape == (2, 1, 224, 224)
    expected = default_maps[torch.arange(2), torch.tensor(prompts)].unsqueeze(1)
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-6)


def test_target_indices_follow_captum_semantics():
    assert target_indices(None, 2, 3) is None
    assert target_indices(torch.tensor(2), 2, 3).tolist() == [2, 2]
    assert target_indices(np.int64(1), 2, 3).tolist() == [1, 1]
    assert target_indices(torch.tensor([[0], [2]]), 2, 3).tolist() == [0, 2]


def test_tuple_inputs_give_a_tuple(itsm, images, default_maps):
    maps = itsm.attribute((images[:1],), target=0)
    assert isinstance(maps, tuple) and len(maps) == 1
    torch.testing.assert_close(maps[0], default_maps[:1, :1], rtol=0, atol=1e-5)


def test_captum_flags(itsm):
    assert itsm.has_convergence_delta() is False
    assert itsm.multiplies_by_inputs is False


# --- values --------------------------------------------------------------------------------
@torch.no_grad()
def test_raw_scores_are_cosines_of_projected_tokens(vit_b32, sim_b32, images, raw_patch_scores):
    """s_{i,k} = normalize(ln_post(Z_i) @ proj) . t_k, from the library's own tokens."""
    visual = vit_b32.visual
    visual.output_tokens = True
    try:
        _, tokens = visual(images)
    finally:
        visual.output_tokens = False
    patch_features = F.normalize(tokens @ visual.proj, dim=-1)
    expected = (patch_features @ sim_b32.text_features.t()).transpose(1, 2).reshape(2, K, 7, 7)
    torch.testing.assert_close(raw_patch_scores, expected, rtol=1e-5, atol=1e-5)
    assert raw_patch_scores.abs().max() <= 1 + 1e-6


def test_default_postprocessing_is_minmax_then_bilinear(default_maps, raw_patch_scores):
    torch.testing.assert_close(default_maps, postprocess_by_hand(raw_patch_scores, (224, 224)), rtol=0, atol=1e-5)
    assert default_maps.min() >= 0 and default_maps.max() <= 1


def test_patch_grid_maps_span_zero_to_one(itsm, images):
    grid_maps = itsm.attribute(images, interpolate=False).flatten(2)
    assert grid_maps.shape == (2, K, 7 * 7)
    torch.testing.assert_close(grid_maps.amin(-1), torch.zeros(2, K), rtol=0, atol=1e-6)
    torch.testing.assert_close(grid_maps.amax(-1), torch.ones(2, K), rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["plain", "surgery"])
def test_batch_invariance(itsm, images, raw_patch_scores, surgery_patch_scores, variant):
    batched = raw_patch_scores if variant == "plain" else surgery_patch_scores
    for i in range(images.shape[0]):
        alone = itsm.attribute(images[i : i + 1], variant=variant, normalize=False, interpolate=False)
        torch.testing.assert_close(alone, batched[i : i + 1], rtol=0, atol=1e-5)


# --- cost: one encoder pass per batch, no autograd ---------------------------------------
@pytest.mark.parametrize("variant", ["plain", "surgery"])
def test_one_forward_pass_whatever_the_number_of_prompts(vit_b32, sim_b32, variant):
    images = make_images(1, 3, 224, 224, seed=11).requires_grad_(True)
    many = CLIPSimilarity(vit_b32, text_features=torch.randn(50, 512, generator=torch.Generator().manual_seed(0)))
    for sim in (sim_b32, many):
        with EncoderCalls(vit_b32.visual.conv1) as counter:
            maps = ITSMAttribution(sim).attribute(images, variant=variant)
        assert maps.shape == (1, sim.num_prompts, 224, 224)
        assert counter.calls == 1 and counter.grad_enabled == [False]
        assert maps.grad_fn is None and not maps.requires_grad


# --- surgery (docs/methods.md §2) -----------------------------------------------------------------
def literal_feature_surgery(patches, global_feature, text):
    """docs/methods.md §2 written out over the D channels, one (image, patch, prompt) at a time."""
    n, length, _ = patches.shape
    k = text.shape[0]
    p = torch.softmax(2 * global_feature @ text.t(), dim=-1)  # (N, K)
    w = p / p.mean(dim=-1, keepdim=True)
    out = torch.empty(n, length, k, dtype=patches.dtype)
    for b in range(n):
        for i in range(length):
            e = [(patches[b, i] * text[j]) * w[b, j] for j in range(k)]  # D-dim e_{i,k}
            r = sum(e) / k
            for j in range(k):
                out[b, i, j] = (e[j] - r).sum()
    return out


def test_feature_surgery_matches_the_spec_formula():
    generator = torch.Generator().manual_seed(12)
    patches = F.normalize(torch.randn(2, 5, 6, generator=generator, dtype=torch.float64), dim=-1)
    global_feature = F.normalize(torch.randn(2, 6, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(4, 6, generator=generator, dtype=torch.float64), dim=-1)
    actual = feature_surgery(patches, global_feature, text)
    torch.testing.assert_close(actual, literal_feature_surgery(patches, global_feature, text), rtol=1e-12, atol=1e-12)
    # Removing the shared component leaves zero mean over the prompts.
    torch.testing.assert_close(actual.mean(dim=-1), torch.zeros(2, 5, dtype=torch.float64), rtol=0, atol=1e-12)


@torch.no_grad()
def test_surgery_scores_are_feature_surgery_of_surgery_features(sim_b32, images, surgery_patch_scores):
    features = F.normalize(sim_b32.adapter.dense_features(images, surgery_depth=6), dim=-1)
    expected = feature_surgery(features[:, 1:], features[:, 0], sim_b32.text_features)
    torch.testing.assert_close(surgery_patch_scores, expected.transpose(1, 2).reshape(2, K, 7, 7), rtol=1e-5, atol=1e-5)
    assert (surgery_patch_scores - torch.stack([surgery_patch_scores[:, 0]] * K, 1)).abs().max() > 0


@torch.no_grad()
def test_single_prompt_surgery_subtracts_the_empty_prompt(vit_b32, tokenizer):
    text, empty = F.normalize(vit_b32.encode_text(tokenizer(["a photo of a cat", ""])), dim=-1).split(1)
    sim = CLIPSimilarity(vit_b32, tokenizer, text_features=text)  # the tokenizer embeds "" on demand
    image = make_images(1, 3, 224, 224, seed=13)
    scores = ITSMAttribution(sim).attribute(
        image, variant="surgery", surgery_depth=4, normalize=False, interpolate=False
    )

    patches = F.normalize(sim.adapter.dense_features(image, surgery_depth=4), dim=-1)[:, 1:]
    expected = (patches @ (text - empty).t()).reshape(1, 1, 7, 7)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    # The subtraction matters: the plain cosines are far from these scores.
    plain = (patches @ text.t()).reshape(1, 1, 7, 7)
    assert (scores - plain).norm() > 0.1 * plain.norm()
