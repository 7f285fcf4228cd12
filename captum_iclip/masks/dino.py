"""DINO as a mask source: loading a DINO backbone (timm, Hugging Face, a checkpoint) and
:class:`DINOMaskProvider`, CLIP images -> DINO [CLS] attention -> a mask on the CLIP grid (and the DINO
patch features, ProxyCLIP's proxy: :meth:`DINOMaskProvider.patch_features`, :func:`dino_provider`)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data import OPENAI_CLIP_MEAN as OPENAI_DATASET_MEAN
from timm.data import OPENAI_CLIP_STD as OPENAI_DATASET_STD
from torch import Tensor, nn

from captum_iclip._io import load_torch_file
from captum_iclip.masks.attention import (
    GridSize,
    _block_indices,
    _depth,
    _is_hf_model,
    _native_image_size,
    cls_attention,
    dino_patch_size,
    top_mass_mask,
)
from captum_iclip.masks.cache import CachedMaskProvider
from captum_iclip.masks.features import PatchFeatures, patch_features
from captum_iclip.masks.providers import MaskProvider, _check_images

_RESAMPLE_MODES = ("bilinear", "nearest")


# --------------------------------------------------------------------------- #
# DINO mask provider
# --------------------------------------------------------------------------- #
def _load_state_dict_file(path: str | os.PathLike) -> dict:
    """Backbone state dict from a plain, ``{"state_dict"|"model"|"teacher": ...}`` or DDP file."""
    checkpoint = load_torch_file(path, "checkpoint")
    for key in ("teacher", "state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint: expected a state dict, got a {type(checkpoint).__name__} in {path!s}")
    state_dict = {}
    for name, value in checkpoint.items():
        for prefix in ("module.", "backbone."):
            name = name[len(prefix) :] if name.startswith(prefix) else name
        state_dict[name] = value
    return state_dict


def _load_timm_dino(name: str, pretrained: bool, checkpoint: str | None) -> nn.Module:
    import timm
    from timm.models import eva, vision_transformer

    try:
        model = timm.create_model(
            name, pretrained=pretrained and checkpoint is None, num_classes=0, dynamic_img_size=True
        )
    except Exception as error:  # offline hub / missing file: say what to do
        raise RuntimeError(
            f"pretrained: expected the weights of timm model {name!r} to be downloadable, got {error}. "
            f"Download them on a machine with network access (e.g. the 'timm/{name}' Hugging Face "
            f"repository, file model.safetensors or pytorch_model.bin, or the original DINO .pth) and "
            f"pass checkpoint='/path/to/file' instead of pretrained=True"
        ) from error
    if checkpoint is not None:
        # Each timm family maps original (e.g. DINOv3) checkpoints to its own layout.
        family = eva if isinstance(model, eva.Eva) else vision_transformer
        state_dict = family.checkpoint_filter_fn(_load_state_dict_file(checkpoint), model)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing:
            raise ValueError(
                f"checkpoint: expected every weight of {name!r}, got {checkpoint!s} without {missing[:5]}..."
            )
        if unexpected:
            warnings.warn(f"checkpoint {checkpoint!s}: ignored unexpected keys {unexpected[:5]}...", stacklevel=3)
    elif not pretrained:
        warnings.warn(
            f"DINOMaskProvider({name!r}) has random weights (pretrained=False and no checkpoint): "
            "its masks are meaningless; pass pretrained=True or checkpoint=PATH",
            stacklevel=3,
        )
    return model


def _load_hf_dino(name: str) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    from transformers import AutoImageProcessor, AutoModel

    def load(local_files_only: bool):
        model = AutoModel.from_pretrained(name, attn_implementation="eager", local_files_only=local_files_only)
        try:
            processor = AutoImageProcessor.from_pretrained(name, local_files_only=local_files_only)
            mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        except (OSError, ValueError, AttributeError, TypeError):
            mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        return model, mean, std

    # The local cache first: it needs no network and gives the same files.
    try:
        return load(local_files_only=True)
    except OSError:
        if os.path.isdir(name):
            raise
    try:
        return load(local_files_only=False)
    except OSError as error:
        raise RuntimeError(
            f"model: expected a Hugging Face model {name!r} in the local cache or on the hub, got {error}. "
            "Download it where the network is reachable (e.g. `huggingface-cli download "
            f"{name} --local-dir DIR`) and pass model='DIR'"
        ) from error


def _resolve_dino_model(
    model: str | nn.Module, pretrained: bool, checkpoint: str | None
) -> tuple[nn.Module, Sequence[float], Sequence[float]]:
    """The DINO model of :class:`DINOMaskProvider` (built from a timm name, a Hugging Face id or folder, or
    given), ready for its [CLS] attention, with the mean and std of its own input normalisation."""
    dino_mean, dino_std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if isinstance(model, str):
        if checkpoint is not None and pretrained:
            raise ValueError(
                f"checkpoint: expected None with pretrained=True (one source of weights), got {checkpoint!r}"
            )
        import timm

        if timm.is_model(model):
            model = _load_timm_dino(model, pretrained, checkpoint)
        elif os.path.isdir(model) or "/" in model:
            if pretrained or checkpoint is not None:
                raise ValueError(
                    "pretrained: expected pretrained=False and checkpoint=None for a Hugging Face model (they "
                    f"apply to timm model names), got pretrained={pretrained!r}, checkpoint={checkpoint!r}"
                )
            model, dino_mean, dino_std = _load_hf_dino(model)
        else:
            raise ValueError(f"model: expected a timm model name, a Hugging Face id or a local folder, got {model!r}")
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a model name or an nn.Module, got {type(model).__name__}")
    elif pretrained or checkpoint is not None:
        raise ValueError(
            "pretrained: expected pretrained=False and checkpoint=None for a built module (they apply to "
            f"model names), got pretrained={pretrained!r}, checkpoint={checkpoint!r}"
        )

    if _is_hf_model(model):
        if getattr(model.config, "_attn_implementation", None) != "eager":
            model.set_attn_implementation("eager")
    else:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        dino_mean, dino_std = cfg.get("mean", dino_mean), cfg.get("std", dino_std)
    return model, dino_mean, dino_std


class DINOMaskProvider(MaskProvider):
    """Foreground masks from the [CLS] attention of a self-supervised DINO ViT.

    Pipeline for CLIP-preprocessed images ``(N, 3, H, W)``:

    1. undo the CLIP normalisation (``input_mean`` / ``input_std``) and apply the
       DINO model's own (timm ``pretrained_cfg`` mean/std; Hugging Face image
       processor values, ImageNet when unavailable);
    2. resize (bilinear, antialiased) to ``image_size`` (square) or, when ``None``,
       to the model's native input size, which is a multiple of its patch size;
    3. :func:`cls_attention` gives ``A`` on the DINO patch grid (the last block's,
       or the mean over ``blocks``; register tokens, like the [CLS] token itself, are
       excluded from the attended tokens);
    4. resample to the CLIP grid ``(h, w)``. ``resample="bilinear"`` (default)
       interpolates ``A`` bilinearly (``align_corners=False``, antialiased when
       shrinking) and applies :func:`top_mass_mask` with ``tau`` on the resampled
       map, so the mask holds ``tau`` of the mass at the CLIP resolution.
       ``resample="nearest"`` thresholds ``A`` on the DINO grid and resamples
       the binary mask by nearest neighbour.

    An empty mask (possible only with ``nearest``, or an all-zero map) falls back
    to all patches and is counted in :attr:`num_empty_fallbacks`.

    The DINO model stays in eval mode without gradients, whatever ``train()``
    is called on a parent module.

    Args:
        model (str or nn.Module): a timm model name (e.g.
            ``"vit_small_patch16_224.dino"``, ``"vit_base_patch16_224.dino"``,
            ``"vit_small_patch14_dinov2"``, ``"vit_small_patch14_reg4_dinov2"``,
            ``"vit_small_patch16_dinov3"``), a Hugging Face hub id or local folder
            (``"facebook/dino-vits16"``, ``"facebook/dinov2-small"``,
            ``"facebook/dinov2-with-registers-small"``), or a built timm
            ``VisionTransformer`` / ``Eva`` or Hugging Face ``ViTModel`` / ``Dinov2Model`` /
            ``Dinov2WithRegistersModel`` / ``DINOv3ViTModel``
            (e.g. from :func:`captum_iclip.models.tiny_dino.load_tiny_dino`). A Hugging
            Face module is switched to eager attention.
        pretrained (bool): Load a timm model's pretrained weights through timm
            (needs the network or a warm cache).
        checkpoint (str, optional): State-dict file for a timm model name.
        tau (float): Attention mass kept, in ``(0, 1]``. Default 0.6.
        input_mean, input_std (sequence of float): Normalisation of the inputs
            (OpenAI CLIP by default).
        image_size (int, optional): Side of the square DINO input; must be a
            multiple of the patch size. ``None``: the model's native size.
        resample (str): ``"bilinear"`` or ``"nearest"``, see above.
        blocks (sequence of int): DINO blocks whose [CLS] attention maps are
            averaged (negative indices count from the end). Default ``(-1,)``: the
            last block, as in the paper.

    Examples::

        >>> from captum_iclip.models.tiny_dino import load_tiny_dino
        >>> provider = DINOMaskProvider(load_tiny_dino("runs/tiny_dino"), tau=0.6)
        >>> mask = provider(clip_images, grid_size=(14, 14))  # (N, 196) bool
    """

    def __init__(
        self,
        model: str | nn.Module = "vit_small_patch16_224.dino",
        *,
        pretrained: bool = False,
        checkpoint: str | None = None,
        tau: float = 0.6,
        input_mean: Sequence[float] = OPENAI_DATASET_MEAN,
        input_std: Sequence[float] = OPENAI_DATASET_STD,
        image_size: int | None = None,
        resample: str = "bilinear",
        blocks: Sequence[int] = (-1,),
    ) -> None:
        super().__init__()
        if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not 0.0 < tau <= 1.0:
            raise ValueError(f"tau: expected a float in (0, 1], got {tau!r}")
        if resample not in _RESAMPLE_MODES:
            raise ValueError(f"resample: expected one of {_RESAMPLE_MODES}, got {resample!r}")
        for argument, value in (("input_mean", input_mean), ("input_std", input_std)):
            if len(value) != 3:
                raise ValueError(f"{argument}: expected 3 values (RGB), got {value!r}")
        if any(s <= 0 for s in input_std):
            raise ValueError(f"input_std: expected a positive value, got {input_std!r}")

        self.model_name = model if isinstance(model, str) else type(model).__name__
        model, dino_mean, dino_std = _resolve_dino_model(model, pretrained, checkpoint)

        patch_h, patch_w = dino_patch_size(model)
        if image_size is None:
            self.dino_size = _native_image_size(model)
        elif not isinstance(image_size, int) or image_size <= 0 or image_size % patch_h or image_size % patch_w:
            raise ValueError(
                f"image_size: expected a positive multiple of the DINO patch size {(patch_h, patch_w)}, "
                f"got {image_size!r}"
            )
        else:
            self.dino_size = (image_size, image_size)

        depth = _depth(model)
        self.blocks = tuple(_block_indices(blocks, depth)) if depth is not None else tuple(blocks)
        self.model = model.eval().requires_grad_(False)
        self.tau = float(tau)
        self.resample = resample
        # x_dino = (x_clip * s_clip + m_clip - m_dino) / s_dino = x_clip * scale + shift
        clip_mean, clip_std = torch.tensor(input_mean), torch.tensor(input_std)
        dino_mean, dino_std = torch.tensor(dino_mean), torch.tensor(dino_std)
        self.register_buffer("scale", (clip_std / dino_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((clip_mean - dino_mean) / dino_std).view(1, 3, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"model={self.model_name!r}, tau={self.tau}, dino_size={self.dino_size}, resample={self.resample!r}, "
            f"blocks={self.blocks}"
        )

    def train(self, mode: bool = True) -> DINOMaskProvider:
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def attention(self, images: Tensor) -> Tensor:
        """[CLS] attention ``A`` of CLIP-preprocessed images on the DINO patch grid.

        Args:
            images (Tensor): CLIP-preprocessed images ``(N, 3, H, W)``.

        Returns:
            Tensor: ``(N, h_d, w_d)`` float attention maps.
        """
        _check_images(images)
        x = images.float() * self.scale + self.shift
        if tuple(x.shape[-2:]) != self.dino_size:
            x = F.interpolate(x, size=self.dino_size, mode="bilinear", align_corners=False, antialias=True)
        return cls_attention(self.model, x, self.blocks).float()

    @torch.no_grad()
    def patch_features(self, images: Tensor, size: GridSize | None = None) -> PatchFeatures:
        """The DINO model's L2-normalised patch features of CLIP-preprocessed images (ProxyCLIP's proxy,
        docs/methods.md §7; :func:`~captum_iclip.masks.features.patch_features`).

        The images are converted to the DINO normalisation as for :meth:`attention`, but keep their own size
        (ProxyCLIP's reference feeds its proxies the CLIP input as it is) unless ``size`` is given.

        Args:
            images (Tensor): CLIP-preprocessed images ``(N, 3, H, W)``.
            size (tuple[int, int], optional): ``(H', W')`` to resize to first (bilinear, antialiased when
                shrinking), each a multiple of the DINO patch size; ``None`` keeps ``(H, W)``.

        Returns:
            PatchFeatures: ``(N, h_d * w_d, C)`` unit features and the DINO grid ``(h_d, w_d)``.
        """
        _check_images(images)
        x = images.float() * self.scale + self.shift
        if size is not None and tuple(size) != tuple(x.shape[-2:]):
            shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrinking)
        return patch_features(self.model, x)

    def compute_mask(self, images: Tensor, grid_size: GridSize) -> Tensor:
        return self.mask_from_attention(self.attention(images), grid_size)

    def mask_from_attention(self, attention: Tensor, grid_size: GridSize) -> Tensor:
        """The foreground of docs/methods.md §3 on ``grid_size`` from :meth:`attention` maps ``(N, h_d, w_d)``.

        Returns:
            Tensor: ``(N, h * w)`` bool masks (before the empty-mask fallback of ``forward``).
        """
        if self.resample == "bilinear":
            if tuple(attention.shape[-2:]) != tuple(grid_size):
                shrinking = grid_size[0] < attention.shape[-2] or grid_size[1] < attention.shape[-1]
                attention = F.interpolate(
                    attention[:, None], size=grid_size, mode="bilinear", align_corners=False, antialias=shrinking
                )[:, 0].clamp_min(0)
            return top_mass_mask(attention, self.tau)
        mask = top_mass_mask(attention, self.tau).view_as(attention)
        return F.interpolate(mask[:, None].float(), size=grid_size, mode="nearest")[:, 0].flatten(1) > 0.5


def dino_provider(source: object) -> DINOMaskProvider | None:
    """The :class:`DINOMaskProvider` behind a mask source: the provider itself, or the one a
    :class:`~captum_iclip.masks.CachedMaskProvider` wraps; ``None`` for any other source (fixed masks,
    callables, the oracle), which has no DINO model to give ProxyCLIP its proxy."""
    while isinstance(source, CachedMaskProvider):
        source = source.provider
    return source if isinstance(source, DINOMaskProvider) else None
