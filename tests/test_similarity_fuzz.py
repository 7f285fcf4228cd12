"""Seeded fuzzing of ``CLIPSimilarity``'s prompts and templates (strings, tuples, unicode, overlong texts,
callables; single strings, empty lists, non-strings): a clear error naming the argument, or the right
embeddings. Seeds are fixed, so a failure reproduces.
"""

from __future__ import annotations

import random

import torch
from conftest import Part

from captum_iclip import CLIPSimilarity


def test_prompts_and_templates_give_a_clear_error_or_the_right_embeddings(tiny_vit, tiny_tokenizer):
    texts = ["a cat", "", "ünïcödé ✓", "a " * 40 + "dog", "x"]
    prompt_forms = {
        "list": lambda r: Part(r.sample(texts, r.randint(1, 3)), True),
        "tuple": lambda r: Part(tuple(r.sample(texts, 2)), True),
        "string": lambda r: Part("a cat", False),
        "empty list": lambda r: Part([], False),
        "with an int": lambda r: Part(["a cat", 3], False),
        "with None": lambda r: Part([None], False),
        "with bytes": lambda r: Part([b"a cat"], False),
    }
    template_forms = {
        "None": lambda r: Part(None, True),
        "list": lambda r: Part(["a photo of {}.", "{}"][: r.randint(1, 2)], True),
        "callable": lambda r: Part([lambda p: f"art of {p}"], True),
        "no placeholder": lambda r: Part(["a photo of"], True),
        "string": lambda r: Part("a photo of {}.", False),
        "empty list": lambda r: Part([], False),
        "with an int": lambda r: Part(["{}", 7], False),
    }
    rng = random.Random(5)
    for case in range(40):
        prompt_name, prompts = rng.choice(list(prompt_forms.items()))
        template_name, templates = rng.choice(list(template_forms.items()))
        prompts, templates = prompts(rng), templates(rng)
        label = f"case {case}: prompts={prompt_name}, templates={template_name}"
        try:
            sim = CLIPSimilarity(tiny_vit, tiny_tokenizer, prompts.value, templates=templates.value)
        except (ValueError, TypeError) as error:
            invalid = [n for n, part in (("prompts", prompts), ("templates", templates)) if not part.valid]
            assert invalid and any(n in str(error) for n in invalid), f"{label}: {error!r}"
            continue
        assert prompts.valid and templates.valid, f"{label}: invalid input accepted"
        # Each row is that prompt's own embedding: prompts embedded one by one give the same rows.
        one_by_one = torch.cat([sim.encode_prompts([p]) for p in prompts.value])
        torch.testing.assert_close(sim.text_features, one_by_one, msg=lambda m, label=label: f"{label}: {m}")
        assert sim.prompts == list(prompts.value)
