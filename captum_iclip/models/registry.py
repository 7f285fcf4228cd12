"""Which dense adapter a CLIP model gets: every family's module, and the dispatch by the model's type.

:func:`~captum_iclip.models.get_adapter` adds the :class:`~captum_iclip.DualProjectionCLIP` wrapper on top
(its module needs this one, so the wrapper's case cannot live here without a cycle).
"""

from __future__ import annotations

from torch import nn

from captum_iclip.models.base import VisionAdapter
from captum_iclip.models.hf_clip import HFCLIPAdapter
from captum_iclip.models.hf_siglip import HFSiglip2Adapter, HFSiglipAdapter
from captum_iclip.models.open_clip_towers import OpenCLIPResNetAdapter, OpenCLIPViTAdapter
from captum_iclip.models.timm_towers import timm_tower_adapter

SUPPORTED_MODELS = (
    "open_clip CLIP/CustomTextCLIP with a VisionTransformer tower",
    "open_clip CLIP/CustomTextCLIP with a ModifiedResNet tower",
    "transformers.CLIPModel",
    "open_clip timm towers (SigLIP, SigLIP 2, EVA02, ConvNeXt, FastViT)",
    "transformers.SiglipModel",
)


def family_adapter(model: nn.Module, interpretability_head: nn.Module | None = None) -> VisionAdapter:
    """The adapter of ``model``'s family, with ``interpretability_head`` attached.

    Args:
        model: an open_clip CLIP model (ViT, ModifiedResNet or timm tower: SigLIP, EVA02, ConvNeXt, ...),
            or a Hugging Face ``CLIPModel``, ``SiglipModel`` or ``Siglip2Model``.
        interpretability_head: the patch tokens' second projection (ICLIP), or ``None``.

    Raises:
        TypeError: for any other kind of model, naming its type and the supported ones.
    """
    # The libraries' types are imported here, not at the top: open_clip alone adds about a second to
    # ``import captum_iclip``, which most uses (loading a bundled model, the commands' --help) never need.
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer
    from transformers import CLIPModel, Siglip2Model, SiglipModel

    # Siglip2Model first, should it ever derive from SiglipModel.
    for model_type, adapter in (
        (Siglip2Model, HFSiglip2Adapter),
        (SiglipModel, HFSiglipAdapter),
        (CLIPModel, HFCLIPAdapter),
    ):
        if isinstance(model, model_type):
            return adapter(model, interpretability_head)
    visual = getattr(model, "visual", None)  # an open_clip model's vision tower
    if visual is None:
        raise TypeError(
            f"model: expected one of {', '.join(SUPPORTED_MODELS)}, got the model type "
            f"{type(model).__module__}.{type(model).__name__}"
        )
    for tower_type, adapter in (
        (TimmModel, timm_tower_adapter),
        (VisionTransformer, OpenCLIPViTAdapter),
        (ModifiedResNet, OpenCLIPResNetAdapter),
    ):
        if isinstance(visual, tower_type):
            return adapter(model, interpretability_head)
    raise TypeError(
        f"model: expected one of {', '.join(SUPPORTED_MODELS)}, got the vision tower "
        f"{type(visual).__module__}.{type(visual).__name__}"
    )
