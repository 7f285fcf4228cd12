"""The families people load today: open_clip timm towers (SigLIP's MAP head, a ViT with average
pooling and registers, EVA02, ConvNeXt) and Hugging Face ``SiglipModel`` / ``Siglip2Model``.

Every model is the real architecture (the same timm / transformers classes and pooling
heads as ViT-B-16-SigLIP, EVA02-B-16, convnext_base, google/siglip(2)-base) at a small size with random,
jittered weights, built once per module:

* parity: the global entry of the dense features is the model's own image embedding;
* the dense rule of docs/methods.md against a literal re-implementation: the model's own
  pooling head run on a sequence (or a 1x1 map) holding only that position;
* scores: SigLIP logits against the model's own forward, sigmoid per prompt;
* ITSM raw / surgery shapes, surgery's NotImplementedError on a convolutional trunk;
* Captum's IntegratedGradients, NoiseTunnel and LayerGradCam on every family;
* DualProjectionCLIP.encode_image is the model's own embedding (SigLIP 2 NaFlex included);
* the block-loop methods (GEM, LeGrad, Chefer, ITSM path variants) run on every ViT family (their parity:
  tests/attr/test_dense_methods_towers.py) and raise an error naming a convolutional trunk, which the method
  registry marks unavailable.
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients, LayerGradCam, NoiseTunnel, Saliency
from conftest import TOWER_SIDE, make_images, timm_clip
from transformers import Siglip2Model, SiglipModel
from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

from captum_iclip import (
    CheferRelevancy,
    CLIPSimilarity,
    DualProjectionCLIP,
    GEMAttribution,
    ITSMAttribution,
    LeGradAttribution,
    get_adapter,
)
from captum_iclip.models.hf_siglip import HFSiglip2Adapter, HFSiglipAdapter
from captum_iclip.models.timm_towers import TimmConvAdapter, TimmViTAdapter

SIZE = TOWER_SIDE  # input side of the ViT families (4x4 grid of 8-px patches); 64 for ConvNeXt (2x2 grid)


@pytest.fixture(scope="module")
def convnext():
    """convnext_base's configuration (timm ConvNeXt, open_clip linear projection) on convnext_atto."""
    return timm_clip("convnext_atto", 16, pool="", proj="linear", image_size=64)


