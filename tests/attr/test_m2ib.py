"""M2IB against a literal re-implementation of its reference loop (YingWANGG/M2IB), and its arguments.

The reference (``scripts/iba.py``'s ``InformationBottleneck`` and ``IBAInterpreter._train_bottleneck``,
``scripts/methods.py``'s ``vision_heatmap_iba``) is written below on the library's own modules: the image
tower run whole on ``batch_size`` copies of the image, the bottleneck module after block ``layer_idx``, the
noise drawn from torch's global generator, Adam on the gates with ``loss.backward()``, and the map read from
the last forward pass's information. The towers are the tiny open_clip and Hugging Face ViTs of conftest
(3 blocks, a 4 x 4 grid) with generic (jittered) weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_images
from transformers import CLIPModel

from captum_iclip import CLIPSimilarity, M2IBAttribution
from captum_iclip.attr._utils import minmax_normalize
from captum_iclip.evaluation.methods import build_method, method_info


@pytest.fixture(scope="module", params=["open_clip", "hf"])
def family(request, small_vit, small_hf):
    model = small_vit if request.param == "open_clip" else small_hf
    text = torch.randn(3, 8, generator=torch.Generator().manual_seed(51))
    return CLIPSimilarity(model, text_features=text)


def literal_m2ib(model, image, text, layer_idx, beta=0.1, steps=10, lr=1, batch_size=10, seed=0):
    """``vision_heatmap_iba`` before its upsampling: the (h*w,) information of one image's patch tokens."""
    hf = isinstance(model, CLIPModel)
    if hf:
        vision = model.vision_model
        blocks = list(vision.encoder.layers)
    else:
        blocks = list(model.visual.transformer.resblocks)

    def image_features(images, bottleneck):
        if hf:
            x = vision.pre_layrnorm(vision.embeddings(images))
        else:
            x = model.visual._embeds(images)
        for index, block in enumerate(blocks):
            x = block(x, None) if hf else block(x)
            if index == layer_idx:
                (x,) = bottleneck(x)
        if hf:
            return model.visual_projection(vision.post_layernorm(x[:, 0]))
        return model.visual.ln_post(x[:, 0]) @ model.visual.proj

    # extract_feature_map: the layer's output, whose shape (its estimator's zeros, squeezed) the gates take.
    features = []
    with torch.no_grad():
        image_features(image, lambda x: (features.append(x) or x,))
    alpha = torch.nn.Parameter(torch.full((1, *features[0].squeeze(0).shape), 5.0))
    buffer = {}

    def bottleneck(x):
        lamb = torch.sigmoid(alpha).expand(x.shape[0], x.shape[1], -1)
        masked_mu = x * lamb
        masked_var = (1 - lamb) ** 2
        buffer["capacity"] = -0.5 * (1 + torch.log(masked_var) - masked_mu**2 - masked_var)
        eps = masked_mu.data.new(masked_mu.size()).normal_()
        return (masked_mu + masked_var.sqrt() * eps,)

    torch.manual_seed(seed)
    images, texts = image.expand(batch_size, -1, -1, -1), text.expand(batch_size, -1)
    optimizer = torch.optim.Adam(lr=lr, params=[alpha])
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            out = image_features(images, bottleneck)
            compression = buffer["capacity"].mean()
            fitting = torch.nn.CosineSimilarity(eps=1e-6)(texts, out).mean()
            (beta * compression - fitting).backward()
            optimizer.step(closure=None)
    return torch.nansum(buffer["capacity"].mean(axis=0), -1)[1:].detach()


