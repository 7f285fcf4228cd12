"""A procedural image-text world with exact segmentation ground truth.

Seeded scenes of coloured shapes over procedural backgrounds, with captions
and per-pixel labels, plus exporters to open_clip training formats (CSV and
webdataset) and to a VOC 2012-style segmentation split.
"""

from captum_iclip.world.export import export_image_text, export_voc, voc_colormap
from captum_iclip.world.generator import (
    BACKGROUNDS,
    CATEGORIES,
    COLOURS,
    CONTEXT_BIAS,
    HELDOUT_SEED_START,
    IGNORE_INDEX,
    PREFERRED_BACKGROUND,
    SEED_RANGES,
    TRAIN_SEED_START,
    Scene,
    WorldDataset,
    WorldObject,
    WorldVariant,
    caption_templates,
    class_names,
    generate_scene,
    prompt_for,
    render_background,
    render_objects,
    sample_caption,
)

__all__ = [
    "BACKGROUNDS",
    "CATEGORIES",
    "COLOURS",
    "CONTEXT_BIAS",
    "HELDOUT_SEED_START",
    "IGNORE_INDEX",
    "PREFERRED_BACKGROUND",
    "SEED_RANGES",
    "TRAIN_SEED_START",
    "Scene",
    "WorldDataset",
    "WorldObject",
    "WorldVariant",
    "caption_templates",
    "class_names",
    "export_image_text",
    "export_voc",
    "generate_scene",
    "prompt_for",
    "render_background",
    "render_objects",
    "sample_caption",
    "voc_colormap",
]