def naflex_inputs(images: torch.Tensor) -> dict:
    """SigLIP 2's vision inputs for full images, patchified by its image processor's own function."""
    n, _, height, width = images.shape
    grid = (height // 8, width // 8)
    return dict(
        pixel_values=torch.stack([convert_image_to_patches(image, 8) for image in images]),
        pixel_attention_mask=torch.ones(n, grid[0] * grid[1], dtype=torch.long),
        spatial_shapes=torch.tensor([grid] * n),
    )


FAMILIES = ["siglip", "vit_avg", "eva02", "convnext", "hf_siglip", "hf_siglip2"]


def image_side(name: str) -> int:
    return 64 if name == "convnext" else SIZE


@torch.no_grad()
def own_embedding(model, images: torch.Tensor) -> torch.Tensor:
    if isinstance(model, (SiglipModel, Siglip2Model)):
        inputs = naflex_inputs(images) if isinstance(model, Siglip2Model) else dict(pixel_values=images)
        out = model.get_image_features(**inputs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    return model.encode_image(images)


# --- dispatch and parity of the global entry -----------------------------------------------
@pytest.mark.parametrize(
    "name, adapter_class, family",
    [
        ("siglip", TimmViTAdapter, "open_clip timm VisionTransformer (map pooling)"),
        ("vit_avg", TimmViTAdapter, "open_clip timm VisionTransformer (avg pooling)"),
        ("eva02", TimmViTAdapter, "open_clip timm Eva (token pooling)"),
        ("convnext", TimmConvAdapter, "open_clip timm ConvNeXt (avg pooling)"),
        ("hf_siglip", HFSiglipAdapter, "transformers SiglipModel"),
        ("hf_siglip2", HFSiglip2Adapter, "transformers Siglip2Model"),
    ],
)
def test_global_entry_is_the_models_own_embedding(name, adapter_class, family, request):
    model = request.getfixturevalue(name)
    adapter = get_adapter(model)
    assert isinstance(adapter, adapter_class) and adapter.family == family
    images = make_images(2, 3, image_side(name), image_side(name), seed=1)
    with torch.no_grad():
        dense = adapter.dense_features(images)
    grid = adapter.grid_size(*images.shape[-2:])
    assert dense.shape == (2, 1 + grid[0] * grid[1], adapter.embed_dim)
    torch.testing.assert_close(dense[:, 0], own_embedding(model, images), rtol=0, atol=2e-6)
    # The dual-projection wrapper keeps that global entry and copies the dense head.
    dual = DualProjectionCLIP(model)
    with torch.no_grad():
        torch.testing.assert_close(dual.encode_dense(images), dense, rtol=0, atol=1e-6)


# --- the dense rule against literal re-implementations ---------------------------------------
@torch.no_grad()
def literal_dense(name: str, model, images: torch.Tensor) -> torch.Tensor:
    """Each position alone through the model's own pooling head: (N, h*w, D)."""
    if name.startswith("hf_siglip"):
        vision = model.vision_model
        inputs = naflex_inputs(images) if name == "hf_siglip2" else dict(pixel_values=images)
        tokens = vision(**inputs).last_hidden_state
        # The MAP head on a one-token sequence: its probe can attend only to that token.
        return torch.stack([vision.head(tokens[:, i : i + 1]) for i in range(tokens.shape[1])], dim=1)
    trunk, clip_head = model.visual.trunk, model.visual.head
    features = trunk.forward_features(images)
    if name == "convnext":  # the pooling head on a 1x1 map holding one position
        n, _, h, w = features.shape
        return torch.stack(
            [clip_head(trunk.forward_head(features[:, :, r : r + 1, c : c + 1])) for r in range(h) for c in range(w)],
            dim=1,
        )
    prefix = trunk.num_prefix_tokens
    outputs = []
    for i in range(prefix, features.shape[1]):
        if name == "vit_avg":  # prefix tokens kept (the pool skips them), one patch to average
            sequence = torch.cat([features[:, :prefix], features[:, i : i + 1]], dim=1)
        else:  # token pooling reads position 0; the MAP head attends to the only token
            sequence = features[:, i : i + 1]
        outputs.append(clip_head(trunk.forward_head(sequence)))
    return torch.stack(outputs, dim=1)


@pytest.mark.parametrize("name", FAMILIES)
def test_dense_rule_matches_a_literal_reimplementation(name, request):
    model = request.getfixturevalue(name)
    images = make_images(2, 3, image_side(name), image_side(name), seed=2)
    with torch.no_grad():
        dense = get_adapter(model).dense_features(images)
    expected = literal_dense(name, model, images)
    torch.testing.assert_close(dense[:, 1:], expected, rtol=0, atol=2e-6)
    # Non-linear heads: the global entry is not the mean of the position entries.
    assert (dense[:, 0] - dense[:, 1:].mean(dim=1)).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["siglip", "vit_avg", "eva02", "hf_siglip", "hf_siglip2"])
def test_any_size_divisible_by_the_patch(name, request):
    model = request.getfixturevalue(name)
    adapter = get_adapter(model)
    images = make_images(1, 3, 24, 40, seed=3)
    with torch.no_grad():
        dense = adapter.dense_features(images)
    assert dense.shape == (1, 1 + 3 * 5, adapter.embed_dim) and torch.isfinite(dense).all()
    if name == "hf_siglip2":  # NaFlex takes any grid itself: the parity holds off the native size too
        torch.testing.assert_close(dense[:, 0], own_embedding(model, images), rtol=0, atol=2e-6)


# --- scores ----------------------------------------------------------------------------------
@torch.no_grad()
def test_siglip_logits_and_probs_are_the_models_own(siglip, hf_siglip):
    images = make_images(2, 3, SIZE, SIZE, seed=4)
    tokens = torch.randint(1, 64, (3, 8), generator=torch.Generator().manual_seed(0))
    image_features, text_features, scale, bias = siglip(images, tokens)
    expected = scale * image_features @ text_features.t() + bias
    sim = CLIPSimilarity(siglip, text_features=siglip.encode_text(tokens), output="logits")
    torch.testing.assert_close(sim(images), expected, rtol=1e-5, atol=1e-5)
    probs = CLIPSimilarity(siglip, text_features=siglip.encode_text(tokens), output="probs")(images)
    torch.testing.assert_close(probs, expected.sigmoid(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sim.probabilities(sim(images)), probs)

    out = hf_siglip(input_ids=tokens, pixel_values=images)
    text = out.text_embeds
    hf_sim = CLIPSimilarity(hf_siglip, text_features=text, output="logits")
    torch.testing.assert_close(hf_sim(images), out.logits_per_image, rtol=1e-5, atol=1e-5)
    assert hf_sim.logit_bias is hf_siglip.logit_bias


@torch.no_grad()
def test_siglip2_logits_are_the_models_own(hf_siglip2):
    images = make_images(2, 3, SIZE, SIZE, seed=4)
    tokens = torch.randint(1, 64, (3, 8), generator=torch.Generator().manual_seed(1))
    out = hf_siglip2(input_ids=tokens, **naflex_inputs(images))
    sim = CLIPSimilarity(hf_siglip2, text_features=out.text_embeds, output="probs")
    torch.testing.assert_close(sim(images), out.logits_per_image.sigmoid(), rtol=1e-5, atol=1e-6)


# --- ITSM, surgery ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_itsm_raw_and_surgery(name, request):
    sim = CLIPSimilarity(
        request.getfixturevalue(name),
        text_features=torch.randn(
            3, get_adapter(request.getfixturevalue(name)).embed_dim, generator=torch.Generator().manual_seed(5)
        ),
    )
    side = image_side(name)
    images = make_images(2, 3, side, side, seed=6)
    itsm = ITSMAttribution(sim)
    maps = itsm.attribute(images, target=[0, 2])
    assert maps.shape == (2, 1, side, side) and maps.min() >= 0 and maps.max() <= 1
    if name == "convnext":
        with pytest.raises(
            NotImplementedError,
            match=r"variant: expected a variant other than surgery for ConvNeXt \(convnext_atto\), got 'surgery'",
        ):
            itsm.attribute(images, variant="surgery")
        return
    surgery = itsm.attribute(images, variant="surgery", surgery_depth=1, normalize=False, interpolate=False)
    raw = itsm.attribute(images, normalize=False, interpolate=False)
    assert surgery.shape == raw.shape == (2, 3, side // 8, side // 8)
    assert torch.isfinite(surgery).all() and not torch.allclose(surgery, raw)
    # Surgery leaves the global entry (the model's embedding) untouched.
    with torch.no_grad():
        dense = sim.adapter.dense_features(images, surgery_depth=2)
    torch.testing.assert_close(dense[:, 0], own_embedding(sim.model, images), rtol=0, atol=2e-6)


@torch.no_grad()
def test_surgery_path_of_the_siglip_tower_literally(siglip):
    """Depth 1: patches = norm(x_in + ls1(proj(norm(softmax(v v^T * scale) v)))) with
    v = the value projection of norm1(x_in), x_in the input of the last block."""
    adapter = get_adapter(siglip)
    trunk = siglip.visual.trunk
    images = make_images(1, 3, SIZE, SIZE, seed=9)
    x = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(images)))
    x = trunk.blocks[0](x)
    block = trunk.blocks[1]
    attn = block.attn
    width = x.shape[-1]
    v = block.norm1(x) @ attn.qkv.weight[2 * width :].t() + attn.qkv.bias[2 * width :]
    heads = []
    for h in range(attn.num_heads):
        vh = v[..., h * attn.head_dim : (h + 1) * attn.head_dim]
        heads.append(torch.softmax(vh @ vh.transpose(-1, -2) * attn.scale, dim=-1) @ vh)
    new = trunk.norm(x + block.ls1(attn.proj(attn.norm(torch.cat(heads, dim=-1)))))
    pool = trunk.attn_pool
    values = new @ pool.kv.weight[width:].t() + pool.kv.bias[width:]
    tokens = adapter.tokens(images, surgery_depth=1)
    torch.testing.assert_close(tokens[:, 1:], values, rtol=0, atol=2e-6)


# --- Captum's methods ------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_captum_methods_run_on_every_family(name, request):
    model = request.getfixturevalue(name)
    sim = CLIPSimilarity(
        model, text_features=torch.randn(2, get_adapter(model).embed_dim, generator=torch.Generator().manual_seed(10))
    )
    side = image_side(name)
    images = make_images(1, 3, side, side, seed=11)
    ig = IntegratedGradients(sim).attribute(images, target=1, n_steps=3)
    assert ig.shape == images.shape and torch.isfinite(ig).all() and ig.abs().sum() > 0
    torch.manual_seed(0)
    smooth = NoiseTunnel(Saliency(sim)).attribute(images, target=1, nt_type="smoothgrad", nt_samples=2, stdevs=0.1)
    assert smooth.shape == images.shape and smooth.abs().sum() > 0
    cam = LayerGradCam(sim, sim.gradcam_layer()).attribute(images, target=1)
    grid = sim.adapter.grid_size(side, side)
    assert cam.shape == (1, 1, *grid) and cam.abs().sum() > 0


# --- the dual-projection wrapper's recognition embedding ---------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_dual_projection_encode_image_is_the_models_own(name, request):
    # SigLIP 2's NaFlex tower takes flattened patches: the wrapper builds what its processor gives.
    model = request.getfixturevalue(name)
    images = make_images(2, 3, image_side(name), image_side(name), seed=12)
    with torch.no_grad():
        own = own_embedding(model, images)
        dual = DualProjectionCLIP(model).encode_image(images)
        normalized = DualProjectionCLIP(model).encode_image(images, normalize=True)
    assert torch.equal(dual, own)
    torch.testing.assert_close(normalized, torch.nn.functional.normalize(own, dim=-1), rtol=0, atol=1e-7)


# --- the dense methods of the shared block loop ------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_block_loop_methods_run_on_every_vit_family_and_name_a_convolutional_trunk(name, request):
    # Their parity with literal re-implementations on these towers: tests/attr/test_dense_methods_towers.py.
    from captum_iclip.evaluation.methods import VIT_METHODS, available_methods, build_method
    from captum_iclip.loading.bundled import WEIGHTS_DIR
    from captum_iclip.models.tiny_dino import load_tiny_dino

    model = request.getfixturevalue(name)
    sim = CLIPSimilarity(model, text_features=torch.randn(2, get_adapter(model).embed_dim))
    images = make_images(1, 3, image_side(name), image_side(name), seed=13)
    # ProxyCLIP's proxy: the bundled tiny DINO.
    proxy = load_tiny_dino(WEIGHTS_DIR / "shapes-tiny" / "dino")
    available = available_methods(sim, proxy=proxy)
    assert available["raw"] and available["surgery"] == (name != "convnext")
    if name != "convnext":
        # Grad-ECLIP reads the class token's attention: on the towers that pool one.
        class_token = sim.adapter.pools_class_token
        assert all(available[method] == (class_token or method != "gradeclip") for method in VIT_METHODS)
        for method in (m for m in VIT_METHODS if available[m]):
            maps = build_method(method, sim, proxy=proxy)(images, torch.tensor([1]))
            assert maps.shape == (1, 1, SIZE, SIZE) and torch.isfinite(maps).all()
        return
    # No transformer blocks at all, as for a ResNet: a clear error, and the registry marks them unavailable.
    for run in (
        lambda: GEMAttribution(sim).attribute(images),
        lambda: LeGradAttribution(sim).attribute(images),
        lambda: CheferRelevancy(sim).attribute(images),
        lambda: ITSMAttribution(sim).attribute(images, variant="naclip"),
    ):
        with pytest.raises(
            TypeError,
            match=r"model: (GEMAttribution|LeGradAttribution|CheferRelevancy|variant='naclip') expected a ViT tower "
            r".*got a open_clip timm ConvNeXt",
        ):
            run()
    assert not any(available[method] for method in VIT_METHODS)
    with pytest.raises(ValueError, match=r"got 'surgery' \(it needs a tower CLIP Surgery is defined on"):
        build_method("surgery", sim)
