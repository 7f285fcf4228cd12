"""A tiny DINO self-supervised trainer (Caron et al., *Emerging Properties in
Self-Supervised Vision Transformers*, ICCV 2021) for CPU-sized ViTs.

It trains a small timm ``VisionTransformer`` whose last-block [CLS] attention
serves as the foreground mask source of masked max pooling (docs/methods.md §3) on
procedural scenes, where no pretrained DINO can be downloaded.

The recipe follows the paper: a student and an EMA teacher (momentum cosine
schedule to 1), a DINO head (3-layer MLP, L2-normalised bottleneck, weight-normed
last layer with its norm fixed to 1), centering of the teacher outputs (EMA of
the batch mean) and sharpening (teacher temperature warm-up, student temperature
0.1), multi-crop (2 global + several local crops), cross-entropy between every
teacher (global) view and every *other* student view, AdamW with linear warm-up
and cosine learning-rate decay, a cosine weight-decay schedule, gradient
clipping and fixed seeds.

Examples::

    >>> from captum_iclip.world import generate_scene
    >>> from captum_iclip.training.dino import DINOConfig, train_dino, load_tiny_dino
    >>> backbone, stats = train_dino(lambda i: generate_scene(i).image, DINOConfig(steps=500),
    ...                              out_dir="runs/tiny_dino")
    >>> backbone = load_tiny_dino("runs/tiny_dino")
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchvision.transforms import v2
from tqdm.auto import tqdm

from captum_iclip._io import atomic_torch_save, load_torch_file
from captum_iclip.models.tiny_dino import (
    DINOConfig,
    build_backbone,
    load_tiny_dino,
    save_tiny_dino,
)

__all__ = [
    "DINOConfig",
    "DINOHead",
    "DINOLoss",
    "build_backbone",
    "multi_crop_transform",
    "ema_update",
    "cosine_schedule",
    "train_dino",
    "save_tiny_dino",
    "load_tiny_dino",
    "CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "checkpoint.pt"
# DINOConfig fields that do not change the training trajectory (ignored when resuming).
_RUNTIME_FIELDS = ("num_threads", "checkpoint_every", "data_workers", "device")

ImageSource = Callable[[int], Any] | Sequence[Any] | torch.utils.data.Dataset


# --------------------------------------------------------------------------- #
# Networks (the backbone is captum_iclip.models.tiny_dino's)
# --------------------------------------------------------------------------- #
class DINOHead(nn.Module):
    """DINO projection head: MLP, L2 normalisation, weight-normed prototypes.

    Args:
        in_dim (int): Backbone feature width.
        out_dim (int): Number of prototypes.
        hidden_dim (int): MLP width.
        bottleneck_dim (int): Width of the normalised bottleneck.

    Examples::

        >>> DINOHead(192, 1024)(torch.randn(8, 192)).shape
        torch.Size([8, 1024])
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512, bottleneck_dim: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        # The prototype norms stay 1 (DINO's norm_last_layer=True): only directions learn.
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad_(False)

    def forward(self, features: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(features), dim=-1))


class _MultiCropNetwork(nn.Module):
    """Backbone + head applied to crops of several sizes, one forward per size."""

    def __init__(self, backbone: VisionTransformer, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[Tensor]) -> Tensor:
        features = torch.cat([self.backbone(batch) for batch in crops])
        return self.head(features)


# --------------------------------------------------------------------------- #
# Loss, schedules, EMA
# --------------------------------------------------------------------------- #
class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher views and the other student views.

    With teacher probabilities ``P_t^a = softmax((g_t(x_a) - c) / T_t)`` for the
    global views ``a`` and student log-probabilities ``log P_s^v = log_softmax(g_s(x_v) / T_s)``
    for all views ``v``, the loss is the mean over pairs ``v != a`` of
    ``-sum_k P_t^a[k] log P_s^v[k]``, averaged over the batch. After each call the
    center follows ``c <- m c + (1 - m) mean_batch(g_t)``.

    Args:
        out_dim (int): Number of prototypes.
        student_temp (float): ``T_s``.
        center_momentum (float): ``m``.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: Tensor, teacher_out: Tensor, num_views: int, teacher_temp: float) -> Tensor:
        """Loss for ``num_views`` student views and 2 (or more) teacher views.

        Args:
            student_out (Tensor): ``(num_views * B, out_dim)``, view-major.
            teacher_out (Tensor): ``(num_teacher_views * B, out_dim)``, view-major;
                view ``a`` of the teacher is view ``a`` of the student.
            num_views (int): Number of student views.
            teacher_temp (float): ``T_t`` for this step.

        Returns:
            Tensor: Scalar loss.
        """
        student_log_probs = F.log_softmax(student_out / self.student_temp, dim=-1).chunk(num_views)
        teacher_out = teacher_out.detach()
        num_teacher_views = teacher_out.shape[0] // student_log_probs[0].shape[0]
        teacher_probs = F.softmax((teacher_out - self.center) / teacher_temp, dim=-1).chunk(num_teacher_views)
        total, pairs = student_out.new_zeros(()), 0
        for a, target in enumerate(teacher_probs):
            for v, log_probs in enumerate(student_log_probs):
                if v == a:
                    continue
                total = total + (-target * log_probs).sum(dim=-1).mean()
                pairs += 1
        self._update_center(teacher_out)
        return total / pairs

    @torch.no_grad()
    def _update_center(self, teacher_out: Tensor) -> None:
        batch_mean = teacher_out.mean(dim=0, keepdim=True)
        self.center.mul_(self.center_momentum).add_(batch_mean, alpha=1.0 - self.center_momentum)


