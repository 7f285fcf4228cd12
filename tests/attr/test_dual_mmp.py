"""Dual projections (docs/methods.md §4), masked max pooling and its attribution (docs/methods.md §3)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, make_images

from captum_iclip import (
    CLIPSimilarity,
    DualProjectionCLIP,
    ITSMAttribution,
    MaskedMaxPooling,
    MaskedMaxPoolingAttribution,
)
from captum_iclip.models import get_adapter


# --- DualProjectionCLIP ----------------------------------------------------------------
@pytest.mark.parametrize("name,size", [("vit_b32", 224), ("tiny_resnet", 64), ("tiny_hf", 8)])
def test_recognition_outputs_are_bit_identical(request, name, size):
    model = request.getfixturevalue(name)
    dual = DualProjectionCLIP(model)
    images = make_images(2, 3, size, size)
    with torch.no_grad():
        with_head = dual.encode_image(images)
        if hasattr(model, "encode_image"):
            plain = model.encode_image(images)
        else:
            plain = model.get_image_features(pixel_values=images)
            plain = plain if isinstance(plain, torch.Tensor) else plain.pooler_output
    assert torch.equal(with_head, plain)


@pytest.mark.parametrize("name,size", [("tiny_vit", 8), ("tiny_hf", 8)])
def test_vit_head_starts_as_a_copy_of_the_recognition_projection(request, name, size):
    dual = DualProjectionCLIP(request.getfixturevalue(name))
    images = make_images(2, 3, size, size)
    with torch.no_grad():
        interpretability = dual.encode_dense(images, projection="interpretability")
        recognition = dual.encode_dense(images, projection="recognition")
    torch.testing.assert_close(interpretability, recognition, rtol=1e-5, atol=1e-6)
    head_param = next(dual.interpretability_head.parameters())
    with torch.no_grad():
        head_param.add_(1.0)
        changed = dual.encode_dense(images)
    assert torch.equal(changed[:, 0], recognition[:, 0])  # the global token keeps W_rec
    assert not torch.allclose(changed[:, 1:], recognition[:, 1:])


def test_resnet_head_projects_each_position_alone(tiny_resnet):
    dual = DualProjectionCLIP(tiny_resnet)
    adapter = get_adapter(dual)
    images = make_images(1, 3, 64, 64)
    with torch.no_grad():
        tokens = adapter.tokens(images)
        pool = tiny_resnet.visual.attnpool
        expected = pool.c_proj(pool.v_proj(tokens[:, 1:]))
        dense = dual.encode_dense(images)
    torch.testing.assert_close(dense[:, 1:], expected)
    torch.testing.assert_close(dense[:, 0], tiny_resnet.encode_image(images))


def test_head_save_and_load_round_trip(tiny_vit, tiny_resnet, tmp_path):
    dual = DualProjectionCLIP(tiny_vit)
    with torch.no_grad():
        for param in dual.interpretability_head.parameters():
            param.mul_(3.0)
    dual.save_interpretability(tmp_path / "head.pt")
    restored = DualProjectionCLIP(tiny_vit).load_interpretability(tmp_path / "head.pt")
    for a, b in zip(dual.interpretability_head.parameters(), restored.interpretability_head.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="trained for"):
        DualProjectionCLIP(tiny_resnet).load_interpretability(tmp_path / "head.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="expected an interpretability head saved by captum-iclip"):
        restored.load_interpretability(tmp_path / "other.pt")
    dual.save(tmp_path / "whole.pt")
    whole = DualProjectionCLIP(tiny_vit).load(tmp_path / "whole.pt")
    images = make_images(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(whole.encode_dense(images), dual.encode_dense(images))


def test_similarity_scores_come_from_recognition_and_maps_from_interpretability(tiny_vit, tiny_tokenizer):
    dual = DualProjectionCLIP(tiny_vit)
    with torch.no_grad():
        dual.interpretability_head.weight.copy_(torch.randn_like(dual.interpretability_head.weight))
    plain = CLIPSimilarity(tiny_vit, tiny_tokenizer, PROMPTS)
    wrapped = CLIPSimilarity(dual, tiny_tokenizer, PROMPTS)
    images = make_images(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(wrapped(images), plain(images))
    auto = ITSMAttribution(wrapped).attribute(images, normalize=False, interpolate=False)
    recognition = ITSMAttribution(wrapped).attribute(
        images, normalize=False, interpolate=False, projection="recognition"
    )
    torch.testing.assert_close(
        recognition, ITSMAttribution(plain).attribute(images, normalize=False, interpolate=False)
    )
    assert not torch.allclose(auto, recognition)


# --- MaskedMaxPooling --------------------------------------------------------------------
def test_masked_max_pooling_known_answer_and_gradients():
    patches = torch.tensor([[[1.0, 5.0], [3.0, -1.0], [9.0, 9.0]]], requires_grad=True)  # (1, 3 patches, 2 channels)
    mask = torch.tensor([[True, True, False]])  # patch 2 is background: its 9s must not win
    pool = MaskedMaxPooling()
    pooled, winners = pool(patches, mask, return_indices=True)
    assert pooled.tolist() == [[3.0, 5.0]]
    assert winners.tolist() == [[1, 0]]
    pooled.sum().backward()
    assert patches.grad.tolist() == [[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]]


def test_masked_max_pooling_empty_mask_falls_back_and_counts():
    patches = torch.tensor([[[1.0], [4.0]], [[2.0], [0.0]]])
    pool = MaskedMaxPooling()
    pooled = pool(patches, torch.tensor([[False, False], [True, False]]))
    assert pooled.flatten().tolist() == [4.0, 2.0]
    assert int(pool.num_empty_masks) == 1 and int(pool.num_pooled) == 2
    with pytest.raises(ValueError, match="mask"):
        pool(patches, torch.ones(2, 3, dtype=torch.bool))


# --- MaskedMaxPoolingAttribution -------------------------------------------------------
@pytest.fixture(scope="module")
def dual_sim(tiny_vit, tiny_tokenizer):
    return CLIPSimilarity(DualProjectionCLIP(tiny_vit), tiny_tokenizer, PROMPTS)


@torch.no_grad()
def _manual_mmp(sim, images, mask, k):
    """docs/methods.md §3 written out: pooled score S_k and a_i by looping over channels."""
    patches = sim.adapter.dense_features(images, projection="interpretability")[0, 1:]
    allowed = patches.clone()
    allowed[~mask[0]] = float("-inf")
    z, winners = allowed.max(dim=0)
    text = sim.text_features[k]
    norm = z.norm()
    attributions = torch.zeros(patches.shape[0])
    for d in range(z.shape[0]):
        attributions[winners[d]] += z[d] * text[d] / norm
    return attributions, float((z / norm) @ text)


def test_mmp_attribution_matches_the_spec_and_is_complete(dual_sim):
    images = make_images(1, 3, 8, 8, seed=3)
    mask = torch.tensor([[True, False, True, True]])
    mmp = MaskedMaxPoolingAttribution(dual_sim, mask_provider=mask)
    attr, delta = mmp.attribute(images, target=2, interpolate=False, return_convergence_delta=True)
    expected, score = _manual_mmp(dual_sim, images, mask, 2)
    torch.testing.assert_close(attr.flatten(), expected, rtol=1e-5, atol=1e-6)
    assert attr.flatten()[1] == 0.0  # background patch
    assert abs(float(attr.sum()) - score) < 1e-6
    assert delta.shape == (1,) and abs(float(delta)) < 1e-6
    assert mmp.has_convergence_delta() and not mmp.multiplies_by_inputs


def test_mmp_pixel_maps_preserve_the_sum_for_every_target(dual_sim):
    images = make_images(3, 3, 8, 8, seed=4)
    mmp = MaskedMaxPoolingAttribution(dual_sim)  # no provider: every patch is foreground
    pixels, delta = mmp.attribute(images, target=None, return_convergence_delta=True)
    patches = mmp.attribute(images, target=None, interpolate=False)
    assert pixels.shape == (3, len(PROMPTS), 8, 8) and delta.shape == (3, len(PROMPTS))
    torch.testing.assert_close(pixels.sum(dim=(2, 3)), patches.sum(dim=(2, 3)))
    assert float(delta.abs().max()) < 1e-6
    per_example = mmp.attribute(images, target=[0, 2, 1])
    for i, k in enumerate([0, 2, 1]):
        torch.testing.assert_close(per_example[i, 0], pixels[i, k])


def test_mmp_rejects_a_mask_of_the_wrong_shape(dual_sim):
    mmp = MaskedMaxPoolingAttribution(dual_sim)
    with pytest.raises(ValueError, match="mask"):
        mmp.attribute(make_images(1, 3, 8, 8), target=0, mask=torch.ones(1, 9, dtype=torch.bool))
