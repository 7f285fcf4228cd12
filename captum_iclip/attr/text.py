"""The text side of a :class:`~captum_iclip.CLIPSimilarity`: how much each token of a prompt makes it match an image.

:class:`TextSimilarity` is the forward function: the scores of K texts against one fixed image, as a
function of the texts' token ids (through the text tower's token embedding layer, which Captum's layer
methods attribute to). :func:`explain_text` gives each text's per-token relevance by one of
:data:`TEXT_METHODS` (docs/methods.md §12):

* ``"gradeclip"``: Grad-ECLIP's text relevance (Zhao et al., ICML 2024);
* ``"chefer"``: Chefer et al.'s relevancy rollout on the text tower (ICCV 2021, Transformer-MM-Explainability);
* ``"ig"``: Captum's ``LayerIntegratedGradients`` on the token embeddings;
* ``"m2ib"``: M2IB's text-side information bottleneck (Wang et al., NeurIPS 2023).

The tokens are those of the adapter's one tokenization rule (the text is explained as it is embedded);
the start token, the end-of-text token and the padding are left out of the relevances, as the references
leave them out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from captum.attr import LayerIntegratedGradients
from torch import Tensor, nn

from captum_iclip._precision import full_precision, upcast
from captum_iclip.attr._utils import check_forward_func, resolve_layer
from captum_iclip.attr.gradeclip import loosened_similarity
from captum_iclip.attr.m2ib import M2IB_BETA, M2IB_LR, M2IB_SAMPLES, M2IB_STEPS, Bottleneck, default_layer
from captum_iclip.models.base import check_depth
from captum_iclip.models.blocks import AttentionTrace, BlockView, check_unhooked, run_text_blocks
from captum_iclip.similarity import CLIPSimilarity

TEXT_METHODS = ("gradeclip", "chefer", "ig", "m2ib")
#: What each method's relevances are, in a line (for pages and figures).
TEXT_METHOD_TITLES = {
    "gradeclip": "Grad-ECLIP's text relevance (sums to 1 over the words)",
    "chefer": "Chefer et al.'s text relevancy rollout (sums to 1 over the words)",
    "ig": "Integrated Gradients on the token embeddings (sums to the score's change from a padding baseline)",
    "m2ib": "M2IB's text information bottleneck (min-max normalised over the text's tokens)",
}
TEXT_OUTPUTS = ("cosine", "logits")


def colour_legend(method: str) -> str:
    """How the word colours of ``method``'s relevances read (figures, ``explain``, the audit page): signed
    relevances raise or lower the score; M2IB's information is never negative."""
    if method == "m2ib":
        return "the redder a word, the more of its information the score needs (never negative)"
    return "red where a word raises the score, blue where it lowers it"


