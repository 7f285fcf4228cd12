"""The runtime loader: CLIP models and mask sources by the names users know, and the bundled offline models.

:mod:`~captum_iclip.loading.loader` holds :func:`load` (every model family), :func:`mask_source` and
:class:`LoadedCLIP`; :mod:`~captum_iclip.loading.bundled` the bundled models (``shapes-tiny``). This package
depends on :mod:`captum_iclip.models` and :mod:`captum_iclip.masks`, never the reverse; the research scripts
that train and select the bundled models are :mod:`captum_iclip.zoo`.
"""

from captum_iclip.loading.loader import LoadedCLIP, WeightsUnavailableError, load, mask_source

__all__ = ["LoadedCLIP", "WeightsUnavailableError", "load", "mask_source"]
