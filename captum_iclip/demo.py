"""``captum-iclip demo``: the paper's experiment in miniature, on the bundled offline models.

Fresh held-out scenes of the procedural world are explained by every method;
the maps are scored against the scenes' ground truth (SPEC §5) and drawn in one
figure. Nothing is downloaded.
"""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from captum_iclip._io import atomic_write_text
from captum_iclip.evaluation.methods import build_method
from captum_iclip.evaluation.metrics import LocalizationMetrics

DEMO_METHODS = ("raw", "surgery", "iclip", "mmp", "gradcam", "ig")
METHOD_TITLES = {
    "raw": "raw ITSM",
    "surgery": "surgery ITSM",
    "iclip": "ICLIP ITSM",
    "mmp": "masked max pooling",
    "gradcam": "LayerGradCam",
    "ig": "IntegratedGradients",
    "occlusion": "Occlusion",
}
# Demo scenes come from the held-out seed range, past the scenes the tests and eval use.
DEMO_SEED_OFFSET = 500_000


def pointing_tolerance_for(size: int) -> int:
    """SPEC §5's 15-pixel tolerance is meant for VOC-sized (~500 px) images; keep the same fraction."""
    return max(1, round(15 * size / 500))


def label_colours(label: np.ndarray) -> np.ndarray:
    """A ground-truth label map as an RGB image with the VOC colour map."""
    from captum_iclip.world.export import voc_colormap

    return voc_colormap()[label].astype(np.float32) / 255.0


def run_demo(
    out_dir: str = "captum-iclip-demo",
    *,
    model: str = "shapes-tiny",
    num_images: int = 48,
    methods: Sequence[str] = DEMO_METHODS,
    batch_size: int = 16,
    figure_rows: int = 6,
    device: str = "cpu",
    progress: bool = True,
) -> Dict[str, Path]:
    """Run the demo and write ``figure.png`` and ``metrics.{json,csv,md}`` into ``out_dir``.

    Args:
        out_dir: output folder (created).
        model: bundled model name.
        num_images: held-out scenes to evaluate.
        methods: method names (see :mod:`captum_iclip.evaluation.methods`).
        batch_size: images per batch.
        figure_rows: scenes drawn in the figure.
        device: torch device.
        progress: show a progress bar.

    Returns:
        The written paths by kind.
    """
    from captum_iclip import CLIPSimilarity, zoo
    from captum_iclip.viz import attribution_grid
    from captum_iclip.world import HELDOUT_SEED_START, generate_scene

    if num_images < 1:
        raise ValueError(f"num_images: expected at least 1, got {num_images}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundle = zoo.load(model, device=device)
    sim = CLIPSimilarity(bundle.dual, bundle.tokenizer, bundle.prompts).to(device)
    runners = {name: build_method(name, sim, mask_provider=bundle.mask_provider) for name in methods}
    size = bundle.image_size
    tolerance = pointing_tolerance_for(size)
    num_classes = len(bundle.class_names)
    metrics = {name: LocalizationMetrics(num_classes, pointing_tolerance=tolerance) for name in methods}
    seconds = {name: 0.0 for name in methods}
    correct, chance = 0, 0.0
    figure_cells: List[List] = []
    figure_images: List[np.ndarray] = []
    figure_titles: List[str] = []

    seeds = [HELDOUT_SEED_START + DEMO_SEED_OFFSET + i for i in range(num_images)]
    bar = tqdm(total=num_images * len(methods), desc="demo", unit="map-set", disable=not progress)
    for start in range(0, num_images, batch_size):
        scenes = [generate_scene(seed, size=size) for seed in seeds[start:start + batch_size]]
        images = torch.stack([bundle.preprocess(scene.image) for scene in scenes]).to(device)
        present = [sorted(int(c) for c in np.unique(s.label) if c not in (0, 255)) for s in scenes]
        # Zero-shot: does the top prompt name an object in the scene? Prompt k is class k + 1.
        with torch.no_grad():
            top = sim(images).argmax(dim=-1).tolist()
        correct += sum(int(t + 1 in classes) for t, classes in zip(top, present))
        chance += sum(len(classes) / sim.num_prompts for classes in present)

        # One (image, class) pair per object class present: repeat the image for each.
        pair_image = torch.tensor([i for i, classes in enumerate(present) for _ in classes])
        pair_class = torch.tensor([c for classes in present for c in classes])
        batch_maps = {}
        for name, run in runners.items():
            began = time.perf_counter()
            maps = run(images[pair_image], pair_class - 1).detach().float().cpu()
            seconds[name] += time.perf_counter() - began
            batch_maps[name] = maps
            for i, scene in enumerate(scenes):
                rows = (pair_image == i).nonzero().flatten()
                if len(rows):
                    metrics[name].update(maps[rows, 0], pair_class[rows], torch.from_numpy(scene.label.astype(np.int64)))
            bar.update(len(scenes))
        for i, scene in enumerate(scenes):
            if len(figure_images) >= figure_rows or not present[i]:
                continue
            row = int((pair_image == i).nonzero()[0])
            target_class = int(pair_class[row])
            figure_images.append(scene.image)
            figure_cells.append([label_colours(scene.label)] + [batch_maps[name][row] for name in methods])
            figure_titles.append(bundle.class_names[target_class])
    bar.close()

    table = []
    for name in methods:
        result = metrics[name].compute()
        table.append({
            "method": name,
            "title": METHOD_TITLES.get(name, name),
            "miou": round(result["miou"], 2),
            "msc": round(result["msc"], 2),
            "pointing": round(result["pointing"], 2),
            "pairs": result["pairs"],
            "seconds_per_image": round(seconds[name] / num_images, 4),
        })
    summary = {
        "model": model,
        "num_images": num_images,
        "image_size": size,
        "pointing_tolerance_px": tolerance,
        "zero_shot_top1_names_present_object": round(100.0 * correct / num_images, 2),
        "zero_shot_chance": round(100.0 * chance / num_images, 2),
        "methods": table,
    }
    paths = {
        "figure": out / "figure.png",
        "json": out / "metrics.json",
        "csv": out / "metrics.csv",
        "markdown": out / "metrics.md",
    }
    attribution_grid(
        figure_images,
        figure_cells,
        column_titles=["ground truth"] + [METHOD_TITLES.get(m, m) for m in methods],
        row_titles=figure_titles,
        path=str(paths["figure"]),
    )
    atomic_write_text(paths["json"], json.dumps(summary, indent=2) + "\n")
    atomic_write_text(paths["csv"], _csv(table))
    atomic_write_text(paths["markdown"], markdown_table(table, summary))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return paths


def _csv(table: List[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()


def markdown_table(table: List[dict], summary: Optional[dict] = None) -> str:
    lines = ["| method | mIoU ↑ | mSC ↑ | pointing ↑ | s / image |", "|---|---:|---:|---:|---:|"]
    for row in table:
        lines.append(f"| {row['title']} | {row['miou']:.1f} | {row['msc']:.1f} | {row['pointing']:.1f} | {row['seconds_per_image']:.3f} |")
    if summary is not None:
        lines.append("")
        lines.append(
            f"{summary['num_images']} held-out scenes at {summary['image_size']} px, model {summary['model']}; "
            f"zero-shot top-1 names an object in the scene: {summary['zero_shot_top1_names_present_object']:.1f}% "
            f"(chance {summary['zero_shot_chance']:.1f}%); pointing tolerance {summary['pointing_tolerance_px']} px."
        )
    return "\n".join(lines) + "\n"
