"""The block-loop methods on the other ViT towers, against literal re-implementations.

CLIP Surgery, the ITSM path variants (MaskCLIP, SCLIP, ClearCLIP, NACLIP), GEM, LeGrad and Chefer et al.'s
relevancy on open_clip's timm towers (SigLIP's MAP head, a ViT with registers and average pooling, EVA02
with its rotary embedding, an EVA with a fused qkv, q/k norms and layer scales), Hugging Face
``SiglipModel`` / ``Siglip2Model`` and open_clip ViTs pooled by their mean or an attention pool. Each
reference below is written on the library's own modules (timm's ``Block``/``EvaBlock`` parts, the pooling
heads, the Hugging Face layers and probe head), one image, head and prompt at a time, the way the authors'
code reads a CLIP ViT (tests/attr/test_dense_methods.py) and the way LeGrad's code reads SigLIP's and CoCa's
attention pools; docs/methods.md §7 and §8 give the definitions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TEXT, TOWER_SIDE, _seeded, make_images, siglip_tower, timm_clip
from open_clip.model import CLIP, CLIPVisionCfg
from test_dense_methods import Reference, naclip_omega, per_head, softmax_product
from timm.layers import apply_rot_embed_cat
from timm.models.eva import Eva
from transformers import Siglip2Model, SiglipModel
from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

from captum_iclip import (
    CheferRelevancy,
    CLIPSimilarity,
    GEMAttribution,
    ITSMAttribution,
    LeGradAttribution,
    get_adapter,
)

TOWERS = ["siglip", "vit_avg", "eva02", "eva_fused", "hf_siglip", "hf_siglip2", "open_clip_avg", "open_clip_pool"]


@pytest.fixture(scope="module")
def eva_fused():
    """An EVA whose parts take the other branches of the block view: a fused qkv with query and value biases,
    per-head q/k norms, layer scales (gamma_1, gamma_2), a register token and average pooling."""
    return timm_clip(
        lambda: Eva(
            img_size=TOWER_SIDE,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            qkv_fused=True,
            qk_norm=True,
            init_values=0.5,
            num_reg_tokens=1,
            use_rot_pos_emb=True,
            ref_feat_shape=(4, 4),
            global_pool="avg",
            num_classes=16,
        ),
        16,
        pool="avg",
        proj=None,
        image_size=TOWER_SIDE,
        shell="vit_tiny_patch16_224",
    )


def _open_clip_vit(**pooling):
    vision = CLIPVisionCfg(layers=2, width=16, head_width=8, patch_size=8, image_size=TOWER_SIDE, **pooling)
    return _seeded(lambda: CLIP(embed_dim=8, vision_cfg=vision, text_cfg=TINY_TEXT), seed=42, jitter=0.1)


@pytest.fixture(scope="module")
def open_clip_avg():
    """An open_clip ViT whose embedding is the mean of its patch tokens (pool_type="avg")."""
    return _open_clip_vit(pool_type="avg")


@pytest.fixture(scope="module")
def open_clip_pool():
    """An open_clip ViT pooled by a learned-query attention pool (attentional_pool=True) of another width."""
    return _open_clip_vit(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)


@pytest.fixture(scope="module", params=TOWERS)
def tower(request):
    """(similarity with 3 random prompts, reference parts) for each tower."""
    model = request.getfixturevalue(request.param)
    if isinstance(model, SiglipModel | Siglip2Model):
        reference = HFTower(model)
    else:
        reference = OpenCLIPPoolTower(model) if request.param.startswith("open_clip") else TimmTower(model)
    text = torch.randn(3, get_adapter(model).embed_dim, generator=torch.Generator().manual_seed(41))
    return CLIPSimilarity(model, text_features=text), reference


class TimmTower:
    """An open_clip timm tower's own modules, for one image (L, C) at a time."""

    def __init__(self, model) -> None:
        self.trunk, self.clip_head = model.visual.trunk, model.visual.head
        self.eva = isinstance(self.trunk, Eva)
        self.blocks = list(self.trunk.blocks)
        self.prefix = self.trunk.num_prefix_tokens
        self.pooling = "map" if self.trunk.attn_pool is not None else self.trunk.global_pool

    def embed(self, image):
        x = self.trunk.patch_embed(image[None])
        x, self.rope = self.trunk._pos_embed(x) if self.eva else (self.trunk._pos_embed(x), None)
        return self.trunk.norm_pre(x)[0]

    def run(self, block, x):
        return (block(x[None], rope=self.rope) if self.eva else block(x[None]))[0]

    def ln_1(self, block, x):
        return block.norm1(x)

    def heads(self, block):
        return block.attn.num_heads

    def qkv(self, block, h):
        """Heads side by side; q and k normed per head, EVA's rotary embedding turning the patches' q and k."""
        attn = block.attn
        if attn.qkv is None:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        else:
            bias = attn.qkv.bias
            if self.eva and attn.q_bias is not None:  # EVA has no key bias
                bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
            q, k, v = F.linear(h, attn.qkv.weight, bias).chunk(3, dim=-1)
        d = q.shape[-1] // attn.num_heads

        def per_head_norm(t, norm):
            parts = []
            for i in range(attn.num_heads):
                part = norm(t[:, i * d : (i + 1) * d])
                if self.rope is not None:
                    part = torch.cat([part[: self.prefix], apply_rot_embed_cat(part[self.prefix :], self.rope)])
                parts.append(part)
            return torch.cat(parts, dim=-1)

        return per_head_norm(q, attn.q_norm), per_head_norm(k, attn.k_norm), v

    def out_proj(self, block, o):
        y = block.attn.proj(block.attn.norm(o))
        if self.eva:
            return y if block.gamma_1 is None else block.gamma_1 * y
        return block.ls1(y)

    def mlp(self, block, y):
        out = block.mlp(block.norm2(y))
        if self.eva:
            return out if block.gamma_2 is None else block.gamma_2 * out
        return block.ls2(out)

    def patch_features(self, z):
        """(h*w, D): each patch of the final tokens z (L, C) through the model's own pooling head alone (the
        prefix tokens beside it for the average, which leaves them out)."""
        x = self.trunk.norm(z[None])
        outputs = []
        for i in range(self.prefix, x.shape[1]):
            sequence = (
                torch.cat([x[:, : self.prefix], x[:, i : i + 1]], 1) if self.pooling == "avg" else x[:, i : i + 1]
            )
            outputs.append(self.clip_head(self.trunk.forward_head(sequence))[0])
        return torch.stack(outputs)

    def embedding(self, z):
        """The model's own embedding (D,) of the tokens z (L, C) leaving a block (class-token or mean pool)."""
        return self.clip_head(self.trunk.forward_head(self.trunk.norm(z[None])))[0]

    def pool_attention(self, z):
        """The latent query's attention (heads, 1, L) over the normed tokens, as LeGrad's hooked pool records it."""
        pool = self.trunk.attn_pool
        x, d = self.trunk.norm(z), pool.head_dim
        q, k = pool.q(pool.latent[0]), pool.kv(x)[:, : x.shape[-1]]
        return torch.stack(
            [
                torch.softmax(pool.q_norm(q[:, s]) * pool.scale @ pool.k_norm(k[:, s]).T, dim=-1)
                for s in (slice(i * d, (i + 1) * d) for i in range(pool.num_heads))
            ]
        )

    def pooled_embedding(self, z, attention):
        """The embedding (D,) of the latent pool given its attention (heads, 1, L) over the tokens z."""
        pool, trunk = self.trunk.attn_pool, self.trunk
        x, d = trunk.norm(z), pool.head_dim
        v = pool.kv(x)[:, x.shape[-1] :]
        y = pool.proj(torch.cat([attention[i] @ v[:, i * d : (i + 1) * d] for i in range(pool.num_heads)], -1))
        y = y + pool.mlp(pool.norm(y))
        return self.clip_head(trunk.head(trunk.head_drop(trunk.fc_norm(y))))[0]


