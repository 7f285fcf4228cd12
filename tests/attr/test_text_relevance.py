"""The text side of CLIPSimilarity (captum_iclip.attr.text) on tiny open_clip and Hugging Face CLIP text towers.

Grad-ECLIP's text relevance is checked against a literal re-implementation of its reference
(``grad_eclip_text.ipynb``: ``clip_encode_text_dense`` with ``n`` blocks, ``attention_layer`` with the causal
mask, ``sim_qk``, ``grad_eclip``), Chefer et al.'s against one of Transformer-MM-Explainability's CLIP notebook
(``interpret``'s text rollout and ``show_heatmap_on_text``), M2IB's against one of YingWANGG/M2IB's
``text_heatmap_iba`` (``scripts/iba.py``'s ``InformationBottleneck`` after a text block and
``IBAInterpreter._train_bottleneck``), all one text at a time in the references' layout; Integrated Gradients by
its completeness.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import _seeded, make_images
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from transformers import CLIPConfig, CLIPModel

from captum_iclip import CLIPSimilarity, TextSimilarity, explain_text

# 14 one-token words fill the 16-token context: no padding, where the references are defined without ambiguity.
FULL = "a b c d e f g h i j k l m n"


@pytest.fixture(scope="module")
def open_clip_text(tiny_tokenizer):
    """open_clip CLIP with a 3-block causal text tower (width 16, 2 heads, 16 tokens), jittered."""
    vision = CLIPVisionCfg(layers=1, width=16, head_width=8, patch_size=4, image_size=8)
    text = CLIPTextCfg(context_length=16, vocab_size=49408, width=16, heads=2, layers=3)
    model = _seeded(lambda: CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text), seed=41, jitter=0.1)
    return model, tiny_tokenizer


@pytest.fixture(scope="module")
def hf_text(hf_tokenizer):
    """transformers CLIPModel with a 3-layer text tower (width 16, 2 heads) on the character tokenizer, jittered."""
    ids = {name: getattr(hf_tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)
    text.update(vocab_size=len(hf_tokenizer), **{f"{name}_token_id": i for name, i in ids.items()})
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(vision_config={**vision, "patch_size": 4, "image_size": 8}, text_config=text, projection_dim=8)
    return _seeded(lambda: CLIPModel(config), seed=42, jitter=0.1), hf_tokenizer


@pytest.fixture(params=["open_clip", "hf"])
def family(request, open_clip_text, hf_text):
    model, tokenizer = open_clip_text if request.param == "open_clip" else hf_text
    return model, tokenizer, TextParts(model)


class TextParts:
    """A text tower's modules as the references read them, for one text (L, C)."""

    def __init__(self, model) -> None:
        self.hf = isinstance(model, CLIPModel)
        self.model = model
        self.blocks = list(model.text_model.encoder.layers if self.hf else model.transformer.resblocks)

    def embed(self, ids):
        if self.hf:
            return self.model.text_model.embeddings(input_ids=ids[None])[0]
        return (self.model.token_embedding(ids[None]) + self.model.positional_embedding[: len(ids)])[0]

    def qkv(self, block, x):
        if self.hf:
            tokens = block.layer_norm1(x)
            return block.self_attn.q_proj(tokens), block.self_attn.k_proj(tokens), block.self_attn.v_proj(tokens)
        return F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)

    def out_proj(self, block, x):
        return (block.self_attn if self.hf else block.attn).out_proj(x)

    def mlp(self, block, x):
        return block.mlp(block.layer_norm2(x) if self.hf else block.ln_2(x))

    def heads(self, block) -> int:
        return (block.self_attn if self.hf else block.attn).num_heads

    def text_embedding(self, x, end):
        if self.hf:
            return self.model.text_projection(self.model.text_model.final_layer_norm(x)[end])
        return self.model.ln_final(x)[end] @ self.model.text_projection

    @staticmethod
    def causal_mask(length):
        return torch.full((length, length), float("-inf")).triu(1)


def reference_attention_layer(q, k, v, num_heads, attn_mask):
    """The reference's ``attention_layer``: (L, C) q, k, v, ``num_heads`` heads, an additive mask; the output
    (L, C) and the probabilities (heads, L, L)."""
    length, width = q.shape
    head_dim = width // num_heads
    q = q * head_dim**-0.5
    q, k, v = (t.reshape(length, num_heads, head_dim).transpose(0, 1) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(1, 2) + attn_mask, dim=-1)
    return (weights @ v).transpose(0, 1).reshape(length, width), weights


