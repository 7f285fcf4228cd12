"""Model adapters: dense features of CLIP vision towers, loading, dual projections."""

from captum_iclip.models.adapters import VisionAdapter, get_adapter

__all__ = ["VisionAdapter", "get_adapter"]
