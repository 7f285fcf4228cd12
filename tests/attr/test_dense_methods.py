"""The field's other dense CLIP methods against literal re-implementations of their references.

Each reference below was written from the authors' code (MaskCLIP, SCLIP, ClearCLIP,
NACLIP, GEM, LeGrad, Transformer-MM-Explainability), one head, image and prompt at a
time, on the library's own modules; the classes must give the same maps on tiny
open_clip and Hugging Face ViTs with generic (jittered) weights and a 4x4 patch grid.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_images
from transformers import CLIPModel

from captum_iclip import (
    CheferRelevancy,
    CLIPSimilarity,
    GEMAttribution,
    GradECLIPAttribution,
    ITSMAttribution,
    LeGradAttribution,
    M2IBAttribution,
)


@pytest.fixture(scope="module", params=["open_clip", "hf"])
def family(request, small_vit, small_hf):
    """(similarity with 3 random prompts, reference parts) for each ViT family."""
    model = small_vit if request.param == "open_clip" else small_hf
    text = torch.randn(3, 8, generator=torch.Generator().manual_seed(13))
    return CLIPSimilarity(model, text_features=text), Reference(model)


class Reference:
    """The library's own modules of a tiny CLIP, read the way each reference reads them."""

    def __init__(self, model) -> None:
        self.model = model
        self.hf = isinstance(model, CLIPModel)
        self.blocks = list(model.vision_model.encoder.layers if self.hf else model.visual.transformer.resblocks)

    def embed(self, images):
        if self.hf:
            vision = self.model.vision_model
            return vision.pre_layrnorm(vision.embeddings(images))
        return self.model.visual._embeds(images)

    def run(self, block, x):
        return block(x, None) if self.hf else block(x)

    def ln_1(self, block, x):
        return block.layer_norm1(x) if self.hf else block.ln_1(x)

    def qkv(self, block, x):
        if self.hf:
            attn = block.self_attn
            return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        return F.linear(x, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)

    def out_proj(self, block, x):
        return block.self_attn.out_proj(x) if self.hf else block.attn.out_proj(x)

    def mlp(self, block, x):
        return block.mlp(block.layer_norm2(x)) if self.hf else block.mlp(block.ln_2(x))

    def heads(self, block) -> int:
        return block.self_attn.num_heads if self.hf else block.attn.num_heads

    def project(self, tokens):
        if self.hf:
            return self.model.visual_projection(self.model.vision_model.post_layernorm(tokens))
        return self.model.visual.ln_post(tokens) @ self.model.visual.proj

    def explicit_block(self, block, x):
        """The block with its attention probabilities (heads, L, L) of one image (L, C) returned."""
        q, k, v = self.qkv(block, self.ln_1(block, x))
        heads = self.heads(block)
        d = q.shape[-1] // heads
        probs = torch.stack(
            [
                torch.softmax(q[:, h * d : (h + 1) * d] * d**-0.5 @ k[:, h * d : (h + 1) * d].T, dim=-1)
                for h in range(heads)
            ]
        )
        attended = torch.cat([probs[h] @ v[:, h * d : (h + 1) * d] for h in range(heads)], dim=-1)
        x = x + self.out_proj(block, attended)
        return x + self.mlp(block, x), probs


def per_head(q, k, v, heads, weights):
    """concat_h weights(q_h, k_h) @ v_h for tokens (L, C)."""
    d = q.shape[-1] // heads
    parts = [slice(h * d, (h + 1) * d) for h in range(heads)]
    return torch.cat([weights(q[:, p], k[:, p], d**-0.5) @ v[:, p] for p in parts], dim=-1)


def softmax_product(a, b, scale):
    return torch.softmax(a @ b.T * scale, dim=-1)