class TextSimilarity(nn.Module):
    r"""Scores of K texts against one fixed image, as a function of the texts' token ids.

    ``forward(input_ids, ends, key_mask)`` runs the text tower from its token embedding layer
    (:attr:`token_embedding`, the layer to hand to Captum's ``LayerIntegratedGradients``) and
    pools each text at its end-of-text position ``ends``; it returns the (K,) scores of the
    texts with the image: the cosine, or the logit :math:`\lambda \cos` (λ the model's logit
    scale). The pooling positions and the padding mask are arguments, not read from the ids,
    so that a baseline sequence is pooled where its text is (pass them as Captum's
    ``additional_forward_args``).

    Texts are tokenized by the model family's one rule (the adapter's ``text_inputs``) and
    embedded alone: the similarity's prompt templates are not applied, so for a similarity
    with templates the score is that of the text itself, not the ensembled prompt.

    Args:
        similarity: a :class:`~captum_iclip.CLIPSimilarity` of an open_clip CLIP or Hugging Face
            ``CLIPModel`` with its tokenizer.
        image: one preprocessed image (1, 3, H, W).
        texts: the K texts; default the similarity's prompts.
        output: ``"cosine"`` or ``"logits"`` (a softmax over the texts would couple them).

    Attributes:
        texts: the K texts.
        input_ids: (K, L) their token ids; ``ends`` (K,) their end-of-text positions; ``key_mask``
            (K, L) 1 for their tokens, 0 for padding keys, or ``None`` where the tower masks none.
        image_feature: (1, D) the image's normalised recognition embedding.

    Examples::

        >>> import open_clip, torch
        >>> from captum_iclip import CLIPSimilarity
        >>> model = open_clip.create_model("ViT-B-16").eval()
        >>> sim = CLIPSimilarity(model, open_clip.get_tokenizer("ViT-B-16"), ["a cat", "a dog"])
        >>> text_sim = TextSimilarity(sim, torch.randn(1, 3, 224, 224))
        >>> text_sim(text_sim.input_ids, text_sim.ends, text_sim.key_mask).shape
        torch.Size([2])
    """

    def __init__(
        self,
        similarity: CLIPSimilarity,
        image: Tensor,
        texts: Sequence[str] | None = None,
        *,
        output: str = "cosine",
    ) -> None:
        super().__init__()
        similarity = check_forward_func(similarity, "TextSimilarity")
        if output not in TEXT_OUTPUTS:
            raise ValueError(f"output: expected one of {TEXT_OUTPUTS}, got {output!r}")
        if not isinstance(image, Tensor) or image.dim() != 4 or image.shape[0] != 1:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"image: expected one preprocessed image (1, 3, H, W), got {shape}")
        if texts is None:
            if similarity.prompts is None:
                raise ValueError("texts: expected the texts to explain (the similarity was built from text_features)")
            texts = similarity.prompts
        if isinstance(texts, str):
            raise TypeError("texts: expected a list of strings, got a single string; wrap it in a list")
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts: expected a non-empty list of strings, got {texts!r}")
        if similarity.tokenizer is None:
            raise ValueError("tokenizer: expected the similarity's tokenizer (to tokenize the texts), got None")
        adapter = similarity.adapter
        self.similarity = similarity
        self.tower = adapter.text_tower()
        self.token_embedding = self.tower.token_embedding
        self.texts = texts
        self.output = output
        similarity.check_inputs(image, "image")
        inputs = adapter.text_inputs(texts, similarity.tokenizer)
        self.input_ids = self.tower.ids(inputs)
        self.key_mask = self.tower.key_mask(inputs)
        self.ends = self.tower.end_positions(self.input_ids)
        with torch.no_grad(), similarity.evaluating():
            self.image_feature = F.normalize(upcast(adapter.encode_image(image)), dim=-1)

    def forward(self, input_ids: Tensor, ends: Tensor, key_mask: Tensor | None = None) -> Tensor:
        with self.similarity.evaluating():
            return self.scores(self.tower.encode(self.token_embedding(input_ids), ends, key_mask))

    def scores(self, text_features: Tensor, output: str | None = None) -> Tensor:
        """(K,) scores of kind ``output`` (default :attr:`output`) of (K, D) text embeddings with the image."""
        with full_precision(text_features.device):
            cosine = F.normalize(upcast(text_features), dim=-1) @ self.image_feature.to(text_features.device)[0]
            if (output or self.output) == "cosine":
                return cosine
            return self.similarity.logit_scale.to(cosine.dtype) * cosine

    def word_positions(self) -> Tensor:
        """(K, L) True at each text's word tokens: after the start token, before the end-of-text token."""
        positions = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return (positions > 0) & (positions[None] < self.ends[:, None])

    def encode_traced(self, trace: AttentionTrace) -> Tensor:
        """(K, D) text embeddings of the texts, with the attention of the blocks from ``trace.start`` recorded."""
        with self.similarity.evaluating():
            return self.tower.encode(self.token_embedding(self.input_ids), self.ends, self.key_mask, trace)


