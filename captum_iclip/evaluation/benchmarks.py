"""The training-free open-vocabulary segmentation benchmarks, as SCLIP, NACLIP, ClearCLIP and ProxyCLIP run them.

One home for the protocol (docs/benchmarks.md): the eight benchmarks (:data:`BENCHMARKS`), each
repository's settings for them (:func:`protocol_settings`), the class names the text side embeds
(:func:`class_queries`, data files in ``class_names/``), and the inference of every image:

1. :func:`protocol_input`: the image's keep-ratio resize (mmcv's rule: scale ``min(long / max(h, w),
   short / min(h, w))``, sides ``int(side · scale + 0.5)``; bilinear without antialiasing, rounded to
   8 bits like OpenCV's), normalised with the model's mean and std;
2. :func:`protocol_logits`: windows of ``window`` px every ``stride`` px (the last flush with the edge;
   ``window=None``: the whole image), each window's patch-grid cosine similarities (one per class
   name) upsampled bilinearly to the window, summed and divided by the coverage, then resized
   bilinearly to the label; crops that are not patch multiples are floored (SCLIP, NACLIP: the patch
   embedding drops the remainder) or zero-padded to ``pad_multiple`` (ClearCLIP, ProxyCLIP);
3. :func:`pamr` (optional): Araslanov and Roth's parameter-free refinement of the logits;
4. :func:`predict_labels`: ``softmax(logit_scale · cos)`` over the class names, the max over each
   class's names, the area threshold (classes covering at most ``area_threshold`` of the
   foreground-predicted pixels lose their probabilities), the argmax, and class 0 where the best
   probability is below ``probability_threshold``.

The run over a dataset (sharding, metrics, the published figures beside ours) is
:mod:`captum_iclip.evaluation.benchmark_run`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from captum_iclip._io import read_image
from captum_iclip.evaluation.metrics import _window_starts
from captum_iclip.similarity import CLIPSimilarity

__all__ = [
    "BENCHMARKS",
    "PAMR_DILATIONS",
    "PROTOCOLS",
    "Benchmark",
    "ProtocolSettings",
    "benchmark_similarity",
    "bilinear_matrix",
    "class_queries",
    "imagenet_templates",
    "pamr",
    "predict_labels",
    "protocol_input",
    "protocol_logits",
    "protocol_settings",
    "published_rows",
    "read_class_name_file",
    "rescaled_size",
]

_DATA = Path(__file__).resolve().parent
CLASS_NAMES_DIR = _DATA / "class_names"
PUBLISHED_FILE = _DATA / "published.json"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its name, the dataset reader it reads (:data:`captum_iclip.datasets.DATASETS`), its title."""

    name: str
    dataset: str
    title: str


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("voc21", "voc", "PASCAL VOC 2012 val, 20 classes + background"),
        Benchmark("voc20", "voc20", "PASCAL VOC 2012 val, 20 classes (background ignored)"),
        Benchmark("context60", "context60", "PASCAL Context val, 59 classes + background"),
        Benchmark("context59", "context", "PASCAL Context val, 59 classes (background ignored)"),
        Benchmark("coco-object", "coco-object", "COCO-Object (COCO-Stuff 164k val2017), 80 objects + background"),
        Benchmark("coco-stuff", "coco-stuff", "COCO-Stuff 164k val2017, 171 classes"),
        Benchmark("cityscapes", "cityscapes", "Cityscapes val, 19 classes"),
        Benchmark("ade20k", "ade20k", "ADE20K val, 150 classes"),
    )
}
"""The eight benchmarks of SCLIP's protocol, by name."""

PROTOCOLS = ("sclip", "naclip", "clearclip", "proxyclip")
"""The repositories whose settings ``--protocol`` selects (SCLIP's is the default)."""

PAMR_DILATIONS = (8, 16)
"""The dilations of PAMR's neighbourhoods in SCLIP's and NACLIP's segmentors (``pamr_stride``)."""


