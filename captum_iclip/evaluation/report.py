"""The result files of an evaluation: ``results.json``, ``results.csv``, ``results.md``, the chart
``results.png`` and example overlays.

One writer for ``captum-iclip eval`` and ``captum-iclip demo``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from captum_iclip._io import atomic_write_text, json_text
from captum_iclip.datasets import SegmentationDataset
from captum_iclip.evaluation.methods import method_colour, method_title

CSV_COLUMNS = (
    "method",
    "miou",
    "miou_low",
    "miou_high",
    "msc",
    "msc_low",
    "msc_high",
    "pointing",
    "pointing_low",
    "pointing_high",
    "pairs",
    "segmentation_miou",
    "segmentation_pixel_accuracy",
    "infidelity",
    "sensitivity",
    "deletion_auc",
    "deletion_auc_low",
    "deletion_auc_high",
    "insertion_auc",
    "insertion_auc_low",
    "insertion_auc_high",
    "confidence_drop",
    "confidence_increase",
    "road_morf",
    "road_lerf",
    "localization_seconds_per_image",
)


def _csv_rows(results: dict) -> list[dict]:
    rows = []
    for name, entry in results["methods"].items():
        segmentation, faithfulness = entry["segmentation"] or {}, entry["faithfulness"] or {}
        rows.append(
            {
                "method": name,
                **{
                    f"{key}{suffix}": value
                    for key in ("miou", "msc", "pointing")
                    for suffix, value in zip(("", "_low", "_high"), [entry[key], *entry.get(f"{key}_ci", [None, None])])
                },
                "pairs": entry["pairs"],
                "segmentation_miou": segmentation.get("miou"),
                "segmentation_pixel_accuracy": segmentation.get("pixel_accuracy"),
                "infidelity": faithfulness.get("infidelity"),
                "sensitivity": faithfulness.get("sensitivity"),
                **{
                    f"{key}{suffix}": value
                    for key in ("deletion_auc", "insertion_auc")
                    for suffix, value in zip(
                        ("", "_low", "_high"), [faithfulness.get(key), *faithfulness.get(f"{key}_ci", [None, None])]
                    )
                },
                **{
                    key: faithfulness.get(key)
                    for key in ("confidence_drop", "confidence_increase", "road_morf", "road_lerf")
                },
                "localization_seconds_per_image": entry["timing"]["localization_seconds_per_image"],
            }
        )
    return rows


MARKDOWN_COLUMNS = (
    # (task or "faithfulness/<metric>", header, CSV column, digits)
    ("localization", "mIoU ↑", "miou", 1),
    ("localization", "mSC ↑", "msc", 1),
    ("localization", "pointing ↑", "pointing", 1),
    ("segmentation", "seg. mIoU ↑", "segmentation_miou", 1),
    ("faithfulness/infidelity", "infidelity ↓", "infidelity", 4),
    ("faithfulness/sensitivity", "sensitivity ↓", "sensitivity", 4),
    ("faithfulness/deletion", "deletion AUC ↓", "deletion_auc", 3),
    ("faithfulness/insertion", "insertion AUC ↑", "insertion_auc", 3),
    ("faithfulness/confidence", "conf. drop % ↓", "confidence_drop", 1),
    ("faithfulness/confidence", "conf. increase % ↑", "confidence_increase", 1),
    ("faithfulness/road", "ROAD MoRF ↓", "road_morf", 3),
    ("faithfulness/road", "ROAD LeRF ↑", "road_lerf", 3),
    ("localization", "s / image", "localization_seconds_per_image", 3),
)
"""The columns of ``results.md``; a column shows when its task (and faithfulness metric) was run."""


def _column_shown(task: str, config: dict) -> bool:
    """Whether a column of :data:`MARKDOWN_COLUMNS` shows: its task ran, and for faithfulness its metric."""
    task, _, metric = task.partition("/")
    return task in config["tasks"] and (not metric or metric in config["faithfulness_metrics"])


def results_markdown(results: dict) -> str:
    """``results.md``: one row per method, a column per figure of the tasks run, and a line on what was evaluated.

    Args:
        results: As returned by :func:`~captum_iclip.evaluation.run.evaluate`.

    Returns:
        A Markdown table (missing entries shown as "–"), followed by ``results["notes"]`` if any.
    """

    def cell(row: dict, key: str, digits: int) -> str:
        value = row[key]
        if value is None:
            return "–"
        low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
        interval = "" if low is None or high is None else f" [{low:.{digits}f}, {high:.{digits}f}]"
        return f"{value:.{digits}f}{interval}".replace("-", "−")

    config, data = results["config"], results["dataset"]
    columns = [column for column in MARKDOWN_COLUMNS if _column_shown(column[0], config)]
    lines = ["| method | " + " | ".join(header for _, header, _, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in _csv_rows(results):
        cells = [cell(row, key, digits) for _, _, key, digits in columns]
        lines.append(f"| {method_title(row['method'])} | " + " | ".join(cells) + " |")
    if results.get("benchmark"):  # the segmentation protocol of eval --benchmark says what it ran
        lines += ["", results["benchmark"]["summary"]]
    else:
        lines += [
            "",
            f"{data['num_images']} images of {data['name']} ({data['split'] or 'default split'}), model "
            f"{results['model'] or 'given in-process'} at {results['resolution']} px, θ = {config['theta']}, "
            f"pointing tolerance {config['pointing_tolerance']} px, {results['world_size']} process(es).",
        ]
    if "localization" in config["tasks"] and timing_note(results):
        lines.append(timing_note(results))
    if "faithfulness" in config["tasks"]:
        lines.append(faithfulness_note(results))
    lines += results.get("notes", [])
    return "\n".join(lines) + "\n"


CHART_UNITS = {
    "mIoU": "explanation mIoU, % (higher is better)",
    "mSC": "mean score contrast, percentage points (higher is better)",
    "pointing": "pointing game hits, % (higher is better)",
    "deletion AUC": "target score × share of pixels removed (lower is better)",
    "insertion AUC": "target score × share of pixels inserted (higher is better)",
}
"""The axis labels of the chart: what each figure measures, its unit, which way is better."""

CHART_FIGURES = (
    # (task or "faithfulness/<metric>", chart label, CSV column)
    ("localization", "mIoU", "miou"),
    ("localization", "mSC", "msc"),
    ("localization", "pointing", "pointing"),
    ("faithfulness/deletion", "deletion AUC", "deletion_auc"),
    ("faithfulness/insertion", "insertion AUC", "insertion_auc"),
)
"""The figures of the chart; a figure shows when its task (and faithfulness metric) was run."""


def chart_title(results: dict) -> str:
    """The chart's title: what was evaluated, and what the dots and bars are."""
    data, config = results["dataset"], results["config"]
    removal = any(_column_shown(task, config) for task, _, _ in CHART_FIGURES if task.startswith("faithfulness"))
    samples = next(iter(results["methods"].values()))["faithfulness"]["samples"] if removal else 0
    if "localization" in config["tasks"]:
        what = f"Localization on {data['num_images']} images of {data['name']}"
        if removal:
            what += f", deletion / insertion on {samples} of them"
    else:
        what = f"Deletion / insertion on {samples} images of {data['name']}"
    return f"{what}, model {results['model'] or 'in-process'}: dot = mean, bar = 95 % bootstrap interval"