def naclip_omega(h: int, w: int, std: float = 5.0, prefix: int = 1) -> torch.Tensor:
    """NACLIP's addition: a (2h-1)x(2w-1) Gaussian window convolved with one-hot patch maps (0 for the
    ``prefix`` tokens before the patches)."""
    axes = [torch.linspace(-(n - 1) / 2, (n - 1) / 2, n) / (std * math.sqrt(2)) for n in (2 * h - 1, 2 * w - 1)]
    window = torch.exp(-(torch.stack(torch.meshgrid(*axes, indexing="ij")) ** 2).sum(0))
    one_hot = torch.eye(h * w).reshape(h * w, 1, h, w)
    spread = F.conv2d(one_hot, window[None, None], padding="same").reshape(h * w, h * w)
    omega = torch.zeros(prefix + h * w, prefix + h * w)
    omega[prefix:, prefix:] = spread
    return omega


def literal_last_block_variant(ref: Reference, image: torch.Tensor, variant: str) -> torch.Tensor:
    """Patch features (h*w, D) of one image for MaskCLIP, SCLIP, ClearCLIP or NACLIP."""
    x = ref.embed(image[None])
    for block in ref.blocks[:-1]:
        x = ref.run(block, x)
    x, block = x[0], ref.blocks[-1]
    q, k, v = ref.qkv(block, ref.ln_1(block, x))
    heads = ref.heads(block)
    if variant == "maskclip":  # value embedding -> out_proj, then the residual and the FFN
        out = x + ref.out_proj(block, v)
        out = out + ref.mlp(block, out)
    elif variant == "sclip":  # softmax(qq) + softmax(kk), with the residual and the FFN
        attended = per_head(q, k, v, heads, lambda a, b, s: softmax_product(a, a, s) + softmax_product(b, b, s))
        out = x + ref.out_proj(block, attended)
        out = out + ref.mlp(block, out)
    elif variant == "clearclip":  # softmax(qq), no residual, no FFN
        out = ref.out_proj(block, per_head(q, k, v, heads, lambda a, b, s: softmax_product(a, a, s)))
    else:  # naclip: softmax(kk * s + omega), no residual, no FFN
        omega = naclip_omega(4, 4)
        out = ref.out_proj(block, per_head(q, k, v, heads, lambda a, b, s: torch.softmax(b @ b.T * s + omega, dim=-1)))
    return ref.project(out)[1:]


