"""captum-iclip: Captum attributions that show where CLIP models see a text in an image."""
from captum_iclip.attr.itsm import ITSMAttribution
from captum_iclip.models.adapters import get_adapter
from captum_iclip.similarity import CLIPSimilarity

__version__ = "0.1.0"

__all__ = [
    "CLIPSimilarity",
    "ITSMAttribution",
    "get_adapter",
]