def literal_text_forward(parts, ids, n, num_heads=None):
    """The text tower of one text (L,), its last ``n`` blocks from their parts with ``num_heads`` heads (the
    model's when ``None``): the embedding at the end-of-text token, the records (q, k, v, attention output,
    probabilities) of those blocks, and the end-of-text position."""
    mask = parts.causal_mask(len(ids))
    x = parts.embed(ids).detach()
    first = len(parts.blocks) - n
    records = []
    for index, block in enumerate(parts.blocks):
        if index == first:
            x = x.detach().requires_grad_(True)
        q, k, v = parts.qkv(block, x)
        heads = parts.heads(block) if index < first or num_heads is None else num_heads
        out, probs = reference_attention_layer(q, k, v, heads, mask)
        x = x + parts.out_proj(block, out)
        x = x + parts.mlp(block, x)
        records.append((q, k, v, out, probs))
    eos = int(ids.argmax()) if not parts.hf else int((ids == parts.model.text_model.eos_token_id).nonzero()[0])
    return parts.text_embedding(x, eos), records[first:], eos


def literal_grad_eclip_text(parts, ids, image_embedding, n, num_heads=None):
    """The reference's ``grad_eclip`` relevance of the words of one text."""
    with torch.enable_grad():
        feature, records, eos = literal_text_forward(parts, ids, n, num_heads)
        cosine = F.normalize(feature, dim=-1) @ image_embedding
        maps = []
        for q, k, v, attn_output, _ in records:
            grad = torch.autograd.grad(cosine, attn_output, retain_graph=True)[0]
            grad_cls = grad[eos]
            sim_qk = (F.normalize(q[eos], dim=-1) * F.normalize(k, dim=-1)).sum(-1)
            sim_qk = (sim_qk - sim_qk.min()) / (sim_qk.max() - sim_qk.min())
            maps.append((grad_cls * v * sim_qk[:, None]).sum(-1))
    # The reference then divides by the sum; its cosine is returned too.
    return F.relu(torch.stack(maps).sum(0))[1:eos].detach(), float(cosine.detach())


def literal_chefer_text(parts, ids, image_embedding, start, logit_scale):
    """Transformer-MM-Explainability's text relevance of the words of one text (``show_heatmap_on_text``)."""
    with torch.enable_grad():
        feature, records, eos = literal_text_forward(parts, ids, len(parts.blocks) - start)
        logit = logit_scale * F.normalize(feature, dim=-1) @ image_embedding
        relevance = torch.eye(len(ids))
        for *_, probs in records:
            grad = torch.autograd.grad(logit, probs, retain_graph=True)[0]
            relevance = relevance + (grad * probs).clamp(min=0).mean(dim=0) @ relevance
    return relevance[eos, 1:eos].detach()  # the notebook then divides by the sum


def unpadded_ids(parts, tokenizer, text):
    """The ids of ``text`` alone, cut after its end-of-text token (the references' text without its padding)."""
    ids = torch.as_tensor(tokenizer([text])["input_ids"][0] if parts.hf else tokenizer([text])[0])
    eos = int(ids.argmax()) if not parts.hf else int((ids == parts.model.text_model.eos_token_id).nonzero()[0])
    return ids[: eos + 1]


