"""The forward function every attribution explains: image -> image-text scores."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_iclip._precision import compute_dtype, full_precision, upcast
from captum_iclip.models import VisionAdapter, get_adapter

OUTPUTS = ("cosine", "logits", "probs")


def _format_prompt(template: str | Callable[[str], str], prompt: str) -> str:
    if callable(template):
        return template(prompt)
    return template.format(prompt) if "{}" in template else f"{template} {prompt}"


class CLIPSimilarity(nn.Module):
    r"""Scores of a batch of images against K prompts, as an ``nn.Module``.

    This is the forward function shared by the attributions of this package and
    by Captum's own (``IntegratedGradients``, ``Saliency``, ``LayerGradCam``,
    ``Occlusion``, ...): it maps images (N, 3, H, W) to scores (N, K), and
    ``target=k`` means "prompt k" for all of them, so they explain the same number.

    Text embeddings are computed once, L2-normalised; with ``templates`` each
    prompt is embedded with every template, the normalised embeddings are
    averaged and renormalised (prompt ensembling, docs/methods.md §1).

    The model is always evaluated in eval mode: a model left in train mode would
    give random maps (dropout) and have its BatchNorm statistics updated by each
    attribution. Every forward pass (and every attribution of this package)
    switches the wrapped model to eval mode for its duration and restores each
    module's own mode afterwards, so the caller's model is left as it was.

    Args:
        model: an open_clip CLIP model (ViT, ModifiedResNet or timm tower: SigLIP,
            EVA02, ConvNeXt, ...), a Hugging Face ``CLIPModel`` or ``SiglipModel``, or
            a ``DualProjectionCLIP``.
        tokenizer: the model's tokenizer (``open_clip.get_tokenizer(name)`` or a
            Hugging Face tokenizer). Needed with ``prompts``.
        prompts: the K texts to score against, e.g. ``["a cat", "a dog"]``.
        text_features: precomputed (K, D) floating-point text embeddings instead of
            prompts (normalised, then cast to the model's dtype; non-finite values
            are refused).
        templates: optional list of prompt templates such as ``["a photo of a {}."]``
            (or callables) for prompt ensembling; a single string is refused (it is
            not a list of templates). Assigning :attr:`templates` later re-validates
            them; call :meth:`set_prompts` to re-embed the prompts with them.
        output: ``"cosine"`` (cosine similarity), ``"logits"`` or ``"probs"``, each
            by the model's own scoring (see below).

    Scores follow the model's training objective. CLIP (contrastive softmax loss):
    ``logits = logit_scale.exp() * cos`` and ``probs`` a softmax of the logits over
    the prompts. SigLIP (sigmoid loss; open_clip SigLIP towers and Hugging Face
    ``SiglipModel``, which carry a ``logit_bias``):
    ``logits = logit_scale.exp() * cos + logit_bias`` and ``probs = sigmoid(logits)``
    per prompt: each prompt is an independent yes/no match, so the probabilities
    do not sum to one over the prompts (docs/methods.md).

    Examples::

        >>> import open_clip, torch
        >>> from captum_iclip import CLIPSimilarity
        >>> model = open_clip.create_model("ViT-B-16").eval()
        >>> tokenizer = open_clip.get_tokenizer("ViT-B-16")
        >>> sim = CLIPSimilarity(model, tokenizer, ["a cat", "a dog"])
        >>> sim(torch.randn(2, 3, 224, 224)).shape
        torch.Size([2, 2])
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable | None = None,
        prompts: Sequence[str] | None = None,
        *,
        text_features: Tensor | None = None,
        templates: Sequence[str | Callable[[str], str]] | None = None,
        output: str = "cosine",
    ) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
        self.model = model
        self.adapter: VisionAdapter = get_adapter(model)
        # Registered so that Captum's LayerGradCam can hook the patch grid of any tower.
        self.grid_tap = self.adapter.grid_tap
        self.tokenizer = tokenizer
        self.templates = templates
        self.output = output
        self.prompts: list | None = None
        if text_features is not None:
            if prompts is not None:
                raise ValueError(f"prompts: expected None with text_features (one source of prompts), got {prompts!r}")
            self.register_buffer("text_features", self._check_text_features(text_features))
        else:
            self.register_buffer("text_features", self.encode_prompts(self._check_prompts(prompts)))
            self.prompts = list(prompts)

    # --- text side ------------------------------------------------------------------
    @property
    def templates(self) -> list[str | Callable[[str], str]] | None:
        """The prompt templates (``None``: the prompt itself)."""
        return self._templates

    @templates.setter
    def templates(self, templates: Sequence[str | Callable[[str], str]] | None) -> None:
        if templates is not None:
            if isinstance(templates, str):
                raise TypeError(
                    f"templates: expected a list of templates, got the single string {templates!r}; wrap it in a list"
                )
            templates = list(templates)
            if not templates:
                raise ValueError("templates: expected at least one template (or None), got an empty list")
            bad = [t for t in templates if not (isinstance(t, str) or callable(t))]
            if bad:
                raise TypeError(f"templates: expected strings or callables, got {bad[0]!r}")
        self._templates = templates

    def _check_prompts(self, prompts: Sequence[str] | None) -> list:
        if prompts is None:
            raise ValueError("prompts: expected a non-empty list of texts (or text_features), got None")
        if isinstance(prompts, str):
            raise TypeError("prompts: expected a list of strings, got a single string; wrap it in a list")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts: expected at least one text, got an empty list")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts: expected every prompt to be a string, got {bad[0]!r}")
        if self.tokenizer is None:
            raise ValueError(
                "tokenizer: expected a tokenizer to embed prompts (or pass text_features instead), got None"
            )
        return prompts

    def _check_text_features(self, text_features: Tensor) -> Tensor:
        if not isinstance(text_features, Tensor) or text_features.dim() != 2 or text_features.shape[0] == 0:
            raise ValueError(
                "text_features: expected a non-empty (K, D) tensor, "
                f"got {tuple(text_features.shape) if isinstance(text_features, Tensor) else type(text_features)}"
            )
        dim = self.adapter.embed_dim
        if text_features.shape[1] != dim:
            raise ValueError(f"text_features: expected dimension {dim}, got {text_features.shape[1]}")
        if not text_features.is_floating_point():
            raise TypeError(f"text_features: expected a floating-point tensor, got dtype {text_features.dtype}")
        if not torch.isfinite(text_features).all():
            raise ValueError("text_features: expected finite values, got NaN or infinity")
        param = self.adapter.parameter
        # Normalised in the given precision, then stored in at least float32 (half-precision rules, _precision).
        features = F.normalize(upcast(text_features.detach().to(param.device)), dim=-1)
        return features.to(compute_dtype(param.dtype))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised (K, D) embeddings of ``prompts`` (ensembled over the templates)."""
        prompts = self._check_prompts(prompts)
        templates = self.templates or ["{}"]
        texts = [_format_prompt(t, p) for p in prompts for t in templates]
        with self.evaluating():
            features = F.normalize(self.adapter.encode_text(texts, self.tokenizer).float(), dim=-1)
        features = features.reshape(len(prompts), len(templates), -1).mean(dim=1)
        return F.normalize(features, dim=-1).to(compute_dtype(self.adapter.parameter.dtype))

    def empty_prompt_feature(self) -> Tensor:
        """(1, D) embedding of the empty prompt ``""`` (with the templates), computed once.

        CLIP Surgery subtracts it from a single prompt's embedding (docs/methods.md §2).
        """
        # Cached per template list: assigning new templates must not reuse the old embedding.
        key = tuple(self.templates or ())
        cached = getattr(self, "_empty_prompt_cache", None)
        if cached is None or cached[0] != key:
            self._empty_prompt_cache = cached = (key, self.encode_prompts([""]))
        return cached[1].to(self.text_features.device)

    def set_prompts(self, prompts: Sequence[str]) -> CLIPSimilarity:
        """Replace the prompts (re-embedding them once). Returns ``self``."""
        self.text_features = self.encode_prompts(prompts)
        self.prompts = list(prompts)
        return self

    @property
    def num_prompts(self) -> int:
        return self.text_features.shape[0]

    @property
    def logit_scale(self) -> Tensor:
        return self.adapter.logit_scale

    @property
    def logit_bias(self) -> Tensor | None:
        """The model's logit bias (sigmoid-loss models such as SigLIP), ``None`` for CLIP."""
        return getattr(self.adapter.model, "logit_bias", None)

    # --- image side -----------------------------------------------------------------
    @contextmanager
    def evaluating(self) -> Iterator[CLIPSimilarity]:
        """Run the wrapped model in eval mode, then give every module its own mode back.

        Attributions must not depend on dropout nor update BatchNorm statistics, and
        must not change the caller's model either. Nested uses are cheap and safe.
        """
        modes = [(module, module.training) for module in self.model.modules()]
        if not any(training for _, training in modes):
            yield self
            return
        self.model.eval()
        try:
            yield self
        finally:
            for module, training in modes:
                module.training = training

    def check_inputs(self, images: Tensor, name: str = "inputs"):
        """Validate images (rank, channels, size, device, dtype, finite values); returns the patch grid."""
        grid = self.adapter.check_images(images, name)
        if not torch.isfinite(images).all():  # NaN pixels would give NaN maps, or maps of whatever survives
            raise ValueError(f"{name}: expected finite values, got NaN or infinity")
        return grid

    def scores(self, image_features: Tensor) -> Tensor:
        """Turn (N, D) recognition embeddings into (N, K) scores of kind :attr:`output`.

        The scores are computed in at least float32 (with autocast off), whatever the
        model's dtype: a half-precision cosine has 3 significant digits, too few for the
        differences that occlusion and the gradients read.
        """
        with full_precision(image_features.device):
            cosine = F.normalize(upcast(image_features), dim=-1) @ upcast(self.text_features).t()
            if self.output == "cosine":
                return cosine
            logits = self._logits(cosine)
            return logits if self.output == "logits" else self._probabilities(logits)

    def _logits(self, cosine: Tensor) -> Tensor:
        logits = self.logit_scale.to(cosine.dtype) * cosine
        return logits if self.logit_bias is None else logits + self.logit_bias.to(cosine.dtype)

    def _probabilities(self, logits: Tensor) -> Tensor:
        # Sigmoid-loss models (a logit bias) score each prompt on its own; CLIP ranks the prompts.
        return logits.softmax(dim=-1) if self.logit_bias is None else logits.sigmoid()

    def probabilities(self, scores: Tensor) -> Tensor:
        """The model's own probabilities (N, K) from scores of kind :attr:`output`:
        a softmax over the prompts for CLIP, a sigmoid per prompt for SigLIP."""
        if self.output == "probs":
            return scores
        return self._probabilities(scores if self.output == "logits" else self._logits(scores))

    def forward(self, images: Tensor) -> Tensor:
        self.check_inputs(images)
        with self.evaluating():
            return self.scores(self.adapter.encode_image(images))

    def gradcam_layer(self) -> nn.Module:
        """The layer to hand to ``captum.attr.LayerGradCam``: the patch grid entering the
        last transformer block (ViT) or the layer4 output (ResNet), as (N, C, h, w)."""
        return self.grid_tap
