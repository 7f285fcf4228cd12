"""CLIP towers and their dense adapters (one module per family), dual projections, the tiny DINO ViT."""

from torch import nn

from captum_iclip.models.base import VisionAdapter
from captum_iclip.models.dual import DualProjectionCLIP
from captum_iclip.models.registry import family_adapter

__all__ = ["VisionAdapter", "get_adapter"]


def get_adapter(model: nn.Module) -> VisionAdapter:
    """Pick the dense adapter for ``model``.

    Args:
        model: an open_clip CLIP model (ViT, ModifiedResNet or timm tower: SigLIP,
            EVA02, ConvNeXt, ...), a Hugging Face ``CLIPModel`` or ``SiglipModel``, or
            a :class:`~captum_iclip.DualProjectionCLIP` wrapping one.

    Returns:
        The adapter. A ``DualProjectionCLIP`` gives its inner model's adapter with
        its interpretability head attached.

    Raises:
        TypeError: for any other kind of model, naming its type and the supported ones.
    """
    if isinstance(model, DualProjectionCLIP):
        return family_adapter(model.clip, model.interpretability_head)
    return family_adapter(model)
