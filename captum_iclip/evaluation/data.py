"""What every evaluation task shares: model inputs from dataset images, shards, distribution, timing.

Geometry and sharding are described in :mod:`captum_iclip.evaluation.run`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from captum_iclip.datasets import SegmentationDataset
from captum_iclip.distributed import (
    gather_objects,
    in_process_group,
    join_process_group,
    launched_world_size,
    local_rank,
)
from captum_iclip.evaluation.metrics import LocalizationMetrics
from captum_iclip.preprocess import to_model_input


def _short_side_size(image: Image.Image, short_side: int, multiple: int) -> tuple[int, int]:
    """(height, width) with the short side at ``short_side``, both rounded to ``multiple``."""
    scale = short_side / min(image.width, image.height)
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (image.height, image.width))


class _ShardImages(Dataset):
    """The images of one shard as (index, model input, label, original image)."""

    def __init__(
        self,
        dataset: SegmentationDataset,
        indices: Sequence[int],
        resolution: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.dataset, self.indices, self.resolution = dataset, list(indices), resolution
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, Tensor, np.ndarray, Image.Image]:
        index = self.indices[position]
        image, label, _ = self.dataset[index]
        square = (self.resolution, self.resolution)
        return index, to_model_input(image, square, self.mean, self.std), label, image


def shard_indices(size: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """The dataset indices of one rank: batches ``rank, rank + K, ...`` of ``batch_size`` images.

    Striding whole batches (rather than single images) gives every batch the
    same images as in a single-process run, so batched kernels see the same
    inputs and the maps, hence the summed statistics, are bit-identical for
    any number of processes. With ``batch_size=1`` rank ``r`` takes images
    ``r, r + K, ...``.

    Args:
        size: Number of images in the dataset.
        batch_size: Images per batch.
        rank: This process's rank, in ``[0, world_size)``.
        world_size: Number of processes ``K``.

    Returns:
        Ascending indices; the shards of all ranks partition ``range(size)``.

    Examples:
        >>> shard_indices(10, 2, 1, 2)
        [2, 3, 6, 7]
    """
    starts = range(rank * batch_size, size, world_size * batch_size)
    return [index for start in starts for index in range(start, min(start + batch_size, size))]


def _collate(batch: list[tuple]) -> tuple:
    return tuple(zip(*batch))


def _scored_classes(label: np.ndarray, metric: LocalizationMetrics) -> list[int]:
    """Class ids present in ``label`` that the localization metric scores, ascending."""
    present = np.unique(label)
    return [int(c) for c in present if c != metric.ignore_index and int(c) not in metric.exclude]


def _largest_class(label: np.ndarray, classes: Sequence[int]) -> int:
    """The class of ``classes`` with the most pixels in ``label`` (the lowest id on ties)."""
    counts = [int((label == c).sum()) for c in classes]
    return classes[int(np.argmax(counts))]


def _init_distributed(device: str) -> str:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1; returns this rank's device."""
    if launched_world_size() <= 1 or dist.is_initialized():
        return device
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank())
        join_process_group(cuda=True)
        return f"cuda:{local_rank()}"
    join_process_group(cuda=False)
    return device


def _sum_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Add per-rank floats (timings) over the process group."""
    if not in_process_group() or not values:
        return dict(values)
    if dist.get_backend() != "nccl":
        device = torch.device("cpu")
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, tensor.tolist()))


def _gather_records(records: list[dict]) -> list[dict]:
    """Every rank's records, merged and sorted by dataset index."""
    records = [record for part in gather_objects(records) for record in part]
    return sorted(records, key=lambda record: record["index"])


class _Clock:
    """Wall seconds that wait for queued GPU work, so timings cover the computation."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()
