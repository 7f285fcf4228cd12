"""Attribution methods (one class per method)."""
from captum_iclip.attr.itsm import ITSMAttribution, feature_surgery

__all__ = ["ITSMAttribution", "feature_surgery"]