def faithfulness_note(results: dict) -> str:
    """What the faithfulness columns read: the sample, the score, the fills and the steps."""
    config = results["config"]
    first = next(iter(results["methods"].values()))["faithfulness"]
    metrics = config["faithfulness_metrics"]
    parts = [f"Faithfulness on {first['samples']} images, one target each (its largest class)"]
    if any(metric in metrics for metric in ("deletion", "insertion", "confidence", "road")):
        parts.append(f"removal metrics read the target's {config['faithfulness_score']}")
    for kind in ("deletion", "insertion"):
        curve = first.get(f"{kind}_curve")
        if curve:
            parts.append(
                f"{kind}: {curve['fill']} fill, {len(curve['fractions']) - 1} scored steps to "
                f"{curve['fractions'][-1]:.0%} of the pixels, AUC over the share changed"
            )
    if "road" in metrics:
        parts.append("ROAD: mean over 10 %, ..., 90 % removed by noisy linear imputation")
    return "; ".join(parts) + " (docs/methods.md §5.1)."


def timing_note(results: dict) -> str | None:
    """How the ``s / image`` column was measured (it depends on the machine and its load)."""
    timing = results.get("timing_context")
    if not timing:
        return None
    return (
        f"s / image: wall time of each method's map calls (batches of {timing['batch_size']}) divided by the images, "
        f"on {timing['device']} with {timing['torch_threads']} torch thread(s), {timing['cpus']} CPU(s) visible; "
        "it grows with other load on the machine (the README's figures: 2 idle CPU cores)."
    )


