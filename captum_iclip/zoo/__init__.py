"""Research scripts behind the bundled models: their recipe (``python -m captum_iclip.zoo.train``), its
selection rules (:mod:`~captum_iclip.zoo.select`), quality figures (:mod:`~captum_iclip.zoo.quality`), the
pre-registered study (``python -m captum_iclip.zoo.study``) and ladder (``python -m captum_iclip.zoo.ladder``).

The bundled models themselves load with the runtime loader, :mod:`captum_iclip.loading.bundled`; its names are
here too, for ``captum_iclip.zoo.load("shapes-tiny")`` and for the scripts that write bundles.

Examples::

    >>> from captum_iclip import zoo, CLIPSimilarity, ITSMAttribution
    >>> bundle = zoo.load("shapes-tiny")
    >>> sim = CLIPSimilarity(bundle.dual, bundle.tokenizer, bundle.prompts, templates=bundle.templates)
"""

from captum_iclip.loading.bundled import WEIGHTS_DIR, ZooBundle, available, build_clip, load
from captum_iclip.preprocess import make_preprocess

__all__ = ["WEIGHTS_DIR", "ZooBundle", "available", "build_clip", "load", "make_preprocess"]