def cosine_schedule(
    start: float, end: float, steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Per-step values: linear warm-up ``warmup_start -> start``, then a cosine ``start -> end``.

    Args:
        start (float): Value after warm-up (first cosine value).
        end (float): Value at the last step.
        steps (int): Total number of steps.
        warmup_steps (int): Linear warm-up length.
        warmup_start (float): Value at step 0 when warming up.

    Returns:
        np.ndarray: ``(steps,)`` float64 values.

    Examples::

        >>> cosine_schedule(1.0, 0.0, 5).round(3).tolist()
        [1.0, 0.854, 0.5, 0.146, 0.0]
    """
    warmup_steps = min(warmup_steps, steps)
    warmup = np.linspace(warmup_start, start, warmup_steps, endpoint=False)
    remaining = steps - warmup_steps
    phase = np.arange(remaining) / max(remaining - 1, 1)
    cosine = end + 0.5 * (start - end) * (1.0 + np.cos(math.pi * phase))
    return np.concatenate([warmup, cosine])


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta_t <- momentum * theta_t + (1 - momentum) * theta_s`` for every parameter.

    Args:
        teacher (nn.Module): Updated in place.
        student (nn.Module): Same architecture as ``teacher``.
        momentum (float): In ``[0, 1]``.
    """
    teacher_params = list(teacher.parameters())
    student_params = [p.detach() for p in student.parameters()]
    if len(teacher_params) != len(student_params):
        raise ValueError(f"teacher: expected the student's {len(student_params)} parameters, got {len(teacher_params)}")
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def multi_crop_transform(config: DINOConfig) -> Callable[[Tensor], list[Tensor]]:
    """DINO multi-crop augmentation of one uint8 ``(3, H, W)`` image.

    Global crops: ``RandomResizedCrop(global_crop_size, global_crop_scale)``,
    horizontal flip, colour jitter (``color_jitter`` with ``color_jitter_prob``),
    grayscale (``grayscale_prob``), Gaussian blur (``blur_sigma``, probabilities
    ``blur_probs[0]`` and ``blur_probs[1]``) and solarisation (second crop,
    ``solarize_prob``). Local crops: ``RandomResizedCrop(local_crop_size,
    local_crop_scale)``, flip, jitter, grayscale, blur (``blur_probs[2]``). All
    crops end as float tensors normalised with the ImageNet mean/std.

    Args:
        config (DINOConfig): Crop sizes, scales and count.

    Returns:
        callable: ``image -> [global_1, global_2, local_1, ..., local_n]``.
    """

    # The kernel spans +-2 sigma of the widest blur, so large sigmas are not truncated.
    kernel = 2 * math.ceil(2 * config.blur_sigma[1]) + 1

    def pipeline(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> v2.Compose:
        return v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=scale, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(*config.color_jitter)], p=config.color_jitter_prob),
                v2.RandomGrayscale(p=config.grayscale_prob),
                v2.RandomApply([v2.GaussianBlur(kernel, sigma=config.blur_sigma)], p=blur_p),
                v2.RandomSolarize(threshold=128, p=solarize_p),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
            ]
        )

    first_blur, second_blur, local_blur = config.blur_probs
    first_global = pipeline(config.global_crop_size, config.global_crop_scale, first_blur, 0.0)
    second_global = pipeline(config.global_crop_size, config.global_crop_scale, second_blur, config.solarize_prob)
    local = pipeline(config.local_crop_size, config.local_crop_scale, local_blur, 0.0)

    def transform(image: Tensor) -> list[Tensor]:
        crops = [first_global(image), second_global(image)]
        crops.extend(local(image) for _ in range(config.num_local_crops))
        return crops

    return transform