def literal_m2ib_text(parts, ids, image, layer_idx, beta=0.1, steps=10, lr=1, batch_size=10, seed=0):
    """``text_heatmap_iba`` on one unpadded text (L,): the (L,) information of its tokens (``nansum`` over the
    channels of the last forward's ``buffer_capacity.mean(axis=0)``), before ``text_heatmap``'s min-max.

    The model's own text forward with an ``InformationBottleneck`` after block ``layer_idx`` (``replace_layer``
    with ``mySequential(layer, bottleneck)``) on ``batch_size`` copies of the text, the noise from torch's
    global generator, the image embedding of as many copies of the image, Adam on the gates with
    ``loss.backward()``. open_clip runs as the Hugging Face path does (its causal mask, pooled at the end-of-text
    token, projected once; the reference's wrapper of OpenAI's CLIP drops the mask and projects twice)."""
    model = copy.deepcopy(parts.model).requires_grad_(False)
    blocks = model.text_model.encoder.layers if parts.hf else model.transformer.resblocks
    # extract_feature_map: the gates take the layer output's shape (its estimator's zeros, squeezed).
    width = model.text_model.config.hidden_size if parts.hf else model.transformer.width
    alpha = torch.nn.Parameter(torch.full((1, len(ids), width), 5.0))
    buffer = {}

    class Sequential(torch.nn.Module):  # mySequential(layer, bottleneck)
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, *args, **kwargs):
            x = self.layer(*args, **kwargs)
            lamb = torch.sigmoid(alpha).expand(x.shape[0], x.shape[1], -1)
            masked_mu = x * lamb
            masked_var = (1 - lamb) ** 2
            buffer["capacity"] = -0.5 * (1 + torch.log(masked_var) - masked_mu**2 - masked_var)
            eps = masked_mu.data.new(masked_mu.size()).normal_()
            return masked_mu + masked_var.sqrt() * eps

    blocks[layer_idx] = Sequential(blocks[layer_idx])

    def text_features(batch):
        if parts.hf:  # transformers 5 returns the output with the projected pooler output
            return getattr(features := model.get_text_features(batch), "pooler_output", features)
        x = model.token_embedding(batch) + model.positional_embedding[: batch.shape[1]]
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[: batch.shape[1], : batch.shape[1]]))
        return x[torch.arange(len(batch)), batch.argmax(dim=-1)] @ model.text_projection

    def image_features(images):
        if parts.hf:
            return getattr(features := model.get_image_features(images), "pooler_output", features)
        return model.encode_image(images)

    torch.manual_seed(seed)
    texts, images = ids[None].expand(batch_size, -1), image.expand(batch_size, -1, -1, -1)
    optimizer = torch.optim.Adam(lr=lr, params=[alpha])
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            out = text_features(texts), image_features(images)
            compression = buffer["capacity"].mean()
            fitting = torch.nn.CosineSimilarity(eps=1e-6)(out[0], out[1]).mean()
            (beta * compression - fitting).backward()
            optimizer.step(closure=None)
    return torch.nansum(buffer["capacity"].mean(axis=0), -1).detach()


def image_embedding(sim, image):
    return F.normalize(sim.adapter.encode_image(image)[0], dim=-1)


TEXTS = ["a cat", "a photo of a dog", FULL]


def test_text_similarity_is_the_library_text_tower(family):
    model, tokenizer, _ = family
    sim = CLIPSimilarity(model, tokenizer, TEXTS)
    image = make_images(1, 3, 8, 8, seed=43)
    text_sim = TextSimilarity(sim, image)
    with torch.no_grad():
        ours = text_sim.tower.encode(text_sim.token_embedding(text_sim.input_ids), text_sim.ends, text_sim.key_mask)
        torch.testing.assert_close(ours, sim.adapter.encode_text(TEXTS, tokenizer), rtol=1e-5, atol=1e-6)
        scores = text_sim(text_sim.input_ids, text_sim.ends, text_sim.key_mask)
        torch.testing.assert_close(scores, sim(image)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("depth", "single_head"), [(None, False), (None, True), (2, False)])
def test_grad_eclip_text_matches_its_reference(family, depth, single_head):
    model, tokenizer, parts = family
    sim = CLIPSimilarity(model, tokenizer, TEXTS)
    image = make_images(1, 3, 8, 8, seed=44)
    results = explain_text(sim, image, "gradeclip", depth=depth, single_head=single_head)
    raw = explain_text(sim, image, "gradeclip", depth=depth, single_head=single_head, normalize=False)
    embedding = image_embedding(sim, image)
    positive = 0
    for text, result, unnormalised in zip(TEXTS, results, raw):
        # A padded text against the reference on the text without its padding (the causal window, docs/methods.md).
        ids = unpadded_ids(parts, tokenizer, text)
        expected, cosine = literal_grad_eclip_text(parts, ids, embedding, depth or 3, 1 if single_head else None)
        assert len(result.tokens) == len(expected)
        torch.testing.assert_close(unnormalised.relevance, expected, rtol=1e-4, atol=1e-7)
        total = expected.sum()
        if total > 0:  # the reference's emap / emap.sum() (a text without positive relevance keeps zeros here)
            positive += 1
            assert (result.relevance - expected / total).abs().max() <= 1e-5
            assert abs(float(result.relevance.sum()) - 1) < 1e-5
        else:
            assert not result.relevance.any()
        assert result.score == pytest.approx(cosine, abs=1e-6)
        if not single_head:  # the explained score is the model's own
            assert result.score == pytest.approx(float(sim(image)[0, TEXTS.index(text)]), abs=1e-6)
    assert positive >= 2