@dataclass(frozen=True)
class TextRelevance:
    """The relevance of each word token of one text for one image.

    Attributes:
        text: the text.
        tokens: its word tokens as the tokenizer decodes them, between its start and end-of-text tokens.
        relevance: (T,) one value per token (as :attr:`method` defines it, docs/methods.md §12).
        score: the score explained: the cosine (``gradeclip``, ``m2ib``, ``ig`` by default) or the logit
            (``chefer``).
        method: a name of :data:`TEXT_METHODS`.
        delta: ``ig`` only: Captum's convergence delta, ``sum(relevance) - (score - baseline score)``.
    """

    text: str
    tokens: tuple[str, ...]
    relevance: Tensor
    score: float
    method: str
    delta: float | None = None


def explain_text(
    similarity: CLIPSimilarity,
    image: Tensor,
    method: str = "gradeclip",
    texts: Sequence[str] | None = None,
    *,
    depth: int | None = None,
    single_head: bool | None = None,
    start_layer: int | None = None,
    n_steps: int | None = None,
    baseline_token: int | None = None,
    output: str | None = None,
    internal_batch_size: int | None = None,
    normalize: bool | None = None,
    layer_index: int | None = None,
    beta: float | None = None,
    steps: int | None = None,
    lr: float | None = None,
    samples: int | None = None,
    seed: int | None = None,
) -> list[TextRelevance]:
    r"""The per-token relevance of each text for one image, by one of :data:`TEXT_METHODS` (docs/methods.md §12).

    The relevances of each text's word tokens as Grad-ECLIP (Zhao et al., ICML 2024), Chefer et al.
    (ICCV 2021), Captum's ``LayerIntegratedGradients`` on the token embeddings or M2IB (Wang et al.,
    NeurIPS 2023) define them.

    Args:
        similarity: a :class:`~captum_iclip.CLIPSimilarity` of an open_clip CLIP or Hugging Face
            ``CLIPModel``, with its tokenizer.
        image: one preprocessed image (1, 3, H, W).
        method: a name of :data:`TEXT_METHODS`.
        texts: the texts to explain; default the similarity's prompts (without its templates).
        depth: ``gradeclip``: the last blocks used; default the reference's 8, at most the tower's blocks.
        single_head: ``gradeclip``: attend as one head over all channels in those blocks, as the
            reference code does (another model than the library's; default ``False``).
        start_layer: ``chefer``: the first block of the rollout (Python indexing; default the
            reference's -1, the last block alone).
        n_steps: ``ig``: integration steps (default 50).
        baseline_token: ``ig``: the id that replaces the word tokens in the baseline (default the
            tokenizer's padding token).
        output: ``ig``: the score integrated, ``"cosine"`` (default) or ``"logits"``.
        internal_batch_size: ``ig``: sequences per forward pass (Captum's); default every step at once.
        normalize: ``gradeclip`` and ``chefer``: divide by the sum over the words (default ``True``, the
            references'; a text without positive relevance keeps zeros); ``False`` keeps the rectified
            sums / the rollout row. ``m2ib``: min-max normalise over the text's tokens from its start to
            its end-of-text token, as the reference's ``text_heatmap`` (default ``True``; a constant map
            gives zeros); ``False`` keeps the information per token, in nats.
        layer_index: ``m2ib``: the text block whose output takes the bottleneck (Python indexing); default
            :func:`~captum_iclip.attr.m2ib.default_layer`, the reference's 9 of 12 blocks.
        beta, steps, lr, samples: ``m2ib``: the information's weight, Adam's steps and learning rate, the
            noisy copies of each text per step (default the reference's 0.1, 10, 1, 10).
        seed: ``m2ib``: the seed of each text's CPU noise generator (default 0): a text's noise depends
            neither on the other texts nor on its padding.

    Returns:
        One :class:`TextRelevance` per text, in order.

    Raises:
        ValueError: an unknown method, an option of another method (it would be ignored), an option out of
            range (``m2ib``'s as :class:`~captum_iclip.attr.m2ib.Bottleneck` checks them).
        TypeError: for a model whose text tower is not a causal CLIP one.

    Examples::

        >>> import open_clip, torch
        >>> from captum_iclip import CLIPSimilarity
        >>> model = open_clip.create_model("ViT-B-16").eval()
        >>> sim = CLIPSimilarity(model, open_clip.get_tokenizer("ViT-B-16"), ["a cat on a mat"])
        >>> [r.tokens for r in explain_text(sim, torch.randn(1, 3, 224, 224), "chefer")]
        [('a', 'cat', 'on', 'a', 'mat')]
    """
    if method not in TEXT_METHODS:
        raise ValueError(f"method: expected one of {TEXT_METHODS}, got {method!r}")
    given = _check_options(method, locals())  # the arguments: the only names bound so far
    bottleneck = _m2ib_bottleneck(given) if method == "m2ib" else None  # checked before any work
    text_sim = TextSimilarity(similarity, image, texts, output="cosine" if output is None else output)
    relevance, scores, delta = _relevance(text_sim, method, given, bottleneck)
    return _word_relevances(text_sim, similarity.tokenizer, method, relevance, scores, delta, normalize is not False)


