"""Choose the bundle's recipe on the *selection* seed range: ``python -m captum_iclip.zoo.select``.

The rules are fixed before any candidate is measured (docs/training-notes.md):

* **CLIP**: among trained candidates (``--clip`` work folders of the ``clip`` stage),
  the highest single-object top-1 accuracy on :data:`SELECTION_SCENES` selection
  scenes, ties (within one point) going to the smaller vision tower;
* **prompt templates** (``--templates``): among :func:`template_candidates`, the
  highest top-1 (names an object of the scene) on :data:`SELECTION_SCENES`
  selection scenes, candidates within half a point going to the fewest templates;
* **mask source**: among DINO backbones (``--dino`` folders), block sets (each single
  block, the first half, the second half, all blocks) and ``tau`` values
  (:data:`TAUS`), the highest IoU with the object patches on :data:`MASK_SCENES`
  selection scenes.

The report range is never read here, so the figures the bundle records
(:func:`captum_iclip.zoo.train.bundle_figures`) stay held out.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from captum_iclip._io import json_text
from captum_iclip.models.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from captum_iclip.zoo import build_clip, make_preprocess
from captum_iclip.zoo.quality import MASK_SCENES, SELECTION_SCENES, mask_quality, recognition_report, scene_range

TAUS = (0.3, 0.4, 0.5, 0.6)


def block_sets(depth: int) -> list[tuple[int, ...]]:
    """The DINO block sets the selection compares: each block, the first half, the second half, all."""
    half = depth // 2
    return [(b,) for b in range(depth)] + [tuple(range(half)), tuple(range(half, depth)), tuple(range(depth))]


@torch.no_grad()
def clip_candidates(folders: Sequence[Path], image_size: int) -> list[dict]:
    """Recognition of each ``clip`` stage folder (``final.pt``, ``model_config.json``) on selection scenes."""
    import open_clip

    from captum_iclip import CLIPSimilarity
    from captum_iclip.models.dual import DualProjectionCLIP
    from captum_iclip.world import CATEGORIES, prompt_for

    scenes = scene_range("selection", SELECTION_SCENES, image_size)
    preprocess = make_preprocess(image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    rows = []
    for folder in folders:
        config = json.loads((folder / "model_config.json").read_text())
        dual = DualProjectionCLIP(build_clip(config)).load(folder / "final.pt").eval()
        tokenizer = open_clip.SimpleTokenizer(context_length=config["text_cfg"]["context_length"])
        sim = CLIPSimilarity(dual.clip, tokenizer, [prompt_for(c) for c in CATEGORIES]).eval()
        report = recognition_report(sim, scenes, preprocess)
        vision = config["vision_cfg"]
        rows.append(
            {
                "clip": str(folder),
                "vision_params": sum(p.numel() for p in dual.clip.visual.parameters()),
                "layers": vision["layers"],
                "width": vision["width"],
                **{k: v for k, v in report.items() if k != "confusion"},
            }
        )
    return rows


@torch.no_grad()
def mask_candidates(folders: Sequence[Path], image_size: int, grid: tuple[int, int]) -> list[dict]:
    """Mask IoU of every (DINO, block set, tau) on selection scenes."""
    from captum_iclip.masks import DINOMaskProvider
    from captum_iclip.models.tiny_dino import load_tiny_dino

    scenes = scene_range("selection", MASK_SCENES, image_size)
    preprocess = make_preprocess(image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    images = torch.stack([preprocess(s.image) for s in scenes])
    rows = []
    for folder in folders:
        dino = load_tiny_dino(folder).float().eval()
        for blocks in block_sets(len(dino.blocks)):
            provider = DINOMaskProvider(dino, input_mean=OPENAI_CLIP_MEAN, input_std=OPENAI_CLIP_STD, blocks=blocks)
            attention = provider.attention(images)  # the same for every tau: one DINO pass per block set
            for tau in TAUS:
                provider.tau = tau
                quality = mask_quality(provider, scenes, preprocess, grid, attention)
                rows.append({"dino": str(folder), "blocks": list(blocks), "tau": tau, **quality})
    return rows


def template_candidates() -> dict[str, list[str] | None]:
    """The prompt-template sets the selection compares (docs/training-notes.md)."""
    from captum_iclip.world import caption_templates

    return {"T0": None, "T1": caption_templates(), "T2": caption_templates(backgrounds=True)}


@torch.no_grad()
def template_rows(bundle_name: str) -> list[dict]:
    """Recognition of a bundle's CLIP with each template set, on selection scenes."""
    from captum_iclip import CLIPSimilarity
    from captum_iclip.zoo import load

    bundle = load(bundle_name)
    scenes = scene_range("selection", SELECTION_SCENES, bundle.image_size)
    rows = []
    for name, templates in template_candidates().items():
        sim = CLIPSimilarity(bundle.dual.clip, bundle.tokenizer, bundle.prompts, templates=templates).eval()
        report = recognition_report(sim, scenes, bundle.preprocess)
        rows.append({"name": name, "templates": templates, **{k: v for k, v in report.items() if k != "confusion"}})
    return rows


def choose_templates(rows: list[dict]) -> dict:
    """The rule of the module docstring: best top-1; within half a point, the fewest templates."""
    best = max(r["top1_any"] for r in rows)
    close = [r for r in rows if r["top1_any"] >= best - 0.5]
    return min(close, key=lambda r: len(r["templates"] or ["{}"]))


def choose_clip(rows: list[dict]) -> dict:
    """The rule of the module docstring: best single-object accuracy; within a point, the smaller tower."""
    best = max(r["single_object"] for r in rows)
    close = [r for r in rows if r["single_object"] >= best - 1.0]
    return min(close, key=lambda r: r["vision_params"])


def main(argv: Sequence[str] | None = None) -> int:
    from captum_iclip.zoo.train import IMAGE_SIZE, MODEL_CONFIG

    parser = argparse.ArgumentParser(prog="python -m captum_iclip.zoo.select", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", nargs="*", default=[], help="clip-stage folders (final.pt, model_config.json)")
    parser.add_argument("--dino", nargs="*", default=[], help="tiny-DINO folders (tiny_dino.pt, tiny_dino.json)")
    parser.add_argument("--templates", default=None, metavar="BUNDLE", help="compare prompt templates on this bundle")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    side = IMAGE_SIZE // MODEL_CONFIG["vision_cfg"]["patch_size"]
    result: dict = {}
    if args.clip:
        result["clip"] = clip_candidates([Path(f) for f in args.clip], IMAGE_SIZE)
        result["chosen_clip"] = choose_clip(result["clip"])["clip"]
    if args.templates:
        result["templates"] = template_rows(args.templates)
        result["chosen_templates"] = choose_templates(result["templates"])["name"]
    if args.dino:
        result["masks"] = mask_candidates([Path(f) for f in args.dino], IMAGE_SIZE, (side, side))
        chosen = max(result["masks"], key=lambda r: r["dino_iou"])
        result["chosen_masks"] = {k: chosen[k] for k in ("dino", "blocks", "tau", "dino_iou", "centre_box_iou")}
    text = json_text(result, indent=2)
    if args.out:
        from captum_iclip._io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    summary = {k: v for k, v in result.items() if k.startswith("chosen")}
    print(json_text(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