@pytest.mark.parametrize("start_layer", [-1, 0])
def test_chefer_text_matches_its_reference(family, start_layer):
    model, tokenizer, parts = family
    sim = CLIPSimilarity(model, tokenizer, TEXTS)
    image = make_images(1, 3, 8, 8, seed=45)
    results = explain_text(sim, image, "chefer", start_layer=start_layer)
    raw = explain_text(sim, image, "chefer", start_layer=start_layer, normalize=False)
    embedding = image_embedding(sim, image)
    positive = 0
    for text, result, unnormalised in zip(TEXTS, results, raw):
        ids = torch.as_tensor(tokenizer([text])["input_ids"][0] if parts.hf else tokenizer([text])[0])  # padded
        expected = literal_chefer_text(parts, ids, embedding, start_layer % 3, sim.logit_scale)
        assert len(result.tokens) == len(expected)
        torch.testing.assert_close(unnormalised.relevance, expected, rtol=1e-4, atol=1e-7)
        total = expected.sum()
        if total > 0:
            positive += 1
            assert (result.relevance - expected / total).abs().max() <= 1e-5
            assert result.relevance.min() >= 0 and abs(float(result.relevance.sum()) - 1) < 1e-5
        else:
            assert not result.relevance.any()
        assert result.score == pytest.approx(float(sim.logit_scale * sim(image)[0, TEXTS.index(text)]), rel=1e-5)
    assert positive >= 2


def test_chefer_rollout_rows_grow_with_the_blocks(family):
    """The rollout's rows are non-negative, and adding a block only adds paths: R' = (I + Ā') R >= R entrywise
    (Ā' >= 0, R >= 0), so the words' unnormalised relevance from the last two blocks bounds the last one's."""
    model, tokenizer, _ = family
    sim = CLIPSimilarity(model, tokenizer, ["a photo of a dog"])
    image = make_images(1, 3, 8, 8, seed=46)
    (raw,) = explain_text(sim, image, "chefer", normalize=False)
    (two,) = explain_text(sim, image, "chefer", start_layer=-2, normalize=False)
    assert raw.relevance.min() >= 0 and raw.relevance.max() > 0
    assert (two.relevance >= raw.relevance - 1e-7).all() and (two.relevance > raw.relevance + 1e-6).any()


def test_integrated_gradients_of_the_words_sum_to_the_score_difference(family):
    model, tokenizer, parts = family
    texts = ["a cat", "a photo of a dog"]
    sim = CLIPSimilarity(model, tokenizer, texts)
    image = make_images(1, 3, 8, 8, seed=47)
    # The baseline's words: open_clip's padding id (the default); for Hugging Face another token than its padding
    # one, which is its end-of-text token, where the library's own pooling (checked below) would stop.
    pad = tokenizer.convert_tokens_to_ids("z") if parts.hf else 0
    results = explain_text(sim, image, "ig", n_steps=64, baseline_token=pad if parts.hf else None)
    embedding = image_embedding(sim, image)
    inputs = sim.adapter.text_inputs(texts, tokenizer)
    ids = inputs["input_ids"] if parts.hf else inputs
    for k, result in enumerate(results):
        end = int(TextSimilarity(sim, image).ends[k])
        baseline = ids.clone()
        baseline[k, 1:end] = pad
        # The baseline scored by the library's own text tower (its own pooling finds the same end token).
        own = {**inputs, "input_ids": baseline} if parts.hf else baseline
        base_score = float(embedding @ F.normalize(sim.adapter.text_features(own)[k], dim=-1))
        assert result.score == pytest.approx(float(sim(image)[0, k]), abs=1e-6)
        # Completeness over the words alone: the start, end and padding tokens carry no attribution.
        total = float(result.relevance.sum())
        assert total - (result.score - base_score) == pytest.approx(result.delta, abs=1e-6)
        assert abs(result.delta) < 2e-3 * max(abs(result.score - base_score), 1e-2)
        assert abs(result.score - base_score) > 1e-3  # the words matter


