"""Image-text training data in open_clip's formats, with a resumable order.

Two sources, read exactly as open_clip's training script reads them:

* **CSV/TSV** (:class:`CsvImageTextDataset`): one row per image, an image-path
  column and a caption column (``--csv-img-key filepath --csv-caption-key
  title``, tab-separated by default). Relative paths are resolved against the
  CSV's folder (absolute paths are used as they are).
* **webdataset shards** (:class:`WebDatasetBatches`): ``.tar`` files holding
  ``KEY.jpg``/``KEY.png`` (also ``.jpeg``/``.webp``) and ``KEY.txt``.

An image that is missing or cannot be decoded is *skipped and counted*, never
fatal: a sample becomes ``None``, :func:`collate_image_text` drops it and
records how many were dropped in :attr:`ImageTextBatch.num_skipped`. Batches
therefore carry their own skip counts back from the data-loader workers.

The data order is a pure function of ``(seed, epoch, rank)`` so that a
resumed run sees exactly the batches an uninterrupted run would have seen:
:class:`ResumableDistributedSampler` skips the batches already consumed in
the current epoch; :class:`WebDatasetBatches` iterates the shards in a
``(seed, epoch)``-shuffled order and skips the raw samples already consumed.
Images are transformed deterministically (the model's evaluation
preprocessing by default) so that masks can be cached by image content.
"""

from __future__ import annotations

import csv
import itertools
import logging
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, IterableDataset, get_worker_info

from captum_iclip._io import read_image

logger = logging.getLogger(__name__)

Sample = tuple[Tensor, str] | None
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _wds():
    """webdataset, imported when shards are read (the ``train`` extra)."""
    from captum_iclip._optional import require

    return require("webdataset", "webdataset shards (--train-data *.tar)")


class ImageTextBatch(NamedTuple):
    """A collated batch: ``images`` (N, 3, H, W), ``captions`` (N strings), and the
    number of samples of the raw batch that were dropped because their image was
    missing or unreadable."""

    images: Tensor | None
    captions: list[str]
    num_skipped: int


def load_image(source: str | os.PathLike | bytes, transform: Callable) -> Tensor | None:
    """Open an image file (or encoded bytes) as RGB with :func:`captum_iclip._io.read_image` and transform it.

    Args:
        source: a path or the encoded bytes of a JPEG/PNG/... image.
        transform: PIL image -> (3, H, W) tensor (e.g. open_clip's preprocess).

    Returns:
        The tensor, or ``None`` when the file is missing or cannot be decoded.
    """
    try:
        return transform(read_image(source, "train_data"))
    except (OSError, ValueError) as error:
        # OSError covers FileNotFoundError and PIL's UnidentifiedImageError / truncated files.
        logger.warning(
            "skipping unreadable image %s: %s", source if not isinstance(source, bytes) else "<bytes>", error
        )
        return None


def collate_image_text(samples: Sequence[Sample]) -> ImageTextBatch:
    """Stack ``(image, caption)`` pairs, dropping ``None`` samples and counting them.

    Args:
        samples: items of a dataset, ``None`` for a skipped one.

    Returns:
        :class:`ImageTextBatch`; ``images`` is ``None`` when every sample was skipped.

    Examples::

        >>> batch = collate_image_text([(torch.zeros(3, 8, 8), "a"), None])
        >>> batch.images.shape, batch.captions, batch.num_skipped
        (torch.Size([1, 3, 8, 8]), ['a'], 1)
    """
    kept = [s for s in samples if s is not None]
    images = torch.stack([image for image, _ in kept]) if kept else None
    return ImageTextBatch(images, [str(caption) for _, caption in kept], len(samples) - len(kept))


class CsvImageTextDataset(Dataset):
    """Image-caption pairs listed in a CSV/TSV file (open_clip's ``--dataset-type csv``).

    Args:
        path: the CSV file.
        transform: PIL image -> tensor.
        img_key: column of the image paths (relative to the CSV's folder, or absolute).
        caption_key: column of the captions.
        separator: the field separator (open_clip's default is a tab).

    Examples::

        >>> data = CsvImageTextDataset("world/train.csv", preprocess)   # doctest: +SKIP
        >>> image, caption = data[0]                                    # None if unreadable
    """

    def __init__(
        self,
        path: str | os.PathLike,
        transform: Callable,
        img_key: str = "filepath",
        caption_key: str = "title",
        separator: str = "\t",
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"train_data: expected a CSV file, got {self.path} (no file there)")
        with open(self.path, newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream, delimiter=separator)
            columns = reader.fieldnames or []
            for argument, key in (("csv_img_key", img_key), ("csv_caption_key", caption_key)):
                if key not in columns:
                    raise ValueError(
                        f"{argument}: expected a column of {self.path} (columns: {columns}; check --csv-separator, "
                        f"got {separator!r}), got {key!r}"
                    )
            rows = [(row[img_key], row[caption_key]) for row in reader]
        if not rows:
            raise ValueError(f"train_data: expected at least one row, got none in {self.path}")
        self.image_paths = [self.path.parent / image for image, _ in rows]  # absolute paths stay absolute
        self.captions = [caption for _, caption in rows]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> Sample:
        image = load_image(self.image_paths[index], self.transform)
        return None if image is None else (image, self.captions[index])


