"""Attribution methods (one class per method)."""

from captum_iclip.attr.chefer import CheferRelevancy
from captum_iclip.attr.gem import GEMAttribution
from captum_iclip.attr.itsm import ITSMAttribution, feature_surgery
from captum_iclip.attr.legrad import LeGradAttribution
from captum_iclip.attr.mmp import MaskedMaxPoolingAttribution
from captum_iclip.attr.segments import ImageSegments, SegmentAttribution

__all__ = [
    "CheferRelevancy",
    "GEMAttribution",
    "ITSMAttribution",
    "ImageSegments",
    "LeGradAttribution",
    "MaskedMaxPoolingAttribution",
    "SegmentAttribution",
    "feature_surgery",
]
