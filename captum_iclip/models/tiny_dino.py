"""The tiny DINO ViT: the mask source of the bundled models, as a model (its shape, its files).

:class:`DINOConfig` holds the settings of a tiny DINO run, the ViT's shape among them; a trained backbone is
saved as ``tiny_dino.pt`` (weights) beside ``tiny_dino.json`` (that config), from which :func:`load_tiny_dino`
rebuilds it. The trainer is :mod:`captum_iclip.training.dino`; the loader and the mask providers read the
files through this module, so they do not depend on the trainer.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer

from captum_iclip._io import atomic_torch_save, atomic_write_text, json_text, load_torch_file

WEIGHTS_NAME = "tiny_dino.pt"
CONFIG_NAME = "tiny_dino.json"


@dataclass
class DINOConfig:
    """Settings of a tiny DINO run.

    The defaults are the recipe of the bundled ``shapes-tiny`` mask source:
    96 x 96 procedural scenes on two CPU cores. Where they differ from DINO's
    ImageNet recipe (QK-normalisation, no colour augmentations, six blocks, no
    register tokens) and the runs that led there are in docs/training-notes.md.

    Args:
        image_size: Input size the backbone is built for (its positional
            embedding grid) and the size :class:`~captum_iclip.masks.DINOMaskProvider`
            feeds it by default. Crops of other sizes use interpolated
            positional embeddings (``dynamic_img_size=True``).
        patch_size, embed_dim, depth, num_heads, mlp_ratio: ViT shape.
        reg_tokens: Register tokens (Darcet et al., 2023, "Vision Transformers Need
            Registers", arXiv 2309.16588): extra learned tokens meant to give attention
            a sink other than background patches (0 in the bundled recipe; see
            docs/training-notes.md).
        qk_norm: LayerNorm on the queries and keys of every attention (timm's
            ``qk_norm``); :func:`~captum_iclip.masks.cls_attention` applies it too.
        drop_path_rate: Stochastic depth of the student (the teacher has none).
        out_dim: Number of DINO prototypes (output dimension of the head).
        head_hidden_dim, head_bottleneck_dim: DINO head MLP widths.
        global_crop_size, local_crop_size: Side of the global and local crops.
        num_local_crops: Local crops per image (two global crops are always used).
        global_crop_scale, local_crop_scale: Area ranges of ``RandomResizedCrop``.
        color_jitter: ``ColorJitter`` brightness, contrast, saturation, hue.
        color_jitter_prob: Probability of applying the colour jitter to a crop.
        grayscale_prob: Probability of converting a crop to grayscale.
        blur_probs: Gaussian-blur probabilities of the first global, the second
            global and each local crop.
        blur_sigma: Range of the blur's standard deviation, in pixels of the crop.
        solarize_prob: Solarisation probability of the second global crop.
        steps: Optimisation steps.
        batch_size: Images per step.
        lr: Peak learning rate, reached after ``warmup_steps``.
        min_lr: Final learning rate of the cosine decay.
        warmup_steps: Linear learning-rate warm-up steps.
        weight_decay, weight_decay_end: Cosine weight-decay schedule (weights only;
            biases and 1-D parameters are not decayed).
        clip_grad: Maximum gradient norm of the student (``0`` disables clipping).
        freeze_last_layer_steps: Steps during which the head's last layer is not
            updated (stabilises the start, as in DINO).
        student_temp: Student softmax temperature.
        teacher_temp_start, teacher_temp: Teacher temperature, warmed up linearly
            over ``teacher_temp_warmup_steps`` and then constant.
        teacher_temp_warmup_steps: Length of that warm-up.
        momentum_start: Teacher EMA momentum at step 0; follows a cosine to 1.
        center_momentum: EMA momentum of the center.
        seed: Seed of the initialisation, the data order and the augmentations.
        checkpoint_every: Steps between checkpoints of :func:`train_dino` when it
            has an ``out_dir`` (``0``: none; when positive, the last step always writes one
            too).
        num_threads: ``torch.set_num_threads`` during training (restored after);
            ``None`` leaves the caller's setting alone.
        data_workers: Processes that decode and augment upcoming batches while
            the model trains (``0``: in the training process). Batches depend only
            on ``seed`` and the step, so this changes the speed, not the result.
        device: Where the networks train (``"cpu"``, ``"cuda"``, ...); the crops are
            made on the CPU either way. Like the three settings above it may change
            between a run and its resumption.
    """

    image_size: int = 96
    patch_size: int = 8
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    reg_tokens: int = 0
    qk_norm: bool = True
    drop_path_rate: float = 0.0
    out_dim: int = 1024
    head_hidden_dim: int = 512
    head_bottleneck_dim: int = 128
    global_crop_size: int = 64
    local_crop_size: int = 32
    num_local_crops: int = 4
    global_crop_scale: tuple[float, float] = (0.35, 1.0)
    local_crop_scale: tuple[float, float] = (0.08, 0.35)
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_prob: float = 0.0
    grayscale_prob: float = 0.0
    blur_probs: tuple[float, float, float] = (0.0, 0.0, 0.0)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_steps: int = 30
    weight_decay: float = 0.04
    weight_decay_end: float = 0.1
    clip_grad: float = 3.0
    freeze_last_layer_steps: int = 30
    student_temp: float = 0.1
    teacher_temp_start: float = 0.04
    teacher_temp: float = 0.04
    teacher_temp_warmup_steps: int = 100
    momentum_start: float = 0.996
    center_momentum: float = 0.9
    seed: int = 0
    checkpoint_every: int = 50
    num_threads: int | None = None
    data_workers: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.global_crop_scale = tuple(self.global_crop_scale)
        self.local_crop_scale = tuple(self.local_crop_scale)
        self.color_jitter = tuple(self.color_jitter)
        self.blur_probs = tuple(self.blur_probs)
        self.blur_sigma = tuple(self.blur_sigma)
        for name in ("image_size", "global_crop_size", "local_crop_size"):
            value = getattr(self, name)
            if value <= 0 or value % self.patch_size:
                raise ValueError(f"{name}: expected a positive multiple of patch_size={self.patch_size}, got {value}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim: expected a multiple of num_heads={self.num_heads}, got {self.embed_dim}")
        for name in ("steps", "batch_size", "out_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected at least 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every: expected a non-negative int (0 disables), got {self.checkpoint_every}")
        if self.data_workers < 0:
            raise ValueError(
                f"data_workers: expected a non-negative int (0: augment in this process), got {self.data_workers}"
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads: expected None or at least 1, got {self.num_threads}")
        if self.num_local_crops < 0:
            raise ValueError(f"num_local_crops: expected a non-negative value, got {self.num_local_crops}")
        if not 0.0 <= self.momentum_start <= 1.0 or not 0.0 <= self.center_momentum <= 1.0:
            raise ValueError(
                "momentum_start: expected it and center_momentum in [0, 1], "
                f"got {self.momentum_start!r} and {self.center_momentum!r}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DINOConfig:
        """Rebuild a config from :func:`dataclasses.asdict` output (e.g. read from JSON)."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"values: expected DINOConfig fields, got the unknown {sorted(unknown)}")
        return cls(**values)


def build_backbone(config: DINOConfig) -> VisionTransformer:
    """The tiny timm ViT described by ``config`` ([CLS] pooling, no classifier).

    Args:
        config (DINOConfig): The run settings.

    Returns:
        VisionTransformer: With ``dynamic_img_size=True`` and a ``pretrained_cfg``
        holding the ImageNet mean/std the trainer normalises with, so that
        :class:`~captum_iclip.masks.DINOMaskProvider` converts inputs correctly.
    """
    model = VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=True,
        drop_path_rate=config.drop_path_rate,
        num_classes=0,
        global_pool="token",
        reg_tokens=config.reg_tokens,
        qk_norm=config.qk_norm,
        dynamic_img_size=True,
    )
    model.pretrained_cfg = {
        "input_size": (3, config.image_size, config.image_size),
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
    }
    return model


