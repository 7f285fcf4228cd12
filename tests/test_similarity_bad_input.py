"""Bad input to CLIPSimilarity fails early with an error that names the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

from captum_iclip import CLIPSimilarity


def test_empty_prompt_list(vit_b32, tokenizer):
    with pytest.raises(ValueError, match=r"prompts: expected at least one text, got an empty list"):
        CLIPSimilarity(vit_b32, tokenizer, [])


def test_a_string_instead_of_a_list_of_prompts(vit_b32, tokenizer):
    with pytest.raises(TypeError, match=r"prompts: expected a list of strings, got a single string"):
        CLIPSimilarity(vit_b32, tokenizer, "a cat")


def test_prompts_that_are_not_strings(vit_b32, tokenizer):
    with pytest.raises(TypeError, match=r"prompts: expected every prompt to be a string"):
        CLIPSimilarity(vit_b32, tokenizer, ["a cat", 3])


def test_prompts_without_a_tokenizer(vit_b32):
    with pytest.raises(ValueError, match=r"tokenizer: expected a tokenizer to embed prompts .*, got None"):
        CLIPSimilarity(vit_b32, None, ["a cat"])


@pytest.mark.parametrize(
    "features, message",
    [
        (torch.randn(2, 256), r"text_features: expected dimension 512, got 256"),
        (torch.randn(512), r"text_features: expected a non-empty \(K, D\)"),
    ],
    ids=["dimension", "rank"],
)
def test_bad_text_features(vit_b32, features, message):
    with pytest.raises(ValueError, match=message):
        CLIPSimilarity(vit_b32, text_features=features)


def test_unknown_output(vit_b32):
    with pytest.raises(ValueError, match=r"output: expected one of \('cosine', 'logits', 'probs'\), got 'softmax'"):
        CLIPSimilarity(vit_b32, text_features=torch.randn(2, 512), output="softmax")