@pytest.mark.parametrize("layer_index", [0, 1, None])  # None: the default, block 2 of 3 (three quarters of 3)
def test_m2ib_text_matches_its_reference(family, layer_index):
    model, tokenizer, parts = family
    sim = CLIPSimilarity(model, tokenizer, TEXTS)
    image = make_images(1, 3, 8, 8, seed=49)
    results = explain_text(sim, image, "m2ib", layer_index=layer_index)
    raw = explain_text(sim, image, "m2ib", layer_index=layer_index, normalize=False)
    for k, (text, result, unnormalised) in enumerate(zip(TEXTS, results, raw)):
        # A padded text (open_clip's to its context, Hugging Face's to the longest) against the reference unpadded.
        ids = unpadded_ids(parts, tokenizer, text)
        expected = literal_m2ib_text(parts, ids, image, 2 if layer_index is None else layer_index)
        assert len(result.tokens) == len(ids) - 2 and expected.std() > 1e-3
        # The information per token, in nats (up to ~35 here), as the image side's test compares it.
        torch.testing.assert_close(unnormalised.relevance, expected[1:-1], rtol=1e-5, atol=1e-5)
        # text_heatmap's min-max over the whole text, then its words (the reference's tmap[1:-1]).
        heatmap = (expected - expected.min()) / (expected.max() - expected.min())
        assert (result.relevance - heatmap[1:-1]).abs().max() <= 1e-5
        assert result.method == "m2ib" and result.delta is None
        assert result.score == pytest.approx(float(sim(image)[0, k]), abs=1e-6)  # the model's own cosine
    again = explain_text(sim, image, "m2ib", layer_index=layer_index, normalize=False)
    assert all(torch.equal(a.relevance, b.relevance) for a, b in zip(raw, again))  # run to run on the CPU


def test_m2ib_text_options_reach_the_fit(open_clip_text):
    model, tokenizer = open_clip_text
    parts = TextParts(model)
    sim = CLIPSimilarity(model, tokenizer, ["a photo of a dog"])
    image = make_images(1, 3, 8, 8, seed=50)
    options = dict(layer_index=-2, beta=1.0, steps=3, lr=0.5, samples=4, seed=7)
    (result,) = explain_text(sim, image, "m2ib", normalize=False, **options)
    ids = unpadded_ids(parts, tokenizer, "a photo of a dog")
    expected = literal_m2ib_text(parts, ids, image, 1, beta=1.0, steps=3, lr=0.5, batch_size=4, seed=7)
    torch.testing.assert_close(result.relevance, expected[1:-1], rtol=1e-5, atol=1e-5)
    (default,) = explain_text(sim, image, "m2ib", normalize=False, layer_index=-2)
    assert (default.relevance - result.relevance).abs().max() > 1e-3


def test_relevance_does_not_depend_on_the_padding(hf_text):
    """Hugging Face pads a batch to its longest text: a text's relevance is the same alone and in a batch."""
    model, tokenizer = hf_text
    sim = CLIPSimilarity(model, tokenizer, ["ab", "a photo of a dog"])
    image = make_images(1, 3, 8, 8, seed=48)
    for method in ("gradeclip", "chefer", "ig", "m2ib"):
        options = {"n_steps": 8} if method == "ig" else {"layer_index": 1} if method == "m2ib" else {}
        batch = explain_text(sim, image, method, **options)
        (alone,) = explain_text(sim, image, method, texts=["ab"], **options)
        assert batch[0].tokens == alone.tokens == ("a", "b")
        torch.testing.assert_close(batch[0].relevance, alone.relevance, rtol=1e-4, atol=1e-6)


def test_tokens_are_the_words_between_the_special_tokens(open_clip_text, hf_text):
    model, tokenizer = open_clip_text
    sim = CLIPSimilarity(model, tokenizer, ["A photo of a dog, isn't it?"])
    (result,) = explain_text(sim, make_images(1, 3, 8, 8), "chefer")
    assert result.tokens == ("a", "photo", "of", "a", "dog", ",", "isn", "'t", "it", "?")
    assert result.text == "A photo of a dog, isn't it?" and result.method == "chefer" and result.delta is None
    model, tokenizer = hf_text
    sim = CLIPSimilarity(model, tokenizer, ["it is"])
    (result,) = explain_text(sim, make_images(1, 3, 8, 8), "gradeclip")
    assert result.tokens == ("i", "t", "i", "s")


