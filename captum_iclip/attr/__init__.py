"""Attribution methods (one class per method)."""

from captum_iclip.attr.chefer import CheferRelevancy
from captum_iclip.attr.gem import GEMAttribution
from captum_iclip.attr.gradeclip import GradECLIPAttribution
from captum_iclip.attr.itsm import ITSMAttribution, feature_surgery
from captum_iclip.attr.legrad import LeGradAttribution
from captum_iclip.attr.m2ib import M2IBAttribution
from captum_iclip.attr.mmp import MaskedMaxPoolingAttribution
from captum_iclip.attr.proxyclip import ProxyCLIPAttribution
from captum_iclip.attr.segments import ImageSegments, SegmentAttribution
from captum_iclip.attr.text import TEXT_METHODS, TextRelevance, TextSimilarity, explain_text

__all__ = [
    "CheferRelevancy",
    "GEMAttribution",
    "GradECLIPAttribution",
    "ITSMAttribution",
    "ImageSegments",
    "LeGradAttribution",
    "M2IBAttribution",
    "MaskedMaxPoolingAttribution",
    "ProxyCLIPAttribution",
    "SegmentAttribution",
    "TEXT_METHODS",
    "TextRelevance",
    "TextSimilarity",
    "explain_text",
    "feature_surgery",
]
