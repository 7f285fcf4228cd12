"""Why a model's similarity maps prefer the background: training-free measurements (docs/methods.md §9).

The ITSM map of a CLIP ViT (docs/methods.md §1) is read off the last block's output tokens. Li et
al. (arXiv 2209.07046) find it "opposite" on pretrained CLIP: higher on the background than on
the object the text names. Three explanations are in the literature, and each leaves its own
trace in a forward pass:

* **High-norm background tokens** (Darcet et al., *Vision Transformers Need Registers*,
  arXiv 2309.16588): large, long-trained ViTs repurpose a few low-information patches as
  global stores whose norms are ten or more times the median; :func:`token_norm_ratios`.
* **The last block's attention** (CLIP Surgery, arXiv 2304.05653; ClearCLIP, Lan et al., ECCV
  2024): the q-k attention of the last block mixes global context into every patch, so its
  output alone gives an opposite map while the residual stream does not;
  :func:`itsm_decomposition` splits the map exactly into the residual-stream, attention and MLP
  terms, and :func:`attention_scaled_maps` scales the attention output in the forward pass.
* **Redundant features** (CLIP Surgery): a direction shared by all prompts dominates the
  patch-text similarities; :func:`shared_direction_removed_maps`.

:class:`Diagnostics` runs them all in one pass per batch and, given ground-truth label maps,
scores every map with the mean score contrast of :class:`~captum_iclip.evaluation.metrics.LocalizationMetrics`
(the same figure ``captum-iclip eval`` reports as ``msc``). They run on the class-token ViTs of
the shared block loop (open_clip ``VisionTransformer``, Hugging Face ``CLIPModel``, and a
:class:`~captum_iclip.DualProjectionCLIP` of either); other towers get an error naming them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_iclip._io import finite_or_null
from captum_iclip._precision import project
from captum_iclip.evaluation.metrics import LocalizationMetrics
from captum_iclip.models.base import VisionAdapter
from captum_iclip.models.blocks import BlockView, check_unhooked
from captum_iclip.models.hf_clip import HFCLIPAdapter
from captum_iclip.models.open_clip_towers import OpenCLIPViTAdapter, TokenProjection
from captum_iclip.similarity import CLIPSimilarity

__all__ = [
    "ALPHAS",
    "TERMS",
    "Diagnostics",
    "LastBlock",
    "attention_scaled_maps",
    "cls_attention",
    "foreground_fractions",
    "itsm_decomposition",
    "run_tower",
    "shared_direction_removed_maps",
    "token_norm_ratios",
]

#: Scales of the last block's attention output in :func:`attention_scaled_maps`.
ALPHAS = (0.5, 1.0, 2.0, 5.0)
#: The terms of :func:`itsm_decomposition`, in the order they are added.
TERMS = ("residual", "attention", "mlp", "bias")
#: Thresholds (times the median patch-token norm) of :func:`token_norm_ratios`.
NORM_THRESHOLDS = (4.0, 10.0)

_SUPPORTED = "a class-token ViT tower (open_clip VisionTransformer with pool_type='tok', transformers.CLIPModel)"


def _vit_adapter(adapter: VisionAdapter, what: str) -> VisionAdapter:
    if isinstance(adapter, OpenCLIPViTAdapter) and adapter.pooling == "tok":
        return adapter
    if isinstance(adapter, HFCLIPAdapter):
        return adapter
    pooling = f" with pool_type={adapter.pooling!r}" if isinstance(adapter, OpenCLIPViTAdapter) else ""
    raise NotImplementedError(
        f"model: {what} expected {_SUPPORTED}, got a {adapter.family} tower{pooling}; the quantity reads the "
        "class token and the residual stream of the shared block loop"
    )


# ----------------------------------------------------------------------------------
# One pass through the tower, keeping what the measurements need
# ----------------------------------------------------------------------------------
@dataclass
class LastBlock:
    """The residual stream around the last block of a ViT, split into its parts.

    ``residual + attention + mlp`` is the last block's output: ``residual`` is its input,
    ``attention`` what its attention adds, ``mlp`` what its MLP adds after that.

    Attributes:
        residual: (N, L, C) tokens entering the last block.
        attention: (N, L, C) the attention branch's output.
        mlp: (N, L, C) the MLP branch's output.
        view: the last block's :class:`~captum_iclip.models.blocks.BlockView`.
    """

    residual: Tensor
    attention: Tensor
    mlp: Tensor
    view: BlockView

    @property
    def output(self) -> Tensor:
        return self.residual + self.attention + self.mlp


@dataclass
class TowerPass:
    """What :func:`run_tower` keeps of one forward pass.

    Attributes:
        block_outputs: the (N, L, C) residual stream after every block, first to last.
        cls_attention: for each of the last blocks asked for, the (N, heads, h*w) attention of the
            class-token query to the patch tokens (softmax over all keys, class token included).
        last: the last block in parts (:class:`LastBlock`).
        grid: the patch grid (h, w).
    """

    block_outputs: list[Tensor]
    cls_attention: list[Tensor]
    last: LastBlock
    grid: tuple[int, int]


def run_tower(adapter: VisionAdapter, images: Tensor, attention_blocks: int = 2) -> TowerPass:
    """Run a ViT tower block by block (each block through its own ``forward``, hooks included),
    recording the residual stream, the class token's attention of the last ``attention_blocks``
    blocks, and the last block in parts.

    Args:
        adapter: the model's adapter (``CLIPSimilarity.adapter``).
        images: (N, 3, H, W) preprocessed images.
        attention_blocks: how many of the last blocks' class-token attention to record.

    Returns:
        A :class:`TowerPass`.

    Raises:
        NotImplementedError: for towers other than class-token ViTs.
        ValueError: for ``attention_blocks`` outside 1..blocks, or a hook on a block read from its parts
            (the last ``attention_blocks``), which those parts would bypass.
    """
    _vit_adapter(adapter, "run_tower")
    views = adapter.block_views("diagnostics")
    _check_attention_blocks(attention_blocks, len(views))
    first_recorded = len(views) - attention_blocks
    # The recorded blocks are read from their parts too: a hook there would not be in the figures.
    check_unhooked(views, range(first_recorded, len(views)), "the diagnostics read their attention and parts")
    x, grid = adapter.embed(images)
    outputs, attention = [], []
    for index, view in enumerate(views):
        if index >= first_recorded:
            q, k, _ = view.qkv(view.ln_1(x))
            probabilities = torch.softmax((q[:, :, :1].float() * view.scale) @ k.float().transpose(-1, -2), dim=-1)
            attention.append(probabilities[:, :, 0, 1:])
        if index == len(views) - 1:
            last = _split_block(view, x)
        x = view.forward(x)
        outputs.append(x)
    return TowerPass(outputs, attention, last, grid)


def _check_attention_blocks(attention_blocks: int, num_blocks: int) -> None:
    if isinstance(attention_blocks, bool) or not isinstance(attention_blocks, int):
        raise TypeError(f"attention_blocks: expected an int, got {type(attention_blocks).__name__}")
    if not 1 <= attention_blocks <= num_blocks:
        raise ValueError(
            f"attention_blocks: expected 1..{num_blocks} (the tower has {num_blocks} blocks), got {attention_blocks}"
        )


def _split_block(view: BlockView, x: Tensor) -> LastBlock:
    q, k, v = view.qkv(view.ln_1(x))
    attention = view.attention_branch(F.scaled_dot_product_attention(q, k, v, scale=view.scale))
    mlp = view.mlp_branch(x + attention)
    return LastBlock(residual=x, attention=attention, mlp=mlp, view=view)


# ----------------------------------------------------------------------------------
# The measurements
# ----------------------------------------------------------------------------------
def token_norm_ratios(block_outputs: Sequence[Tensor]) -> Tensor:
    """Norm of every patch token over the median patch-token norm of its image, per block.

    Args:
        block_outputs: (N, 1 + h*w, C) tokens after each block (:attr:`TowerPass.block_outputs`).

    Returns:
        (blocks, N, h*w) ratios; a high-norm token of Darcet et al. has a ratio of ten or more.
    """
    ratios = []
    for tokens in block_outputs:
        norms = tokens[:, 1:].float().norm(dim=-1)
        ratios.append(norms / norms.median(dim=1, keepdim=True).values.clamp_min(torch.finfo(norms.dtype).tiny))
    return torch.stack(ratios)


@dataclass(frozen=True)
class _FinalProjection:
    """The tower's final LayerNorm and the linear projection after it, as the decomposition needs them."""

    norm: nn.LayerNorm
    weight: Tensor  # (C, D): features = normed @ weight + bias
    bias: Tensor | None