def test_text_side_bad_input(open_clip_text):
    model, tiny_tokenizer = open_clip_text
    sim = CLIPSimilarity(model, tiny_tokenizer, ["a cat"])
    image = make_images(1, 3, 8, 8)
    cases = [
        (dict(method="lime"), ValueError, "method: expected one of"),
        (dict(image=make_images(2, 3, 8, 8)), ValueError, r"image: expected one preprocessed image \(1, 3, H, W\)"),
        (dict(texts="a cat"), TypeError, "texts: expected a list of strings"),
        (dict(texts=[]), ValueError, "texts: expected a non-empty list"),
        (dict(method="gradeclip", depth=0), ValueError, "depth: expected at least 1"),
        (dict(method="gradeclip", depth=4), ValueError, "depth: expected 0..3"),
        (dict(method="gradeclip", single_head="yes"), TypeError, "single_head: expected a bool"),
        (dict(method="chefer", start_layer=3), ValueError, "start_layer: expected -3..2"),
        (dict(method="ig", n_steps=0), ValueError, "n_steps: expected a positive int"),
        (dict(method="ig", baseline_token=49408), ValueError, "baseline_token: expected a token id in 0..49407"),
        (dict(method="ig", output="probs"), ValueError, "output: expected one of"),
        (dict(method="m2ib", beta=-1.0), ValueError, "beta: expected a finite number >= 0, got -1.0"),
        (dict(method="m2ib", steps=0), ValueError, "steps: expected a positive int, got 0"),
        (dict(method="m2ib", lr=0), ValueError, "lr: expected a finite number > 0, got 0"),
        (dict(method="m2ib", samples=2.5), ValueError, "samples: expected a positive int, got 2.5"),
        (dict(method="m2ib", seed="0"), ValueError, "seed: expected an int, got '0'"),
        (dict(method="m2ib", layer_index=3), ValueError, r"layer_index: expected -3..2 \(the tower has 3 blocks\)"),
        (dict(method="m2ib", n_steps=5), ValueError, r"n_steps: expected no value with method 'm2ib' \(an option of"),
        (
            dict(method="chefer", steps=5),
            ValueError,
            r"steps: expected no value with method 'chefer' \(an option of m2ib\)",
        ),
        (
            dict(method="chefer", depth=2),
            ValueError,
            r"depth: expected no value with method 'chefer' \(an option of gradeclip\)",
        ),
        (
            dict(method="ig", normalize=False),
            ValueError,
            "normalize: expected no value with method 'ig' .*gradeclip and chefer and m2ib",
        ),
    ]
    for options, error, message in cases:
        options = {"image": image, **options}
        with pytest.raises(error, match=message):
            explain_text(sim, options.pop("image"), **options)
    with pytest.raises(ValueError, match="texts: expected the texts to explain"):
        explain_text(CLIPSimilarity(model, text_features=torch.randn(1, 8)), image)
    vision = CLIPVisionCfg(layers=1, width=16, head_width=8, patch_size=4, image_size=8)
    text = CLIPTextCfg(context_length=16, vocab_size=49408, width=16, heads=2, layers=1, no_causal_mask=True)
    bidirectional = _seeded(lambda: CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text))
    with pytest.raises(
        TypeError, match="expected a causal CLIP text tower .* got an open_clip text tower with no causal"
    ):
        explain_text(CLIPSimilarity(bidirectional, tiny_tokenizer, ["a cat"]), image)
    # A hook on the last block is named by its index in the tower (M2IB checks the whole tower at once).
    handle = model.transformer.resblocks[2].register_forward_hook(lambda *args: None)
    try:
        for method in ("gradeclip", "m2ib"):
            with pytest.raises(ValueError, match=r"expected no hooks.*text tower.*on block 2 of 3"):
                explain_text(sim, image, method)
    finally:
        handle.remove()


def test_colour_legends_say_how_each_method_reads():
    from captum_iclip.attr.text import colour_legend

    assert all("lowers" in colour_legend(method) for method in ("gradeclip", "chefer", "ig"))
    assert "never negative" in colour_legend("m2ib") and "lowers" not in colour_legend("m2ib")
