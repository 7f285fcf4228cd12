"""Streaming localization and segmentation metrics (docs/methods.md §5).

Both metric classes keep only sums (integer counts, and the score contrast
in fixed point), never maps, so a dataset can be processed image by image,
in shards, or across processes: :meth:`merge` and :meth:`all_reduce` add
the sums, and because integer addition is exact and order-free, any
sharding gives bit-identical results to a single pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LocalizationMetrics",
    "SegmentationMetrics",
    "bootstrap_mean",
    "map_agreement",
    "segment_from_maps",
    "sliding_window",
]

_SC_SCALE = 2**32
"""Fixed-point scale of the score-contrast sums: each per-pair contrast in
[-1, 1] is stored as round(SC · 2^32) in int64 (resolution 2.3e-10), which
makes the sums exact and independent of the order of accumulation; a class
can take 2^31 pairs before overflow."""


def _as_label_tensor(value: Tensor | np.ndarray, name: str) -> Tensor:
    """Convert a label map to an integer tensor, rejecting float input."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer class ids, got dtype {value.dtype}")
    return value.long()


class _StreamingMetric:
    """Additive state shared by the metrics: reset, state, merge, all_reduce.

    Subclasses list their state tensors in ``_state_names`` (all int64, on
    the CPU) and their configuration in :meth:`_config`.
    """

    _state_names: tuple[str, ...] = ()

    def _config(self) -> dict:
        raise NotImplementedError

    def _empty_state(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything accumulated so far (per-image records included)."""
        for name, tensor in self._empty_state().items():
            setattr(self, name, tensor)
        if getattr(self, "_image_states", None) is not None:
            self._image_states = []

    def record_images(self) -> _StreamingMetric:
        """Keep each :meth:`update`'s contribution apart, for :meth:`bootstrap` (single process).

        Returns:
            ``self``.
        """
        self._image_states: list[dict[str, Tensor]] | None = []
        return self

    def _record(self, contribution: dict[str, Tensor]) -> None:
        if getattr(self, "_image_states", None) is not None:
            self._image_states.append(contribution)

    def bootstrap(
        self, keys: Sequence[str], resamples: int = 1000, level: float = 0.95, seed: int = 0
    ) -> dict[str, tuple[float, float]]:
        """Percentile bootstrap intervals over the recorded images.

        Each resample draws as many images as were recorded, with replacement, sums
        their contributions and computes the metrics from those sums, exactly as
        :meth:`compute` does on the whole set.

        Args:
            keys: Figures of :meth:`compute` to give intervals for (e.g. ``("miou", "msc")``).
            resamples: Number of bootstrap resamples.
            level: Coverage of the interval, in (0, 1).
            seed: Seed of the resampling.

        Returns:
            ``{key: (low, high)}``; NaN bounds where a resample leaves a figure undefined.

        Raises:
            RuntimeError: If images were not recorded (see :meth:`record_images`).
        """
        images = getattr(self, "_image_states", None)
        if not images:
            raise RuntimeError("bootstrap: expected images recorded by record_images() before update(), got none")
        if not 0.0 < level < 1.0:
            raise ValueError(f"level: expected a coverage in (0, 1), got {level!r}")
        if resamples < 1:
            raise ValueError(f"resamples: expected at least 1, got {resamples!r}")
        stacked = {name: torch.stack([image[name] for image in images]) for name in self._state_names}
        generator = torch.Generator().manual_seed(seed)
        resample = type(self).__new__(type(self))
        resample.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_image_states"})
        values: dict[str, list[float]] = {key: [] for key in keys}
        for _ in range(resamples):
            counts = torch.bincount(
                torch.randint(len(images), (len(images),), generator=generator), minlength=len(images)
            )
            for name, per_image in stacked.items():
                setattr(resample, name, torch.tensordot(counts, per_image, dims=1))
            scores = resample.compute()
            for key in keys:
                values[key].append(float(scores[key]))
        return {key: _percentile_interval(np.array(values[key]), level) for key in keys}

    def state(self) -> dict[str, Tensor]:
        """A copy of the accumulated sums (CPU int64 tensors), e.g. to save or send.

        Returns:
            Mapping from state name to tensor; :meth:`load_state` restores it.
        """
        return {name: getattr(self, name).clone() for name in self._state_names}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Replace the accumulated sums with ``state`` (as returned by :meth:`state`).

        Args:
            state: Mapping with exactly the keys of :meth:`state`, tensors of
                the same shapes.

        Raises:
            ValueError: If keys or shapes differ.
        """
        if set(state) != set(self._state_names):
            raise ValueError(f"state: expected the keys {sorted(self._state_names)}, got {sorted(state)}")
        for name in self._state_names:
            current = getattr(self, name)
            value = torch.as_tensor(state[name])
            if value.shape != current.shape:
                raise ValueError(f"state[{name!r}]: expected shape {tuple(current.shape)}, got {tuple(value.shape)}")
            setattr(self, name, value.to(device="cpu", dtype=current.dtype).clone())

    def merge(self, other: _StreamingMetric) -> _StreamingMetric:
        """Add another metric's sums (same class and configuration) into this one.

        Args:
            other: A metric that accumulated other images.

        Returns:
            ``self``, now holding the sums of both.

        Raises:
            TypeError: If ``other`` is of another class.
            ValueError: If ``other`` has another configuration.
        """
        if type(other) is not type(self):
            raise TypeError(f"other: expected a {type(self).__name__}, got {type(other).__name__}")
        if other._config() != self._config():
            raise ValueError(f"other: expected the configuration {self._config()}, got {other._config()}")
        for name in self._state_names:
            getattr(self, name).add_(getattr(other, name))
        return self

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> _StreamingMetric:
        """Sum the state over all processes of ``group`` (no-op when not distributed).

        Every process ends with the global sums, so :meth:`compute` then gives
        the same numbers everywhere, equal to a single-process run over all
        the data. Call it once, after the last :meth:`update`, on every process.

        Args:
            group: The process group; ``None`` is the default group.

        Returns:
            ``self``.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        for name in self._state_names:
            tensor = getattr(self, name).to(device)
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
            setattr(self, name, tensor.cpu())
        return self


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of resampled figures, ignoring NaN (NaN bounds if all are)."""
    if np.isnan(values).all():
        return math.nan, math.nan
    tail = 100.0 * (1.0 - level) / 2.0
    return float(np.nanpercentile(values, tail)), float(np.nanpercentile(values, 100.0 - tail))


def bootstrap_mean(
    values: Sequence[float], resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-image figures (NaN figures left out of each mean).

    Args:
        values: One figure per image.
        resamples: Number of bootstrap resamples (each draws ``len(values)`` images with replacement).
        level: Coverage of the interval, in (0, 1).
        seed: Seed of the resampling.

    Returns:
        ``(low, high)``; NaN bounds when there is no finite figure.

    Examples:
        >>> bootstrap_mean([2.0, 2.0, 2.0], resamples=10)
        (2.0, 2.0)
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a coverage in (0, 1), got {level!r}")
    if resamples < 1:
        raise ValueError(f"resamples: expected at least 1, got {resamples!r}")
    figures = torch.as_tensor(list(values), dtype=torch.float64)
    if not len(figures) or torch.isnan(figures).all():
        return math.nan, math.nan
    generator = torch.Generator().manual_seed(seed)
    draws = figures[torch.randint(len(figures), (resamples, len(figures)), generator=generator)]
    return _percentile_interval(draws.nanmean(dim=1).numpy(), level)


class LocalizationMetrics(_StreamingMetric):
    """Explanation mIoU, mean score contrast and pointing game (docs/methods.md §5;
    pointing game of Zhang et al., arXiv 1608.00507).

    For every image, :meth:`update` takes the maps of the classes present in
    it and, for each class ``c`` in the ground truth and not in ``exclude``,
    forms one (image, class) pair:

    - the map is resized to the ground truth's size (bilinear,
      ``align_corners=False``) if needed, then min–max normalised to [0, 1]
      over the non-ignored pixels (a constant map becomes all zeros);
    - **IoU**: the pixels with normalised value ``>= theta`` are intersected
      and united with c's mask; intersection and union are summed per class
      over the dataset, and mIoU is the mean over the classes seen of
      I_c / U_c;
    - **score contrast**: mean of the map over c's pixels minus its mean
      over the other non-ignored pixels (pairs where c covers every
      non-ignored pixel have no contrast and are left out of mSC only);
    - **pointing game**: a hit when the map's maximum (over the non-ignored
      pixels; the first in row-major order on ties) lies within Euclidean
      distance ``pointing_tolerance`` of c's mask, i.e. inside the mask
      dilated by a disk of that radius. A constant map has no maximum and
      counts as a miss.

    Ignore pixels take no part in anything: not in normalisation, masks,
    unions, means or the argmax. Classes given with a map but absent from
    the ground truth are skipped, so maps for every prompt may be passed.

    Args:
        num_classes: Number of class ids (the background included).
        theta: Binarisation threshold on the normalised map, in [0, 1].
        pointing_tolerance: Tolerance radius of the pointing game, pixels.
        ignore_index: Ground-truth value of ignored pixels.
        exclude: Class ids never scored — the background by default (id 0).
            Datasets without a background class (PASCAL Context, COCO-Stuff,
            Cityscapes) need ``exclude=()``; :meth:`for_dataset` sets it.

    Examples:
        >>> metric = LocalizationMetrics(num_classes=21)
        >>> gt = torch.zeros(4, 4, dtype=torch.long)
        >>> gt[:2] = 7
        >>> metric.update(gt[None].float(), [7], gt)  # a perfect map
        >>> metric.compute()["miou"]
        100.0
    """

    _state_names = (
        "intersection",
        "union",
        "class_pairs",
        "pointing_hits",
        "contrast_sum",
        "contrast_pairs",
    )

    def __init__(
        self,
        num_classes: int,
        *,
        theta: float = 0.5,
        pointing_tolerance: int = 15,
        ignore_index: int = 255,
        exclude: Sequence[int] = (0,),
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        if not 0.0 <= float(theta) <= 1.0:
            raise ValueError(f"theta: expected in [0, 1], got {theta!r}")
        if isinstance(pointing_tolerance, bool) or not isinstance(pointing_tolerance, int) or pointing_tolerance < 0:
            raise ValueError(f"pointing_tolerance: expected a non-negative int, got {pointing_tolerance!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index: expected a value outside the class ids [0, {num_classes}), got {ignore_index}"
            )
        self.num_classes = num_classes
        self.theta = float(theta)
        self.pointing_tolerance = pointing_tolerance
        self.ignore_index = ignore_index
        self.exclude = tuple(sorted({int(c) for c in exclude}))
        # Offsets of the disk of radius `pointing_tolerance`, as (P,) rows and columns.
        radius = pointing_tolerance
        grid = torch.arange(-radius, radius + 1)
        dy, dx = torch.meshgrid(grid, grid, indexing="ij")
        inside = dy**2 + dx**2 <= radius**2
        self._disk_offsets = (dy[inside], dx[inside])
        self.reset()

    @classmethod
    def for_dataset(cls, dataset: Any, **kwargs: Any) -> LocalizationMetrics:
        """A metric sized for a dataset reader, excluding its background class.

        Args:
            dataset: Any object with ``num_classes``, ``background_index`` and
                ``ignore_index`` (every reader of :mod:`captum_iclip.datasets`).
            **kwargs: ``theta`` and ``pointing_tolerance``.

        Returns:
            ``LocalizationMetrics(dataset.num_classes, exclude=(background,) or (),
            ignore_index=dataset.ignore_index, **kwargs)``.
        """
        background = dataset.background_index
        return cls(
            dataset.num_classes,
            ignore_index=dataset.ignore_index,
            exclude=() if background is None else (background,),
            **kwargs,
        )

    def _config(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "theta": self.theta,
            "pointing_tolerance": self.pointing_tolerance,
            "ignore_index": self.ignore_index,
            "exclude": self.exclude,
        }

    def _empty_state(self) -> dict[str, Tensor]:
        return {name: torch.zeros(self.num_classes, dtype=torch.long) for name in self._state_names}

    def update(
        self,
        maps: Tensor,
        classes: Sequence[int] | Tensor,
        gt: Tensor | np.ndarray,
    ) -> None:
        """Accumulate one image.

        Args:
            maps: ``(K, H', W')`` float maps (any scale; any size — resized
                bilinearly to the ground truth), one per entry of ``classes``.
            classes: ``K`` distinct class ids, the class each map explains.
            gt: ``(H, W)`` integer ground truth, ``ignore_index`` = ignored.

        Raises:
            TypeError: If ``maps`` is not a float tensor or ``gt`` not integer.
            ValueError: If shapes disagree, a class id is out of range or
                repeated, ``gt`` holds an unknown class id, or a map holds
                NaN/inf.
        """
        if not isinstance(maps, Tensor) or not maps.is_floating_point():
            raise TypeError(
                f"maps: expected a floating-point torch.Tensor of shape (K, H, W), "
                f"got {tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__}"
            )
        if maps.dim() != 3:
            raise ValueError(f"maps: expected shape (K, H, W), got {tuple(maps.shape)}")
        gt = _as_label_tensor(gt, "gt").to(maps.device)
        if gt.dim() != 2:
            raise ValueError(f"gt: expected shape (H, W), got {tuple(gt.shape)}")
        classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
        if classes.numel() != maps.shape[0]:
            raise ValueError(
                f"classes: expected one class per map ({maps.shape[0]} maps), got {classes.numel()} classes"
            )
        if classes.numel() and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise ValueError(f"classes: expected ids in [0, {self.num_classes}), got {classes.tolist()}")
        if classes.unique().numel() != classes.numel():
            raise ValueError(f"classes: expected distinct values, got {classes.tolist()}")
        valid = gt != self.ignore_index
        bad = valid & ((gt < 0) | (gt >= self.num_classes))
        if bad.any():
            raise ValueError(
                f"gt: expected class ids in [0, {self.num_classes}) or ignore_index {self.ignore_index}, "
                f"got {gt[bad].unique()[:8].tolist()}"
            )

        class_masks = gt[None] == classes.to(gt.device)[:, None, None]  # (K, H, W)
        excluded = torch.tensor([int(c) in self.exclude for c in classes.tolist()], dtype=torch.bool)
        keep = class_masks.flatten(1).any(1).cpu() & ~excluded
        if not keep.any():
            self._record(self._empty_state())  # an image without a scored pair still counts in resamples
            return
        classes, class_masks = classes[keep], class_masks[keep.to(gt.device)]
        maps = maps[keep.to(maps.device)]
        if not torch.isfinite(maps).all():
            raise ValueError("maps: expected finite values, got NaN or inf")
        if maps.shape[-2:] != gt.shape:
            maps = F.interpolate(maps[None], size=tuple(gt.shape), mode="bilinear", align_corners=False)[0]
        maps = self._normalise(maps.double(), valid)

        predicted = (maps >= self.theta) & valid
        intersection = (predicted & class_masks).flatten(1).sum(1)
        union = (predicted | class_masks).flatten(1).sum(1)
        contrast, has_contrast = self._score_contrast(maps, class_masks, valid)
        hits = self._pointing_hits(maps, class_masks, valid)

        fixed_contrast = torch.round(contrast * _SC_SCALE).long() * has_contrast
        contribution = {}
        for name, values in (
            ("intersection", intersection),
            ("union", union),
            ("class_pairs", torch.ones_like(intersection)),
            ("pointing_hits", hits.long()),
            ("contrast_sum", fixed_contrast),
            ("contrast_pairs", has_contrast.long()),
        ):
            contribution[name] = torch.zeros_like(getattr(self, name)).index_add_(0, classes, values.cpu())
            getattr(self, name).add_(contribution[name])
        self._record(contribution)

    @staticmethod
    def _normalise(maps: Tensor, valid: Tensor) -> Tensor:
        """Min–max normalise each map over the valid pixels; constant maps → 0."""
        low = maps.masked_fill(~valid, math.inf).amin(dim=(1, 2), keepdim=True)
        high = maps.masked_fill(~valid, -math.inf).amax(dim=(1, 2), keepdim=True)
        span = high - low
        scaled = (maps - low) / torch.where(span > 0, span, torch.ones_like(span))
        return torch.where(span > 0, scaled, torch.zeros_like(scaled))

    @staticmethod
    def _score_contrast(maps: Tensor, class_masks: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Per map: mean inside c minus mean over the other valid pixels, and whether defined."""
        others = valid & ~class_masks
        inside_area = class_masks.flatten(1).sum(1)
        other_area = others.flatten(1).sum(1)
        inside_mean = (maps * class_masks).flatten(1).sum(1) / inside_area
        other_mean = (maps * others).flatten(1).sum(1) / other_area.clamp(min=1)
        has_contrast = other_area > 0
        return torch.where(has_contrast, inside_mean - other_mean, 0.0), has_contrast

    def _pointing_hits(self, maps: Tensor, class_masks: Tensor, valid: Tensor) -> Tensor:
        """Per map: is its valid argmax within the disk tolerance of c's mask?"""
        height, width = valid.shape
        scores = maps.masked_fill(~valid, -math.inf).flatten(1)
        flat_index = scores.argmax(dim=1)
        constant = maps.flatten(1).amax(1) <= 0  # normalised constant maps are all zero
        rows, cols = flat_index // width, flat_index % width
        dy, dx = (offset.to(maps.device) for offset in self._disk_offsets)
        probe_rows = rows[:, None] + dy[None]
        probe_cols = cols[:, None] + dx[None]
        in_image = (probe_rows >= 0) & (probe_rows < height) & (probe_cols >= 0) & (probe_cols < width)
        map_index = torch.arange(maps.shape[0], device=maps.device)[:, None]
        probed = class_masks[map_index, probe_rows.clamp(0, height - 1), probe_cols.clamp(0, width - 1)]
        return (probed & in_image).any(dim=1) & ~constant

    def compute(self) -> dict:
        """The metrics over everything accumulated (and reduced) so far.

        Returns:
            A dict with

            - ``miou``: 100 × mean over classes seen of I_c / U_c,
            - ``msc``: 100 × mean score contrast over (image, class) pairs,
            - ``pointing``: pointing-game accuracy over pairs, percent,
            - ``per_class_iou``, ``per_class_msc``, ``per_class_pointing``:
              ``{class_id: percent}`` for the classes seen,
            - ``pairs``: number of (image, class) pairs.

            With no pair accumulated, the three means are NaN.
        """
        seen = torch.nonzero(self.class_pairs).flatten().tolist()
        iou = self.intersection.double() / self.union.double().clamp(min=1)
        per_class_iou = {c: 100.0 * iou[c].item() for c in seen}
        per_class_msc = {
            c: 100.0 * self.contrast_sum[c].item() / _SC_SCALE / self.contrast_pairs[c].item()
            for c in seen
            if self.contrast_pairs[c] > 0
        }
        per_class_pointing = {c: 100.0 * self.pointing_hits[c].item() / self.class_pairs[c].item() for c in seen}
        pairs = int(self.class_pairs.sum())
        contrast_pairs = int(self.contrast_pairs.sum())
        return {
            "miou": sum(per_class_iou.values()) / len(seen) if seen else math.nan,
            "msc": (100.0 * int(self.contrast_sum.sum()) / _SC_SCALE / contrast_pairs if contrast_pairs else math.nan),
            "pointing": 100.0 * int(self.pointing_hits.sum()) / pairs if pairs else math.nan,
            "per_class_iou": per_class_iou,
            "per_class_msc": per_class_msc,
            "per_class_pointing": per_class_pointing,
            "pairs": pairs,
        }


class SegmentationMetrics(_StreamingMetric):
    """Confusion-matrix segmentation metrics (mIoU, pixel and mean accuracy).

    The confusion matrix ``confusion[g, p]`` counts non-ignored pixels with
    ground truth ``g`` predicted as ``p``. IoU_c = TP / (TP + FP + FN); mIoU
    is the mean over the classes with a non-zero union (present in the
    ground truth or predicted somewhere), the usual convention of
    mmsegmentation and the Cityscapes scripts.

    Args:
        num_classes: Number of class ids.
        ignore_index: Ground-truth value of ignored pixels.

    Examples:
        >>> metric = SegmentationMetrics(num_classes=3)
        >>> metric.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [2, 1]]))
        >>> round(metric.compute()["miou"], 2)
        66.67
    """

    _state_names = ("confusion",)

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index: expected a value outside the class ids [0, {num_classes}), got {ignore_index}"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def _config(self) -> dict:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index}

    def _empty_state(self) -> dict[str, Tensor]:
        return {"confusion": torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)}

    def update(self, pred: Tensor | np.ndarray, gt: Tensor | np.ndarray) -> None:
        """Accumulate predictions against ground truth.

        Args:
            pred: ``(H, W)`` or ``(N, H, W)`` integer class ids in
                ``[0, num_classes)`` (wherever ``gt`` is not ignored).
            gt: Same shape, integer class ids or ``ignore_index``.

        Raises:
            TypeError: If either is not an integer tensor/array.
            ValueError: If shapes differ or ids are out of range.
        """
        pred = _as_label_tensor(pred, "pred")
        gt = _as_label_tensor(gt, "gt").to(pred.device)
        if pred.shape != gt.shape or pred.dim() not in (2, 3):
            raise ValueError(
                f"pred: expected the shape of gt, (H, W) or (N, H, W), got {tuple(pred.shape)} and gt {tuple(gt.shape)}"
            )
        valid = gt != self.ignore_index
        gt, pred = gt[valid], pred[valid]
        if gt.numel() and (gt.min() < 0 or gt.max() >= self.num_classes):
            raise ValueError(
                f"gt: expected ids in [0, {self.num_classes}) or {self.ignore_index}, "
                f"got values {gt.unique()[:8].tolist()}"
            )
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(
                f"pred: expected ids in [0, {self.num_classes}) where gt is not ignored, "
                f"got values {pred.unique()[:8].tolist()}"
            )
        counts = torch.bincount(gt * self.num_classes + pred, minlength=self.num_classes**2)
        self.confusion += counts.reshape(self.num_classes, self.num_classes).cpu()

    def compute(self) -> dict:
        """The metrics over everything accumulated (and reduced) so far.

        Returns:
            A dict with ``miou`` (percent, classes with non-zero union),
            ``pixel_accuracy`` (percent of non-ignored pixels right),
            ``mean_accuracy`` (percent, mean recall over classes present in
            the ground truth), ``per_class_iou`` (``{class_id: percent}``
            for classes with non-zero union) and ``pixels`` (count). With
            no pixel accumulated the percentages are NaN.
        """
        confusion = self.confusion.double()
        true_positive = confusion.diagonal()
        gt_count, pred_count = confusion.sum(1), confusion.sum(0)
        union = gt_count + pred_count - true_positive
        present = torch.nonzero(union).flatten().tolist()
        per_class_iou = {c: 100.0 * (true_positive[c] / union[c]).item() for c in present}
        in_gt = gt_count > 0
        pixels = int(self.confusion.sum())
        return {
            "miou": sum(per_class_iou.values()) / len(present) if present else math.nan,
            "pixel_accuracy": 100.0 * true_positive.sum().item() / pixels if pixels else math.nan,
            "mean_accuracy": (
                100.0 * (true_positive[in_gt] / gt_count[in_gt]).mean().item() if in_gt.any() else math.nan
            ),
            "per_class_iou": per_class_iou,
            "pixels": pixels,
        }


def segment_from_maps(
    maps: Tensor,
    *,
    classes: Sequence[int] | Tensor | None = None,
    background_index: int | None = None,
    background_threshold: float | None = None,
) -> Tensor:
    """Open-vocabulary segmentation: per-pixel argmax over class maps (docs/methods.md §5).

    Two ways to get background, as in the literature: include a background
    prompt's map in ``maps`` (then the plain argmax handles it), or give
    ``background_threshold`` and ``background_index``: pixels whose best
    score is below the threshold are labelled background.

    Args:
        maps: ``(K, H, W)`` or ``(N, K, H, W)`` unnormalised similarities.
        classes: The class id of each of the K maps; ``None`` means map k
            is class k.
        background_index: Label given to below-threshold pixels; needs
            ``background_threshold``.
        background_threshold: Score under which a pixel is background.

    Returns:
        ``(H, W)`` or ``(N, H, W)`` int64 labels.

    Raises:
        ValueError: On bad shapes, a ``classes`` length other than K, or
            only one of ``background_index`` / ``background_threshold``.

    Examples:
        >>> maps = torch.tensor([[[0.1, 0.9]], [[0.2, 0.3]]])  # K=2, 1x2
        >>> segment_from_maps(maps, classes=[5, 7])
        tensor([[7, 5]])
        >>> segment_from_maps(maps, classes=[5, 7], background_index=0, background_threshold=0.25)
        tensor([[0, 5]])
    """
    if not isinstance(maps, Tensor) or maps.dim() not in (3, 4):
        raise ValueError(
            f"maps: expected a tensor of shape (K, H, W) or (N, K, H, W), "
            f"got {tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__}"
        )
    if (background_index is None) != (background_threshold is None):
        raise ValueError(
            "background_threshold: expected it together with background_index (to use a background prompt "
            "instead, include its map in maps), got "
            f"background_index={background_index!r}, background_threshold={background_threshold!r}"
        )
    best_score, best_map = maps.max(dim=-3)
    labels = best_map
    if classes is not None:
        classes = torch.as_tensor(classes, dtype=torch.long, device=maps.device).reshape(-1)
        if classes.numel() != maps.shape[-3]:
            raise ValueError(f"classes: expected one id per map ({maps.shape[-3]}), got {classes.numel()}")
        labels = classes[best_map]
    if background_threshold is not None:
        labels = torch.where(best_score < background_threshold, torch.full_like(labels, background_index), labels)
    return labels


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """Read an int or a pair of ints as (height, width), positive."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    positive_ints = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)
    if len(pair) != 2 or not positive_ints:
        raise ValueError(f"{name}: expected a positive int or a pair of them, got {value!r}")
    return pair


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window origins covering [0, size): stride apart, the last flush with the end."""
    if size <= window:
        return [0]
    count = math.ceil((size - window) / stride) + 1
    return [min(i * stride, size - window) for i in range(count)]


def sliding_window(
    fn: Callable[[Tensor], Tensor],
    image: Tensor,
    window: int | Sequence[int],
    stride: int | Sequence[int],
) -> Tensor:
    """Run a dense predictor over overlapping crops and average the logits.

    Windows of size ``window`` are placed every ``stride`` pixels, the last
    row/column of windows flush with the image's bottom/right edge so every
    pixel is covered; a side shorter than the window is taken whole. Each
    crop's output is resized bilinearly to the crop's size when it differs
    (e.g. a patch-grid map), added into the full-size canvas, and every
    pixel is divided by the number of windows that covered it.

    Args:
        fn: Maps a ``(N, C, h, w)`` crop to ``(N, K, h', w')`` logits.
        image: ``(N, C, H, W)`` images.
        window: Crop size, ``int`` or ``(height, width)``.
        stride: Step between crops, ``int`` or ``(height, width)``; at most
            ``window`` so no pixel is skipped.

    Returns:
        ``(N, K, H, W)`` averaged logits.

    Raises:
        ValueError: On a non-4D image, bad window/stride, or an ``fn``
            output that is not ``(N, K, h', w')``.

    Examples:
        >>> predictor = lambda crop: crop.mean(1, keepdim=True)
        >>> sliding_window(predictor, torch.ones(1, 3, 10, 12), window=8, stride=4).shape
        torch.Size([1, 1, 10, 12])
    """
    if not isinstance(image, Tensor) or image.dim() != 4:
        raise ValueError(
            f"image: expected a tensor of shape (N, C, H, W), "
            f"got {tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}"
        )
    window_h, window_w = _pair(window, "window")
    stride_h, stride_w = _pair(stride, "stride")
    if stride_h > window_h or stride_w > window_w:
        raise ValueError(f"stride: expected at most the window {window!r}, got {stride!r}")
    batch, _, height, width = image.shape
    crop_h, crop_w = min(window_h, height), min(window_w, width)
    total: Tensor | None = None
    coverage: Tensor | None = None
    for top in _window_starts(height, crop_h, stride_h):
        for left in _window_starts(width, crop_w, stride_w):
            logits = fn(image[:, :, top : top + crop_h, left : left + crop_w])
            if not isinstance(logits, Tensor) or logits.dim() != 4 or logits.shape[0] != batch:
                raise ValueError(
                    f"fn: expected to return a (N={batch}, K, h, w) tensor, got "
                    f"{getattr(logits, 'shape', type(logits).__name__)}"
                )
            if logits.shape[-2:] != (crop_h, crop_w):
                logits = F.interpolate(logits, size=(crop_h, crop_w), mode="bilinear", align_corners=False)
            if total is None:
                total = logits.new_zeros(batch, logits.shape[1], height, width)
                coverage = logits.new_zeros(height, width)
            total[:, :, top : top + crop_h, left : left + crop_w] += logits
            coverage[top : top + crop_h, left : left + crop_w] += 1
    return total / coverage


def _average_ranks(values: Tensor) -> Tensor:
    """Ranks 0..n-1 of the 1-d ``values``, tied values sharing their average rank (as Spearman's needs)."""
    order = values.argsort()
    _, inverse, counts = torch.unique_consecutive(values[order], return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    ranks = torch.empty(values.numel(), dtype=torch.float64, device=values.device)
    ranks[order] = (first.double() + (counts.double() - 1) / 2)[inverse]
    return ranks


def map_agreement(reference: Tensor, other: Tensor) -> tuple[float, float]:
    """How closely ``other`` maps agree with ``reference`` maps (e.g. half precision vs float32).

    Each (image, prompt) map of the (N, K, H, W) tensors is min-max normalised to [0, 1]
    (a constant map to 0), in float64.

    Returns:
        ``(max_abs_diff, rank_correlation)``: the largest absolute difference of the normalised
        maps, and the smallest Spearman rank correlation of a map pair (ties take their average
        rank; 1.0 for a pair of constant maps).

    Examples::

        >>> maps = torch.rand(2, 3, 8, 8)
        >>> max_abs_diff, rank_correlation = map_agreement(maps, 2 * maps + 1)
        >>> max_abs_diff < 1e-6, round(rank_correlation, 6)
        (True, 1.0)
    """
    if reference.shape != other.shape or reference.dim() < 2:
        raise ValueError(
            f"other: expected maps of the reference's shape {tuple(reference.shape)}, got {tuple(other.shape)}"
        )

    def normalised(maps: Tensor) -> Tensor:
        flat = maps.detach().to(device="cpu", dtype=torch.float64).flatten(2)
        low = flat.min(dim=-1, keepdim=True).values
        span = flat.max(dim=-1, keepdim=True).values - low
        return ((flat - low) / span.clamp_min(torch.finfo(torch.float64).tiny)).flatten(0, 1)

    a, b = normalised(reference), normalised(other)
    max_abs_diff = float((a - b).abs().max())
    correlations = []
    for x, y in zip(a, b):
        rx, ry = _average_ranks(x), _average_ranks(y)
        rx, ry = rx - rx.mean(), ry - ry.mean()
        scale = float(rx.norm() * ry.norm())
        correlations.append(1.0 if scale == 0 else float(rx @ ry) / scale)
    return max_abs_diff, min(correlations)
