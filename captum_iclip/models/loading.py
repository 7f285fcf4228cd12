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


def check_device(device: "str | torch.device", argument: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` that this machine has, else a ``ValueError`` naming ``argument``.

    Examples::

        >>> check_device("cpu")
        device(type='cpu')
    """
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{argument}: expected a torch device such as 'cpu' or 'cuda:0', got {device!r}") from error
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{argument}: {device!r} needs a CUDA GPU, and torch sees none on this machine; "
                             "use --device cpu")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise ValueError(f"{argument}: {device!r} does not exist; this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif target.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{argument}: 'mps' is not available on this machine; use --device cpu")
    elif target.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{argument}: expected 'cpu', 'cuda' or 'mps', got {device!r}")
    return target


def check_model_options(model_name: Optional[str], pretrained: Optional[str], checkpoint: Optional[str],
                        hf_model: Optional[str]) -> None:
    """Refuse model options that contradict each other or would be ignored (a ``ValueError`` naming one).

    ``pretrained`` and ``checkpoint`` need an open_clip ``model_name`` (without one the bundled model
    would run, and the weights the user asked for would be ignored); a bundled model has its own
    weights; ``hf_model`` loads its own model and weights.
    """
    given = next((name for name, value in (("pretrained", pretrained), ("checkpoint", checkpoint))
                  if value is not None), None)
    if hf_model is not None:
        extra = "model_name" if model_name is not None else given
        if extra is not None:
            raise ValueError(f"{extra}: cannot be combined with hf_model (--hf-model loads its own weights)")
        return
    if given is None:
        return
    if model_name is None:
        raise ValueError(f"{given}: needs model_name (--model NAME, the open_clip architecture the weights are "
                         "for); without --model the bundled model shapes-tiny is used")
    from captum_iclip import zoo

    if model_name in zoo.available():
        raise ValueError(f"{given}: the bundled model {model_name!r} has its own weights; give --model an "
                         "open_clip architecture to load other weights")


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
    random_weights: bool = False,
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
        random_weights: load an open_clip architecture with its random initialisation
            when neither ``pretrained`` nor ``checkpoint`` is given. Off by default: a
            random model explains nothing, so asking for one must be explicit.

    Returns:
        :class:`LoadedCLIP` with the model in eval mode.

    Raises:
        WeightsUnavailableError: the weights cannot be fetched (offline) or found,
            with a message saying what to download and how to pass it.
        ValueError: options that contradict each other or would be ignored (``pretrained`` or
            ``checkpoint`` without ``model_name``, or with a bundled model or ``hf_model``), an
            open_clip name without weights and without ``random_weights``, an unknown name, a
            device this machine does not have.
    """
    check_device(device)
    check_model_options(model_name, pretrained, checkpoint, hf_model)
    if hf_model is not None:
        return _load_hf(hf_model, device, image_size)
    from captum_iclip import zoo

    model_name = model_name or "shapes-tiny"
    if model_name in zoo.available():
        bundle = zoo.load(model_name, device=device)
        return LoadedCLIP(bundle.model, bundle.preprocess, bundle.tokenizer, model_name)
    return _load_open_clip(model_name, pretrained, checkpoint, device, image_size, random_weights)


def _load_open_clip(name: str, pretrained: Optional[str], checkpoint: Optional[str], device: str,
                    image_size: Optional[int], random_weights: bool) -> LoadedCLIP:
    import open_clip

    from captum_iclip import zoo

    if name not in open_clip.list_models():
        raise ValueError(f"model_name: expected an open_clip architecture (see open_clip.list_models()) or a bundled "
                         f"model {zoo.available()}, got {name!r}")
    if pretrained is not None and checkpoint is not None:
        raise ValueError("checkpoint: give either pretrained (a tag) or checkpoint (a file), not both")
    if pretrained is None and checkpoint is None and not random_weights:
        raise ValueError(f"model_name: {name!r} has no weights without pretrained (--pretrained TAG) or checkpoint "
                         "(--checkpoint FILE); pass random_weights=True (--random-weights; --from-scratch for "
                         "training) to use a randomly initialised model on purpose")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise WeightsUnavailableError(f"checkpoint: no file at {checkpoint}")
    extra = {"force_image_size": image_size} if image_size else {}
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=checkpoint or pretrained, device=device, **extra
        )
    except Exception as error:  # open_clip raises RuntimeError, UnpicklingError, KeyError, ... for a bad file
        if checkpoint is not None:
            reason = " ".join(str(error).split()) or type(error).__name__
            raise ValueError(f"checkpoint: cannot load {checkpoint} into open_clip {name!r} (corrupt, truncated or "
                             f"for another architecture): {type(error).__name__}: {reason[:300]}") from error
        if not isinstance(error, (OSError, RuntimeError, ValueError)):
            raise
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
