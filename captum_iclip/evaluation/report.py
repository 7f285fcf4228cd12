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
                "localization_seconds_per_image": entry["timing"]["localization_seconds_per_image"],
            }
        )
    return rows


MARKDOWN_COLUMNS = (
    # (task, header, CSV column, digits)
    ("localization", "mIoU ↑", "miou", 1),
    ("localization", "mSC ↑", "msc", 1),
    ("localization", "pointing ↑", "pointing", 1),
    ("segmentation", "seg. mIoU ↑", "segmentation_miou", 1),
    ("faithfulness", "infidelity ↓", "infidelity", 4),
    ("faithfulness", "sensitivity ↓", "sensitivity", 4),
    ("localization", "s / image", "localization_seconds_per_image", 3),
)
"""The columns of ``results.md``; a column shows when its task was run."""


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
    columns = [column for column in MARKDOWN_COLUMNS if column[0] in config["tasks"]]
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
    lines += results.get("notes", [])
    return "\n".join(lines) + "\n"


CHART_UNITS = {
    "mIoU": "explanation mIoU, % (higher is better)",
    "mSC": "mean score contrast, percentage points (higher is better)",
    "pointing": "pointing game hits, % (higher is better)",
}
"""The axis labels of the chart: what each figure measures, its unit, which way is better."""


def chart_title(results: dict) -> str:
    """The chart's title: what was evaluated, and what the dots and bars are."""
    data = results["dataset"]
    return (
        f"Localization on {data['num_images']} images of {data['name']}, model {results['model'] or 'in-process'}: "
        "dot = mean, bar = 95 % bootstrap interval"
    )


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
    """The localization figures of each method for :func:`~captum_iclip.viz.metrics_chart`."""
    figures = (("mIoU", "miou"), ("mSC", "msc"), ("pointing", "pointing"))
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
    """Write ``{stem}.{json,csv,md}``, the chart ``{stem}.png`` of the localization figures with their
    intervals (when localization ran), and the example overlays into ``out``, atomically.

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
    if "localization" in results["config"]["tasks"]:
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