@pytest.mark.parametrize("layer_index", [1, None])  # None: the default, block 2 of 3 (three quarters of 3)
def test_m2ib_matches_its_reference(family, layer_index):
    sim = family
    images = make_images(2, 3, 16, 16, seed=52)
    m2ib = M2IBAttribution(sim)
    target = torch.tensor([2, 0])
    found = m2ib.attribute(images, target=target, layer_index=layer_index, normalize=False, interpolate=False)
    layer = 2 if layer_index is None else layer_index
    expected = torch.stack(
        [literal_m2ib(sim.model, images[i : i + 1], sim.text_features[target[i]], layer) for i in range(2)]
    )
    assert found.shape == (2, 1, 4, 4) and expected.std() > 1e-3
    torch.testing.assert_close(found.flatten(1), expected, rtol=1e-5, atol=1e-5)
    normalized = m2ib.attribute(images, target=target, layer_index=layer_index, interpolate=False)
    assert (normalized.flatten(1) - minmax_normalize(expected[:, None, :])[:, 0]).abs().max() <= 1e-5
    # Run to run on the CPU: the same numbers.
    again = m2ib.attribute(images, target=target, layer_index=layer_index, normalize=False, interpolate=False)
    assert torch.equal(found, again)


def test_each_map_is_its_own_images_and_prompts(family):
    sim = family
    images = make_images(2, 3, 16, 16, seed=53)
    m2ib = M2IBAttribution(sim)
    # Block 1 of 3: the patch tokens reach the embedding, so the noise shapes their gates.
    every = m2ib.attribute(images, layer_index=1, steps=3, normalize=False, interpolate=False)
    assert every.shape == (2, 3, 4, 4)
    alone = m2ib.attribute(images[1:], target=2, layer_index=1, steps=3, normalize=False, interpolate=False)
    torch.testing.assert_close(alone[:, 0], every[1:, 2], rtol=1e-5, atol=1e-5)  # the same noise, alone or not
    other_seed = m2ib.attribute(images[1:], target=2, layer_index=1, steps=3, seed=1, interpolate=False)
    assert not torch.allclose(other_seed, minmax_normalize(alone), atol=1e-3)
    maps = m2ib.attribute((images,), target=0, steps=3)
    assert isinstance(maps, tuple) and maps[0].shape == (2, 1, 16, 16)


def test_the_model_gets_no_gradients_and_is_left_as_it_was(small_vit):
    model = copy.deepcopy(small_vit).requires_grad_(True).train()
    sim = CLIPSimilarity(model, text_features=torch.randn(2, 8))
    M2IBAttribution(sim).attribute(make_images(1, 3, 16, 16, seed=54), target=0, steps=2)
    assert all(p.grad is None for p in model.parameters()) and model.training


def test_the_registry_builds_it_with_its_defaults(family):
    sim = family
    images = make_images(2, 3, 16, 16, seed=55)
    target = torch.tensor([1, 2])
    assert method_info("m2ib").kind == "gradient" and method_info("m2ib").applies_to(sim)
    expected = M2IBAttribution(sim).attribute(images, target=target)
    torch.testing.assert_close(build_method("m2ib", sim)(images, target), expected, rtol=0, atol=0)


def test_bad_arguments_name_the_argument(small_vit, tiny_resnet):
    sim = CLIPSimilarity(small_vit, text_features=torch.randn(2, 8))
    m2ib = M2IBAttribution(sim)
    images = make_images(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"layer_index: expected -3..2 \(the tower has 3 blocks\), got 3"):
        m2ib.attribute(images, target=0, layer_index=3)
    for argument, value, expected in (
        ("beta", -1.0, "a finite number >= 0"),
        ("lr", 0, "a finite number > 0"),
        ("steps", 0, "a positive int"),
        ("samples", 2.5, "a positive int"),
        ("seed", "0", "an int"),
    ):
        with pytest.raises(ValueError, match=rf"{argument}: expected {expected}, got"):
            m2ib.attribute(images, target=0, **{argument: value})
    resnet = CLIPSimilarity(tiny_resnet, text_features=torch.randn(2, 8))
    with pytest.raises(TypeError, match=r"model: M2IBAttribution expected a ViT tower"):
        M2IBAttribution(resnet).attribute(make_images(1, 3, 64, 64), target=0)
