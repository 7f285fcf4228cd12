"""ICLIP training (Li et al., arXiv 2209.07046; docs/methods.md §4).

Masked max pooling on the interpretability projection.

The objective is

.. math::

    L = L_{itc}(\\mathrm{normalize}(\\mathrm{MMP}(P_{int}, m)), t) + \\lambda \\, L_{itc}(g_{rec}, t)

with :math:`L_{itc}` open_clip's own symmetric InfoNCE (:class:`open_clip.loss.ClipLoss`,
features gathered with gradient across ranks, so the loss is over the global
batch) at the model's logit scale; :math:`P_{int}` the patch tokens of
``DualProjectionCLIP.encode_dense`` (interpretability projection), :math:`m` a
foreground mask on the CLIP patch grid (DINO attention, §3; all patches when no
mask source is given), :math:`g_{rec}` the recognition embedding (the global
token of the same forward pass) and :math:`t` the text embeddings.

Modes:

* ``projection``: trains the interpretability head alone. Everything else is
  frozen and the CLIP model stays in eval mode (ResNet BatchNorm statistics do
  not move), so ``encode_image`` is bit-identical before and after. The
  recognition term has no trainable input and is not computed.
* ``last-k``: also the last ``k`` vision blocks (ViT: residual blocks and the
  final norm; ResNet: the last ``k`` stages, ``k = 1`` is ``layer4``).
* ``full``: every weight, including the text tower and the logit scale. With
  ``from_scratch`` it trains a randomly initialised open_clip architecture;
  ``objective="clip"`` trains the plain CLIP loss alone (no MMP term), after
  which the interpretability head is re-initialised as a copy of the trained
  recognition projection.

Runs under ``torchrun`` (DDP; nccl on GPU, gloo on CPU), writes atomic
checkpoints and resumes exactly: a run killed after a checkpoint and resumed
with ``--resume`` ends with the same parameters, bit for bit, as an
uninterrupted run (same batches, optimizer, schedule and RNG states).

Examples::

    # 2 processes, a tab-separated CSV, DINO masks, projection mode
    torchrun --nproc-per-node 2 -m captum_iclip.train --model ViT-B-16 --pretrained openai \\
        --train-data world/train.csv --csv-img-key filepath --csv-caption-key title \\
        --dino vit_small_patch16_224.dino --mode projection --batch-size 64 --epochs 2 --output-dir runs/iclip

    >>> from captum_iclip.training.iclip import TrainConfig, train
    >>> stats = train(TrainConfig(train_data="world/train.csv", output_dir="runs/x"),  # doctest: +SKIP
    ...               model=clip, tokenizer=tokenizer)
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip_train.scheduler import cosine_lr
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from captum_iclip._io import atomic_torch_save, atomic_write_text, json_text, load_torch_file
from captum_iclip.distributed import gather_objects, join_process_group, launched_world_size, local_rank, rank_and_world
from captum_iclip.masks import CachedMaskProvider, MaskProvider, as_mask_provider
from captum_iclip.models.dual import DualProjectionCLIP
from captum_iclip.pooling import MaskedMaxPooling
from captum_iclip.training.data import (
    CsvImageTextDataset,
    ImageTextBatch,
    ResumableDistributedSampler,
    WebDatasetBatches,
    collate_image_text,
    count_webdataset_samples,
    expand_shards,
)

logger = logging.getLogger(__name__)

MODES = ("projection", "last-k", "full")


def parse_mode(name: str) -> tuple[str, int]:
    """``(mode, unlock_blocks)`` of a mode name as the commands write it: ``"projection"``,
    ``"full"`` or ``"last-k"`` with ``k`` written out (``"last-2"``)."""
    if name in ("projection", "full"):
        return name, 1
    blocks = name[len("last-") :] if name.startswith("last-") else ""
    if not blocks.isdigit() or int(blocks) < 1:
        raise ValueError(f"mode: expected 'projection', 'full' or 'last-<k>' with k >= 1, got {name!r}")
    return "last-k", int(blocks)


OBJECTIVES = ("iclip", "clip")
PRECISIONS = ("auto", "fp32", "amp_bf16", "amp_fp16")
DATASET_TYPES = ("auto", "csv", "webdataset")
CHECKPOINT_FORMAT = "captum-iclip/train-checkpoint/1"
# Fields that must not change when a run is resumed: they fix the data order and the schedule.
RESUME_INVARIANTS = (
    "train_data",
    "dataset_type",
    "batch_size",
    "epochs",
    "seed",
    "mode",
    "objective",
    "unlock_blocks",
    "lr",
    "warmup",
    "train_num_samples",
)


@dataclass
class TrainConfig:
    """Every option of ``captum-iclip train`` (the CLI flag is the field name with dashes).

    Data:
        train_data: a CSV/TSV file or a webdataset shard spec (``"dir/shard-{000000..000003}.tar"``).
        dataset_type: ``"csv"``, ``"webdataset"`` or ``"auto"`` (webdataset when it ends in ``.tar``).
        csv_img_key, csv_caption_key, csv_separator: CSV columns and separator (open_clip's defaults).
        train_num_samples: samples per epoch for webdataset (default: counted from the tar headers).
        workers: data-loader worker processes per rank.
        progress: show the progress bar and the log lines on the console (``log.jsonl`` is written either way).
    Model:
        model: open_clip architecture name or bundled model name; with ``model_config`` the
            config's name (its file stem) by default.
        pretrained: open_clip pretrained tag; checkpoint: a local open_clip weights file.
        hf_model: a Hugging Face CLIP id or folder (``projection`` and ``full`` modes, ``last-k`` too).
        model_config: an open_clip model-config JSON file, registered with ``open_clip.add_model_config``.
        from_scratch: random initialisation of the architecture (no weights are loaded).
    Objective:
        mode: ``"projection"``, ``"last-k"`` or ``"full"``; unlock_blocks: ``k`` for ``last-k``.
        objective: ``"iclip"`` (MMP term + λ recognition term) or ``"clip"`` (plain CLIP loss).
        rec_weight: λ; ``None`` means 1 when recognition weights train and 0 in ``projection`` mode.
        dino: mask source (timm name, Hugging Face id/folder, tiny-DINO folder or file, or
            ``None``/``"none"``: every patch is foreground); dino_checkpoint: weights for a timm name.
        tau: DINO attention mass kept (§3); mask_cache: folder of cached masks.
    Optimisation:
        batch_size (per rank), epochs, lr, wd, beta1, beta2, eps, warmup (steps),
        grad_clip_norm (``None``: no clipping), precision (``auto``: bf16 autocast on GPUs that
        support it, else fp16 with a GradScaler; always fp32 on CPU), seed, device (``auto``).
    Output:
        output_dir, log_every (steps), save_every (steps; 0: only at the end),
        resume (``"latest"``: ``output_dir/checkpoints/latest.pt`` if present; or a path).
    """

    train_data: str | None = None
    dataset_type: str = "auto"
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = "\t"
    train_num_samples: int | None = None
    workers: int = 2
    progress: bool = True
    model: str | None = None
    pretrained: str | None = None
    checkpoint: str | None = None
    hf_model: str | None = None
    model_config: str | None = None
    from_scratch: bool = False
    mode: str = "projection"
    unlock_blocks: int = 1
    objective: str = "iclip"
    rec_weight: float | None = None
    dino: str | None = None
    dino_checkpoint: str | None = None
    tau: float = 0.6
    mask_cache: str | None = None
    batch_size: int = 64
    epochs: int = 1
    lr: float = 5e-4
    wd: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int = 0
    grad_clip_norm: float | None = None
    precision: str = "auto"
    seed: int = 0
    device: str = "auto"
    output_dir: str = "runs/iclip"
    log_every: int = 10
    save_every: int = 100
    resume: str | None = None

    def __post_init__(self) -> None:
        for name, allowed in (
            ("mode", MODES),
            ("objective", OBJECTIVES),
            ("precision", PRECISIONS),
            ("dataset_type", DATASET_TYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        for name in ("batch_size", "epochs", "unlock_blocks", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        for name in ("workers", "warmup", "save_every", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {getattr(self, name)!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau: expected a float in (0, 1], got {self.tau!r}")
        if self.lr <= 0:
            raise ValueError(f"lr: expected a positive float, got {self.lr!r}")
        if self.rec_weight is not None and self.rec_weight < 0:
            raise ValueError(f"rec_weight: expected λ >= 0, got {self.rec_weight!r}")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm: expected a positive float, got {self.grad_clip_norm!r}")
        if self.train_num_samples is not None and self.train_num_samples < 1:
            raise ValueError(f"train_num_samples: expected a positive integer, got {self.train_num_samples!r}")
        if self.mode == "projection" and self.objective == "clip":
            raise ValueError(
                "objective: expected 'iclip' with mode='projection' ('clip' trains no interpretability head, so "
                "nothing would train; or use mode='full' or 'last-k'), got 'clip'"
            )
        if self.from_scratch and (self.pretrained or self.checkpoint or self.hf_model):
            raise ValueError(
                "from_scratch: expected False with pretrained, checkpoint or hf_model (they give weights), got True"
            )
        if self.dino is not None and self.dino.lower() == "none":
            self.dino = None

    @property
    def lambda_rec(self) -> float:
        """λ actually used: the recognition term is dropped when nothing it depends on trains."""
        if self.mode == "projection":
            return 0.0
        return 1.0 if self.rec_weight is None else float(self.rec_weight)


# ----------------------------------------------------------------------------------
# Distributed set-up
# ----------------------------------------------------------------------------------
@dataclass
class _Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this call created the process group and must destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: str) -> _Distributed:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group (nccl on GPU, gloo on CPU)."""
    world_size = launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    gpu = local_rank()
    if device == "auto":
        device = f"cuda:{gpu}" if torch.cuda.is_available() else "cpu"
    from captum_iclip.devices import check_device

    target = check_device(device)
    if target.type == "cuda":
        if target.index is None:  # plain "cuda": this process's GPU under torchrun, else the first
            target = torch.device("cuda", gpu)
        torch.cuda.set_device(target)
    owns_group = join_process_group(cuda=target.type == "cuda")
    if dist.is_initialized():
        rank, world_size = rank_and_world()
    return _Distributed(rank, world_size, gpu, target, owns_group)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Every RNG state as tensors, ints, floats, strings and tuples: what ``torch.load(weights_only=True)``
    reads back (a NumPy array in a checkpoint would need the unsafe unpickler)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------
# Model, masks and what trains
# ----------------------------------------------------------------------------------
def build_model(config: TrainConfig, device: torch.device) -> tuple[DualProjectionCLIP, Callable, Callable]:
    """The dual model, its (evaluation) preprocessing and tokenizer, from the config's model options.

    Loaded by :func:`captum_iclip.load`. A bundled model is already dual (its trained
    head included): that head trains, the model is not wrapped again.
    """
    from captum_iclip.loading.loader import load

    if config.from_scratch and config.model_config is None and config.model not in open_clip.list_models():
        raise ValueError(
            f"model: expected an open_clip architecture name or --model-config with from_scratch, got {config.model!r}"
        )
    loaded = load(
        config.model,
        config.pretrained,
        hf_model=config.hf_model,
        checkpoint=config.checkpoint,
        model_config=config.model_config,
        device=str(device),
        from_scratch=config.from_scratch,
    )
    model = loaded.model
    dual = model if isinstance(model, DualProjectionCLIP) else DualProjectionCLIP(model)
    return dual, loaded.preprocess, loaded.tokenizer


def build_mask_provider(config: TrainConfig, dual: DualProjectionCLIP) -> MaskProvider | None:
    """DINO masks from ``config.dino`` (:func:`captum_iclip.mask_source`; ``None``: every patch).

    Cached on disk when ``config.mask_cache`` is set.
    """
    from captum_iclip.loading.loader import mask_source

    if config.dino is None:
        if config.mask_cache:
            logger.warning("mask_cache is ignored without --dino: the mask is every patch")
        return None
    adapter = dual.adapter
    return mask_source(
        config.dino,
        checkpoint=config.dino_checkpoint,
        tau=config.tau,
        input_mean=adapter.image_mean,
        input_std=adapter.image_std,
        cache=config.mask_cache,
    )


def _vision_stages(dual: DualProjectionCLIP) -> tuple[list[nn.Module], list[nn.Module]]:
    """(blocks in order, modules after the blocks that the patch tokens pass) of the vision tower."""
    clip = dual.clip
    visual = getattr(clip, "visual", None)
    if visual is not None and hasattr(visual, "transformer"):
        return list(visual.transformer.resblocks), [visual.ln_post]
    if visual is not None and hasattr(visual, "layer4"):
        return [visual.layer1, visual.layer2, visual.layer3, visual.layer4], []
    vision_model = getattr(clip, "vision_model", None)
    if vision_model is not None:
        return list(vision_model.encoder.layers), [vision_model.post_layernorm]
    raise TypeError(
        f"model: expected an open_clip or Hugging Face CLIP whose blocks mode='last-k' knows, got {type(clip).__name__}"
    )


def configure_trainable(dual: DualProjectionCLIP, config: TrainConfig) -> list[nn.Module]:
    """Freeze what the mode keeps fixed; return the modules to put in train mode.

    Args:
        dual: the model; its ``requires_grad`` flags are set in place.
        config: ``mode``, ``unlock_blocks`` and ``objective`` decide.

    Returns:
        Modules that train (everything else is kept in eval mode so that
        BatchNorm statistics and dropout of frozen parts do not change).
    """
    dual.requires_grad_(False)
    if config.mode == "full":
        trainable: list[nn.Module] = [dual.clip]
    else:
        trainable = []
        if config.mode == "last-k":
            blocks, tail = _vision_stages(dual)
            if config.unlock_blocks > len(blocks):
                raise ValueError(
                    f"unlock_blocks: expected at most the vision tower's {len(blocks)} blocks, "
                    f"got {config.unlock_blocks}"
                )
            trainable += blocks[-config.unlock_blocks :] + tail
    if config.objective == "iclip":
        trainable.append(dual.interpretability_head)
    for module in trainable:
        module.requires_grad_(True)
    return trainable


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as open_clip makes them: no decay on gains, biases, norms and the logit scale."""

    def no_decay(name: str, param: Tensor) -> bool:
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("mode: expected a mode that trains at least one parameter, got none trainable")
    return [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
    ]


class ICLIPForward(nn.Module):
    """The features of one training step, as one module so that DDP can wrap it.

    Args:
        dual: the dual-projection model.
        objective: ``"iclip"`` or ``"clip"``.
        with_recognition: also return the recognition embedding (λ > 0).

    Returns (from ``forward(images, text, mask)``): a dict of L2-normalised
    ``"image_int"`` (MMP of the interpretability patches; ``"iclip"`` only),
    ``"image_rec"`` (``"clip"``, or λ > 0), ``"text"``, and ``"logit_scale"`` (exp'd).
    """

    def __init__(self, dual: DualProjectionCLIP, objective: str, with_recognition: bool) -> None:
        super().__init__()
        self.dual = dual
        self.pool = MaskedMaxPooling()
        self.objective = objective
        self.with_recognition = with_recognition

    def forward(self, images: Tensor, text: Any, mask: Tensor | None) -> dict[str, Tensor]:
        out = {"text": self.dual.encode_text(text, normalize=True), "logit_scale": self.dual.logit_scale.exp()}
        if self.objective == "clip":
            out["image_rec"] = self.dual.encode_image(images, normalize=True)
            return out
        dense = self.dual.encode_dense(images, projection="interpretability")
        patches = dense[:, 1:]
        if mask is None:
            mask = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
        out["image_int"] = F.normalize(self.pool(patches, mask), dim=-1)
        if self.with_recognition:
            out["image_rec"] = F.normalize(dense[:, 0], dim=-1)  # the global token is g_rec (== encode_image)
        return out


# ----------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------
def _default_preprocess(dual: DualProjectionCLIP) -> Callable:
    adapter = dual.adapter
    return open_clip.transform.image_transform(
        adapter.image_size, is_train=False, mean=adapter.image_mean, std=adapter.image_std
    )


class _BatchStream:
    """Batches in a resumable order: ``iterate(step)`` yields ``(epoch, batch)`` from global step ``step``."""

    def __init__(self, config: TrainConfig, dataset: Dataset | None, preprocess: Callable, ctx: _Distributed) -> None:
        self.config, self.ctx = config, ctx
        # Loaders draw their worker seeds from their own generator, never from the global RNG.
        self.loader_options = dict(
            num_workers=config.workers,
            pin_memory=ctx.device.type == "cuda",
            generator=torch.Generator().manual_seed(config.seed + ctx.rank),
        )
        if dataset is not None:
            if isinstance(dataset, IterableDataset):
                raise TypeError(
                    "dataset: expected a map-style Dataset of (image tensor, caption), got an IterableDataset"
                )
            self.webdataset = False
            self.dataset = dataset
        else:
            if config.train_data is None:
                raise ValueError("train_data: expected a CSV file or webdataset shards (or pass dataset=), got None")
            kind = config.dataset_type
            if kind == "auto":
                kind = "webdataset" if ".tar" in config.train_data else "csv"
            self.webdataset = kind == "webdataset"
            if self.webdataset:
                self.shards = config.train_data
                num_samples = config.train_num_samples or count_webdataset_samples(expand_shards(config.train_data))
                self.steps_per_epoch = num_samples // (config.batch_size * ctx.world_size)
                self.preprocess = preprocess
            else:
                self.dataset = CsvImageTextDataset(
                    config.train_data, preprocess, config.csv_img_key, config.csv_caption_key, config.csv_separator
                )
        if not self.webdataset:
            self.sampler = ResumableDistributedSampler(
                self.dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed, drop_last=True
            )
            self.steps_per_epoch = self.sampler.num_samples // config.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"batch_size: expected at most an epoch of data across {ctx.world_size} ranks, got {config.batch_size}"
            )

    def iterate(self, step: int) -> Iterator[tuple[int, ImageTextBatch]]:
        config = self.config
        if self.webdataset:
            stream = WebDatasetBatches(
                self.shards,
                self.preprocess,
                config.batch_size,
                seed=config.seed,
                start_batch=step,
                num_workers=config.workers,
                world_size=self.ctx.world_size,
            )
            loader = DataLoader(stream, batch_size=None, **self.loader_options)
            for index, batch in enumerate(loader, start=step):
                yield index // self.steps_per_epoch, batch
            return
        epoch, within = divmod(step, self.steps_per_epoch)
        while True:
            self.sampler.set_epoch(epoch, start=within * config.batch_size)
            loader = DataLoader(
                self.dataset,
                batch_size=config.batch_size,
                sampler=self.sampler,
                drop_last=True,
                collate_fn=collate_image_text,
                **self.loader_options,
            )
            for batch in loader:
                yield epoch, batch
            epoch, within = epoch + 1, 0


def _equalise_batch(batch: ImageTextBatch, ctx: _Distributed) -> tuple[Tensor | None, list[str], int]:
    """Cut every rank's batch to the smallest one: the feature gather needs equal sizes.

    Returns the images, the captions and how many good samples were cut here.
    """
    size = len(batch.captions)
    if ctx.world_size == 1:
        return batch.images, batch.captions, 0
    smallest = torch.tensor([size], device=ctx.device)
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    keep = int(smallest)
    if keep == 0:
        return None, [], size
    return batch.images[:keep], batch.captions[:keep], size - keep


# ----------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------
def _resume_path(config: TrainConfig) -> Path | None:
    if config.resume is None:
        return None
    if config.resume == "latest":
        latest = Path(config.output_dir) / "checkpoints" / "latest.pt"
        return latest if latest.is_file() else None
    path = Path(config.resume)
    if not path.is_file():
        raise ValueError(f"resume: expected a checkpoint file, got {path} (no file there)")
    return path


def _trainable_state(dual: DualProjectionCLIP, mode: str) -> dict[str, Tensor]:
    module = dual.interpretability_head if mode == "projection" else dual
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _load_trainable_state(dual: DualProjectionCLIP, mode: str, state: dict[str, Tensor]) -> None:
    (dual.interpretability_head if mode == "projection" else dual).load_state_dict(state)


# ----------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------
_COUNTERS = ("samples", "skipped_images", "equalisation_cut", "empty_mask_fallbacks")


class NonFiniteTrainingError(RuntimeError):
    """The loss or the weights of a run became NaN or infinite: the run stops, its last good checkpoint kept."""


def _non_finite(state: dict[str, Tensor]) -> list[str]:
    """The names of the floating-point tensors of ``state`` that hold a NaN or an infinity."""
    return [name for name, value in state.items() if value.is_floating_point() and not bool(value.isfinite().all())]


def _mask_fallbacks(provider: MaskProvider | None, pool: MaskedMaxPooling) -> int:
    """Empty masks replaced by all patches so far (each image counted once, where it was computed)."""
    count = int(pool.num_empty_masks)
    if provider is not None:
        count += sum(m.num_empty_fallbacks for m in provider.modules() if isinstance(m, MaskProvider))
    return count


def _precision(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (``None``: fp32)."""
    if device.type != "cuda":
        if config.precision not in ("auto", "fp32"):
            raise ValueError(
                f"precision: expected 'auto' or 'fp32' on a CPU (it trains in fp32), got {config.precision!r}"
            )
        return None
    if config.precision == "fp32":
        return None
    if config.precision == "amp_fp16" or (config.precision == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def train(
    config: TrainConfig,
    model: nn.Module | None = None,
    mask_provider: MaskProvider | Callable | Tensor | None = None,
    *,
    dataset: Dataset | None = None,
    tokenizer: Callable | None = None,
    preprocess: Callable | None = None,
) -> dict[str, Any]:
    """Train an ICLIP model (docs/methods.md §4) and write its checkpoints, final weights and stats.

    Args:
        config: the options (see :class:`TrainConfig`).
        model: an open_clip / Hugging Face CLIP or a :class:`DualProjectionCLIP`
            to train in place; ``None`` builds one from ``config``'s model options.
        mask_provider: a mask source for MMP (anything :func:`~captum_iclip.masks.as_mask_provider`
            takes); ``None`` uses ``config.dino`` (or every patch when that is unset).
            Wrapped in a :class:`~captum_iclip.masks.CachedMaskProvider` when ``config.mask_cache`` is set.
        dataset: a map-style dataset of ``(image tensor, caption)`` (``None`` items are
            skipped and counted) used instead of ``config.train_data``.
        tokenizer: captions -> token ids; needed with ``model`` (for an open_clip model
            without one, open_clip's tokenizer at the model's context length is used).
        preprocess: PIL image -> tensor for ``config.train_data``; default the model's
            evaluation transform (deterministic, so cached masks stay valid).

    Returns:
        The final statistics, also written to ``output_dir/stats.json``: ``steps``,
        ``samples``, ``wall_time_s``, ``samples_per_s``, ``final_loss``, ``skipped_images``,
        ``empty_mask_fallbacks``, ``equalisation_cut`` (good samples cut so every rank's
        batch has the same size), ``lambda_rec``, ``mode``, ``objective``, ``world_size``.

    The model is trained in place and left in eval mode with its ``requires_grad`` flags as given.

    Raises:
        ValueError: bad options (named), a checkpoint to resume that is not one (or is corrupt),
            or a run in which no image could be read (nothing trained; no final weights written).

    Files in ``output_dir``: ``checkpoints/latest.pt`` (every ``save_every`` steps and at
    the end), ``log.jsonl``, ``final.pt`` (:meth:`DualProjectionCLIP.save`),
    ``interpretability_head.pt`` (:meth:`DualProjectionCLIP.save_interpretability`), ``stats.json``.
    """
    ctx = _setup_distributed(config.device)
    try:
        trainer = ICLIPTrainer(
            config, ctx, model, mask_provider, dataset=dataset, tokenizer=tokenizer, preprocess=preprocess
        )
        trainer.resume()
        return trainer.run()
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


@dataclass
class TrainStep:
    """What one optimisation step needs besides the batch (see :func:`train_step`).

    Attributes:
        forward: :class:`ICLIPForward` (possibly DDP-wrapped).
        loss_fn: open_clip's ``ClipLoss`` (global batch across ranks).
        optimizer: AdamW over the trainable parameters.
        scaler: a GradScaler for fp16 autocast, else ``None``.
        trainable: the parameters whose gradient norm is clipped.
        provider: mask source on the CLIP patch grid (``None``: every patch).
        dual: the model (for the patch grid).
        tokenizer: the model's tokenizer (applied by :meth:`text_inputs`).
        config: ``objective``, ``grad_clip_norm``.
        lambda_rec: weight of the recognition term.
        autocast_dtype: ``None`` for fp32.
        device: where the step runs.
    """

    forward: nn.Module
    loss_fn: ClipLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    trainable: list[Tensor]
    provider: MaskProvider | None
    dual: DualProjectionCLIP
    tokenizer: Callable
    config: TrainConfig
    lambda_rec: float
    autocast_dtype: torch.dtype | None
    device: torch.device

    def text_inputs(self, captions: list[str]) -> Tensor | dict[str, Tensor]:
        """The captions as the text tower's inputs, by the family's tokenization rule: the one
        ``CLIPSimilarity`` explains the trained model with (``VisionAdapter.text_inputs``)."""
        return self.dual.adapter.text_inputs(captions, self.tokenizer)


def train_step(parts: TrainStep, images: Tensor, captions: list[str]) -> float:
    """One optimisation step of the objective (also what ``benchmarks/bench_train_step.py`` times).

    Args:
        parts: the model, loss, optimizer and options of the step.
        images, captions: the batch.

    Returns:
        The loss (over the global batch) before the update.
    """
    device, config = parts.device, parts.config
    images = images.to(device, non_blocking=True)
    text = parts.text_inputs(captions)
    mask = None
    if parts.provider is not None:
        with torch.no_grad():
            mask = parts.provider(images, parts.dual.adapter.grid_size(*images.shape[-2:]))
    dtype = parts.autocast_dtype
    with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
        features = parts.forward(images, text, mask)
        scale = features["logit_scale"]
        if config.objective == "clip":
            loss = parts.loss_fn(features["image_rec"], features["text"], scale)
        else:
            loss = parts.loss_fn(features["image_int"], features["text"], scale)
            if parts.lambda_rec > 0:
                loss = loss + parts.lambda_rec * parts.loss_fn(features["image_rec"], features["text"], scale)
    optimizer, scaler = parts.optimizer, parts.scaler
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if config.grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(parts.trainable, config.grad_clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(loss.detach())


class ICLIPTrainer:
    """One ICLIP run: its state, :meth:`resume`, :meth:`step`, :meth:`save` and :meth:`run`.

    Building it sets up the model, the mask source, what trains, the optimizer, the
    schedule and the batch stream (the arguments are those of :func:`train`).
    The run's state is ``step``, ``last_loss``, ``counters`` and the wall time.
    """

    def __init__(
        self,
        config: TrainConfig,
        ctx: _Distributed,
        model: nn.Module | None = None,
        mask_provider: Any = None,
        *,
        dataset: Dataset | None = None,
        tokenizer: Callable | None = None,
        preprocess: Callable | None = None,
    ) -> None:
        self.config, self.ctx = config, ctx
        self.out_dir = Path(config.output_dir)
        self.checkpoint_path = self.out_dir / "checkpoints" / "latest.pt"
        dual, tokenizer, preprocess = self._model(model, tokenizer, preprocess)
        self.dual = dual
        self.provider = self._masks(mask_provider)
        self.parts = self._step_parts(tokenizer)
        self.stream = _BatchStream(config, dataset, preprocess, ctx)
        self.total_steps = config.epochs * self.stream.steps_per_epoch
        self.scheduler = cosine_lr(self.parts.optimizer, config.lr, config.warmup, self.total_steps)
        # State: what a checkpoint holds and a resumed run continues from.
        self.step_index, self.elapsed_before, self.last_loss = 0, 0.0, float("nan")
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self.fallbacks_before = 0
        self.saved_step: int | None = None  # the step of the last checkpoint this run wrote or resumed from
        self.started = time.monotonic()

    # --- setup --------------------------------------------------------------------
    def _model(self, model, tokenizer, preprocess) -> tuple[DualProjectionCLIP, Callable, Callable]:
        config, ctx = self.config, self.ctx
        # The same seed on every rank while the model is built (identical random init), then one per rank.
        _seed_everything(config.seed)
        if model is None:
            dual, built_preprocess, tokenizer = build_model(config, ctx.device)
            preprocess = preprocess or built_preprocess
        else:
            dual = model if isinstance(model, DualProjectionCLIP) else DualProjectionCLIP(model)
            dual.to(ctx.device)
            if tokenizer is None:
                if not hasattr(dual.clip, "context_length"):
                    raise ValueError(
                        "tokenizer: expected a tokenizer with a model that is not an open_clip CLIP, got None"
                    )
                tokenizer = open_clip.SimpleTokenizer(context_length=dual.clip.context_length)
        _seed_everything(config.seed + ctx.rank)
        return dual, tokenizer, preprocess or _default_preprocess(dual)

    def _masks(self, mask_provider: Any) -> MaskProvider | None:
        config = self.config
        provider = (
            as_mask_provider(mask_provider) if mask_provider is not None else build_mask_provider(config, self.dual)
        )
        if mask_provider is not None and config.mask_cache:
            provider = CachedMaskProvider(provider, config.mask_cache)
        if provider is not None:
            provider.to(self.ctx.device)
        if config.objective == "clip" and provider is not None:
            logger.warning("objective='clip' has no MMP term; the mask source is not used")
            provider = None
        return provider

    def _step_parts(self, tokenizer: Callable) -> TrainStep:
        config, ctx, dual = self.config, self.ctx, self.dual
        # The caller's flags come back at the end: they select kernels (e.g. attention fast paths), and
        # recognition outputs must stay bit-identical to the untrained model's in projection mode.
        self.requires_grad_before = [p.requires_grad for p in dual.parameters()]
        trainable_modules = configure_trainable(dual, config)
        dual.eval()
        for module in trainable_modules:
            module.train()
        lambda_rec = config.lambda_rec
        self.step_module = ICLIPForward(dual, config.objective, with_recognition=lambda_rec > 0).to(ctx.device)
        forward: nn.Module = self.step_module
        if ctx.world_size > 1:
            forward = DistributedDataParallel(
                self.step_module,
                device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                # Without the recognition term the recognition projection of a fully trained model gets no gradient.
                find_unused_parameters=config.mode == "full" and config.objective == "iclip" and lambda_rec == 0,
            )
        autocast_dtype = _precision(config, ctx.device)
        optimizer = torch.optim.AdamW(
            parameter_groups(dual, config.wd), lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps
        )
        return TrainStep(
            forward=forward,
            loss_fn=ClipLoss(local_loss=False, gather_with_grad=True, rank=ctx.rank, world_size=ctx.world_size),
            optimizer=optimizer,
            scaler=torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None,
            trainable=[p for p in dual.parameters() if p.requires_grad],
            provider=self.provider,
            dual=dual,
            tokenizer=tokenizer,
            config=config,
            lambda_rec=lambda_rec,
            autocast_dtype=autocast_dtype,
            device=ctx.device,
        )

    # --- state --------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from ``output_dir/checkpoints/latest.pt`` when ``config.resume`` asks for it."""
        config, ctx = self.config, self.ctx
        resume_from = _resume_path(config)
        if resume_from is not None:
            payload = load_torch_file(resume_from, "resume")  # weights_only: a checkpoint never runs code
            if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"resume: expected a captum-iclip training checkpoint, got {resume_from}")
            if payload["world_size"] != ctx.world_size:
                raise ValueError(
                    f"resume: expected a checkpoint written by this run's {ctx.world_size} ranks (the data order "
                    f"and RNG states are per rank), got one by {payload['world_size']}"
                )
            changed = [k for k in RESUME_INVARIANTS if payload["config"].get(k) != getattr(config, k)]
            if changed:
                raise ValueError(
                    "resume: expected the checkpoint's options (they fix the data order and schedule), "
                    f"got different {changed}"
                )
            _load_trainable_state(self.dual, config.mode, payload["model"])
            self.parts.optimizer.load_state_dict(payload["optimizer"])
            if self.parts.scaler is not None and payload["scaler"] is not None:
                self.parts.scaler.load_state_dict(payload["scaler"])
            self.step_index, self.elapsed_before = payload["step"], payload["elapsed_s"]
            self.last_loss = payload["last_loss"]
            self.counters = dict(payload["counters"][ctx.rank])
            _set_rng_state(payload["rng"][ctx.rank])
            self.saved_step = self.step_index
            if ctx.is_main:
                logger.info("resumed from %s at step %d", resume_from, self.step_index)
        self.fallbacks_before = self.counters["empty_mask_fallbacks"]

    def elapsed(self) -> float:
        """Wall seconds of the run, the time before a resume included."""
        return self.elapsed_before + time.monotonic() - self.started

    def save(self) -> None:
        """Write the checkpoint of the current state (every rank takes part; the main rank writes).

        Raises:
            NonFiniteTrainingError: the weights to checkpoint hold a NaN or an infinity; the checkpoint
                on disk (the last good one) is left as it is.
        """
        ctx, config = self.ctx, self.config
        module = self.dual.interpretability_head if config.mode == "projection" else self.dual
        bad = _non_finite(module.state_dict())
        if bad:
            names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise self._diverged(
                f"model: expected finite weights to checkpoint at step {self.step_index}, got NaN or infinite "
                f"values in {names}"
            )
        epoch, step_in_epoch = divmod(self.step_index, self.stream.steps_per_epoch)  # the next batch's position
        self.counters["empty_mask_fallbacks"] = self.fallbacks_before + _mask_fallbacks(
            self.provider, self.step_module.pool
        )
        rng_states = gather_objects(_rng_state())
        all_counters = gather_objects(dict(self.counters))
        if ctx.is_main:
            scaler = self.parts.scaler
            atomic_torch_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "step": self.step_index,
                    "epoch": epoch,
                    "step_in_epoch": step_in_epoch,
                    "model": _trainable_state(self.dual, config.mode),
                    "optimizer": self.parts.optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": rng_states,
                    "counters": all_counters,
                    "elapsed_s": self.elapsed(),
                    "last_loss": self.last_loss,
                    "world_size": ctx.world_size,
                    "config": dataclasses.asdict(config),
                },
                self.checkpoint_path,
            )
        self.saved_step = self.step_index

    def _diverged(self, what: str) -> NonFiniteTrainingError:
        """The error of a run that diverged, saying which checkpoint is kept and how to go on from it."""
        if self.saved_step is None:
            kept = (
                "No checkpoint was written before it (see --save-every): start again with a lower --lr or with "
                "--grad-clip-norm"
            )
        else:
            kept = (
                f"The last good checkpoint, {self.checkpoint_path} (step {self.saved_step}), is kept: continue from "
                "it with the same options and --resume (with --grad-clip-norm to steady the updates), or start "
                "again with a lower --lr"
            )
        return NonFiniteTrainingError(
            f"{what}; training stopped at step {self.step_index} of {self.total_steps} and nothing of that step "
            f"was saved (lr {self.parts.optimizer.param_groups[0]['lr']:.3g}). {kept}"
        )

    # --- training -----------------------------------------------------------------
    def step(self, batch: ImageTextBatch) -> int:
        """One step on ``batch`` (skipped when no rank has an image); returns the samples trained on here."""
        self.counters["skipped_images"] += batch.num_skipped
        images, captions, cut = _equalise_batch(batch, self.ctx)
        self.counters["equalisation_cut"] += cut
        trained = 0
        if images is not None:
            loss = train_step(self.parts, images, captions)
            if not math.isfinite(loss):
                self.step_index += 1
                raise self._diverged(f"loss: expected a finite training loss, got {loss}")
            self.last_loss = loss
            if self.dual.logit_scale.requires_grad:
                with torch.no_grad():
                    self.dual.logit_scale.clamp_(0, math.log(100))  # as open_clip does
            trained = len(captions)
            self.counters["samples"] += trained
        self.step_index += 1
        return trained

    def run(self) -> dict[str, Any]:
        """Train to the last step, checkpoint, then write the final weights and statistics."""
        config, ctx = self.config, self.ctx
        if ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        log = _TrainLog(self.out_dir / "log.jsonl", ctx, self.total_steps, self.step_index, config.progress)
        self.started = time.monotonic()
        try:
            batches = itertools.islice(self.stream.iterate(self.step_index), self.total_steps - self.step_index)
            for epoch, batch in batches:
                lr = self.scheduler(self.step_index)
                samples = self.step(batch)
                log.update(
                    self.step_index,
                    epoch,
                    self.last_loss,
                    lr,
                    samples,
                    self.counters["skipped_images"],
                    write=self.step_index % config.log_every == 0 or self.step_index == self.total_steps,
                )
                if config.save_every and self.step_index % config.save_every == 0:
                    self.save()
            self.save()
        finally:
            log.close()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Restore the caller's flags, sum the counters over ranks, write the final files; returns the stats."""
        config, ctx, dual = self.config, self.ctx, self.dual
        for param, flag in zip(dual.parameters(), self.requires_grad_before):
            param.requires_grad_(flag)
        dual.eval()
        if config.objective == "clip":
            # The head was not trained: start it again from the trained recognition projection (docs/methods.md §4).
            dual.interpretability_head.load_state_dict(dual.adapter.make_interpretability_head().state_dict())
        totals = torch.tensor([self.counters[k] for k in _COUNTERS], dtype=torch.float64, device=ctx.device)
        if ctx.world_size > 1:
            dist.all_reduce(totals)
        total = dict(zip(_COUNTERS, (int(v) for v in totals.tolist())))
        if total["samples"] == 0:
            # No step saw an image: the loss is NaN and the weights are the initial ones; that is a failure.
            raise ValueError(
                "train_data: expected readable images (check the paths and the image files), got none: "
                f"{total['skipped_images']} skipped as missing or unreadable, so nothing was trained"
            )
        wall_time = self.elapsed()
        stats = {
            "steps": self.step_index,
            "epochs": config.epochs,
            "steps_per_epoch": self.stream.steps_per_epoch,
            "samples": total["samples"],
            "wall_time_s": wall_time,
            "samples_per_s": total["samples"] / max(wall_time, 1e-9),
            "final_loss": self.last_loss,
            "skipped_images": total["skipped_images"],
            "empty_mask_fallbacks": total["empty_mask_fallbacks"],
            "equalisation_cut": total["equalisation_cut"],
            "lambda_rec": self.parts.lambda_rec,
            "mode": config.mode,
            "objective": config.objective,
            "world_size": ctx.world_size,
        }
        if ctx.is_main:
            metadata = {"config": dataclasses.asdict(config), "stats": stats}
            dual.save(self.out_dir / "final.pt", **metadata)
            dual.save_interpretability(self.out_dir / "interpretability_head.pt", **metadata)
            atomic_write_text(self.out_dir / "stats.json", json_text(stats, indent=2))
            logger.info("training done: %s", stats)
        return stats


class _TrainLog:
    """The progress bar and ``log.jsonl`` of the main rank (throughput over the last logging window)."""

    def __init__(self, path: Path, ctx: _Distributed, total_steps: int, step: int, console: bool = True) -> None:
        self.ctx, self.console = ctx, console and ctx.is_main
        self.file = open(path, "a", encoding="utf-8") if ctx.is_main else None  # noqa: SIM115 - closed by close()
        self.progress = tqdm(
            total=total_steps, initial=step, disable=not self.console, desc="iclip", dynamic_ncols=True
        )
        self.window_start, self.window_samples = time.monotonic(), 0

    def update(self, step: int, epoch: int, loss: float, lr: float, samples: int, skipped: int, *, write: bool) -> None:
        self.window_samples += samples
        self.progress.update(1)
        if not (self.ctx.is_main and write):
            return
        now = time.monotonic()
        record = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "samples_per_s": self.window_samples * self.ctx.world_size / max(now - self.window_start, 1e-9),
            "skipped_images": skipped,
        }
        self.window_start, self.window_samples = now, 0
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if self.console:
            tqdm.write(json_text(record))
        self.file.write(json_text(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.progress.close()
        if self.file is not None:
            self.file.close()