def _final_projection(adapter: VisionAdapter, projection: str) -> _FinalProjection:
    _vit_adapter(adapter, "itsm_decomposition")
    if isinstance(adapter, OpenCLIPViTAdapter):
        norm, weight, bias = adapter.visual.ln_post, adapter.visual.proj, None
    else:
        norm = adapter.vision.post_layernorm
        weight, bias = adapter.model.visual_projection.weight.t(), adapter.model.visual_projection.bias
    if projection == "interpretability":
        head = adapter.interpretability_head
        if isinstance(head, TokenProjection):
            weight, bias = head.weight, None
        elif isinstance(head, nn.Linear):
            weight, bias = head.weight.t(), head.bias
        else:
            raise NotImplementedError(
                f"projection: the decomposition expected a linear interpretability head (TokenProjection or "
                f"nn.Linear), got {type(head).__name__}"
            )
    if not isinstance(norm, nn.LayerNorm):
        raise NotImplementedError(
            f"model: the decomposition expected a LayerNorm final norm, got {type(norm).__name__}"
        )
    return _FinalProjection(norm, weight, bias)


def _project(final: _FinalProjection, tokens: Tensor) -> Tensor:
    """Final norm (in the model's dtype, as the tower runs it), then the projection in float32 as the
    adapters project (docs/methods.md §10)."""
    return project(final.norm(tokens), final.weight, final.bias).float()