class HFTower:
    """A Hugging Face SiglipModel's or Siglip2Model's own modules, for one image (L, C) at a time."""

    def __init__(self, model) -> None:
        self.vision = model.vision_model
        self.naflex = isinstance(model, Siglip2Model)
        self.blocks = list(self.vision.encoder.layers)
        self.prefix, self.pooling = 0, "map"

    def embed(self, image):
        embeddings = self.vision.embeddings
        if not self.naflex:
            return embeddings(image[None])[0]
        grid = torch.tensor([[image.shape[-2] // 8, image.shape[-1] // 8]])
        return embeddings(convert_image_to_patches(image, 8)[None], grid)[0]

    def run(self, block, x):
        return block(x[None], None)[0]

    def ln_1(self, block, x):
        return block.layer_norm1(x)

    def heads(self, block):
        return block.self_attn.num_heads

    def qkv(self, block, h):
        attn = block.self_attn
        return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)

    def out_proj(self, block, o):
        return block.self_attn.out_proj(o)

    def mlp(self, block, y):
        return block.mlp(block.layer_norm2(y))

    def patch_features(self, z):
        """(h*w, D): the probe head on a one-token sequence, where its probe can attend only to that patch."""
        x = self.vision.post_layernorm(z[None])
        return torch.stack([self.vision.head(x[:, i : i + 1])[0] for i in range(x.shape[1])])

    def _projections(self):
        attention = self.vision.head.attention
        return attention.in_proj_weight.chunk(3), attention.in_proj_bias.chunk(3), attention.num_heads

    def pool_attention(self, z):
        (w_q, w_k, _), (b_q, b_k, _), heads = self._projections()
        x = self.vision.post_layernorm(z)
        q, k = self.vision.head.probe[0] @ w_q.T + b_q, x @ w_k.T + b_k
        d = q.shape[-1] // heads
        return torch.stack(
            [
                torch.softmax(q[:, s] @ k[:, s].T * d**-0.5, dim=-1)
                for s in (slice(i * d, (i + 1) * d) for i in range(heads))
            ]
        )

    def pooled_embedding(self, z, attention):
        (_, _, w_v), (_, _, b_v), heads = self._projections()
        head = self.vision.head
        v = self.vision.post_layernorm(z) @ w_v.T + b_v
        d = v.shape[-1] // heads
        y = head.attention.out_proj(torch.cat([attention[i] @ v[:, i * d : (i + 1) * d] for i in range(heads)], -1))
        return (y + head.mlp(head.layernorm(y)))[0]


class OpenCLIPPoolTower:
    """An open_clip ViT pooled by its mean or its attention pool: the block parts of test_dense_methods'
    reference, for one image (L, C) at a time."""

    def __init__(self, model) -> None:
        self.parts, self.visual = Reference(model), model.visual
        self.blocks, self.prefix = self.parts.blocks, 1
        self.pooling = "map" if self.visual.attn_pool is not None else "avg"
        self.ln_1, self.qkv, self.heads = self.parts.ln_1, self.parts.qkv, self.parts.heads
        self.out_proj, self.mlp = self.parts.out_proj, self.parts.mlp

    def embed(self, image):
        return self.parts.embed(image[None])[0]

    def run(self, block, x):
        return self.parts.run(block, x[None])[0]

    def patch_features(self, z):
        """(h*w, D): the mean's projection of each patch, or the attention pool on a one-token sequence."""
        visual = self.visual
        if self.pooling == "avg":
            return visual.ln_post(z[1:]) @ visual.proj
        return torch.stack(
            [visual.ln_post(visual.attn_pool(z[None, i : i + 1]))[0, 0] @ visual.proj for i in range(1, len(z))]
        )

    def embedding(self, z):
        return self.visual.ln_post(z[1:]).mean(dim=0) @ self.visual.proj

    def _projections(self):
        attention = self.visual.attn_pool.attn  # kdim != embed_dim: separate query, key and value weights
        weights = (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
        return weights, attention.in_proj_bias.chunk(3), attention.num_heads

    def pool_attention(self, z):
        """The first query's attention (heads, 1, L) over the tokens, as LeGrad's hooked CoCa pool records it."""
        (w_q, w_k, _), (b_q, b_k, _), heads = self._projections()
        pooler = self.visual.attn_pool
        q, k = pooler.ln_q(pooler.query[:1]) @ w_q.T + b_q, pooler.ln_k(z) @ w_k.T + b_k
        d = q.shape[-1] // heads
        return torch.stack(
            [
                torch.softmax(q[:, s] @ k[:, s].T * d**-0.5, dim=-1)
                for s in (slice(i * d, (i + 1) * d) for i in range(heads))
            ]
        )

    def pooled_embedding(self, z, attention):
        (_, _, w_v), (_, _, b_v), heads = self._projections()
        pooler = self.visual.attn_pool
        v = pooler.ln_k(z) @ w_v.T + b_v
        d = v.shape[-1] // heads
        y = pooler.attn.out_proj(torch.cat([attention[i] @ v[:, i * d : (i + 1) * d] for i in range(heads)], -1))
        return self.visual.ln_post(y)[0] @ self.visual.proj


def explicit_block(ref, block, x):
    """The block with its attention probabilities (heads, L, L) of one image (L, C) returned."""
    q, k, v = ref.qkv(block, ref.ln_1(block, x))
    heads = ref.heads(block)
    d = q.shape[-1] // heads
    parts = [slice(h * d, (h + 1) * d) for h in range(heads)]
    probs = torch.stack([softmax_product(q[:, p], k[:, p], d**-0.5) for p in parts])
    x = x + ref.out_proj(block, torch.cat([probs[h] @ v[:, p] for h, p in enumerate(parts)], dim=-1))
    return x + ref.mlp(block, x), probs


def minmax(maps):
    flat = maps.flatten(-2)
    low, high = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - low) / (high - low)).reshape(maps.shape)


def cosine_maps(features, text):
    """(h*w, D) patch features -> (K, 4, 4) min-max normalised cosine maps."""
    return minmax((F.normalize(features, dim=-1) @ text.T).T.reshape(-1, 4, 4))


def images_of(seed: int) -> torch.Tensor:
    return make_images(2, 3, TOWER_SIDE, TOWER_SIDE, seed=seed)


# --- CLIP Surgery and the ITSM path variants ----------------------------------------------
@torch.no_grad()
def literal_surgery(ref, image, depth):
    """CLIP Surgery's patch features (h*w, D): the value-value path through the last ``depth`` blocks,
    residual, no MLP, the original path's x feeding each block's value projection."""
    x = ref.embed(image)
    for block in ref.blocks[: len(ref.blocks) - depth]:
        x = ref.run(block, x)
    stream = x
    for block in ref.blocks[len(ref.blocks) - depth :]:
        _, _, v = ref.qkv(block, ref.ln_1(block, x))
        value_value = per_head(v, v, v, ref.heads(block), lambda a, b, s: softmax_product(a, a, s))
        stream = stream + ref.out_proj(block, value_value)
        x = ref.run(block, x)
    return ref.patch_features(stream)


@torch.no_grad()
def test_surgery_matches_a_literal_reimplementation(tower):
    sim, ref = tower
    images = images_of(51)
    dense = sim.adapter.dense_features(images, surgery_depth=2)
    expected = torch.stack([literal_surgery(ref, image, 2) for image in images])
    torch.testing.assert_close(dense[:, 1:], expected, rtol=0, atol=2e-6)
    assert (dense[:, 1:] - sim.adapter.dense_features(images)[:, 1:]).abs().max() > 1e-3
    own = sim.adapter.own_image_features(images)
    if sim.adapter.exact_global_with_path:  # the global entry stays the model's own embedding
        torch.testing.assert_close(dense[:, 0], own, rtol=1e-5, atol=1e-5)
    else:  # an attention pool without a slot among the tokens: feature surgery of several prompts refuses
        assert (dense[:, 0] - own).abs().max() > 1e-4
        with pytest.raises(NotImplementedError, match="global embedding survives CLIP Surgery's second path"):
            ITSMAttribution(sim).attribute(images, variant="surgery")


@torch.no_grad()
def literal_variant(ref, image, variant):
    x = ref.embed(image)
    for block in ref.blocks[:-1]:
        x = ref.run(block, x)
    block = ref.blocks[-1]
    q, k, v = ref.qkv(block, ref.ln_1(block, x))
    heads = ref.heads(block)
    if variant == "maskclip":
        out = x + ref.out_proj(block, v)
        out = out + ref.mlp(block, out)
    elif variant == "sclip":
        attended = per_head(q, k, v, heads, lambda a, b, s: softmax_product(a, a, s) + softmax_product(b, b, s))
        out = x + ref.out_proj(block, attended)
        out = out + ref.mlp(block, out)
    elif variant == "clearclip":
        out = ref.out_proj(block, per_head(q, k, v, heads, lambda a, b, s: softmax_product(a, a, s)))
    else:  # naclip, its neighbourhood zero at the prefix tokens
        omega = naclip_omega(4, 4, prefix=ref.prefix)
        out = ref.out_proj(block, per_head(q, k, v, heads, lambda a, b, s: torch.softmax(b @ b.T * s + omega, dim=-1)))
    return ref.patch_features(out)


@pytest.mark.parametrize("variant", ["maskclip", "sclip", "clearclip", "naclip"])
def test_path_variants_match_their_references(tower, variant):
    sim, ref = tower
    images = images_of(52)
    actual = ITSMAttribution(sim).attribute(images, variant=variant, interpolate=False)
    expected = torch.stack([cosine_maps(literal_variant(ref, image, variant), sim.text_features) for image in images])
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


# --- GEM -------------------------------------------------------------------------------------
@torch.no_grad()
def literal_gem(ref, image, depth):
    """GEM's patch features (h*w, D): one self-self round per q, k, v on the last ``depth`` blocks."""
    x = ref.embed(image)
    for block in ref.blocks[: len(ref.blocks) - depth]:
        x = ref.run(block, x)
    stream = x
    for block in ref.blocks[len(ref.blocks) - depth :]:
        tokens = ref.ln_1(block, x)
        q, k, v = ref.qkv(block, tokens)
        heads = ref.heads(block)
        d = q.shape[-1] // heads
        tau = tokens.norm(dim=-1).mean() * d**-0.5
        outputs = []
        for h in range(heads):
            part = slice(h * d, (h + 1) * d)
            assigned = 0
            for start in (v[:, part], k[:, part], q[:, part]):
                xs = F.normalize(start, dim=-1)
                xs = F.normalize(torch.softmax(xs @ xs.T * tau, dim=-1) @ xs, dim=-1)
                assigned = assigned + torch.softmax(xs @ xs.T * tau, dim=-1) @ v[:, part]
            outputs.append(assigned / 3)
        stream = stream + ref.out_proj(block, torch.cat(outputs, dim=-1))
        x = ref.run(block, x)
    return ref.patch_features(stream)


def test_gem_matches_its_reference(tower):
    sim, ref = tower
    images = images_of(53)
    actual = GEMAttribution(sim).attribute(images, depth=2, interpolate=False)
    expected = torch.stack([cosine_maps(literal_gem(ref, image, 2), sim.text_features) for image in images])
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


# --- LeGrad ------------------------------------------------------------------------------------
def literal_legrad(ref, image, text, start):
    """LeGrad's (h*w,) map of one image and prompt. On an attention-pooled tower (LeGrad's SigLIP code) the
    pool reads each block's tokens and the gradient is taken with respect to the pool's attention; otherwise
    with respect to the block's own, the block's score read through the tower's pool (the mean token through
    a class-token pool)."""
    with torch.enable_grad():
        x, total = ref.embed(image), 0
        for index, block in enumerate(ref.blocks):
            if index < start:
                x = ref.run(block, x)
                continue
            if ref.pooling == "map":
                x = ref.run(block, x)
                attention = ref.pool_attention(x).detach().requires_grad_(True)
                embedding = ref.pooled_embedding(x, attention)
            else:
                x = x.detach().requires_grad_(True) if index == start else x
                x, attention = explicit_block(ref, block, x)
                embedding = ref.embedding(x.mean(dim=0, keepdim=True) if ref.pooling == "token" else x)
            grad = torch.autograd.grad(F.normalize(embedding, dim=-1) @ text, attention)[0]
            total = total + grad.clamp_min(0).mean(dim=(0, 1))[-16:]
    return total


def test_legrad_matches_its_reference(tower):
    sim, ref = tower
    images = images_of(54)
    actual = LeGradAttribution(sim).attribute(images, layer_index=0, interpolate=False)
    expected = torch.stack(
        [
            minmax(torch.stack([literal_legrad(ref, image, t, 0).reshape(4, 4) for t in sim.text_features]))
            for image in images
        ]
    )
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


# --- Chefer et al. -----------------------------------------------------------------------------
def literal_chefer(ref, image, text, start, logit_scale):
    """The relevancy (h*w,) of one image and prompt: the rollout R of the blocks from ``start``, read out by
    the class token's row, the mean of the averaged tokens' rows, or the pool's gradient-weighted attention."""
    with torch.enable_grad():
        x, probs = ref.embed(image), []
        for index, block in enumerate(ref.blocks):
            if index < start:
                x = ref.run(block, x)
                continue
            x = x.detach().requires_grad_(True) if index == start else x
            x, p = explicit_block(ref, block, x)
            probs.append(p)
        if ref.pooling == "map":
            pool = ref.pool_attention(x)
            embedding = ref.pooled_embedding(x, pool)
        else:
            embedding = ref.embedding(x)
        logit = logit_scale * F.normalize(embedding, dim=-1) @ text
        relevancy = torch.eye(x.shape[0])
        for p in probs:
            grad = torch.autograd.grad(logit, p, retain_graph=True)[0]
            relevancy = relevancy + (grad * p).clamp(min=0).mean(dim=0) @ relevancy
        if ref.pooling == "token":
            row = relevancy[0]
        elif ref.pooling == "avg":
            row = relevancy[ref.prefix :].mean(dim=0)
        else:
            grad = torch.autograd.grad(logit, pool)[0]
            row = (grad * pool).clamp(min=0).mean(dim=0)[0] @ relevancy[-pool.shape[-1] :]
    return row[ref.prefix :]


def test_chefer_matches_its_reference(tower):
    sim, ref = tower
    images = images_of(55)
    actual = CheferRelevancy(sim).attribute(images, start_layer=0, interpolate=False)
    expected = torch.stack(
        [
            minmax(
                torch.stack(
                    [literal_chefer(ref, image, t, 0, sim.logit_scale).reshape(4, 4) for t in sim.text_features]
                )
            )
            for image in images
        ]
    )
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


# --- hooks on the blocks computed from their parts -----------------------------------------------
def test_hooks_on_the_blocks_computed_from_their_parts_are_refused(tower):
    sim, ref = tower
    images = images_of(56)
    last = ref.blocks[-1]
    attention = last.self_attn if isinstance(ref, HFTower) else last.attn
    # Feature surgery of several prompts refuses an attention pool without a slot first (see above).
    variant, depth = ("surgery", {"surgery_depth": 1}) if sim.adapter.exact_global_with_path else ("clearclip", {})
    for module, kind in ((last, "forward hook"), (attention, "forward pre-hook")):
        if kind == "forward hook":
            handle = module.register_forward_hook(lambda module, args, output: output)
        else:
            handle = module.register_forward_pre_hook(lambda module, args: None)
        try:
            for run in (
                lambda: GEMAttribution(sim).attribute(images, depth=1),
                lambda: ITSMAttribution(sim).attribute(images, variant=variant, **depth),
                lambda: LeGradAttribution(sim).attribute(images, layer_index=-1),
            ):
                with pytest.raises(ValueError, match=rf"model: expected no hooks .* got a {kind} on block 1 of 2"):
                    run()
            ITSMAttribution(sim).attribute(images)  # the plain path runs the block whole
        finally:
            handle.remove()


def test_blocks_without_known_parts_run_whole_and_the_methods_that_need_them_refuse():
    """A timm ViT of post-norm blocks (ResPostBlock): plain ITSM runs its blocks whole; the methods that compute
    blocks from their parts name the block, and the registry marks them (and surgery) unavailable."""
    from timm.models.vision_transformer import ResPostBlock

    from captum_iclip.evaluation.methods import VIT_METHODS, available_methods

    model = siglip_tower(logit_bias=None, block_fn=ResPostBlock)
    sim = CLIPSimilarity(model, text_features=torch.randn(2, 32))
    images = images_of(57)
    with torch.no_grad():
        torch.testing.assert_close(sim.adapter.encode_image(images), model.encode_image(images), rtol=0, atol=2e-6)
    assert ITSMAttribution(sim).attribute(images).shape == (2, 2, TOWER_SIDE, TOWER_SIDE)
    message = r"model: expected blocks that the block loop can compute from their parts \(.*\), got block 1 of 2: a "
    for run in (
        lambda: ITSMAttribution(sim).attribute(images, variant="surgery", surgery_depth=1),
        lambda: GEMAttribution(sim).attribute(images, depth=1),
        lambda: CheferRelevancy(sim).attribute(images),
    ):
        with pytest.raises(NotImplementedError, match=message + "ResPostBlock with Attention; the view knows"):
            run()
    available = available_methods(sim)
    assert available["raw"] and not available["surgery"] and not any(available[name] for name in VIT_METHODS)
