"""``captum-iclip demo``: the paper's experiment in miniature, on the bundled offline models.

The demo is :func:`~captum_iclip.evaluation.run.evaluate` (task ``localization``, and
task ``faithfulness`` with the deletion and insertion curves on
:data:`DEMO_FAITHFULNESS_SAMPLES` evenly spaced scenes) on fresh held-out scenes
of the procedural world (:class:`~captum_iclip.datasets.WorldScenes`, generated in
memory), plus one figure of its example maps: the same evaluation loop, metrics
(docs/methods.md §5 and §5.1) and result writers as ``captum-iclip eval``. Nothing is
downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from captum_iclip.evaluation.methods import method_title

DEMO_METHODS = ("raw", "surgery", "iclip", "mmp", "gradcam", "ig")
DEMO_BOOTSTRAP = 1000  # resamples of the 95 % intervals over scenes
DEMO_FAITHFULNESS_SAMPLES = 16  # scenes of the deletion / insertion curves (evenly spaced over the demo's)


def pointing_tolerance_for(size: int) -> int:
    """The pointing game's 15-pixel tolerance is meant for VOC-sized (~500 px) images; keep the same fraction."""
    return max(1, round(15 * size / 500))


def run_demo(
    out_dir: str = "captum-iclip-demo",
    *,
    model: str = "shapes-tiny",
    num_images: int = 200,
    methods: Sequence[str] = DEMO_METHODS,
    batch_size: int = 16,
    figure_rows: int = 6,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Path]:
    """Run the demo and write ``figure.png`` and ``metrics.{json,csv,md}`` into ``out_dir``.

    Args:
        out_dir: output folder (created).
        model: bundled model name.
        num_images: held-out scenes to evaluate.
        methods: method names of the registry (:mod:`captum_iclip.evaluation.methods`).
        batch_size: images per batch.
        figure_rows: scenes drawn in the figure.
        device: torch device.
        progress: show a progress bar.

    Returns:
        The written paths by kind.
    """
    from captum_iclip.datasets import WorldScenes
    from captum_iclip.evaluation.config import EvalConfig
    from captum_iclip.evaluation.report import write_results
    from captum_iclip.evaluation.run import class_prompts, run_evaluation
    from captum_iclip.loading.loader import load
    from captum_iclip.similarity import CLIPSimilarity
    from captum_iclip.world import SEED_RANGES

    if num_images < 1:
        raise ValueError(f"num_images: expected at least 1, got {num_images}")
    loaded = load(model, device=device)
    first_seed = SEED_RANGES["demo"]
    dataset = WorldScenes(first_seed, limit=num_images, size=loaded.image_size)
    prompts = class_prompts(dataset, loaded.bundle)
    sim = CLIPSimilarity(loaded.model, loaded.tokenizer, prompts, templates=loaded.templates).to(device)
    config = EvalConfig(
        "world",
        str(first_seed),
        methods=methods,
        tasks=("localization", "faithfulness"),
        faithfulness_metrics=("deletion", "insertion"),
        faithfulness_samples=DEMO_FAITHFULNESS_SAMPLES,
        batch_size=batch_size,
        pointing_tolerance=pointing_tolerance_for(loaded.image_size),
        examples=figure_rows,
        bootstrap=DEMO_BOOTSTRAP,
        out=None,
        progress=progress,
    )
    results, examples, _ = run_evaluation(
        config, sim, dataset=dataset, mask_provider=loaded.mask_provider, model_name=loaded.name
    )
    results["zero_shot"] = zero_shot_names_an_object(sim, dataset, batch_size)
    results["notes"] = [
        f"95 % bootstrap intervals over the {len(dataset)} scenes ({DEMO_BOOTSTRAP} resamples) in brackets.",
        f"Zero-shot on these scenes: the top prompt names an object of the scene in "
        f"{results['zero_shot']['accuracy']:.1f}% of them (chance {results['zero_shot']['chance']:.1f}%).",
        *recognition_notes(loaded.bundle.info if loaded.bundle is not None else {}),
    ]
    paths = write_results(results, out_dir, dataset=dataset, stem="metrics")
    paths["figure"] = Path(out_dir) / "figure.png"
    _draw_figure(examples, dataset.class_names, list(methods), paths["figure"])
    for kind in ("figure", "chart", "json", "csv", "markdown"):
        print(f"{kind}: {paths[kind]}")
    print()
    print(paths["markdown"].read_text(encoding="utf-8"), end="")  # the table itself, as the README shows it
    return paths


def recognition_notes(info: dict) -> list[str]:
    """Lines on the bundle's recorded recognition and mask quality (held-out ``report`` scenes)."""
    recognition, masks = info.get("recognition"), info.get("dino_masks")
    lines = []
    if recognition:
        recalls = ", ".join(f"{name} {value:.0f}" for name, value in recognition["per_class_recall"].items())
        lines += [
            f"Recognition ({recognition['scenes']} held-out scenes): top-1 names an object of the scene in "
            f"{recognition['top1_any']:.1f}% (chance {recognition['chance']:.1f}%); single-object scenes "
            f"{recognition['single_object']:.1f}%; per-class recall on them: {recalls}.",
        ]
    if masks:
        lines.append(
            f"DINO masks ({masks['scenes']} held-out scenes): IoU with the object patches {masks['dino_iou']:.1f}% "
            f"(centre box {masks['centre_box_iou']:.1f}%, every patch {masks['all_patches_iou']:.1f}%)."
        )
    return lines


def zero_shot_names_an_object(sim, dataset, batch_size: int) -> dict[str, float]:
    """How often the best foreground prompt names an object present in the scene, and the chance level.

    The background prompt is left out: the question is whether the model recognises
    one of the scene's objects. Chance: the share of foreground classes present.
    """
    from captum_iclip.preprocess import to_model_input

    adapter = sim.adapter
    mean = torch.tensor(adapter.image_mean).reshape(3, 1, 1)
    std = torch.tensor(adapter.image_std).reshape(3, 1, 1)
    foreground = dataset.foreground_classes
    correct, chance = 0, 0.0
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        size = (dataset.size, dataset.size)
        images = torch.stack([to_model_input(image, size, mean, std) for image, _, _ in items])
        with torch.no_grad():
            scores = sim(images.to(adapter.parameter.device, adapter.parameter.dtype))[:, foreground]
        for best, (_, label, _) in zip(scores.argmax(dim=-1).tolist(), items):
            present = {int(c) for c in label.flatten().tolist()} & set(foreground)
            correct += int(foreground[best] in present)
            chance += len(present) / len(foreground)
    return {"accuracy": 100.0 * correct / len(dataset), "chance": 100.0 * chance / len(dataset)}


def _draw_figure(examples: list[dict], class_names: list[str], methods: list[str], path: Path) -> None:
    """One row per example scene: the image, its ground truth and every method's map of its largest object."""
    from captum_iclip.viz import attribution_grid, label_colours

    attribution_grid(
        [example["image"] for example in examples],
        [[label_colours(example["label"])] + [example["maps"][name] for name in methods] for example in examples],
        column_titles=["ground truth (target outlined)"] + [method_title(name) for name in methods],
        row_titles=[class_names[example["class"]] for example in examples],
        target_masks=[example["label"] == example["class"] for example in examples],
        path=str(path),
    )
