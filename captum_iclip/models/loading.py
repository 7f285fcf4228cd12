"""Loading CLIP models by the names users know: open_clip names and pretrained tags,
Hugging Face ids or folders, checkpoint files, and the bundled zoo."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

OFFLINE_HINT = (
    "This machine could not fetch the weights. Download them where there is network access and point "
    "the command at the files: an open_clip checkpoint with --model NAME --checkpoint FILE.bin "
    "(e.g. open_clip_pytorch_model.bin from the model's Hugging Face page), or a Hugging Face model folder "
    "with --hf-model DIR (the folder written by CLIPModel.save_pretrained / huggingface-cli download). "
    "Without any of these, the bundled offline model is used (--model shapes-tiny)."
)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched or found."""


@dataclass
class LoadedCLIP:
    """A CLIP model with what is needed to use it."""

    model: nn.Module
    preprocess: Callable  # PIL image -> (3, H, W) tensor
    tokenizer: Callable
    name: str


def load_clip(
    model_name: Optional[str] = None,
    pretrained: Optional[str] = None,
    *,
    hf_model: Optional[str] = None,
    checkpoint: Optional[str] = None,
    device: str = "cpu",
    image_size: Optional[int] = None,
) -> LoadedCLIP:
    """Load a CLIP model for attribution.

    Args:
        model_name: an open_clip architecture name (``"ViT-B-16"``, ``"RN50"``, ...)
            or the name of a bundled model (``"shapes-tiny"``).
        pretrained: an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``);
            fetched through open_clip's registry and cached as open_clip caches.
        hf_model: a Hugging Face model id or a local folder with a ``CLIPModel``.
        checkpoint: a local open_clip checkpoint file for ``model_name``.
        device: where to put the model.
        image_size: resolution for the preprocessing (default: the model's own).

    Returns:
        :class:`LoadedCLIP` with the model in eval mode.

    Raises:
        WeightsUnavailableError: the weights cannot be fetched (offline) or found,
            with a message saying what to download and how to pass it.
    """
    if hf_model is not None:
        return _load_hf(hf_model, device, image_size)
    if model_name is None:
        model_name = "shapes-tiny"
    from captum_iclip import zoo

    if model_name in zoo.available():
        bundle = zoo.load(model_name, device=device)
        return LoadedCLIP(bundle.model, bundle.preprocess, bundle.tokenizer, model_name)
    return _load_open_clip(model_name, pretrained, checkpoint, device, image_size)


def _load_open_clip(name: str, pretrained: Optional[str], checkpoint: Optional[str], device: str,
                    image_size: Optional[int]) -> LoadedCLIP:
    import open_clip

    if name not in open_clip.list_models():
        raise ValueError(f"model_name: unknown open_clip model {name!r}; see open_clip.list_models()")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise WeightsUnavailableError(f"checkpoint: no file at {checkpoint}")
    extra = {"force_image_size": image_size} if image_size else {}
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=checkpoint or pretrained, device=device, **extra
        )
    except (OSError, RuntimeError, ValueError) as error:
        raise WeightsUnavailableError(
            f"could not load open_clip {name!r} with pretrained={checkpoint or pretrained!r}: {error}\n{OFFLINE_HINT}"
        ) from error
    return LoadedCLIP(model.eval(), preprocess, open_clip.get_tokenizer(name), f"{name}/{checkpoint or pretrained}")


def _load_hf(model_id: str, device: str, image_size: Optional[int]) -> LoadedCLIP:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    local = Path(model_id).is_dir()
    try:
        model = CLIPModel.from_pretrained(model_id, local_files_only=local).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=local)
        processor = CLIPImageProcessor.from_pretrained(model_id, local_files_only=local)
    except OSError as error:
        raise WeightsUnavailableError(f"could not load Hugging Face model {model_id!r}: {error}\n{OFFLINE_HINT}") from error
    size = image_size or model.config.vision_config.image_size

    def preprocess(image) -> torch.Tensor:
        out = processor(images=image, return_tensors="pt", size={"shortest_edge": size},
                        crop_size={"height": size, "width": size})
        return out["pixel_values"][0]

    return LoadedCLIP(model, preprocess, tokenizer, model_id)