def _to_uint8_chw(item: Any) -> Tensor:
    """A ``(3, H, W)`` uint8 tensor from an array, a tensor, a PIL image or a scene."""
    if hasattr(item, "image"):
        item = item.image
    elif isinstance(item, (tuple, list)):
        item = item[0]
    if not isinstance(item, Tensor):
        item = torch.from_numpy(np.ascontiguousarray(np.asarray(item)))
    if item.dtype != torch.uint8:
        raise TypeError(f"source: expected uint8 images, got {item.dtype}")
    if item.dim() == 2:
        item = item.unsqueeze(-1).expand(-1, -1, 3)
    if item.dim() == 3 and item.shape[-1] == 3 and item.shape[0] != 3:
        item = item.permute(2, 0, 1)
    if item.dim() != 3 or item.shape[0] != 3:
        raise ValueError(f"source: expected images of shape (H, W, 3) or (3, H, W), got {tuple(item.shape)}")
    return item.contiguous()


def _derived_seed(*entropy: int) -> int:
    """A 63-bit seed that depends on every value of ``entropy`` (NumPy's ``SeedSequence`` mixing)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(2, np.uint64)[0] >> np.uint64(1))


class _AugmentedBatches(torch.utils.data.Dataset):
    """Step ``s`` -> the multi-crop views of the ``s``-th batch, as ``[view_0, ..., view_n]`` tensors.

    Each batch is a pure function of ``(seed, step)``: the images come from
    per-epoch permutations seeded by ``(seed, epoch)`` (or are items
    ``s * batch_size ...`` of a callable stream) and the augmentations run under
    a torch seed derived from ``(seed, step)``. So batches can be prepared ahead
    in worker processes, and a resumed run only needs to know its next step.
    """

    def __init__(self, source: ImageSource, config: DINOConfig) -> None:
        if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
            if len(source) == 0:
                raise ValueError("source: expected at least one image, got an empty source")
            self.fetch: Callable[[int], Any] = source.__getitem__
            self.length: int | None = len(source)
        elif callable(source):
            self.fetch, self.length = source, None
        else:
            raise TypeError(
                "source: expected a map-style dataset / sequence of uint8 images or a callable index -> image, "
                f"got {type(source).__name__}"
            )
        self.batch_size = config.batch_size
        self.seed = config.seed
        self.steps = config.steps
        self.num_views = 2 + config.num_local_crops
        self.augment = multi_crop_transform(config)
        self._epoch_order: tuple[int, list[int]] = (-1, [])

    def __len__(self) -> int:
        return self.steps

    def _order(self, epoch: int) -> list[int]:
        if self._epoch_order[0] != epoch:
            generator = torch.Generator().manual_seed(_derived_seed(self.seed, epoch, 0))
            self._epoch_order = (epoch, torch.randperm(self.length, generator=generator).tolist())
        return self._epoch_order[1]

    def indices(self, step: int) -> list[int]:
        """Source indices of batch ``step``."""
        first = step * self.batch_size
        positions = range(first, first + self.batch_size)
        if self.length is None:
            return list(positions)
        return [self._order(p // self.length)[p % self.length] for p in positions]

    def __getitem__(self, step: int) -> list[Tensor]:
        images = [_to_uint8_chw(self.fetch(index)) for index in self.indices(step)]
        # The transforms draw from the global torch RNG: seed it per step, and leave the
        # caller's stream (e.g. stochastic depth in the main process) untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_derived_seed(self.seed, step, 1))
            views = [self.augment(image) for image in images]
        return [torch.stack([v[k] for v in views]) for k in range(self.num_views)]


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
def _param_groups(model: nn.Module) -> list[dict[str, Any]]:
    decayed, undecayed = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (undecayed if name.endswith(".bias") or param.dim() == 1 else decayed).append(param)
    return [{"params": decayed}, {"params": undecayed, "weight_decay": 0.0}]


def _comparable(config: DINOConfig) -> dict[str, Any]:
    """The settings that determine the training trajectory (not threads or checkpoint cadence)."""
    values = asdict(config)
    for name in _RUNTIME_FIELDS:
        values.pop(name)
    return values


def _load_checkpoint(path: Path, config: DINOConfig) -> dict[str, Any]:
    checkpoint = load_torch_file(path, "resume")
    saved = _comparable(DINOConfig.from_dict(checkpoint["config"]))
    current = _comparable(config)
    if saved != current:
        differing = sorted(name for name in current if saved[name] != current[name])
        raise ValueError(
            f"config: expected the settings of the checkpoint {path} (resume with them or train into a new "
            f"out_dir), got different {differing}"
        )
    return checkpoint


def train_dino(
    source: ImageSource,
    config: DINOConfig | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    resume: bool = False,
) -> tuple[VisionTransformer, dict[str, Any]]:
    """Train a tiny ViT with DINO and return the teacher backbone.

    Every ``config.checkpoint_every`` steps, and after the last one, the full
    training state (student, teacher, optimizer, loss center, step, losses and
    the global torch RNG) is written atomically to ``out_dir/checkpoint.pt``.
    Batch ``s`` depends only on ``config.seed`` and ``s``, so with ``resume=True``
    training continues from that file and ends in the same state, bit for bit,
    as an uninterrupted run with the same thread count (the data source must
    give the same images again).

    Args:
        source: Training images: a map-style dataset or sequence whose items are
            uint8 ``(H, W, 3)`` / ``(3, H, W)`` arrays or tensors, PIL images,
            objects with an ``.image`` attribute (e.g. ``Scene``) or tuples whose
            first element is one of those (shuffled, epoch by epoch); or a
            callable ``index -> image`` called with 0, 1, 2, ... (an endless
            procedural stream, e.g. ``lambda i: generate_scene(i).image``).
        config (DINOConfig, optional): Settings; defaults to ``DINOConfig()``.
        out_dir (str or Path, optional): Where the checkpoint and, at the end,
            the teacher backbone (:func:`save_tiny_dino`) are written.
        progress (bool): Show a tqdm progress bar.
        resume (bool): Continue from ``out_dir/checkpoint.pt`` when it exists
            (a missing file starts from scratch). Its settings must equal
            ``config`` except ``num_threads``, ``checkpoint_every`` and ``data_workers``.

    Returns:
        tuple: ``(teacher_backbone, stats)``. The backbone is in eval mode
        without gradients. ``stats`` holds ``steps``, ``images_seen``,
        ``wall_time_s`` (summed over resumed sessions), ``final_loss`` (mean of
        the last 10 step losses), ``losses`` (every step) and ``weights_path``
        (or ``None``).

    Raises:
        ValueError: ``resume=True`` without ``out_dir``, or a checkpoint written
            with other settings.

    Examples::

        >>> config = DINOConfig(image_size=96, steps=600, checkpoint_every=50)
        >>> source = lambda i: generate_scene(i).image
        >>> backbone, stats = train_dino(source, config, out_dir="runs/tiny_dino", resume=True)
    """
    config = config or DINOConfig()
    if resume and out_dir is None:
        raise ValueError("out_dir: expected the folder holding checkpoint.pt with resume=True, got None")
    checkpoint_path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    previous_threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        trainer = DINOTrainer(source, config)
        if resume and checkpoint_path.is_file():
            trainer.resume(checkpoint_path)
        backbone = trainer.run(checkpoint_path, progress)
        stats = trainer.stats()
        if out_dir is not None:
            stats["weights_path"] = str(save_tiny_dino(backbone, config, out_dir, stats))
        return backbone, stats
    finally:
        torch.set_num_threads(previous_threads)


class DINOTrainer:
    """One tiny-DINO run: student, EMA teacher, loss center and schedules; :meth:`resume`, :meth:`step`,
    :meth:`save` and :meth:`run` (the recipe is described in the module docstring).

    Args:
        source: training images (see :func:`train_dino`).
        config: the settings.
    """

    def __init__(self, source: ImageSource, config: DINOConfig) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        self.batches = _AugmentedBatches(source, config)
        self.student = _MultiCropNetwork(
            build_backbone(config),
            DINOHead(config.embed_dim, config.out_dim, config.head_hidden_dim, config.head_bottleneck_dim),
        )
        # Eval mode: the teacher runs without stochastic depth (timm DropPath is off in eval).
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.student.train()
        self.criterion = DINOLoss(config.out_dim, config.student_temp, config.center_momentum)
        # Built on the CPU first, so the initialisation is the same on every device.
        self.device = torch.device(config.device)
        for module in (self.student, self.teacher, self.criterion):
            module.to(self.device)
        self.optimizer = torch.optim.AdamW(_param_groups(self.student), lr=config.lr)
        self.lr_schedule = cosine_schedule(config.lr, config.min_lr, config.steps, config.warmup_steps)
        self.wd_schedule = cosine_schedule(config.weight_decay, config.weight_decay_end, config.steps)
        self.momentum_schedule = cosine_schedule(config.momentum_start, 1.0, config.steps)
        warmup = min(config.teacher_temp_warmup_steps, config.steps)
        self.teacher_temps = np.concatenate(
            [
                np.linspace(config.teacher_temp_start, config.teacher_temp, warmup),
                np.full(config.steps - warmup, config.teacher_temp),
            ]
        )
        # State: what a checkpoint holds.
        self.first_step, self.losses, self.earlier_wall_time = 0, [], 0.0
        self.started = time.perf_counter()

    def resume(self, path: Path) -> None:
        """Continue from the checkpoint at ``path`` (written with the same settings)."""
        state = _load_checkpoint(path, self.config)
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.criterion.center.copy_(state["center"])
        torch.set_rng_state(state["torch_rng"])
        self.first_step, self.losses, self.earlier_wall_time = (
            state["step"],
            list(state["losses"]),
            state["wall_time_s"],
        )

    def wall_time(self) -> float:
        """Seconds of training, earlier sessions included."""
        return self.earlier_wall_time + time.perf_counter() - self.started

    def save(self, path: Path, next_step: int) -> None:
        """Write the full training state, to continue at ``next_step``."""
        atomic_torch_save(
            {
                "config": asdict(self.config),
                "step": next_step,
                "student": self.student.state_dict(),
                "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "center": self.criterion.center.clone(),
                "torch_rng": torch.get_rng_state(),
                "losses": list(self.losses),
                "wall_time_s": self.wall_time(),
            },
            path,
        )

    def step(self, step: int, crops: list[Tensor]) -> float:
        """One optimisation step on the multi-crop views of a batch; returns the loss."""
        config, optimizer = self.config, self.optimizer
        for group in optimizer.param_groups:
            group["lr"] = float(self.lr_schedule[step])
        optimizer.param_groups[0]["weight_decay"] = float(self.wd_schedule[step])

        crops = [crop.to(self.device, non_blocking=True) for crop in crops]
        global_crops = torch.cat(crops[:2])
        student_inputs = [global_crops] + ([torch.cat(crops[2:])] if config.num_local_crops else [])
        with torch.no_grad():
            teacher_out = self.teacher([global_crops])
        student_out = self.student(student_inputs)
        loss = self.criterion(student_out, teacher_out, 2 + config.num_local_crops, float(self.teacher_temps[step]))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss: expected a finite DINO loss, got {loss.item()} at step {step}")

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.student.parameters(), config.clip_grad)
        if step < config.freeze_last_layer_steps:
            for param in self.student.head.last_layer.parameters():
                param.grad = None
        optimizer.step()
        ema_update(self.teacher, self.student, float(self.momentum_schedule[step]))
        self.losses.append(loss.item())
        return self.losses[-1]

    def run(self, checkpoint_path: Path | None, progress: bool) -> VisionTransformer:
        """Train to ``config.steps``, checkpointing on the way; returns the teacher backbone (eval, frozen)."""
        config = self.config
        # Workers augment the next batches while this process trains on the current one.
        loader = torch.utils.data.DataLoader(
            self.batches,
            batch_size=None,
            sampler=range(self.first_step, config.steps),
            num_workers=config.data_workers,
            prefetch_factor=2 if config.data_workers else None,
            # Its own generator: creating the iterator must not draw from the global RNG,
            # whose state a resumed run restores before this point.
            generator=torch.Generator(),
        )
        self.started = time.perf_counter()
        bar = tqdm(loader, desc="DINO", disable=not progress, initial=self.first_step, total=config.steps)
        for step, crops in enumerate(bar, start=self.first_step):
            loss = self.step(step, crops)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.lr_schedule[step]:.1e}")
            done = step + 1
            if (
                checkpoint_path is not None
                and config.checkpoint_every
                and (done % config.checkpoint_every == 0 or done == config.steps)
            ):
                self.save(checkpoint_path, done)
        return self.teacher.backbone.eval().requires_grad_(False)

    def stats(self) -> dict[str, Any]:
        """The run's figures (see :func:`train_dino`)."""
        return {
            "steps": self.config.steps,
            "images_seen": self.config.steps * self.config.batch_size,
            "wall_time_s": self.wall_time(),
            "final_loss": float(np.mean(self.losses[-10:])),
            "losses": self.losses,
            "weights_path": None,
        }
