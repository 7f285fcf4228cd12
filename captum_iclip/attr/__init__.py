"""Attribution methods (one class per method)."""

from captum_iclip.attr.itsm import ITSMAttribution, feature_surgery
from captum_iclip.attr.mmp import MaskedMaxPoolingAttribution

__all__ = ["ITSMAttribution", "MaskedMaxPoolingAttribution", "feature_surgery"]