def maps_of(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(h*w, D) patch features -> (K, 4, 4) cosine maps."""
    return (F.normalize(features, dim=-1) @ text.T).T.reshape(-1, 4, 4)


# --- ITSM variants ---------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("variant", ["maskclip", "sclip", "clearclip", "naclip"])
def test_itsm_variant_matches_its_reference(family, variant):
    sim, ref = family
    images = make_images(2, 3, 16, 16, seed=21)
    actual = ITSMAttribution(sim).attribute(images, variant=variant, normalize=False, interpolate=False)
    expected = torch.stack(
        [maps_of(literal_last_block_variant(ref, image, variant), sim.text_features) for image in images]
    )
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    # The global token is still the model's image embedding.
    raw = sim.adapter.dense_features(images)[:, 0]
    torch.testing.assert_close(sim.adapter.dense_features(images, path=_path(variant))[:, 0], raw, rtol=1e-5, atol=1e-6)


def _path(variant):
    from captum_iclip.models.attention import dense_path

    return dense_path(variant)


def test_naclip_neighbourhood_is_the_reference_window():
    from captum_iclip.models.attention import gaussian_neighbourhood

    torch.testing.assert_close(gaussian_neighbourhood((4, 3), 5.0).float(), naclip_omega(4, 3), rtol=1e-5, atol=1e-6)


# --- GEM -------------------------------------------------------------------------------
def literal_gem(ref: Reference, image: torch.Tensor, depth: int, iterations: int = 1) -> torch.Tensor:
    """GEM's patch features (h*w, D) of one image: self-self path on the last ``depth`` blocks."""
    x = ref.embed(image[None])
    for block in ref.blocks[: len(ref.blocks) - depth]:
        x = ref.run(block, x)
    x = x[0]
    x_gem = x
    for block in ref.blocks[len(ref.blocks) - depth :]:
        tokens = ref.ln_1(block, x)
        q, k, v = ref.qkv(block, tokens)
        heads = ref.heads(block)
        d = q.shape[-1] // heads
        inverse_temperature = tokens.norm(dim=-1).mean() * d**-0.5
        outputs = []
        for h in range(heads):
            part = slice(h * d, (h + 1) * d)
            assigned = 0
            for start in (v[:, part], k[:, part], q[:, part]):
                xs = start
                for _ in range(iterations):
                    xs = F.normalize(xs, dim=-1)
                    xs = torch.softmax(xs @ xs.T * inverse_temperature, dim=-1) @ xs
                xs = F.normalize(xs, dim=-1)
                assigned = assigned + torch.softmax(xs @ xs.T * inverse_temperature, dim=-1) @ v[:, part]
            outputs.append(assigned / 3)
        x_gem = x_gem + ref.out_proj(block, torch.cat(outputs, dim=-1))
        x = ref.run(block, x[None])[0]
    return ref.project(x_gem)[1:]


@torch.no_grad()
@pytest.mark.parametrize("depth,iterations", [(2, 1), (3, 2)])
def test_gem_matches_its_reference(family, depth, iterations):
    sim, ref = family
    images = make_images(2, 3, 16, 16, seed=22)
    actual = GEMAttribution(sim).attribute(
        images, depth=depth, iterations=iterations, normalize=False, interpolate=False
    )
    expected = torch.stack([maps_of(literal_gem(ref, image, depth, iterations), sim.text_features) for image in images])
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


# --- LeGrad ------------------------------------------------------------------------------
def literal_legrad(ref: Reference, image: torch.Tensor, text: torch.Tensor, start: int) -> torch.Tensor:
    """LeGrad's (h*w,) map of one image and one prompt, layer by layer."""
    with torch.enable_grad():
        x = ref.embed(image[None])[0]
        probs, outputs = [], []
        for index, block in enumerate(ref.blocks):
            if index < start:
                x = ref.run(block, x[None])[0]
                continue
            x = x.detach().requires_grad_(True) if index == start else x
            x, p = ref.explicit_block(block, x)
            probs.append(p)
            outputs.append(x)
        total = 0
        for p, out in zip(probs, outputs):
            feature = F.normalize(ref.project(out.mean(dim=0)), dim=-1)  # mean over all tokens, class token too
            grad = torch.autograd.grad(feature @ text, p, retain_graph=True)[0]
            total = total + grad.clamp_min(0).mean(dim=0).mean(dim=0)[1:]
    return total


@pytest.mark.parametrize("layer_index", [-2, 0])
def test_legrad_matches_its_reference(family, layer_index):
    sim, ref = family
    images = make_images(2, 3, 16, 16, seed=23)
    actual = LeGradAttribution(sim).attribute(images, layer_index=layer_index, normalize=False, interpolate=False)
    start = layer_index % len(ref.blocks)
    expected = torch.stack(
        [
            torch.stack([literal_legrad(ref, image, t, start).reshape(4, 4) for t in sim.text_features])
            for image in images
        ]
    )
    assert expected.abs().max() > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)
    single = LeGradAttribution(sim).attribute(
        images, target=[2, 0], layer_index=layer_index, normalize=False, interpolate=False
    )
    torch.testing.assert_close(single[:, 0], expected[[0, 1], [2, 0]], rtol=1e-4, atol=1e-6)