@dataclass(frozen=True)
class ProtocolSettings:
    """How one repository runs one benchmark (docs/benchmarks.md has the table).

    Attributes:
        protocol: A name of :data:`PROTOCOLS`.
        benchmark: A name of :data:`BENCHMARKS`.
        short_side: The keep-ratio resize's bound on the short side (mmcv ``Resize(scale=(long_side, short_side))``).
        long_side: Its bound on the long side.
        window: Sliding-window side; ``None``: the whole image in one pass.
        stride: Sliding-window step.
        logit_scale: The temperature of the softmax over the class names.
        probability_threshold: Pixels whose best class probability is below it become class 0 (0: never).
        area_threshold: Classes (but 0) predicted on at most this fraction of the pixels predicted as a class
            other than 0 lose their probabilities; ``None``: no area threshold.
        pad_multiple: Windows whose sides are not multiples of it are zero-padded (centred) to one (ClearCLIP,
            ProxyCLIP); ``None``: the patch embedding floors them (SCLIP, NACLIP).
    """

    protocol: str
    benchmark: str
    short_side: int = 336
    long_side: int = 2048
    window: int | None = 224
    stride: int = 112
    logit_scale: float = 40.0
    probability_threshold: float = 0.0
    area_threshold: float | None = None
    pad_multiple: int | None = None


# Each repository's defaults (its segmentor's arguments and base configuration), then its per-benchmark
# configurations (configs/cfg_*.py). ClearCLIP and ProxyCLIP pad windows to the patch size / 56.
_DEFAULTS = {
    "sclip": {},
    "naclip": {},
    "clearclip": {"short_side": 448, "window": 448, "stride": 224, "logit_scale": 50.0, "pad_multiple": 16},
    "proxyclip": {"window": 336, "stride": 112, "pad_multiple": 56},
}
_OVERRIDES = {
    "sclip": {
        "voc21": {"logit_scale": 65.0, "probability_threshold": 0.1, "area_threshold": 0.1},
        "context60": {"logit_scale": 50.0, "probability_threshold": 0.1},
        "coco-object": {"logit_scale": 50.0, "probability_threshold": 0.1},
        "coco-stuff": {"short_side": 448},
        "cityscapes": {"short_side": 560},
    },
    "naclip": {
        "voc21": {"probability_threshold": 0.1, "window": None},
        "voc20": {"window": None},
        "context60": {"probability_threshold": 0.1},
        "coco-object": {"probability_threshold": 0.1},
        "cityscapes": {"short_side": 560},
    },
    "clearclip": {
        "voc21": {"probability_threshold": 0.5},
        "context60": {"probability_threshold": 0.15},
        "coco-object": {"probability_threshold": 0.4},
        "cityscapes": {"window": 224},
    },
    "proxyclip": {
        "voc21": {"probability_threshold": 0.2},
        "context60": {"probability_threshold": 0.15},
        "coco-object": {"probability_threshold": 0.25},
        "cityscapes": {"short_side": 448, "window": 224},
        "ade20k": {"short_side": 448},
    },
}


def _check_names(benchmark: str, protocol: str) -> None:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark: expected one of {sorted(BENCHMARKS)}, got {benchmark!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")


def protocol_settings(benchmark: str, protocol: str = "sclip") -> ProtocolSettings:
    """The settings with which ``protocol``'s repository runs ``benchmark``.

    Args:
        benchmark: A name of :data:`BENCHMARKS`.
        protocol: A name of :data:`PROTOCOLS`.

    Returns:
        The settings (docs/benchmarks.md lists them all).

    Raises:
        ValueError: For an unknown benchmark or protocol.

    Examples:
        >>> protocol_settings("voc21").logit_scale, protocol_settings("coco-stuff").short_side
        (65.0, 448)
        >>> protocol_settings("voc21", "naclip").window is None
        True
    """
    _check_names(benchmark, protocol)
    values = {**_DEFAULTS[protocol], **_OVERRIDES[protocol].get(benchmark, {})}
    return replace(ProtocolSettings(protocol, benchmark), **values)


# --------------------------------------------------------------------------- the text side
def read_class_name_file(path: str | Path) -> list[list[str]]:
    """A class-name file: one line per class (line i = class id i), its names separated by commas.

    Args:
        path: The UTF-8 text file.

    Returns:
        Each class's names, in file order.

    Raises:
        ValueError: On a blank line or an empty name.

    Examples:
        >>> read_class_name_file(CLASS_NAMES_DIR / "voc20.txt")[14][:2]
        ['person', 'person in shirt']
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    classes = []
    for number, line in enumerate(lines, start=1):
        names = [name.strip() for name in line.split(",")]
        if not all(names):
            raise ValueError(
                f"class-name file: expected comma-separated names on every line, got line {number} {line!r}"
            )
        classes.append(names)
    return classes


def _class_name_file(benchmark: str, protocol: str) -> Path:
    """The protocol's own file where its names differ from SCLIP's (ClearCLIP's, ProxyCLIP's VOC and COCO-Object)."""
    own = CLASS_NAMES_DIR / protocol / f"{benchmark}.txt"
    return own if own.is_file() else CLASS_NAMES_DIR / f"{benchmark}.txt"


def class_queries(benchmark: str, protocol: str = "sclip") -> tuple[list[str], list[int]]:
    """The texts the protocol embeds for ``benchmark``: every name of every class, and each name's class id.

    Args:
        benchmark: A name of :data:`BENCHMARKS`.
        protocol: A name of :data:`PROTOCOLS`.

    Returns:
        ``(queries, query_class)``: the names in file order and, for each, its class id.

    Examples:
        >>> queries, query_class = class_queries("voc21")
        >>> queries[:2], query_class[:2], query_class[-1]
        (['sky', 'wall'], [0, 0], 20)
    """
    _check_names(benchmark, protocol)
    classes = read_class_name_file(_class_name_file(benchmark, protocol))
    queries = [name for names in classes for name in names]
    query_class = [index for index, names in enumerate(classes) for _ in names]
    return queries, query_class


def imagenet_templates() -> list[Callable[[str], str]]:
    """The 80 prompt templates of CLIP's ImageNet evaluation (open_clip's ``OPENAI_IMAGENET_TEMPLATES``),
    which every protocol ensembles: per name, the mean of the normalised embeddings of the 80 prompts,
    renormalised."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return list(OPENAI_IMAGENET_TEMPLATES)


