"""The audit page: one static, self-contained HTML file built from the records.

No script, no external stylesheet, font or CDN: the CSS is inline and the
images are relative links into ``images/``, so the folder opens the same from
``file://``, over HTTP, or zipped and mailed. Every user string (file names,
paths, prompts, error messages) goes through :func:`html.escape`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any
from urllib.parse import quote

import numpy as np

from captum_iclip.attr.text import TEXT_METHOD_TITLES, colour_legend

# Cards after this many load lazily, so that a report of thousands of images opens quickly.
EAGER_CARDS = 24

CSS = """
:root { --ink:#1f2328; --muted:#59636e; --line:#d1d9e0; --page:#f6f8fa; --card:#fff; --accent:#0969da;
  --warn:#7d4e00; --warn-bg:#fff1c2; --bad:#b3261e; --bad-bg:#ffe4e1; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--page); color: var(--ink);
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Liberation Sans", "DejaVu Sans", sans-serif; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
a.file { display: inline-block; min-width: 120px; }
header.top { background: var(--card); border-bottom: 1px solid var(--line); padding: 20px 0 12px; }
.wrap { max-width: 1240px; margin: 0 auto; padding: 0 28px; }
h1 { font-size: 22px; margin: 0; } h1 small { color: var(--muted); font-weight: normal; font-size: 15px; }
h2 { font-size: 18px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 0; word-break: break-all; }
nav { margin-top: 10px; display: flex; gap: 18px; flex-wrap: wrap; }
.stats { display: flex; gap: 12px; flex-wrap: wrap; margin: 14px 0 4px; }
.stat { background: var(--page); border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; min-width: 130px; }
.stat b { display: block; font-size: 20px; } .stat span { color: var(--muted); font-size: 12px; }
.stat.warn { background: var(--warn-bg); } .stat.bad { background: var(--bad-bg); }
.warning { background: var(--warn-bg); color: var(--warn); border-radius: 6px; padding: 8px 12px; margin: 12px 0; max-width: 900px; }
p.note { color: var(--muted); margin: 6px 0 12px; max-width: 900px; }
table.grid { border-collapse: collapse; background: var(--card); border: 1px solid var(--line); }
table.grid th, table.grid td { padding: 6px 12px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
table.grid th { background: var(--page); font-weight: 600; font-size: 13px; }
table.grid th.group { text-align: center; border-left: 1px solid var(--line); }
.legend { display: inline-block; width: 120px; height: 10px; border-radius: 2px; vertical-align: middle; margin: 0 4px; }
table.grid td.num, table.grid th.num { text-align: right; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; border-radius: 10px; padding: 0 9px; font-size: 12px; font-weight: 600; white-space: nowrap; }
.badge.warn { background: var(--warn-bg); color: var(--warn); } .badge.bad { background: var(--bad-bg); color: var(--bad); }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; margin: 14px 0; padding: 12px 16px; }
.card.flagged { border-left: 4px solid var(--bad); }
.card-head { display: flex; gap: 10px; align-items: baseline; flex-wrap: wrap; }
.source { color: var(--muted); font-size: 12px; word-break: break-all; }
.card-body { display: flex; gap: 18px; align-items: flex-start; margin-top: 10px; flex-wrap: wrap; }
figure { margin: 0; text-align: center; }
figcaption { font-size: 12px; color: var(--muted); }
img.input { width: 144px; height: auto; border-radius: 4px; border: 1px solid var(--line); }
img.map { width: 112px; height: auto; border-radius: 4px; border: 2px solid transparent; display: block; margin: 0 auto; }
img.upscaled { image-rendering: pixelated; }
figure.outside img.map { border-color: var(--bad); } figure.outside figcaption { color: var(--bad); font-weight: 600; }
table.maps { border-collapse: collapse; }
table.maps th { font-size: 12px; color: var(--muted); font-weight: 600; padding: 0 6px 4px; text-align: center; }
table.maps td { padding: 4px 6px; vertical-align: middle; }
td.prompt { min-width: 170px; max-width: 240px; }
.prompt-text { word-break: break-word; } .rank { color: var(--muted); font-size: 12px; }
.bar { background: #e6eaef; border-radius: 3px; height: 6px; margin: 4px 0 2px; }
.bar span { display: block; height: 6px; border-radius: 3px; background: var(--accent); }
.prob { font-size: 12px; font-variant-numeric: tabular-nums; }
.words { margin-top: 4px; line-height: 1.9; } .words span { border-radius: 3px; padding: 1px 3px; margin-right: 2px; }
footer { color: var(--muted); font-size: 12px; padding: 24px 0 40px; }
""".strip()


@dataclass
class ReportContext:
    """What the page says about the run, beside the records."""

    prompts: list[str]
    methods: list[str]
    top_k: int
    model_name: str
    has_masks: bool
    low_confidence: float
    background_threshold: float
    settings: str
    generated: str
    versions: dict[str, str] = field(default_factory=dict)
    foreign_records: int = 0
    warnings: list[str] = field(default_factory=list)  # what the command says about the model and prompts
    skipped: list[str] = field(default_factory=list)  # files in the searched folders that are not images
    text_method: str | None = None  # how the records' words were explained (None: no words)


def method_title(name: str) -> str:
    from captum_iclip.evaluation.methods import method_title as registered_title

    return registered_title(name)


def _pct(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.0f}%"


def _anchor(record: dict[str, Any]) -> str:
    return f"img-{record['key']}"


def _src(path: str) -> str:
    return escape(quote(path), quote=True)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def flags_of(record: dict[str, Any], context: ReportContext) -> dict[str, Any]:
    """The flags of one audited image.

    Returns:
        ``{"low_confidence": bool, "background": {method: fraction outside}}``;
        the background flag looks at the top-1 prompt's maps only (the model's
        answer) and is empty without masks.
    """
    best = record["top"][0]
    background = {}
    for name, cell in best["maps"].items():
        fraction = cell.get("background_fraction")
        if fraction is not None and fraction > context.background_threshold:
            background[name] = fraction
    return {"low_confidence": best["probability"] < context.low_confidence, "background": background}


def render_report(records: Sequence[dict[str, Any]], context: ReportContext) -> str:
    """The HTML page of an audit.

    Args:
        records: the per-image records (``status`` ``"ok"`` or ``"error"``).
        context: the run's settings and metadata.

    Returns:
        The page as a string (UTF-8 HTML5).
    """
    audited = [r for r in records if r["status"] == "ok"]
    broken = [r for r in records if r["status"] != "ok"]
    flags = {r["key"]: flags_of(r, context) for r in audited}
    num_low = sum(f["low_confidence"] for f in flags.values())
    num_background = sum(bool(f["background"]) for f in flags.values())
    stats = [
        (len(audited), "images audited", ""),
        (num_low, "low confidence", "warn" if num_low else ""),
        (num_background if context.has_masks else "—", "look at the background", "bad" if num_background else ""),
        (len(broken), "unreadable files", "bad" if broken else ""),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request (a 404 over HTTP)
        f"<title>Audit report — {escape(context.model_name)}</title>",
        f"<style>\n{CSS}\n</style></head><body>",
        '<header class="top"><div class="wrap">',
        f"<h1>captum-iclip audit <small>{escape(context.model_name)} · {len(context.prompts)} prompts · "
        f"{escape(', '.join(method_title(m) for m in context.methods))}</small></h1>",
        '<div class="stats">'
        + "".join(f'<div class="stat {kind}"><b>{value}</b><span>{label}</span></div>' for value, label, kind in stats)
        + "</div>",
        '<nav><a href="#prompts">Prompts</a><a href="#flagged">Flagged cases</a>'
        '<a href="#unreadable">Unreadable files</a><a href="#images">Images</a><a href="#run">About this run</a></nav>',
        '</div></header><main class="wrap">',
        "".join(f'<p class="warning">{escape(message)}</p>' for message in context.warnings),
        _prompt_section(audited, context),
        _flag_section(audited, flags, context),
        _broken_section(broken, context.skipped),
        _image_section(audited, flags, context),
        _run_section(context),
        "</main>",
        f'<footer class="wrap">Generated by captum-iclip {escape(context.versions.get("captum-iclip", ""))} '
        f"on {escape(context.generated)}.</footer>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _prompt_section(audited: Sequence[dict[str, Any]], context: ReportContext) -> str:
    num_prompts = len(context.prompts)
    top1 = [0] * num_prompts
    prob_sums = [0.0] * num_prompts
    inside: dict[tuple, list[float]] = {}
    for record in audited:
        top1[record["top"][0]["prompt"]] += 1
        for k, p in enumerate(record["probabilities"]):
            prob_sums[k] += p
        for entry in record["top"]:
            for name, cell in entry["maps"].items():
                if cell.get("background_fraction") is not None:
                    inside.setdefault((entry["prompt"], name), []).append(1.0 - cell["background_fraction"])
    if context.has_masks:
        span = len(context.methods)
        head = (
            '<tr><th rowspan="2">prompt</th><th rowspan="2" class="num">top-1 images</th>'
            f'<th rowspan="2" class="num">mean probability</th><th colspan="{span}" class="group">'
            "foreground share of the maps</th></tr><tr>"
            + "".join(f'<th class="num">{escape(method_title(m))}</th>' for m in context.methods)
            + "</tr>"
        )
    else:
        head = '<tr><th>prompt</th><th class="num">top-1 images</th><th class="num">mean probability</th></tr>'
    rows = []
    count = max(len(audited), 1)
    for k in sorted(range(num_prompts), key=lambda k: (-top1[k], -prob_sums[k])):
        cells = (
            f'<td>{escape(context.prompts[k])}</td><td class="num">{top1[k]} ({100 * top1[k] / count:.0f}%)</td>'
            f'<td class="num">{prob_sums[k] / count:.3f}</td>'
        )
        if context.has_masks:
            cells += "".join(f'<td class="num">{_pct(_mean(inside.get((k, m), [])))}</td>' for m in context.methods)
        rows.append(f"<tr>{cells}</tr>")
    mask_note = (
        "Foreground share: the mean share of a map's mass inside the DINO foreground, over the maps drawn for "
        "that prompt (it is among an image's top prompts); — where none was drawn."
        if context.has_masks
        else "No foreground mask provider was available, so the foreground share of the maps is not computed."
    )
    return (
        '<section id="prompts"><h2>Prompts</h2>'
        f'<p class="note">Top-1: how many images score this prompt highest. Mean probability: the model\'s '
        f"probability (softmax over the {num_prompts} prompts for CLIP, sigmoid per prompt for SigLIP), "
        f"averaged over all {len(audited)} audited images. "
        f"{mask_note}</p>"
        f'<table class="grid"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></section>'
    )


def _flag_section(audited: Sequence[dict[str, Any]], flags: dict[str, dict[str, Any]], context: ReportContext) -> str:
    rules = [
        f"<li><b>low confidence</b>: the top-1 probability is below {context.low_confidence:.2f}.</li>",
    ]
    if context.has_masks:
        rules.append(
            f"<li><b>looks at the background</b>: more than {100 * context.background_threshold:.0f}% of the "
            "top-1 prompt's map mass lies outside the DINO foreground, for the methods named. The mass is that of "
            "the map min-max normalised to [0, 1] (as drawn); the foreground is the mask provider's patch mask, "
            "upsampled to pixels with nearest neighbours.</li>"
        )
    else:
        rules.append(
            "<li><b>looks at the background</b>: <em>not computed</em>: no foreground mask provider (DINO) was "
            "available for this model.</li>"
        )
    rows = []
    for record in audited:
        flag = flags[record["key"]]
        best = record["top"][0]
        prompt = escape(context.prompts[best["prompt"]])
        badges, details = [], []
        if flag["low_confidence"]:
            badges.append('<span class="badge warn">low confidence</span>')
            details.append(f"top-1 “{prompt}” at p = {best['probability']:.3f}")
        if flag["background"]:
            badges.append('<span class="badge bad">looks at the background</span>')
            details.append(
                f"“{prompt}”: "
                + ", ".join(f"{escape(method_title(m))} {_pct(f)} outside" for m, f in flag["background"].items())
            )
        if badges:
            rows.append(
                f'<tr><td><a class="file" href="#{_anchor(record)}">{escape(record["name"])}</a></td>'
                f"<td>{'<br>'.join(badges)}</td><td>{'<br>'.join(details)}</td></tr>"
            )
    table = (
        '<table class="grid"><thead><tr><th>image</th><th>flag</th><th>detail</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else '<p class="note">No image was flagged.</p>'
    )
    return f'<section id="flagged"><h2>Flagged cases</h2><ul class="note">{"".join(rules)}</ul>{table}</section>'


def _broken_section(broken: Sequence[dict[str, Any]], skipped: Sequence[str] = ()) -> str:
    skipped_note = ""
    if skipped:
        from captum_iclip.audit.records import IMAGE_SUFFIXES

        items = "".join(f"<li>{escape(path)}</li>" for path in skipped)
        skipped_note = (
            f'<p class="note">{len(skipped)} file(s) in the searched folders were skipped: their names do not end '
            f'in an image suffix ({escape(", ".join(IMAGE_SUFFIXES))}).</p><ul class="skipped">{items}</ul>'
        )
    if not broken:
        return (
            '<section id="unreadable"><h2>Unreadable files</h2><p class="note">Every image file was read.</p>'
            f"{skipped_note}</section>"
        )
    rows = "".join(
        f'<tr class="broken"><td>{escape(r["source"])}</td><td>{escape(r["error"])}</td></tr>' for r in broken
    )
    return (
        '<section id="unreadable"><h2>Unreadable files</h2>'
        '<p class="note">These files could not be read or decoded as images and were not audited.</p>'
        f'<table class="grid"><thead><tr><th>file</th><th>error</th></tr></thead><tbody>{rows}</tbody></table>'
        f"{skipped_note}</section>"
    )


def _image_section(audited: Sequence[dict[str, Any]], flags: dict[str, dict[str, Any]], context: ReportContext) -> str:
    caption = "share of the map's mass outside the foreground" if context.has_masks else "no foreground masks"
    cards = [_card(record, flags[record["key"]], context, lazy=i >= EAGER_CARDS) for i, record in enumerate(audited)]
    return (
        '<section id="images"><h2>Images</h2>'
        f'<p class="note">Each image as the model sees it, its top {context.top_k} prompts by probability, and '
        f"one map per method for each, min-max normalised: low {_legend()} high. "
        f"Under each map: {caption}.{_words_note(context)}</p>"
        + ("".join(cards) or '<p class="note">No image was audited.</p>')
        + "</section>"
    )


def _words_note(context: ReportContext) -> str:
    if context.text_method is None:
        return ""
    return (
        f" Under each prompt: its words by {escape(context.text_method)}, {colour_legend(context.text_method)} "
        "(hover a word for its relevance)."
    )


def _legend(cmap: str = "jet") -> str:
    """A colour bar of ``cmap`` (the overlays' colormap, :func:`captum_iclip.viz.overlay`'s default)."""
    from matplotlib import colormaps

    stops = ", ".join(
        "#" + "".join(f"{round(255 * c):02x}" for c in rgba[:3]) for rgba in colormaps[cmap](np.linspace(0.0, 1.0, 9))
    )
    return f'<span class="legend" style="background: linear-gradient(to right, {stops})"></span>'


def _img(src: str, alt: str, css: str, width: int, height: int, display: int, lazy: bool) -> str:
    # Small model inputs are shown larger than they are: keep their pixels sharp.
    upscaled = " upscaled" if width < display else ""
    loading = ' loading="lazy"' if lazy else ""
    return (
        f'<img class="{css}{upscaled}" src="{_src(src)}" alt="{escape(alt, quote=True)}" '
        f'width="{width}" height="{height}"{loading}>'
    )


def _card(record: dict[str, Any], flag: dict[str, Any], context: ReportContext, *, lazy: bool) -> str:
    width, height = record["width"], record["height"]
    badges = ""
    if flag["low_confidence"]:
        badges += '<span class="badge warn">low confidence</span>'
    if flag["background"]:
        badges += '<span class="badge bad">looks at the background</span>'
    head = "".join(f"<th>{escape(method_title(m))}</th>" for m in context.methods)
    rows = []
    for rank, entry in enumerate(record["top"]):
        prompt = context.prompts[entry["prompt"]]
        cells = []
        for name in context.methods:
            cell = entry["maps"][name]
            fraction = cell.get("background_fraction")
            outside = rank == 0 and name in flag["background"]
            text = f"{_pct(fraction)} outside" if fraction is not None else ("—" if context.has_masks else "")
            image = _img(
                cell["overlay"],
                f"{method_title(name)} map of “{prompt}” on {record['name']}",
                "map",
                width,
                height,
                112,
                lazy,
            )
            cells.append(
                f'<td><figure class="{"outside" if outside else ""}">{image}'
                f"<figcaption>{text}</figcaption></figure></td>"
            )
        rows.append(
            f'<tr><td class="prompt"><span class="rank">#{rank + 1}</span> '
            f'<span class="prompt-text">{escape(prompt)}</span>'
            f'<div class="bar"><span style="width:{100 * entry["probability"]:.1f}%"></span></div>'
            f'<span class="prob">p = {entry["probability"]:.3f}</span>{_words(entry, context)}</td>'
            f"{''.join(cells)}</tr>"
        )
    thumbnail = _img(record["thumbnail"], f"input {record['name']}", "input", width, height, 144, lazy)
    return (
        f'<article class="card{" flagged" if flag["background"] else ""}" id="{_anchor(record)}">'
        f'<div class="card-head"><h3>{escape(record["name"])}</h3>{badges}'
        f'<span class="source">{escape(record["source"])}</span></div>'
        f'<div class="card-body"><figure>{thumbnail}<figcaption>model input, {width}×{height}</figcaption></figure>'
        f'<table class="maps"><thead><tr><th>prompt</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
        "</div></article>"
    )


def _words(entry: dict[str, Any], context: ReportContext) -> str:
    """The prompt's words coloured by their relevance for the image (:func:`captum_iclip.viz.word_colours`),
    each with its value as a tooltip; nothing for a record without words."""
    from captum_iclip.viz import word_colours

    words = entry.get("words")
    if words is None:
        return ""
    spans = "".join(
        f'<span style="background: #{"".join(f"{round(255 * c):02x}" for c in colour)}" '
        f'title="{value:+.4f}">{escape(token)}</span>'
        for token, value, colour in zip(words["tokens"], words["relevance"], word_colours(words["relevance"]))
    )
    title = escape(f"words by {context.text_method}: {colour_legend(context.text_method)}", quote=True)
    return f'<div class="words" title="{title}">{spans}</div>'


def _run_section(context: ReportContext) -> str:
    rows = [
        ("model", escape(context.model_name)),
        ("methods", escape(", ".join(f"{method_title(m)} ({m})" for m in context.methods))),
        ("prompts", str(len(context.prompts))),
        ("top-k", str(context.top_k)),
        (
            "probabilities",
            "the model's own: softmax over the prompts of logit scale × cosine (CLIP); "
            "sigmoid of logit scale × cosine + logit bias per prompt (SigLIP)",
        ),
        (
            "foreground masks",
            "yes (the model's mask provider, e.g. DINO)"
            if context.has_masks
            else "none: the background flag is not computed",
        ),
        ("low-confidence threshold", f"top-1 probability &lt; {context.low_confidence:.2f}"),
        (
            "background threshold",
            f"&gt; {100 * context.background_threshold:.0f}% of the map mass outside the foreground"
            if context.has_masks
            else "not used",
        ),
        (
            "words",
            escape(f"{context.text_method}: {TEXT_METHOD_TITLES[context.text_method]}")
            if context.text_method
            else "not explained",
        ),
        ("settings digest", escape(context.settings)),
        ("generated", escape(context.generated)),
    ]
    rows += [(escape(name), escape(version)) for name, version in context.versions.items()]
    body = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in rows)
    note = ""
    if context.foreign_records:
        note = (
            f'<p class="note">{context.foreign_records} record(s) in records/ were made with other settings '
            "(another model, prompts or methods) and are not shown.</p>"
        )
    return f'<section id="run"><h2>About this run</h2><table class="grid"><tbody>{body}</tbody></table>{note}</section>'
