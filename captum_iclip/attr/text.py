"""The text side of a :class:`~captum_iclip.CLIPSimilarity`: how much each token of a prompt makes it match an image.

:class:`TextSimilarity` is the forward function: the scores of K texts against one fixed image, as a
function of the texts' token ids (through the text tower's token embedding layer, which Captum's layer
methods attribute to). :func:`explain_text` gives each text's per-token relevance by one of
:data:`TEXT_METHODS` (docs/methods.md §12):

* ``"gradeclip"``: Grad-ECLIP's text relevance (Zhao et al., ICML 2024);
* ``"chefer"``: Chefer et al.'s relevancy rollout on the text tower (ICCV 2021, Transformer-MM-Explainability);
* ``"ig"``: Captum's ``LayerIntegratedGradients`` on the token embeddings.

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
from captum_iclip.models.base import check_depth
from captum_iclip.models.blocks import AttentionTrace, BlockView
from captum_iclip.similarity import CLIPSimilarity

TEXT_METHODS = ("gradeclip", "chefer", "ig")
#: What each method's relevances are, in a line (for pages and figures).
TEXT_METHOD_TITLES = {
    "gradeclip": "Grad-ECLIP's text relevance (sums to 1 over the words)",
    "chefer": "Chefer et al.'s text relevancy rollout (sums to 1 over the words)",
    "ig": "Integrated Gradients on the token embeddings (sums to the score's change from a padding baseline)",
}
TEXT_OUTPUTS = ("cosine", "logits")


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
        score: the score explained: the cosine (``gradeclip``, ``ig`` by default) or the logit (``chefer``).
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
) -> list[TextRelevance]:
    r"""The per-token relevance of each text for one image, by one of :data:`TEXT_METHODS` (docs/methods.md §12).

    The relevances of each text's word tokens as Grad-ECLIP (Zhao et al., ICML 2024), Chefer et al.
    (ICCV 2021) or Captum's ``LayerIntegratedGradients`` on the token embeddings define them.

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
            sums / the rollout row.

    Returns:
        One :class:`TextRelevance` per text, in order.

    Raises:
        ValueError: an unknown method, an option of another method (it would be ignored), an option out of range.
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
    _check_options(
        method,
        depth=depth,
        single_head=single_head,
        start_layer=start_layer,
        n_steps=n_steps,
        baseline_token=baseline_token,
        output=output,
        internal_batch_size=internal_batch_size,
        normalize=normalize,
    )
    text_sim = TextSimilarity(similarity, image, texts, output="cosine" if output is None else output)
    delta = None
    if method == "gradeclip":
        relevance, scores = _gradeclip(text_sim, depth, False if single_head is None else single_head)
    elif method == "chefer":
        relevance, scores = _chefer(text_sim, -1 if start_layer is None else start_layer)
    else:
        steps = 50 if n_steps is None else n_steps
        relevance, scores, delta = _integrated_gradients(text_sim, steps, baseline_token, internal_batch_size)
    return _word_relevances(text_sim, similarity.tokenizer, method, relevance, scores, delta, normalize is not False)


def _check_options(method: str, **given: object) -> None:
    """Refuse an option of another method than ``method`` (it would be silently ignored)."""
    for name, value in given.items():
        if value is not None and name not in _OPTIONS[method]:
            owners = " and ".join(m for m, names in _OPTIONS.items() if name in names)
            raise ValueError(f"{name}: expected no value with method {method!r} (an option of {owners}), got {value!r}")


def _word_relevances(
    text_sim: TextSimilarity,
    tokenizer,
    method: str,
    relevance: Tensor,
    scores: Tensor,
    delta: Tensor | None,
    normalize: bool,
) -> list[TextRelevance]:
    """One :class:`TextRelevance` per text: the relevance of its word tokens, divided by their sum for the
    methods whose references do (not ``ig``, whose relevances sum to the score difference)."""
    words = text_sim.word_positions()
    results = []
    for k, text in enumerate(text_sim.texts):
        row = relevance[k][words[k]].detach()
        if method != "ig" and normalize:
            total = row.sum()
            row = row / total if total > 0 else torch.zeros_like(row)
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