def benchmark_similarity(
    model: nn.Module, tokenizer: Callable, benchmark: str, protocol: str = "sclip"
) -> CLIPSimilarity:
    """The forward function of a benchmark: one prompt per class name (:func:`class_queries`), ensembled over
    the 80 ImageNet templates.

    Each name is embedded on its own (80 texts a pass, as the reference segmentors do), so that the
    171 × 80 texts of COCO-Stuff never go through the text tower at once.

    Args:
        model: A CLIP model (anything :class:`~captum_iclip.CLIPSimilarity` takes).
        tokenizer: Its tokenizer.
        benchmark: A name of :data:`BENCHMARKS`.
        protocol: A name of :data:`PROTOCOLS`.

    Returns:
        The :class:`~captum_iclip.CLIPSimilarity`, its ``prompts`` the class names.

    Examples:
        >>> sim = benchmark_similarity(model, tokenizer, "voc20")  # doctest: +SKIP
        >>> sim.num_prompts  # 18 classes of one name, person's 7, the tv's 5
        30
    """
    queries, _ = class_queries(benchmark, protocol)
    sim = CLIPSimilarity(model, tokenizer, queries[:1], templates=imagenet_templates())
    # What set_prompts does, one name at a time.
    sim.text_features = torch.cat([sim.encode_prompts([query]) for query in queries])
    sim.prompts = list(queries)
    return sim