# --- Chefer et al. -----------------------------------------------------------------------
def literal_chefer(ref: Reference, image: torch.Tensor, text: torch.Tensor, start: int, logit_scale) -> torch.Tensor:
    """Transformer-MM-Explainability's CLIP relevancy (h*w,) of one image and one prompt."""
    with torch.enable_grad():
        x = ref.embed(image[None])[0]
        probs = []
        for index, block in enumerate(ref.blocks):
            if index == start:
                x = x.detach().requires_grad_(True)
            if index < start:
                x = ref.run(block, x[None])[0]
            else:
                x, p = ref.explicit_block(block, x)
                probs.append(p)
        logit = logit_scale * F.normalize(ref.project(x[0]), dim=-1) @ text
        relevancy = torch.eye(x.shape[0])
        for p in probs:
            grad = torch.autograd.grad(logit, p, retain_graph=True)[0]
            cam = (grad * p).clamp(min=0).mean(dim=0)
            relevancy = relevancy + cam @ relevancy
    return relevancy[0, 1:]


@pytest.mark.parametrize("start_layer", [-1, 0])
def test_chefer_matches_its_reference(family, start_layer):
    sim, ref = family
    images = make_images(2, 3, 16, 16, seed=24)
    actual = CheferRelevancy(sim).attribute(images, start_layer=start_layer, normalize=False, interpolate=False)
    start = start_layer % len(ref.blocks)
    expected = torch.stack(
        [
            torch.stack(
                [literal_chefer(ref, image, t, start, sim.logit_scale).reshape(4, 4) for t in sim.text_features]
            )
            for image in images
        ]
    )
    assert expected.abs().max() > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