class ResumableDistributedSampler(DistributedSampler):
    """:class:`~torch.utils.data.DistributedSampler` that can start mid-epoch.

    The epoch's order is torch's own (a permutation seeded by ``seed + epoch``,
    split across ranks); ``set_epoch(epoch, start=k)`` makes the next iteration
    skip this rank's first ``k`` indices, so a resumed run continues with the
    very next sample.

    Examples::

        >>> sampler = ResumableDistributedSampler(range(10), num_replicas=1, rank=0, seed=0)
        >>> sampler.set_epoch(0, start=8)
        >>> len(list(sampler))
        2
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start: expected 0..{self.num_samples}, got {start}")
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


def expand_shards(urls: str) -> list[str]:
    """Shard list of an open_clip ``--train-data`` string (brace patterns, ``::``-joined lists)."""
    shards = _wds().shardlists.expand_urls(urls)
    if not shards:
        raise ValueError(f"train_data: expected at least one shard, got none in {urls!r}")
    return shards


def count_webdataset_samples(shards: Sequence[str]) -> int:
    """Number of samples (distinct keys) in local tar shards, read from the tar headers only."""
    total = 0
    for shard in shards:
        try:
            with tarfile.open(shard) as archive:
                keys = {_wds().tariterators.base_plus_ext(m.name)[0] for m in archive if m.isfile()}
        except (OSError, tarfile.TarError) as error:
            raise ValueError(
                f"train_data: expected shards readable to count their samples (or pass --train-num-samples), "
                f"got {shard}: {error}"
            ) from error
        total += len(keys - {None})
    return total


def decode_webdataset_sample(sample: dict[str, object], transform: Callable) -> Sample:
    """``{"png"|"jpg"|...: bytes, "txt": bytes}`` -> (image, caption), ``None`` if either is missing or bad."""
    image_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
    if image_key is None or "txt" not in sample:
        logger.warning("skipping webdataset sample %s without an image or a caption", sample.get("__key__"))
        return None
    image = load_image(sample[image_key], transform)
    if image is None:
        return None
    return image, sample["txt"].decode("utf-8").strip()


class WebDatasetBatches(IterableDataset):
    """An endless, resumable stream of collated batches from webdataset shards.

    For epoch ``e`` (counted per loader worker) the shard list is shuffled with
    ``random.Random(seed + e)``, split across ranks with ``wds.split_by_node``
    and across loader workers (one shard in ``W``), and read with
    ``wds.tarfile_samples``. Every worker thus produces an endless deterministic
    sequence of batches; the data loader takes one batch from each worker in
    turn, starting with worker 0, so batch ``k`` of a rank comes from logical
    worker ``k % W`` and is fully determined by ``k``. To resume after
    ``start_batch`` batches, loader worker ``i`` plays logical worker
    ``(i + start_batch) % W`` (so the loader's first batch is batch
    ``start_batch``) and skips the raw samples (not yet decoded) of the batches
    that logical worker had produced. This rotation is why the worker split is
    done here rather than by ``wds.split_by_worker``, which only knows the
    loader's worker id.

    Tar-level read errors are handled like ``wds.warn_and_continue`` (logged,
    reading goes on) and counted into the next batch's ``num_skipped``.

    Args:
        urls: an open_clip shard spec, e.g. ``"data/shard-{000000..000007}.tar"``.
        transform: PIL image -> tensor.
        batch_size: raw samples per batch (skipped ones included).
        seed: seed of the per-epoch shard order.
        start_batch: batches of this rank already consumed.
        num_workers: data-loader workers that will read this dataset (0: the main process).
        world_size: number of ranks.
    """

    def __init__(
        self,
        urls: str,
        transform: Callable,
        batch_size: int,
        *,
        seed: int = 0,
        start_batch: int = 0,
        num_workers: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.shards = expand_shards(urls)
        readers = world_size * max(1, num_workers)
        if len(self.shards) < readers:
            raise ValueError(
                f"train_data: expected at least {readers} shards to feed {world_size} ranks x "
                f"{max(1, num_workers)} workers (or fewer --workers), got {len(self.shards)}"
            )
        self.transform = transform
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch
        self._tar_errors = 0

    def _count_tar_error(self, error: Exception) -> bool:
        logger.warning("webdataset read error (skipped): %r", error)
        self._tar_errors += 1
        return True

    def _raw_samples(self, worker: int, num_workers: int) -> Iterator[dict[str, object]]:
        for epoch in itertools.count():
            order = list(self.shards)
            random.Random(self.seed + epoch).shuffle(order)
            of_rank = list(_wds().split_by_node([{"url": url} for url in order]))
            shards = of_rank[worker::num_workers]
            produced = 0
            for sample in _wds().tarfile_samples(shards, handler=self._count_tar_error):
                produced += 1
                yield sample
            if not produced:  # an endless stream of nothing would hang the run
                raise RuntimeError(
                    f"train_data: expected shards that yield samples, got none from {[s['url'] for s in shards]}"
                )

    def __iter__(self) -> Iterator[ImageTextBatch]:
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (loader_worker + self.start_batch) % num_workers
        # Logical worker w made batches w, w + W, ...: those below start_batch are consumed.
        consumed = max(0, -(-(self.start_batch - worker) // num_workers))
        raw = itertools.islice(self._raw_samples(worker, num_workers), consumed * self.batch_size, None)
        while True:
            group = list(itertools.islice(raw, self.batch_size))
            batch = collate_image_text([decode_webdataset_sample(s, self.transform) for s in group])
            errors, self._tar_errors = self._tar_errors, 0
            yield batch._replace(num_skipped=batch.num_skipped + errors)