# --------------------------------------------------------------------------- the image side
def rescaled_size(height: int, width: int, short_side: int, long_side: int = 2048) -> tuple[int, int]:
    """(height, width) of mmcv's keep-ratio rescale into ``long_side`` × ``short_side``.

    The scale is the largest that fits both bounds, ``min(long_side / max(h, w), short_side / min(h, w))``;
    each side becomes ``int(side · scale + 0.5)``.

    Examples:
        >>> rescaled_size(375, 500, 336)
        (336, 448)
    """
    scale = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def protocol_input(
    image: Image.Image, settings: ProtocolSettings, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """The image as the protocol feeds it: resized (:func:`rescaled_size`), normalised, (3, h, w) float32.

    The resize is bilinear with half-pixel centres and no antialiasing, rounded half up to 8 bits, as
    OpenCV's ``INTER_LINEAR`` (mmcv's default) writes it; OpenCV's 11-bit fixed-point weights can
    differ from these by one grey level at some pixels. ``mean`` and ``std`` are in [0, 1] units.
    """
    pixels = torch.from_numpy(np.asarray(read_image(image), dtype=np.uint8).copy()).permute(2, 0, 1)
    size = rescaled_size(image.height, image.width, settings.short_side, settings.long_side)
    if size != (image.height, image.width):
        resized = F.interpolate(pixels[None].double(), size=size, mode="bilinear", align_corners=False)[0]
        pixels = (resized + 0.5).floor().clamp(0, 255)
    scale = torch.tensor([255.0 * m for m in mean], dtype=torch.float32).reshape(3, 1, 1)
    spread = torch.tensor([255.0 * s for s in std], dtype=torch.float32).reshape(3, 1, 1)
    return (pixels.float() - scale) / spread


def _pad_sides(size: int, multiple: int | None) -> tuple[int, int]:
    """(before, after) zero padding that makes ``size`` a multiple of ``multiple``, centred (the extra pixel after)."""
    if multiple is None or size % multiple == 0:
        return 0, 0
    total = multiple - size % multiple
    return total // 2, total - total // 2


def bilinear_matrix(size_in: int, size_out: int) -> Tensor:
    """The (size_out, size_in) float64 matrix of a 1-D bilinear resize with ``align_corners=False``.

    Row r holds ``F.interpolate``'s two weights: source ``max((r + 0.5) · size_in / size_out − 0.5, 0)``,
    split between its floor and the next sample (the last sample repeated at the edge).

    Examples:
        >>> bilinear_matrix(2, 4)
        tensor([[1.0000, 0.0000],
                [0.7500, 0.2500],
                [0.2500, 0.7500],
                [0.0000, 1.0000]], dtype=torch.float64)
    """
    source = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * (size_in / size_out) - 0.5).clamp(min=0)
    low = source.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    weight = (source - low).clamp(0, 1)
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    matrix.index_put_((rows, low), 1 - weight, accumulate=True)
    matrix.index_put_((rows, high), weight, accumulate=True)
    return matrix