# --- shared semantics and bad input -------------------------------------------------------
@pytest.mark.parametrize("method", ["gem", "legrad", "chefer", "clearclip"])
def test_target_and_postprocessing_follow_itsm(family, method):
    sim, _ = family
    images = make_images(2, 3, 16, 16, seed=25)
    run = {
        "gem": lambda **kw: GEMAttribution(sim).attribute(images, depth=2, **kw),
        "legrad": lambda **kw: LeGradAttribution(sim).attribute(images, **kw),
        "chefer": lambda **kw: CheferRelevancy(sim).attribute(images, **kw),
        "clearclip": lambda **kw: ITSMAttribution(sim).attribute(images, variant="clearclip", **kw),
    }[method]
    every = run(normalize=False, interpolate=False)
    assert every.shape == (2, 3, 4, 4)
    picked = run(target=torch.tensor([1, 2]), normalize=False, interpolate=False)
    torch.testing.assert_close(picked[:, 0], every[[0, 1], [1, 2]], rtol=1e-5, atol=1e-7)
    maps = run(target=1)
    assert maps.shape == (2, 1, 16, 16)
    flat = F.interpolate(every[:, 1:2], size=(16, 16), mode="bilinear", align_corners=False)
    low = every[:, 1:2].amin(dim=(2, 3), keepdim=True)
    high = every[:, 1:2].amax(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(maps, (flat - low) / (high - low), rtol=1e-4, atol=1e-5)
    assert isinstance(run(target=0), torch.Tensor)


@pytest.mark.parametrize(
    "run",
    [
        lambda sim, x: GEMAttribution(sim).attribute(x),
        lambda sim, x: LeGradAttribution(sim).attribute(x),
        lambda sim, x: CheferRelevancy(sim).attribute(x),
        lambda sim, x: ITSMAttribution(sim).attribute(x, variant="naclip"),
    ],
    ids=["gem", "legrad", "chefer", "naclip"],
)
def test_resnet_towers_get_a_clear_error(tiny_resnet, run):
    sim = CLIPSimilarity(tiny_resnet, text_features=torch.randn(2, 8))
    with pytest.raises(TypeError, match=r"model: .* expected a ViT tower .*got a open_clip ModifiedResNet tower"):
        run(sim, make_images(1, 3, 64, 64))


def test_bad_layer_arguments_name_the_argument(small_vit):
    sim = CLIPSimilarity(small_vit, text_features=torch.randn(2, 8))
    images = make_images(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"layer_index: expected -3..2 \(the tower has 3 blocks\), got 3"):
        LeGradAttribution(sim).attribute(images, layer_index=3)
    with pytest.raises(ValueError, match=r"start_layer: expected -3..2"):
        CheferRelevancy(sim).attribute(images, start_layer=-4)
    with pytest.raises(ValueError, match=r"depth: expected 0..3"):
        GEMAttribution(sim).attribute(images, depth=4)
    with pytest.raises(ValueError, match=r"iterations: expected a non-negative int"):
        GEMAttribution(sim).attribute(images, iterations=-1)
    with pytest.raises(ValueError, match=r"variant: expected one of"):
        ITSMAttribution(sim).attribute(images, variant="gem")


# --- the method registry of demo, eval and audit ------------------------------------------
def test_registry_runs_every_new_method_and_only_on_vits(family, tiny_resnet):
    from captum_iclip.evaluation.methods import VIT_METHODS, available_methods, build_method, method_info

    sim, _ = family
    images = make_images(2, 3, 16, 16, seed=26)
    target = torch.tensor([2, 1])
    direct = {
        "gem": lambda: GEMAttribution(sim).attribute(images, target=target),
        "legrad": lambda: LeGradAttribution(sim).attribute(images, target=target),
        "chefer": lambda: CheferRelevancy(sim).attribute(images, target=target),
        "m2ib": lambda: M2IBAttribution(sim).attribute(images, target=target),
        "gradeclip": lambda: GradECLIPAttribution(sim).attribute(images, target=target),
    }
    # ProxyCLIP needs a proxy model besides the tower (tests/attr/test_proxyclip.py builds it with one).
    without_proxy = [name for name in VIT_METHODS if not method_info(name).needs_proxy]
    assert set(VIT_METHODS) - set(without_proxy) == {"proxyclip"}
    assert all(available_methods(sim)[name] for name in without_proxy)
    for name in without_proxy:
        maps = build_method(name, sim)(images, target)
        expected = (
            direct[name]() if name in direct else ITSMAttribution(sim).attribute(images, target=target, variant=name)
        )
        torch.testing.assert_close(maps, expected)
    resnet = CLIPSimilarity(tiny_resnet, text_features=torch.randn(2, 8))
    assert not any(available_methods(resnet)[name] for name in VIT_METHODS)
    with pytest.raises(ValueError, match=r"got 'legrad' \(it needs a ViT tower \(open_clip VisionTransformer or timm"):
        build_method("legrad", resnet)


def test_prompts_in_chunks_give_the_same_maps(family, monkeypatch):
    from captum_iclip.attr import _prompt_grads

    sim, _ = family
    images = make_images(2, 3, 16, 16, seed=27)
    whole = [
        LeGradAttribution(sim).attribute(images, layer_index=0),
        CheferRelevancy(sim).attribute(images, start_layer=0),
    ]
    # One prompt per backward pass, one (prompt, image) per reduction, one image per graph.
    monkeypatch.setattr(_prompt_grads, "GRADIENT_BUDGET", 1)
    monkeypatch.setattr(_prompt_grads, "GRAPH_BUDGET", 1)
    chunked = [
        LeGradAttribution(sim).attribute(images, layer_index=0),
        CheferRelevancy(sim).attribute(images, start_layer=0),
    ]
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    one = [
        LeGradAttribution(sim).attribute(images, target=[1, 0], layer_index=0),
        CheferRelevancy(sim).attribute(images, target=[1, 0], start_layer=0),
    ]
    for a, b in zip(whole, one):  # one prompt per image, in the same chunks
        torch.testing.assert_close(b[:, 0], torch.stack([a[0, 1], a[1, 0]]), rtol=1e-5, atol=1e-6)


# --- hooks on the blocks (ablation, activation patching) -------------------------------------------
def _blocks_of(model):
    return list(
        model.vision_model.encoder.layers if isinstance(model, CLIPModel) else model.visual.transformer.resblocks
    )


def _skip_block(module, inputs, output):
    """A forward hook that ablates the block: its output is its input (no residual update)."""
    return inputs[0] if isinstance(output, torch.Tensor) else (inputs[0], *output[1:])


def _ablated_copy(model, index: int):
    """``model`` with block ``index`` ablated by its weights (out-projections zeroed), without a hook."""
    import copy

    ablated = copy.deepcopy(model)
    block = _blocks_of(ablated)[index]
    hf = isinstance(ablated, CLIPModel)
    for linear in (block.self_attn.out_proj, block.mlp.fc2) if hf else (block.attn.out_proj, block.mlp.c_proj):
        linear.weight.data.zero_()
        linear.bias.data.zero_()
    return ablated


# (method, what it computes from the blocks' parts, the first such block of the 3)
REPLACING_CALLS = {
    "gem": (lambda sim, x: GEMAttribution(sim).attribute(x, depth=2), 1),
    "legrad": (lambda sim, x: LeGradAttribution(sim).attribute(x, layer_index=-2), 1),
    "chefer": (lambda sim, x: CheferRelevancy(sim).attribute(x, start_layer=-1), 2),
    "itsm-clearclip": (lambda sim, x: ITSMAttribution(sim).attribute(x, variant="clearclip"), 2),
    "itsm-surgery": (lambda sim, x: ITSMAttribution(sim).attribute(x, variant="surgery", surgery_depth=2), 1),
}


@pytest.mark.parametrize("method", list(REPLACING_CALLS))
def test_block_loop_methods_refuse_hooks_on_the_blocks_they_replace(family, method):
    sim, _ = family
    run, first = REPLACING_CALLS[method]
    images = make_images(1, 3, 16, 16, seed=31)
    handle = _blocks_of(sim.model)[first].register_forward_hook(_skip_block)
    try:
        with pytest.raises(ValueError, match=rf"model: expected no hooks .* got a forward hook on block {first} of 3"):
            run(sim, images)
    finally:
        handle.remove()
    run(sim, images)  # without the hook it runs


@pytest.mark.parametrize("method", list(REPLACING_CALLS))
def test_block_loop_methods_honour_hooks_on_the_blocks_they_run_whole(family, method):
    # Block 0 is run by the plain path in every call above: its hook acts as the model's own forward does.
    sim, _ = family
    run, _ = REPLACING_CALLS[method]
    images = make_images(1, 3, 16, 16, seed=32)
    ablated = CLIPSimilarity(_ablated_copy(sim.model, 0), text_features=sim.text_features)
    expected = run(ablated, images)
    handle = _blocks_of(sim.model)[0].register_forward_hook(_skip_block)
    try:
        torch.testing.assert_close(sim(images), ablated(images))
        torch.testing.assert_close(run(sim, images), expected)
    finally:
        handle.remove()
    assert not torch.allclose(run(sim, images), expected)


def test_hooks_on_a_replaced_blocks_attention_are_refused(family):
    sim, _ = family
    block = _blocks_of(sim.model)[2]
    name = "self_attn" if isinstance(sim.model, CLIPModel) else "attn"
    images = make_images(1, 3, 16, 16, seed=33)
    handle = getattr(block, name).register_forward_pre_hook(lambda module, args: None)
    try:
        with pytest.raises(ValueError, match=rf"got a forward pre-hook on block 2 of 3 \(.*, on its {name} \("):
            GEMAttribution(sim).attribute(images, depth=1)
        ITSMAttribution(sim).attribute(images)  # the plain path runs it whole
    finally:
        handle.remove()
    # A part that the block's parts call themselves keeps its hook: it runs.
    calls = []
    handle = getattr(block, name).out_proj.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        GEMAttribution(sim).attribute(images, depth=1)
    finally:
        handle.remove()
    assert calls
