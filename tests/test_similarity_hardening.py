"""Hardening of CLIPSimilarity: templates, the empty prompt, text features, a model in train mode.

Each test failed on the code before its fix (the hardening passes: one test per defect an adversarial
review found). Models are tiny random architectures (conftest) or the bundled shapes-tiny model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_images

from captum_iclip import CLIPSimilarity, ITSMAttribution, MaskedMaxPoolingAttribution

PROMPTS = ["a cat", "a dog", "a car"]


def test_templates_given_as_one_string_are_refused(tiny_vit, tiny_tokenizer):
    with pytest.raises(TypeError, match="templates: expected a list of templates, got the single string"):
        CLIPSimilarity(tiny_vit, tiny_tokenizer, PROMPTS, templates="a photo of {}.")
    sim = CLIPSimilarity(tiny_vit, tiny_tokenizer, PROMPTS, templates=["a photo of {}."])
    with pytest.raises(TypeError, match="templates"):
        sim.templates = "a {}"


def test_empty_prompt_embedding_follows_the_templates(tiny_vit, tiny_tokenizer):
    sim = CLIPSimilarity(tiny_vit, tiny_tokenizer, ["a cat"])
    plain = sim.empty_prompt_feature()
    sim.templates = ["a photo of {}.", "a drawing of {}."]
    ensembled = sim.empty_prompt_feature()
    assert torch.equal(ensembled, sim.encode_prompts([""]))
    assert not torch.allclose(plain, ensembled)


def test_text_features_of_another_float_dtype_are_cast_and_bad_ones_refused(tiny_vit, tiny_tokenizer):
    reference = CLIPSimilarity(tiny_vit, tiny_tokenizer, PROMPTS)
    images = make_images(2, 3, 8, 8, seed=4)
    sim = CLIPSimilarity(tiny_vit, text_features=reference.text_features.double())
    assert sim.text_features.dtype == torch.float32
    torch.testing.assert_close(sim(images), reference(images))
    torch.testing.assert_close(ITSMAttribution(sim).attribute(images), ITSMAttribution(reference).attribute(images))
    with pytest.raises(TypeError, match="text_features: expected a floating-point"):
        CLIPSimilarity(tiny_vit, text_features=torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="text_features: expected finite"):
        CLIPSimilarity(tiny_vit, text_features=torch.full((3, 8), float("nan")))


def test_a_model_in_train_mode_is_explained_in_eval_mode_and_left_as_given(tiny_resnet, tiny_tokenizer):
    images = make_images(2, 3, 64, 64, seed=5)
    evaluated = CLIPSimilarity(tiny_resnet, tiny_tokenizer, PROMPTS)
    expected = (
        evaluated(images),
        ITSMAttribution(evaluated).attribute(images, target=1),
        MaskedMaxPoolingAttribution(evaluated).attribute(images, target=1),
    )
    model = copy.deepcopy(tiny_resnet).train()
    statistics = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    sim = CLIPSimilarity(model, tiny_tokenizer, PROMPTS)
    got = (
        sim(images),
        ITSMAttribution(sim).attribute(images, target=1),
        MaskedMaxPoolingAttribution(sim).attribute(images, target=1),
    )
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert all(module.training for module in model.modules())  # the caller's mode is given back
    assert all(torch.equal(model.state_dict()[k], v) for k, v in statistics.items())  # BatchNorm untouched