@dataclass(frozen=True)
class _Axis:
    """One side of an image's windows: where they start, how long they are, how the reference sees them."""

    starts: tuple[int, ...]
    length: int  # the window's side on this axis
    pad_before: int
    padded: int  # the side after the zero padding
    grid: int  # patches the tower sees (the padded side floored to whole patches)

    @property
    def padding(self) -> tuple[int, int]:
        """The zero padding (before, after) of each window on this axis."""
        return self.pad_before, self.padded - self.length - self.pad_before

    @classmethod
    def of(cls, size: int, window: int | None, stride: int, pad_multiple: int | None, patch: int) -> _Axis:
        length = size if window is None else min(window, size)
        starts = (0,) if window is None else tuple(_window_starts(size, length, stride))
        before, after = _pad_sides(length, pad_multiple)
        padded = length + before + after
        if padded < patch:
            raise ValueError(f"inputs: expected windows of at least one {patch}-px patch, got a side of {length} px")
        return cls(starts, length, before, padded, padded // patch)

    def placement(self, size: int, label_size: int) -> list[Tensor]:
        """For each window start, the (label_size, grid) map from its patch grid to the label's axis.

        The composition of the reference's linear steps on this axis: the grid upsampled to the padded
        window, the padding cut, the window placed in the image, the division by the coverage, and the
        resize to the label. Each step is linear and acts on one axis, and the coverage of a grid of
        windows is a product of a row and a column count, so the whole pipeline is, per window,
        ``rows @ grid @ columns.T``.
        """
        upsample = bilinear_matrix(self.grid, self.padded)[self.pad_before : self.pad_before + self.length]
        coverage = torch.zeros(size, dtype=torch.float64)
        for start in self.starts:
            coverage[start : start + self.length] += 1
        resize = bilinear_matrix(size, label_size) / coverage
        return [resize[:, start : start + self.length] @ upsample for start in self.starts]


def protocol_logits(
    dense: Callable[[Tensor], Tensor],
    inputs: Sequence[Tensor],
    label_sizes: Sequence[tuple[int, int]],
    settings: ProtocolSettings,
    patch: int,
    *,
    windows_per_pass: int = 32,
) -> list[Tensor]:
    """Every image's (Q, H, W) cosine logits at its label's size, by windows (or whole images).

    Equal to the reference segmentors' computation (each window's grid upsampled bilinearly to the
    window, the windows' sum divided by the coverage, resized bilinearly to the label; the remainder
    rule of ``settings.pad_multiple``), computed as one product per window on each axis
    (:meth:`_Axis.placement`) instead of through window-sized and image-sized canvases: the same
    numbers up to float rounding, at a fraction of the memory traffic. The windows of all images are
    cut first; windows of the same size go through ``dense`` together, ``windows_per_pass`` at a time.

    Args:
        dense: Maps (M, 3, h, w) images, ``h`` and ``w`` multiples of ``patch``, to (M, Q, h / patch, w / patch)
            cosine similarities (``ITSMAttribution.attribute(..., target=None, normalize=False, interpolate=False)``).
        inputs: Each image as :func:`protocol_input` gives it, (3, h, w), on ``dense``'s device.
        label_sizes: Each image's label (H, W).
        settings: The protocol.
        patch: The tower's patch size.
        windows_per_pass: At most this many windows per call of ``dense``.

    Returns:
        One float32 (Q, H, W) tensor per image.

    Raises:
        ValueError: If a window is smaller than one patch.
    """
    windows = []  # (image, its row axis, its column axis, row window, column window)
    placements = []
    for index, image in enumerate(inputs):
        sides = image.shape[-2:]
        rows, cols = (_Axis.of(size, settings.window, settings.stride, settings.pad_multiple, patch) for size in sides)
        placements.append(
            [
                [m.to(device=image.device, dtype=torch.float32) for m in axis.placement(size, label_size)]
                for axis, size, label_size in zip((rows, cols), sides, label_sizes[index])
            ]
        )
        windows += [(index, rows, cols, r, c) for r in range(len(rows.starts)) for c in range(len(cols.starts))]
    by_shape: dict[tuple[int, int], list] = {}
    for window in windows:
        by_shape.setdefault((window[1].grid, window[2].grid), []).append(window)
    # Per image and row of windows, the windows' grids placed along the columns (Q, grid rows, W): the
    # rows' placement, the larger product, then runs once per row of windows instead of once per window.
    partial: list[dict[int, Tensor]] = [{} for _ in inputs]
    for group in by_shape.values():
        for first in range(0, len(group), windows_per_pass):
            chunk = group[first : first + windows_per_pass]
            crops = []
            for index, rows, cols, r, c in chunk:
                top, left = rows.starts[r], cols.starts[c]
                crop = inputs[index][:, top : top + rows.length, left : left + cols.length]
                crop = F.pad(crop, (*cols.padding, *rows.padding))
                # The patch embedding sees whole patches only: the reference towers drop the remainder.
                crops.append(crop[:, : rows.grid * patch, : cols.grid * patch])
            for (index, _, _, r, c), grid in zip(chunk, dense(torch.stack(crops)).float()):
                placed = grid @ placements[index][1][c].T
                partial[index][r] = placed if r not in partial[index] else partial[index][r] + placed
    outputs = []
    for index, rows_of_windows in enumerate(partial):
        row_maps = placements[index][0]
        outputs.append(sum(row_maps[r] @ placed for r, placed in sorted(rows_of_windows.items())))
    return outputs


# --------------------------------------------------------------------------- PAMR
_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def _shifted(x: Tensor, dilation: int, offsets: Sequence[tuple[int, int]]) -> list[Tensor]:
    """``x`` (N, C, H, W) read at each offset × ``dilation``, the border replicated: a list of (N, C, H, W)."""
    height, width = x.shape[-2:]
    padded = F.pad(x, [dilation] * 4, mode="replicate")
    rows, cols = [dilation * (1 + dy) for dy, _ in offsets], [dilation * (1 + dx) for _, dx in offsets]
    return [padded[..., top : top + height, left : left + width] for top, left in zip(rows, cols)]


def pamr(image: Tensor, logits: Tensor, steps: int, dilations: Sequence[int] = PAMR_DILATIONS) -> Tensor:
    r"""Pixel-adaptive mask refinement (Araslanov and Roth, CVPR 2020, "Single-Stage Semantic Segmentation from
    Image Labels", arXiv 2005.08104), parameter-free, as SCLIP and NACLIP apply it (docs/benchmarks.md).

    For each pixel i and its 8 neighbours j at each dilation d (8·D neighbours; borders replicated),
    :math:`k_{ij} = \mathrm{mean}_c\, -|I_{c,i} - I_{c,j}| / (10^{-8} + 0.1\, \sigma_{c,i})` where
    :math:`\sigma_{c,i}` is the (unbiased) standard deviation of channel c over the 3 × 3 neighbourhoods
    of all dilations, centre included (9·D values); :math:`a_{ij} = \mathrm{softmax}_j\, k_{ij}`. Each of
    ``steps`` iterations replaces the logits by :math:`m_i \leftarrow \sum_j a_{ij} m_j`.

    Args:
        image: (N, C, H, W) image (the normalised model input resized to the logits).
        logits: (N, K, H, W) logits to refine.
        steps: Iterations (0 returns ``logits``).
        dilations: The neighbourhoods' dilations.

    Returns:
        (N, K, H, W) refined logits.

    Examples:
        >>> pamr(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 8, 8), steps=10).shape
        torch.Size([1, 2, 8, 8])
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected a non-negative int, got {steps!r}")
    if image.shape[-2:] != logits.shape[-2:] or image.shape[0] != logits.shape[0]:
        raise ValueError(f"image: expected the logits' batch and size {tuple(logits.shape)}, got {tuple(image.shape)}")
    if steps == 0:
        return logits
    image = image.to(logits.dtype)
    neighbours = [(dy, dx) for dy, dx in _OFFSETS if (dy, dx) != (0, 0)]
    spread = torch.stack([v for d in dilations for v in _shifted(image, d, _OFFSETS)], dim=2).std(dim=2)
    kernel = torch.stack(
        [(image - v).abs() for d in dilations for v in _shifted(image, d, neighbours)], dim=2
    )  # (N, C, 8·D, H, W)
    affinity = (-kernel / (1e-8 + 0.1 * spread[:, :, None])).mean(dim=1).softmax(dim=1)  # (N, 8·D, H, W)
    for _ in range(steps):
        shifted = [v for d in dilations for v in _shifted(logits, d, neighbours)]
        logits = sum(v * affinity[:, p : p + 1] for p, v in enumerate(shifted))
    return logits


# --------------------------------------------------------------------------- the decision
def predict_labels(
    logits: Tensor, query_class: Sequence[int] | Tensor, num_classes: int, settings: ProtocolSettings
) -> Tensor:
    """Per-pixel class ids from (Q, H, W) cosine logits of the class names (step 4 of the module docstring).

    Args:
        logits: (Q, H, W) cosine similarities, one map per class name.
        query_class: The class id of each name.
        num_classes: The number of classes.
        settings: The protocol (its logit scale and thresholds).

    Returns:
        (H, W) int64 class ids.

    Examples:
        >>> settings = protocol_settings("voc20")
        >>> predict_labels(torch.tensor([[[0.2, 0.1]], [[0.1, 0.3]], [[0.0, 0.25]]]), [0, 1, 1], 2, settings)
        tensor([[0, 1]])
    """
    query_class = torch.as_tensor(query_class, dtype=torch.long, device=logits.device)
    probabilities = (logits.float() * settings.logit_scale).softmax(dim=0)
    index = query_class[:, None, None].expand_as(probabilities)
    best = probabilities.new_zeros(num_classes, *probabilities.shape[1:]).scatter_reduce(
        0, index, probabilities, reduce="amax", include_self=False
    )
    if settings.area_threshold is not None:
        areas = torch.bincount(best.argmax(dim=0).flatten(), minlength=num_classes)[1:]
        kept = (areas > settings.area_threshold * areas.sum()).to(best.dtype)
        best[1:] *= kept[:, None, None]
    labels = best.argmax(dim=0)
    return torch.where(best.amax(dim=0) < settings.probability_threshold, torch.zeros_like(labels), labels)


# --------------------------------------------------------------------------- published figures
@lru_cache(maxsize=1)
def _published() -> tuple[dict, ...]:
    return tuple(json.loads(PUBLISHED_FILE.read_text(encoding="utf-8"))["rows"])


def published_rows(method: str, model: str, benchmark: str) -> list[dict]:
    """The published mIoU rows (``published.json``) of ``method`` with ``model`` on ``benchmark``.

    Args:
        method: A method name of the registry (``"sclip"``, ``"raw"``, ...).
        model: The model as the loader names it (``"ViT-B-16/openai"``).
        benchmark: A name of :data:`BENCHMARKS`.

    Returns:
        The rows, each with ``method``, ``model``, ``backbone``, ``benchmark``, ``miou``, ``protocol``,
        ``pamr`` and ``source``.

    Examples:
        >>> [row["miou"] for row in published_rows("sclip", "ViT-B-16/openai", "voc21")]
        [59.1, 59.63]
    """
    return [
        dict(row)
        for row in _published()
        if row["method"] == method and row["model"] == model and row["benchmark"] == benchmark
    ]
