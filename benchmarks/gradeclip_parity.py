"""Grad-ECLIP's image maps and the text-side relevances next to literal re-implementations of their references, on a
random open_clip ViT-B-16 (its 12-block, 77-token text tower included).

The literal references are those of the test suite (``tests/attr/test_gradeclip.py`` for Grad-ECLIP's image side,
``tests/attr/test_text_relevance.py`` for its text side and for Chefer et al.'s text rollout), run here at full size;
the tests assert the same bounds on tiny towers and on ViT-B-16's image side. Printed: max |difference| of the
min-max normalised maps (image) and of the relevances summed to 1 (text), and Integrated Gradients' completeness.

Usage::

    python benchmarks/gradeclip_parity.py
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import open_clip
import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "attr")]

from conftest import make_images  # noqa: E402
from test_gradeclip import LastBlock, expected_maps  # noqa: E402
from test_text_relevance import (  # noqa: E402
    TextParts,
    image_embedding,
    literal_chefer_text,
    literal_grad_eclip_text,
    unpadded_ids,
)

from captum_iclip import CLIPSimilarity, GradECLIPAttribution, explain_text  # noqa: E402
from captum_iclip.attr._utils import minmax_normalize  # noqa: E402

TEXTS = [
    "a photo of a cat",
    "a dog in a car waiting for traffic lights.",
    "single cowboy guiding a line of horses through the desert",
]


def main() -> None:
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random weights
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16").eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    sim = CLIPSimilarity(model, tokenizer, TEXTS)
    images = make_images(2, 3, 224, 224, seed=33)
    parts = LastBlock(model)
    for single_head in (False, True):
        expected = expected_maps(parts, sim, images, 1 if single_head else parts.heads, (14, 14))
        maps = GradECLIPAttribution(sim).attribute(images, single_head=single_head, interpolate=False)
        difference = (maps - minmax_normalize(expected)).abs().max()
        print(f"image, Grad-ECLIP, single_head={single_head}: max|diff| {difference:.2e} (2 images x 3 prompts)")

    image, text_parts = images[:1], TextParts(model)
    embedding = image_embedding(sim, image)
    for single_head in (False, True):
        worst = 0.0
        for text, result in zip(TEXTS, explain_text(sim, image, "gradeclip", single_head=single_head)):
            ids = unpadded_ids(text_parts, tokenizer, text)
            expected, _ = literal_grad_eclip_text(text_parts, ids, embedding, 8, 1 if single_head else None)
            worst = max(worst, float((result.relevance - expected / expected.sum()).abs().max()))
        print(f"text, Grad-ECLIP (last 8 blocks), single_head={single_head}: max|diff| {worst:.2e}")
    worst, padded = 0.0, 0.0
    for text, result in zip(TEXTS, explain_text(sim, image, "chefer")):
        expected = literal_chefer_text(
            text_parts, torch.as_tensor(tokenizer([text])[0]), embedding, 11, sim.logit_scale
        )
        worst = max(worst, float((result.relevance - expected / expected.sum()).abs().max()))
    print(f"text, Chefer rollout (last block, 77-token padded input): max|diff| {worst:.2e}")
    for text, result in zip(TEXTS, explain_text(sim, image, "gradeclip")):
        ids = torch.as_tensor(tokenizer([text])[0])  # the reference's min-max over the padding as well
        expected, _ = literal_grad_eclip_text(text_parts, ids, embedding, 8)
        padded = max(padded, float((result.relevance - expected / expected.sum()).abs().max()))
    print(f"text, Grad-ECLIP vs the reference run on the padding too (docs/methods.md §11): max|diff| {padded:.2e}")
    for result in explain_text(sim, image, "ig", n_steps=50):
        total = float(result.relevance.sum())
        print(
            f"text, Integrated Gradients (50 steps), {result.text!r}: words sum {total:+.5f}, "
            f"score - baseline {total - result.delta:+.5f}, delta {result.delta:+.1e}"
        )


if __name__ == "__main__":
    main()
