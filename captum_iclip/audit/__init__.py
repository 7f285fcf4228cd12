"""Audit reports: where a CLIP model looks, for a whole folder of images, as one static page.

``captum-iclip audit --images DIR --prompts "a,b,c" --out report/`` (or
:func:`audit` from Python) scores every image against the prompts, draws the
maps of each image's top prompts with several methods (raw / surgery / ICLIP
ITSM, masked max pooling, ...), flags images the model is unsure about or
whose maps fall on the background, and writes ``report/index.html``: one
self-contained file (inline CSS, no script) with its PNGs beside it, which a
reviewer opens without Python. Runs are resumable (one JSON record per image).

Modules: :mod:`~captum_iclip.audit.run` (the computation),
:mod:`~captum_iclip.audit.records` (keys, records, the background measure),
:mod:`~captum_iclip.audit.report` (the page); the command line is
:mod:`captum_iclip.cli.audit`.
"""

from captum_iclip.audit.records import background_fraction, find_images
from captum_iclip.audit.run import DEFAULT_METHODS, AuditSummary, audit

__all__ = ["DEFAULT_METHODS", "AuditSummary", "audit", "background_fraction", "find_images"]