def itsm_decomposition(adapter: VisionAdapter, last: LastBlock, text: Tensor, projection: str = "recognition"):
    r"""The raw ITSM map split exactly into what the last block's parts contribute.

    With :math:`z = r + a + m` a patch token after the last block (residual stream, attention
    output, MLP output), the final LayerNorm is affine in :math:`z` once its standard deviation
    :math:`\sigma(z)` is fixed, and the projection :math:`W` is linear, so with :math:`F(z)` the
    projected feature and :math:`t` a normalised prompt embedding

    .. math::
        \frac{F(z) \cdot t}{\lVert F(z) \rVert} = \sum_{u \in \{r, a, m\}}
        \frac{(\gamma \odot (u - \bar u) / \sigma(z)) W \cdot t}{\lVert F(z) \rVert}
        + \frac{(\beta W + b) \cdot t}{\lVert F(z) \rVert}

    (:math:`\bar u` the channel mean, :math:`\gamma, \beta` the norm's weight and bias,
    :math:`b` the projection's bias). The four terms sum to the map (checked here to 1e-4 of
    its scale; docs/methods.md §9).

    Args:
        adapter: the model's adapter.
        last: the last block in parts (:attr:`TowerPass.last`).
        text: (K, D) normalised prompt embeddings.
        projection: ``"recognition"`` or ``"interpretability"``.

    Returns:
        ``(map, terms)``: the (N, h*w, K) raw map and a dict of one (N, h*w, K) tensor per name of
        :data:`TERMS`.
    """
    final = _final_projection(adapter, projection)
    norm = final.norm
    # In float32 from the parts, so that the terms sum to the map in any model dtype (docs/methods.md §10).
    parts = {name: part[:, 1:].float() for name, part in zip(TERMS, (last.residual, last.attention, last.mlp))}
    z = sum(parts.values())
    sigma = (z.var(dim=-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
    weight = final.weight.float()
    ones = torch.ones(z.shape[-1], device=z.device)
    gamma = norm.weight.float() if norm.weight is not None else ones
    beta = norm.bias.float() if norm.bias is not None else 0 * ones
    constant = beta @ weight + (final.bias.float() if final.bias is not None else 0.0)
    features = (((z - z.mean(dim=-1, keepdim=True)) * gamma / sigma) @ weight) + constant
    scale = features.norm(dim=-1, keepdim=True)
    text = text.float()
    terms = {}
    for name, part in parts.items():
        centred = (part - part.mean(dim=-1, keepdim=True)) * gamma / sigma
        terms[name] = (centred @ weight) @ text.t() / scale
    terms["bias"] = (constant @ text.t()).expand_as(terms["residual"]) / scale
    raw = (features / scale) @ text.t()
    error = (sum(terms.values()) - raw).abs().max().item()
    if error > 1e-4 * max(1.0, raw.abs().max().item()):
        raise RuntimeError(f"itsm_decomposition: the terms sum to the map within {error:.2e}, expected 1e-4")
    return raw, terms


def attention_scaled_maps(
    adapter: VisionAdapter,
    last: LastBlock,
    text: Tensor,
    alphas: Sequence[float] = ALPHAS,
    projection: str = "recognition",
) -> dict[float, Tensor]:
    """Raw ITSM maps with the last block's attention output scaled by each ``alpha``.

    The last block is rerun as ``y = r + alpha * a``, ``y + MLP(y)`` (the MLP sees the scaled
    stream), then the final norm and projection; ``alpha = 1`` is the model's own map.

    Returns:
        ``{alpha: (N, h*w, K) map}``.
    """
    final = _final_projection(adapter, projection)
    maps = {}
    for alpha in alphas:
        y = last.residual + float(alpha) * last.attention
        y = y + last.view.mlp_branch(y)
        maps[float(alpha)] = F.normalize(_project(final, y[:, 1:]).float(), dim=-1) @ text.float().t()
    return maps


def shared_direction_removed_maps(features: Tensor, text: Tensor) -> Tensor:
    """Patch-prompt similarities after removing the direction every prompt shares.

    ``s'_{i,k} = f_i . (t_k - mean_k' t_k')``: the mean text embedding over the prompts is CLIP
    Surgery's "redundant feature" (docs/methods.md §9). It needs two prompts or more.

    Args:
        features: (N, h*w, D) normalised patch features.
        text: (K, D) normalised prompt embeddings.

    Returns:
        (N, h*w, K) scores.
    """
    if text.shape[0] < 2:
        raise ValueError(f"prompts: expected two prompts or more to remove the shared direction, got {text.shape[0]}")
    text = text.float()
    return features.float() @ (text - text.mean(dim=0, keepdim=True)).t()


def cls_attention(tower: TowerPass) -> Tensor:
    """(blocks, N, heads, h*w) attention of the class token to the patches in the last blocks."""
    return torch.stack(tower.cls_attention)


def foreground_fractions(foreground: Tensor, grid: tuple[int, int], valid: Tensor | None = None) -> Tensor:
    """The share of each patch's valid pixels that are foreground: (N, H, W) bool -> (N, h*w) float.

    Label maps may have any size: the fractions are area averages over the patch cells
    (``adaptive_avg_pool2d``); ignored pixels (``valid`` False) count neither way.
    """
    foreground = foreground.float()
    valid = torch.ones_like(foreground) if valid is None else valid.float()
    fg = F.adaptive_avg_pool2d((foreground * valid)[:, None], grid)[:, 0]
    area = F.adaptive_avg_pool2d(valid[:, None], grid)[:, 0]
    return (fg / area.clamp_min(1e-12)).flatten(1)


# ----------------------------------------------------------------------------------
# All of them over a dataset
# ----------------------------------------------------------------------------------
@dataclass
class _Running:
    """Sums for means over images (or over patches, weighted)."""

    total: float = 0.0
    weight: float = 0.0

    def add(self, value: Tensor, weight: Tensor | float = 1.0) -> None:
        value = torch.as_tensor(value, dtype=torch.float64)
        weight = torch.as_tensor(weight, dtype=torch.float64)
        self.total += float((value * weight).sum())
        self.weight += float((torch.ones_like(value) * weight).sum())

    @property
    def mean(self) -> float | None:
        return self.total / self.weight if self.weight > 0 else None


@dataclass
class _Sums:
    norm_max_ratio: list[_Running] = field(default_factory=list)
    norm_shares: list[dict[float, _Running]] = field(default_factory=list)
    attention_patch_mass: list[list[_Running]] = field(default_factory=list)
    attention_fg_share: list[list[_Running]] = field(default_factory=list)
    fg_area: _Running = field(default_factory=_Running)
    cosine_fg: _Running = field(default_factory=_Running)
    cosine_bg: _Running = field(default_factory=_Running)
    images: int = 0


class Diagnostics:
    r"""Every diagnostic of this module on a :class:`~captum_iclip.CLIPSimilarity`, accumulated over batches.

    For each batch, one pass through the tower (:func:`run_tower`) gives:

    * ``token_norms``: per block, the largest patch-token norm over the image's median (mean over
      images) and the share of patch tokens above 4x and 10x the median;
    * ``maps``: the raw ITSM map, its four terms (:func:`itsm_decomposition`), the map with the
      prompts' shared direction removed, and the map with the last block's attention output
      scaled by each of ``alphas``;
    * ``cls_attention``: per head of the last ``attention_blocks`` blocks, the class token's
      attention mass on the patches, and with labels the share of that mass on the foreground
      (beside the foreground's share of the area, what a uniform attention would give);
    * ``global_cosine``: the cosine of each patch feature to the global embedding, over the
      foreground and over the background patches (labels needed).

    With ground-truth labels every map is scored like ``captum-iclip eval``'s localization task
    (:class:`~captum_iclip.evaluation.metrics.LocalizationMetrics`: each (image, class present)
    pair, maps upsampled bilinearly to the input and then to the label), so the raw map's
    ``msc`` here equals ``eval``'s ``raw`` figure on the same model, prompts and images.

    Args:
        forward_func: the :class:`~captum_iclip.CLIPSimilarity` whose maps are diagnosed; with
            labels, prompt k explains class id ``classes[k]``.
        num_classes: class ids of the labels (the background included); ``None``: no labels.
        classes: the class id each prompt explains (default: prompt k explains class k, as the
            dataset prompts of ``captum-iclip eval`` are ordered).
        exclude: class ids that are not scored and count as background (default: 0).
        ignore_index: label value of ignored pixels.
        projection: ``"recognition"`` (the model's own projection, default), ``"interpretability"``
            or ``"auto"``, as for :class:`~captum_iclip.ITSMAttribution`.
        attention_blocks: how many of the last blocks' class-token attention to measure.
        alphas: scales of the last block's attention output.
        bootstrap: resamples for 95 % intervals of each map's mSC (0: none).

    Examples::

        >>> from captum_iclip import CLIPSimilarity, zoo
        >>> from captum_iclip.datasets import build_dataset
        >>> bundle = zoo.load("shapes-tiny")
        >>> data = build_dataset("world", "heldout", limit=8)
        >>> sim = CLIPSimilarity(bundle.dual, bundle.tokenizer, data.prompts)
        >>> diagnostics = Diagnostics(sim, num_classes=data.num_classes)
        >>> for index in range(len(data)):
        ...     image, label, _ = data[index]
        ...     diagnostics.update(bundle.preprocess(image)[None], [label])
        >>> summary = diagnostics.summary()
        >>> sorted(summary["maps"])[:3]
        ['alpha=0.5', 'alpha=1', 'alpha=2']
    """

    def __init__(
        self,
        forward_func: CLIPSimilarity,
        *,
        num_classes: int | None = None,
        classes: Sequence[int] | None = None,
        exclude: Sequence[int] = (0,),
        ignore_index: int = 255,
        projection: str = "recognition",
        attention_blocks: int = 2,
        alphas: Sequence[float] = ALPHAS,
        bootstrap: int = 0,
    ) -> None:
        if not isinstance(forward_func, CLIPSimilarity):
            raise TypeError(f"forward_func: expected a CLIPSimilarity, got {type(forward_func).__name__}")
        self.sim = forward_func
        adapter = _vit_adapter(forward_func.adapter, "Diagnostics")
        self.projection = adapter.resolve_projection(projection)
        _check_attention_blocks(attention_blocks, adapter.num_blocks)
        alphas = tuple(float(a) for a in alphas)
        if not alphas or any(not math.isfinite(a) for a in alphas):
            raise ValueError(f"alphas: expected one finite scale or more, got {alphas}")
        if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
            raise ValueError(f"bootstrap: expected a non-negative int, got {bootstrap!r}")
        self.attention_blocks, self.alphas, self.bootstrap = attention_blocks, alphas, bootstrap
        k = forward_func.num_prompts
        self.classes = list(range(k)) if classes is None else [int(c) for c in classes]
        if len(self.classes) != k:
            raise ValueError(f"classes: expected one class id per prompt ({k}), got {len(self.classes)}")
        self.num_classes, self.exclude, self.ignore_index = num_classes, tuple(exclude), ignore_index
        if num_classes is not None and any(not 0 <= c < num_classes for c in self.classes):
            raise ValueError(f"classes: expected ids in [0, {num_classes}), got {self.classes}")
        self.map_names = ["itsm", *TERMS, "shared-removed", *(_alpha_name(a) for a in alphas)]
        self.metrics: dict[str, LocalizationMetrics] = {}
        if num_classes is not None:
            for name in self.map_names:
                metric = LocalizationMetrics(num_classes, exclude=exclude, ignore_index=ignore_index)
                if bootstrap:
                    metric.record_images()
                self.metrics[name] = metric
        self._sums = _Sums()

    @torch.no_grad()
    def measure(self, images: Tensor) -> dict[str, Tensor | dict]:
        """The per-image measurements of a batch, without accumulating them.

        Returns:
            A dict with ``norm_ratios`` (blocks, N, h*w), ``cls_attention`` (blocks, N, heads, h*w),
            ``global_cosine`` (N, h*w), ``maps`` (name -> (N, K, h, w) unnormalised maps) and ``grid``.
        """
        sim = self.sim
        sim.check_inputs(images)
        with sim.evaluating():
            adapter = sim.adapter
            tower = run_tower(adapter, images, self.attention_blocks)
            text = sim.text_features
            raw, terms = itsm_decomposition(adapter, tower.last, text, self.projection)
            final = _final_projection(adapter, self.projection)
            patches = F.normalize(_project(final, tower.last.output[:, 1:]).float(), dim=-1)
            global_feature = F.normalize(adapter.pool(tower.last.output).embedding.float(), dim=-1)
            maps = {"itsm": raw, **terms}
            if text.shape[0] >= 2:
                maps["shared-removed"] = shared_direction_removed_maps(patches, text)
            for alpha, scaled in attention_scaled_maps(adapter, tower.last, text, self.alphas, self.projection).items():
                maps[_alpha_name(alpha)] = scaled
        n, (h, w) = images.shape[0], tower.grid
        return {
            "norm_ratios": token_norm_ratios(tower.block_outputs),
            "cls_attention": cls_attention(tower),
            "global_cosine": (patches @ global_feature[:, :, None])[..., 0],
            "maps": {name: m.transpose(1, 2).reshape(n, -1, h, w) for name, m in maps.items()},
            "grid": tower.grid,
        }

    @torch.no_grad()
    def update(self, images: Tensor, labels: Sequence[np.ndarray | Tensor] | None = None) -> dict:
        """Measure a batch and accumulate it.

        Args:
            images: (N, 3, H, W) preprocessed images.
            labels: with ``num_classes``, one (H', W') integer label map per image (any size).

        Returns:
            The batch's measurements (:meth:`measure`).
        """
        if (labels is None) != (self.num_classes is None):
            raise ValueError(
                "labels: expected label maps exactly when the Diagnostics has num_classes "
                f"(num_classes={self.num_classes}), got {'none' if labels is None else len(labels)}"
            )
        if labels is not None and len(labels) != images.shape[0]:
            raise ValueError(f"labels: expected one label map per image ({images.shape[0]}), got {len(labels)}")
        measured = self.measure(images)
        sums = self._sums
        ratios, attention = measured["norm_ratios"], measured["cls_attention"]
        if not sums.norm_max_ratio:
            sums.norm_max_ratio = [_Running() for _ in range(ratios.shape[0])]
            sums.norm_shares = [{t: _Running() for t in NORM_THRESHOLDS} for _ in range(ratios.shape[0])]
            heads = attention.shape[2]
            sums.attention_patch_mass = [[_Running() for _ in range(heads)] for _ in range(attention.shape[0])]
            sums.attention_fg_share = [[_Running() for _ in range(heads)] for _ in range(attention.shape[0])]
        for block, block_ratios in enumerate(ratios):
            sums.norm_max_ratio[block].add(block_ratios.amax(dim=1))
            for threshold, running in sums.norm_shares[block].items():
                running.add((block_ratios > threshold).double().mean(dim=1))
        patch_mass = attention.sum(dim=-1)  # (blocks, N, heads)
        for block in range(attention.shape[0]):
            for head in range(attention.shape[2]):
                sums.attention_patch_mass[block][head].add(patch_mass[block, :, head])
        sums.images += images.shape[0]
        if labels is None:
            return measured
        fractions = self._foreground(labels, measured["grid"])  # (N, h*w)
        fg_area = fractions.mean(dim=1)
        has_both = (fg_area > 0) & (fg_area < 1)
        sums.fg_area.add(fg_area[has_both])
        on_foreground = (attention * fractions[None, :, None]).sum(-1) / patch_mass.clamp_min(1e-12)
        for block in range(attention.shape[0]):
            for head in range(attention.shape[2]):
                sums.attention_fg_share[block][head].add(on_foreground[block, has_both, head])
        cosine = measured["global_cosine"].double()
        fg_weight, bg_weight = fractions.double(), 1 - fractions.double()
        sums.cosine_fg.add((cosine * fg_weight).sum(1)[has_both] / fg_weight.sum(1)[has_both].clamp_min(1e-12))
        sums.cosine_bg.add((cosine * bg_weight).sum(1)[has_both] / bg_weight.sum(1)[has_both].clamp_min(1e-12))
        size = images.shape[-2:]
        for name, maps in measured["maps"].items():
            upsampled = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
            for i, label in enumerate(labels):
                self.metrics[name].update(upsampled[i].float().cpu(), self.classes, label)
        return measured

    def _foreground(self, labels: Sequence[np.ndarray | Tensor], grid: tuple[int, int]) -> Tensor:
        fractions = []
        for label in labels:
            label = torch.as_tensor(np.asarray(label)).long()
            valid = label != self.ignore_index
            background = torch.zeros_like(valid)
            for c in self.exclude:
                background |= label == c
            fractions.append(foreground_fractions((valid & ~background)[None], grid, valid[None])[0])
        return torch.stack(fractions).to(self.sim.adapter.parameter.device)

    def summary(self) -> dict:
        """Everything accumulated, as a JSON-ready dict (``None`` where a mean has nothing to average).

        Keys: ``images``; ``token_norms`` (one row per block: ``max_ratio``, ``share_above_4``,
        ``share_above_10``); ``cls_attention`` (one row per recorded block and head:
        ``patch_mass``, ``foreground_share``; and ``foreground_area``); ``global_cosine``
        (``foreground``, ``background``); ``maps`` (with labels: per map ``msc``, ``miou``,
        ``pointing``, and ``msc_ci`` with ``bootstrap``).
        """
        sums = self._sums
        blocks = len(sums.norm_max_ratio)
        first_recorded = blocks - len(sums.attention_patch_mass)
        summary: dict = {
            "images": sums.images,
            "projection": self.projection,
            "token_norms": [
                {
                    "block": block,
                    "max_ratio": sums.norm_max_ratio[block].mean,
                    **{f"share_above_{t:g}": sums.norm_shares[block][t].mean for t in NORM_THRESHOLDS},
                }
                for block in range(blocks)
            ],
            "cls_attention": {
                "foreground_area": sums.fg_area.mean,
                "heads": [
                    {
                        "block": first_recorded + b,
                        "head": head,
                        "patch_mass": sums.attention_patch_mass[b][head].mean,
                        "foreground_share": sums.attention_fg_share[b][head].mean,
                    }
                    for b in range(len(sums.attention_patch_mass))
                    for head in range(len(sums.attention_patch_mass[b]))
                ],
            },
            "global_cosine": {"foreground": sums.cosine_fg.mean, "background": sums.cosine_bg.mean},
            "maps": {},
        }
        for name, metric in self.metrics.items():
            scores = metric.compute()
            entry = {key: finite_or_null(scores[key]) for key in ("msc", "miou", "pointing")}
            if self.bootstrap:
                interval = metric.bootstrap(("msc",), resamples=self.bootstrap)
                entry["msc_ci"] = finite_or_null(interval["msc"])
            summary["maps"][name] = entry
        return summary


def _alpha_name(alpha: float) -> str:
    return f"alpha={alpha:g}"