def _chart_rows(results: dict) -> list[dict]:
    """The figures of each method for :func:`~captum_iclip.viz.metrics_chart` (:data:`CHART_FIGURES`)."""
    figures = [(label, key) for task, label, key in CHART_FIGURES if _column_shown(task, results["config"])]
    return [
        {
            "title": method_title(row["method"]),
            "colour": method_colour(row["method"]),
            "figures": {label: (row[key], row[f"{key}_low"], row[f"{key}_high"]) for label, key in figures},
        }
        for row in _csv_rows(results)
    ]


def write_results(
    results: dict,
    out: str,
    examples: Sequence[dict] = (),
    dataset: SegmentationDataset | None = None,
    *,
    stem: str = "results",
) -> dict[str, Path]:
    """Write ``{stem}.{json,csv,md}``, the chart ``{stem}.png`` of the localization figures and the deletion
    and insertion AUCs with their intervals (those that ran), and the example overlays into ``out``, atomically.

    Args:
        results: As returned by :func:`~captum_iclip.evaluation.run.evaluate`.
        out: Output folder (created).
        examples: Example records (image, label, class, maps per method) to draw.
        dataset: The dataset, naming the classes of the examples.
        stem: The files' name (``"results"`` for ``eval``, ``"metrics"`` for ``demo``).

    Returns:
        The written paths by kind (``json``, ``csv``, ``markdown``, ``chart``, ``example-<index>``).
    """
    from captum_iclip.viz import attribution_grid, label_colours, metrics_chart

    folder = Path(out)
    paths = {"json": folder / f"{stem}.json", "csv": folder / f"{stem}.csv", "markdown": folder / f"{stem}.md"}
    atomic_write_text(paths["json"], json_text(results, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(_csv_rows(results))
    atomic_write_text(paths["csv"], buffer.getvalue())
    atomic_write_text(paths["markdown"], results_markdown(results))
    if any(_column_shown(task, results["config"]) for task, _, _ in CHART_FIGURES):
        paths["chart"] = folder / f"{stem}.png"
        metrics_chart(_chart_rows(results), title=chart_title(results), units=CHART_UNITS, path=str(paths["chart"]))
    for example in examples:
        methods = list(example["maps"])
        class_name = dataset.class_names[example["class"]] if dataset is not None else str(example["class"])
        path = folder / "examples" / f"{example['index']:06d}.png"
        attribution_grid(
            [example["image"]],
            [[label_colours(example["label"])] + [example["maps"][name] for name in methods]],
            column_titles=["ground truth (target outlined)"] + [method_title(name) for name in methods],
            row_titles=[class_name],
            target_masks=[example["label"] == example["class"]],
            path=str(path),
        )
        paths[f"example-{example['index']}"] = path
    return paths
