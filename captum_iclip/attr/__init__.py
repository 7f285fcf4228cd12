"""Attribution methods (one class per method)."""

from captum_iclip.attr.chefer import CheferRelevancy
from captum_iclip.attr.gem import GEMAttribution
from captum_iclip.attr.itsm import ITSMAttribution, feature_surgery
from captum_iclip.attr.legrad import LeGradAttribution
from captum_iclip.attr.mmp import MaskedMaxPoolingAttribution

__all__ = [
    "CheferRelevancy",
    "GEMAttribution",
    "ITSMAttribution",
    "LeGradAttribution",
    "MaskedMaxPoolingAttribution",
    "feature_surgery",
]