def _check_options(method: str, arguments: dict[str, object]) -> dict[str, object]:
    """The options of ``method`` among ``arguments`` (``None``: not given); refuse an option of another method
    (it would be silently ignored)."""
    for name, value in arguments.items():
        known = any(name in names for names in _OPTIONS.values())
        if known and value is not None and name not in _OPTIONS[method]:
            owners = " and ".join(m for m, names in _OPTIONS.items() if name in names)
            raise ValueError(f"{name}: expected no value with method {method!r} (an option of {owners}), got {value!r}")
    return {name: arguments[name] for name in _OPTIONS[method]}


def _relevance(
    text_sim: TextSimilarity, method: str, options: dict[str, object], bottleneck: Bottleneck | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The (K, L) relevance of every position by ``method`` with its ``options``, the (K,) scores explained,
    and ``ig``'s (K,) convergence deltas (``None`` for the other methods)."""
    if method == "gradeclip":
        single_head = options["single_head"]
        return (*_gradeclip(text_sim, options["depth"], False if single_head is None else single_head), None)
    if method == "chefer":
        start_layer = options["start_layer"]
        return (*_chefer(text_sim, -1 if start_layer is None else start_layer), None)
    if method == "m2ib":
        return (*_m2ib(text_sim, bottleneck, options["layer_index"]), None)
    n_steps = 50 if options["n_steps"] is None else options["n_steps"]
    return _integrated_gradients(text_sim, n_steps, options["baseline_token"], options["internal_batch_size"])


def _word_relevances(
    text_sim: TextSimilarity,
    tokenizer,
    method: str,
    relevance: Tensor,
    scores: Tensor,
    delta: Tensor | None,
    normalize: bool,
) -> list[TextRelevance]:
    """One :class:`TextRelevance` per text: the relevance of its word tokens, normalised as the method's
    reference does (not ``ig``, whose relevances sum to the score difference)."""
    words = text_sim.word_positions()
    results = []
    for k, text in enumerate(text_sim.texts):
        row = relevance[k][words[k]].detach()
        if method in ("gradeclip", "chefer") and normalize:
            total = row.sum()
            row = row / total if total > 0 else torch.zeros_like(row)
        elif method == "m2ib" and normalize:
            # The reference min-max normalises the whole unpadded text, start and end-of-text tokens included.
            sequence = relevance[k][: int(text_sim.ends[k]) + 1].detach()
            low, span = sequence.min(), sequence.max() - sequence.min()
            row = (row - low) / span if span > 0 else torch.zeros_like(row)
        ids = text_sim.input_ids[k][words[k]]
        strings = tuple(text_sim.tower.token_strings(ids, tokenizer))
        error = None if delta is None else float(delta[k])
        results.append(TextRelevance(text, strings, row.cpu(), float(scores[k]), method, error))
    return results


#: The options of each method of :func:`explain_text`.
_OPTIONS = {
    "gradeclip": ("depth", "single_head", "normalize"),
    "chefer": ("start_layer", "normalize"),
    "ig": ("n_steps", "baseline_token", "output", "internal_batch_size"),
    "m2ib": ("layer_index", "beta", "steps", "lr", "samples", "seed", "normalize"),
}


def _end_rows(tensor: Tensor, ends: Tensor) -> Tensor:
    """(K, L, ...) -> (K, ...) the rows at the end-of-text positions."""
    return tensor[torch.arange(tensor.shape[0], device=tensor.device), ends.to(tensor.device)]


def _gradeclip(text_sim: TextSimilarity, depth: int | None, single_head: bool) -> tuple[Tensor, Tensor]:
    """Grad-ECLIP's (K, L) rectified relevance (every position) and the (K,) cosines."""
    if not isinstance(single_head, bool):
        raise TypeError(f"single_head: expected a bool, got {type(single_head).__name__}")
    num_blocks = len(text_sim.tower.block_views())
    depth = min(8, num_blocks) if depth is None else depth
    check_depth(depth, num_blocks, "depth")
    if depth == 0:
        raise ValueError("depth: expected at least 1 block for Grad-ECLIP's text relevance, got 0")
    trace = AttentionTrace(num_blocks - depth, parts=True, single_head=single_head)
    ends = text_sim.ends
    with torch.enable_grad():
        scores = text_sim.scores(text_sim.encode_traced(trace), "cosine")
        # The texts are independent in the batch: the gradient of the sum holds each text's own.
        gradients = torch.autograd.grad(scores.sum(), trace.attended)
    with torch.no_grad(), full_precision(scores.device):
        positions = torch.arange(text_sim.input_ids.shape[1], device=scores.device)
        attended_keys = positions[None] <= ends[:, None].to(scores.device)  # the causal window of the end token
        relevance = 0
        for grad, queries, keys, values in zip(gradients, trace.queries, trace.keys, trace.values):
            weights = _end_rows(upcast(BlockView.merge_heads(grad)), ends)  # (K, C)
            query = _end_rows(upcast(BlockView.merge_heads(queries)), ends)[:, None]  # (K, 1, C)
            loosened = loosened_similarity(query, upcast(BlockView.merge_heads(keys)), attended_keys[:, None])[:, 0]
            contributions = torch.einsum("kc,klc->kl", weights, upcast(BlockView.merge_heads(values)))
            relevance = relevance + contributions * loosened
        return relevance.clamp_min(0), scores.detach()


def _chefer(text_sim: TextSimilarity, start_layer: int) -> tuple[Tensor, Tensor]:
    """Chefer et al.'s (K, L) rollout row at the end-of-text token and the (K,) logits."""
    start = resolve_layer(start_layer, len(text_sim.tower.block_views()), "start_layer")
    trace = AttentionTrace(start)
    with torch.enable_grad():
        logits = text_sim.scores(text_sim.encode_traced(trace), "logits")
        gradients = torch.autograd.grad(logits.sum(), trace.probabilities)
    with torch.no_grad(), full_precision(logits.device):
        length = text_sim.input_ids.shape[1]
        relevancy = torch.eye(length, dtype=logits.dtype, device=logits.device).expand(logits.shape[0], -1, -1)
        for attention, grad in zip(trace.probabilities, gradients):
            weighted = (upcast(grad) * upcast(attention)).clamp_min(0).mean(dim=1)  # (K, L, L)
            relevancy = relevancy + weighted @ relevancy
        return _end_rows(relevancy, text_sim.ends), logits.detach()


def _integrated_gradients(
    text_sim: TextSimilarity, n_steps: int, baseline_token: int | None, internal_batch_size: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``LayerIntegratedGradients`` (K, L) on the token embeddings, the (K,) scores and the (K,) deltas."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps: expected a positive int, got {n_steps!r}")
    tower, ids = text_sim.tower, text_sim.input_ids
    if baseline_token is None:
        baseline_token = tower.pad_token(text_sim.similarity.tokenizer)
    vocabulary = tower.token_embedding.num_embeddings
    if isinstance(baseline_token, bool) or not isinstance(baseline_token, int) or not 0 <= baseline_token < vocabulary:
        raise ValueError(f"baseline_token: expected a token id in 0..{vocabulary - 1}, got {baseline_token!r}")
    baseline = torch.where(text_sim.word_positions(), torch.full_like(ids, baseline_token), ids)
    args = (text_sim.ends, text_sim.key_mask)
    integrated = LayerIntegratedGradients(text_sim, text_sim.token_embedding)
    attributions, delta = integrated.attribute(
        ids,
        baselines=baseline,
        additional_forward_args=args,
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        return_convergence_delta=True,
    )
    with torch.no_grad():
        scores = text_sim(ids, *args)
        return upcast(attributions).sum(dim=-1), scores, delta


def _m2ib_bottleneck(options: dict[str, object]) -> Bottleneck:
    """The checked settings of a text-side M2IB fit from its ``options``, the image side's defaults where not given."""
    defaults = {"beta": M2IB_BETA, "steps": M2IB_STEPS, "lr": M2IB_LR, "samples": M2IB_SAMPLES, "seed": 0}
    given = {name: default if options[name] is None else options[name] for name, default in defaults.items()}
    return Bottleneck(**given)


def _m2ib(text_sim: TextSimilarity, bottleneck: Bottleneck, layer_index: int | None) -> tuple[Tensor, Tensor]:
    """M2IB's (K, L) information of each token (nats, summed over the channels) and the (K,) cosines.

    The bottleneck (:meth:`~captum_iclip.attr.m2ib.Bottleneck.fit`) takes the output of block
    ``layer_index``; the rest of the text tower runs on the noisy copies to the end-of-text embedding,
    scored against the image embedding (docs/methods.md §12).
    """
    tower, ids, ends = text_sim.tower, text_sim.input_ids, text_sim.ends
    views = tower.block_views()
    # Checked once on the whole tower, so that a refusal names the hooked block's own index.
    check_unhooked(views, range(len(views)), "a text tower, whose blocks the text-side explanations run from parts")
    layer = default_layer(len(views)) if layer_index is None else layer_index
    layer = resolve_layer(layer, len(views), "layer_index")
    length, dtype = ids.shape[1], text_sim.token_embedding.weight.dtype
    mask = tower.attention_mask(text_sim.key_mask, length)
    # The copies of a text are adjacent (Bottleneck.fit's layout): each takes its text's mask and pooling position.
    copy_mask = mask.repeat_interleave(bottleneck.samples, dim=0) if mask.shape[0] > 1 else mask
    copy_ends = ends.repeat_interleave(bottleneck.samples)

    def embed(noisy: Tensor) -> Tensor:
        x = tower.final_norm(run_text_blocks(views[layer + 1 :], noisy.to(dtype), copy_mask))
        return tower.project(x[torch.arange(x.shape[0], device=x.device), copy_ends.to(x.device)])

    with text_sim.similarity.evaluating():
        with torch.no_grad():
            scores = text_sim(ids, ends, text_sim.key_mask)
            x = text_sim.token_embedding(ids)
            tokens = run_text_blocks(views[: layer + 1], x + tower.positions(length).to(x.dtype), mask)
        target = text_sim.image_feature.to(tokens.device).expand(len(ids), -1)
        # Each text's own tokens, its start to its end-of-text token: the reference runs a text unpadded.
        information = bottleneck.fit(tokens, embed, target, lengths=(ends + 1).tolist())
    return torch.nansum(information, dim=-1), scores
