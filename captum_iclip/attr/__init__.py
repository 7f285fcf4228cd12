"""Attribution methods (one class per method)."""

from captum_iclip.attr.chefer import CheferRelevancy
from captum_iclip.attr.gem import GEMAttribution
from captum_iclip.attr.gradeclip import GradECLIPAttribution
from captum_iclip.attr.itsm import ITSMAttribution, feature_surgery
from captum_iclip.attr.legrad import LeGradAttribution
from captum_iclip.attr.mmp import MaskedMaxPoolingAttribution
from captum_iclip.attr.text import TEXT_METHODS, TextRelevance, TextSimilarity, explain_text

__all__ = [
    "CheferRelevancy",
    "GEMAttribution",
    "GradECLIPAttribution",
    "ITSMAttribution",
    "LeGradAttribution",
    "MaskedMaxPoolingAttribution",
    "TEXT_METHODS",
    "TextRelevance",
    "TextSimilarity",
    "explain_text",
    "feature_surgery",
]
