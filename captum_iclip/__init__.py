"""captum-iclip: Captum attributions that show where CLIP models see a text in an image."""

from captum_iclip.attr.chefer import CheferRelevancy
from captum_iclip.attr.gem import GEMAttribution
from captum_iclip.attr.gradeclip import GradECLIPAttribution
from captum_iclip.attr.itsm import ITSMAttribution
from captum_iclip.attr.legrad import LeGradAttribution
from captum_iclip.attr.m2ib import M2IBAttribution
from captum_iclip.attr.mmp import MaskedMaxPoolingAttribution
from captum_iclip.attr.proxyclip import ProxyCLIPAttribution
from captum_iclip.attr.segments import ImageSegments, SegmentAttribution
from captum_iclip.attr.text import TextRelevance, TextSimilarity, explain_text
from captum_iclip.loading.loader import LoadedCLIP, load, mask_source
from captum_iclip.models import get_adapter
from captum_iclip.models.dual import DualProjectionCLIP
from captum_iclip.pooling import MaskedMaxPooling
from captum_iclip.similarity import CLIPSimilarity

__version__ = "0.1.0"

__all__ = [
    "CLIPSimilarity",
    "CheferRelevancy",
    "DualProjectionCLIP",
    "GEMAttribution",
    "GradECLIPAttribution",
    "ITSMAttribution",
    "ImageSegments",
    "LeGradAttribution",
    "LoadedCLIP",
    "M2IBAttribution",
    "MaskedMaxPooling",
    "MaskedMaxPoolingAttribution",
    "ProxyCLIPAttribution",
    "SegmentAttribution",
    "TextRelevance",
    "TextSimilarity",
    "explain_text",
    "get_adapter",
    "load",
    "mask_source",
]