def save_tiny_dino(
    backbone: VisionTransformer, config: DINOConfig, out_dir: str | os.PathLike, stats: dict | None = None
) -> Path:
    """Write ``tiny_dino.pt`` (backbone state dict) and ``tiny_dino.json`` (config, stats) atomically.

    Args:
        backbone (VisionTransformer): The (teacher) backbone.
        config (DINOConfig): Its settings, needed to rebuild it.
        out_dir (str or Path): Destination folder (created if missing).
        stats (dict, optional): Training statistics stored beside the config.

    Returns:
        Path: The weights file.
    """
    out_dir = Path(out_dir)
    weights = out_dir / WEIGHTS_NAME
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    atomic_torch_save(state, weights)
    meta = {"config": asdict(config), "stats": stats or {}}
    atomic_write_text(out_dir / CONFIG_NAME, json_text(meta, indent=2))
    return weights


def load_tiny_dino(path: str | os.PathLike) -> VisionTransformer:
    """Rebuild a backbone written by :func:`train_dino` / :func:`save_tiny_dino`.

    Args:
        path (str or Path): The output folder, or its ``tiny_dino.pt`` file.

    Returns:
        VisionTransformer: In eval mode, ready for
        :class:`~captum_iclip.masks.DINOMaskProvider`.

    Examples::

        >>> from captum_iclip.masks import DINOMaskProvider
        >>> provider = DINOMaskProvider(load_tiny_dino("runs/tiny_dino"), tau=0.6)
    """
    path = Path(path)
    folder, weights = (path, path / WEIGHTS_NAME) if path.is_dir() else (path.parent, path)
    if not weights.is_file() or not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"path: expected a tiny DINO folder holding {WEIGHTS_NAME} and {CONFIG_NAME}, got {path}"
        )
    with open(folder / CONFIG_NAME) as stream:
        config = DINOConfig.from_dict(json.load(stream)["config"])
    backbone = build_backbone(config)
    backbone.load_state_dict(load_torch_file(weights, "path"))
    return backbone.eval()
