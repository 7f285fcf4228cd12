"""Visualization: overlays of attribution maps on images, and grid figures (matplotlib).

For a single map, Captum's own ``captum.attr.visualization.visualize_image_attr``
works on our outputs directly (``attr[i].permute(1, 2, 0)``); these helpers add
what it lacks for CLIP: undoing CLIP's normalisation, and grids of images ×
prompts or methods.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from captum_iclip._io import atomic_write_bytes
from captum_iclip.models.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

ArrayLike = Tensor | np.ndarray


def denormalize(
    images: Tensor, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
) -> Tensor:
    """Undo CLIP preprocessing: (N, 3, H, W) or (3, H, W) normalised -> [0, 1] RGB."""
    shape = (-1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).reshape(shape)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).reshape(shape)
    return (images * std_t + mean_t).clamp(0, 1)


def _to_hwc(image: ArrayLike) -> np.ndarray:
    """(3, H, W) tensor / (H, W, 3) array / PIL image in [0, 1] or uint8 -> float (H, W, 3) in [0, 1]."""
    if isinstance(image, Tensor):
        image = image.detach().float().cpu()
        image = image.permute(1, 2, 0).numpy() if image.dim() == 3 and image.shape[0] in (1, 3) else image.numpy()
    array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def _to_map(attribution: ArrayLike, size: tuple[int, int]) -> np.ndarray:
    """A (1, h, w) / (h, w) map resized bilinearly to ``size`` as float (H, W)."""
    if isinstance(attribution, np.ndarray):
        attribution = torch.from_numpy(attribution)
    attribution = attribution.detach().float().cpu()
    while attribution.dim() > 2:
        if attribution.shape[0] != 1:
            raise ValueError(f"attribution: expected one map (1, H, W) or (H, W), got shape {tuple(attribution.shape)}")
        attribution = attribution[0]
    if tuple(attribution.shape) != tuple(size):
        attribution = torch.nn.functional.interpolate(
            attribution[None, None], size=size, mode="bilinear", align_corners=False
        )[0, 0]
    return attribution.numpy()


def overlay(
    image: ArrayLike,
    attribution: ArrayLike,
    *,
    cmap: str = "jet",
    alpha: float = 0.5,
    normalize: bool = True,
) -> np.ndarray:
    """Blend a heat map over an image.

    Args:
        image: the original image: (3, H, W) tensor in [0, 1] (use :func:`denormalize`
            on a preprocessed one), (H, W, 3) array, or a PIL image.
        attribution: (1, h, w) or (h, w) map; resized to the image.
        cmap: matplotlib colormap of the heat map.
        alpha: opacity of the heat map.
        normalize: min-max normalise the map first (maps from ``normalize=False``
            attributions keep their sign and scale otherwise).

    Returns:
        (H, W, 3) float array in [0, 1].
    """
    from matplotlib import colormaps

    rgb = _to_hwc(image)
    heat = _to_map(attribution, rgb.shape[:2])
    if normalize:
        span = heat.max() - heat.min()
        heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    colored = colormaps[cmap](np.clip(heat, 0, 1))[..., :3]
    return (1 - alpha) * rgb + alpha * colored


def attribution_grid(
    images: Sequence[ArrayLike],
    maps: Sequence[Sequence[ArrayLike | None]],
    *,
    column_titles: Sequence[str] | None = None,
    row_titles: Sequence[str] | None = None,
    show_image: bool = True,
    cmap: str = "jet",
    alpha: float = 0.5,
    cell_size: float = 2.2,
    path: str | None = None,
    dpi: int = 100,
    target_masks: Sequence[ArrayLike | None] | None = None,
    colorbar: bool = True,
):
    """A grid figure: one row per image, one column per prompt or method, and a colour bar of the maps.

    Args:
        images: the N original images (see :func:`overlay` for accepted forms).
        maps: ``maps[i][j]`` is the map of image i in column j (or an array
            (h, w, 3) drawn as is, e.g. a ground-truth colour mask; ``None``
            leaves the cell empty).
        column_titles: a title per map column.
        row_titles: a label per row (e.g. the scores).
        show_image: add the plain image as the first column.
        path: if given, save the figure there (PNG/PDF by extension).
        target_masks: per row, an (H, W) mask of the object the maps explain (or ``None``); it is
            outlined in white on that row's colour cells (the ground truth), so the target is visible.
        colorbar: draw the colour bar of the maps (min-max normalised per map: low to high).

    Returns:
        The matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure

    n_rows = len(images)
    if n_rows == 0:
        raise ValueError("images: expected at least one image, got none")
    if len(maps) != n_rows:
        raise ValueError(f"maps: expected one row of maps per image ({n_rows}), got {len(maps)}")
    n_maps = max(len(row) for row in maps)
    n_cols = n_maps + int(show_image)
    if target_masks is not None and len(target_masks) != n_rows:
        raise ValueError(f"target_masks: expected one mask (or None) per image ({n_rows}), got {len(target_masks)}")
    fig = Figure(figsize=(cell_size * n_cols + (0.9 if colorbar else 0.0), cell_size * n_rows), layout="constrained")
    axes = np.asarray(fig.subplots(n_rows, n_cols, squeeze=False))
    drew_map = False
    for i, image in enumerate(images):
        rgb = _to_hwc(image)
        if show_image:
            axes[i, 0].imshow(rgb)
            if i == 0:
                axes[i, 0].set_title("image", fontsize=9)
        for j in range(n_maps):
            ax = axes[i, j + int(show_image)]
            cell = maps[i][j] if j < len(maps[i]) else None
            if cell is not None:
                array = cell.detach().cpu().numpy() if isinstance(cell, Tensor) else np.asarray(cell)
                colour_cell = array.ndim == 3 and array.shape[-1] == 3
                drawn = array if colour_cell else overlay(rgb, cell, cmap=cmap, alpha=alpha)
                drew_map = drew_map or not colour_cell
                ax.imshow(drawn)
                if colour_cell and target_masks is not None:
                    _outline(ax, target_masks[i])
            if i == 0 and column_titles is not None and j < len(column_titles):
                ax.set_title(column_titles[j], fontsize=9)
        if row_titles is not None:
            axes[i, 0].set_ylabel(row_titles[i], fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if colorbar and drew_map:
        _colour_bar(fig, axes, cmap)
    if path is not None:
        _save(fig, path, dpi)
    return fig


def _outline(ax, target: ArrayLike | None) -> None:
    """Outline the mask ``target`` (the object the maps explain) in white on ``ax``."""
    if target is None:
        return
    mask = target.detach().cpu().numpy() if isinstance(target, Tensor) else np.asarray(target)
    if mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=1.5)


def _colour_bar(fig, axes: np.ndarray, cmap: str) -> None:
    """The colour bar of the maps beside the grid: min-max normalised per map, low to high."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    shrink = min(0.9, 2.5 / axes.shape[0])
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), colormaps[cmap]), ax=list(axes.flat), shrink=shrink)
    bar.set_ticks([0.0, 0.5, 1.0], labels=["low", "", "high"])
    bar.set_label("attribution, min-max normalised per map", fontsize=8)


def metrics_chart(
    rows: Sequence[dict],
    *,
    title: str | None = None,
    units: dict[str, str] | None = None,
    path: str | None = None,
    dpi: int = 100,
):
    """Dot-and-interval chart of evaluation figures: one panel per figure, one line per method.

    Args:
        rows: one dict per method: ``title`` (its label), ``colour`` (a matplotlib colour or
            ``None``) and ``figures``: ``{figure name: (mean, low, high)}``, the interval ends
            ``None`` when there is no interval. Every row names the same figures.
        title: a title above the panels.
        units: per figure name, the label of its axis (its unit and which way is better).
        path: if given, save the figure there (PNG/PDF by extension).

    Returns:
        The matplotlib ``Figure``.

    Examples:
        >>> rows = [{"title": "raw ITSM", "colour": "tab:blue", "figures": {"mSC": (9.4, 7.7, 11.1)}}]
        >>> metrics_chart(rows).axes[0].get_title()
        'mSC'
    """
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("rows: expected at least one method, got none")
    names = list(rows[0]["figures"])
    if any(list(row["figures"]) != names for row in rows):
        raise ValueError(f"rows: expected every row to name the figures {names}")
    label_width = 0.07 * max(len(row["title"]) for row in rows)  # inches the method names take
    fig = Figure(
        figsize=(label_width + 4.0 * len(names), 0.4 * len(rows) + 1.2 + 0.4 * bool(units) + 0.3 * bool(title))
    )
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    y = np.arange(len(rows))[::-1]  # the first method on top
    for ax, name in zip(axes, names):
        for row, position in zip(rows, y):
            mean, low, high = row["figures"][name]
            if mean is None:  # undefined (nothing to average): no point
                continue
            error = None if low is None or high is None else [[max(mean - low, 0.0)], [max(high - mean, 0.0)]]
            ax.errorbar(mean, position, xerr=error, fmt="o", color=row.get("colour"), capsize=3)
        ax.axvline(0.0, color="black", linewidth=0.8)  # the sign of a contrast is part of the result
        ax.set_title(name, fontsize=10)
        if units and name in units:
            ax.set_xlabel(units[name], fontsize=9)
        ax.set_yticks(y)
        ax.set_yticklabels([row["title"] for row in rows] if ax is axes[0] else [])
        ax.grid(axis="x", alpha=0.3)
    if title is not None:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        _save(fig, path, dpi)
    return fig


def word_colours(relevance: ArrayLike) -> np.ndarray:
    """The colour of each token of a text by its relevance, one rule for the figures and the audit page.

    White at 0, red for positive and blue for negative relevance (matplotlib's ``bwr``), the strongest
    token of the text at 70% of the colormap's range either way so that black text stays readable; a text
    whose relevances are all 0 is white.

    Args:
        relevance: (T,) one value per token.

    Returns:
        (T, 3) RGB in [0, 1].
    """
    from matplotlib import colormaps

    values = np.asarray(relevance.detach().cpu() if isinstance(relevance, Tensor) else relevance, dtype=np.float64)
    scale = np.abs(values).max() if values.size else 0.0
    scaled = values / scale if scale > 0 else np.zeros_like(values)
    return colormaps["bwr"](0.5 + 0.35 * scaled)[:, :3]


def word_relevance_figure(
    rows: Sequence[tuple[str, Sequence[str], ArrayLike]],
    *,
    title: str | None = None,
    line_chars: int = 96,
    path: str | None = None,
    dpi: int = 100,
):
    """Texts drawn as coloured words: one block per text, its label, then its tokens on :func:`word_colours`.

    Args:
        rows: ``(label, tokens, relevance)`` per text, e.g. ``(f"{image}: {prompt}", r.tokens, r.relevance)``
            of :func:`~captum_iclip.attr.text.explain_text`'s results.
        title: a title above the texts (e.g. the method).
        line_chars: characters per line before a text wraps.
        path: if given, save the figure there (PNG/PDF by extension).

    Returns:
        The matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("rows: expected at least one text, got none")
    lines: list[tuple[str, list[tuple[int, str, np.ndarray]]]] = []  # (label, [(column, token, colour)])
    for label, tokens, relevance in rows:
        colours = word_colours(relevance)
        if len(colours) != len(tokens):
            raise ValueError(f"rows: expected one relevance per token of {label!r} ({len(tokens)}), got {len(colours)}")
        placed, column = [], 0
        lines.append((str(label), placed))
        for token, colour in zip(tokens, colours):
            if column and column + len(token) > line_chars:
                placed, column = [], 0
                lines.append(("", placed))
            placed.append((column, token, colour))
            column += len(token) + 1
    char_inches, line_inches = 0.085, 0.32  # monospace at 10 pt
    label_lines = sum(1 for label, _ in lines if label)
    height = line_inches * (len(lines) + label_lines) + 0.3 * bool(title) + 0.2
    fig = Figure(figsize=(char_inches * line_chars + 0.4, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.set_xlim(-2, line_chars + 2)
    ax.set_ylim(height / line_inches, 0)
    y = 0.6 + 0.9 * bool(title)
    if title:
        ax.text(0, 0.6, title, fontsize=11, fontweight="bold", va="center")
    for label, placed in lines:
        if label:
            ax.text(0, y, label, fontsize=9, color="#444444", va="center")
            y += 1
        for column, token, colour in placed:
            box = {"boxstyle": "round,pad=0.15", "facecolor": tuple(colour), "edgecolor": "none"}
            ax.text(column, y, token, fontsize=10, family="monospace", va="center", bbox=box)
        y += 1
    if path is not None:
        _save(fig, path, dpi)
    return fig


def _save(fig, path: str, dpi: int) -> None:
    """Write ``fig`` in the format of ``path``'s extension, atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format=str(path).rsplit(".", 1)[-1].lower())
    atomic_write_bytes(path, buffer.getvalue())


def label_colours(label: np.ndarray) -> np.ndarray:
    """A ground-truth label map (H, W) of class ids as an RGB float image (H, W, 3), VOC colour map."""
    from captum_iclip.world.export import voc_colormap

    return voc_colormap()[label].astype(np.float32) / 255.0


def diagnostics_figure(
    summary: dict,
    *,
    image: ArrayLike | None = None,
    maps: dict[str, ArrayLike] | None = None,
    title: str | None = None,
    path: str | None = None,
    dpi: int = 100,
):
    """The figure of :meth:`captum_iclip.diagnostics.Diagnostics.summary`.

    Top row: the largest patch-token norm over the median per block (a high-norm token of
    Darcet et al. is at 10 or more); the class token's attention share on the foreground per
    head of the last blocks, beside the foreground's share of the area (what a uniform attention
    gives); and, with labels, the mSC of every map with its interval. Bottom row, when ``image``
    and ``maps`` are given: one image with its raw map and the map's last-block terms.

    Args:
        summary: a :meth:`~captum_iclip.diagnostics.Diagnostics.summary` dict.
        image: (H, W, 3) image in [0, 1] for the example row.
        maps: ``{name: (h, w) map}`` drawn over ``image`` (e.g. ``itsm``, ``residual``, ``attention``, ``mlp``).
        title: a title above the panels.
        path: if given, save the figure there (PNG/PDF by extension).

    Returns:
        The matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure

    example = image is not None and maps
    columns = max(3, len(maps) + 1 if example else 0)
    fig = Figure(figsize=(4.0 * columns, 3.6 * (2 if example else 1)))
    axes = fig.subplots(2 if example else 1, columns, squeeze=False)

    _norms_panel(axes[0][0], summary["token_norms"])
    _attention_panel(axes[0][1], summary["cls_attention"])
    _msc_panel(axes[0][2], summary["maps"])
    for ax in axes[0][3:]:
        ax.axis("off")

    if example:
        image = _to_hwc(image)
        axes[1][0].imshow(image)
        axes[1][0].set_title("image")
        for ax, (name, attribution) in zip(axes[1][1:], maps.items()):
            drawn = ax.imshow(_to_map(attribution, image.shape[:2]), cmap="coolwarm")
            ax.imshow(image, alpha=0.35)
            ax.set_title(name)
            fig.colorbar(drawn, ax=ax, fraction=0.046, pad=0.04)
        for ax in axes[1]:
            ax.axis("off")
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        _save(fig, path, dpi)
    return fig


def _norms_panel(ax, norms: list[dict]) -> None:
    ax.plot([row["block"] for row in norms], [row["max_ratio"] for row in norms], "o-")
    ax.axhline(10.0, color="tab:red", linestyle="--", linewidth=0.8, label="10x: high-norm token")
    ax.set(title="token norms", xlabel="block", ylabel="largest patch norm / median")
    ax.legend(fontsize=8)


def _attention_panel(ax, attention: dict) -> None:
    heads = attention["heads"]
    shares = [row["foreground_share"] for row in heads]
    if any(share is not None for share in shares):
        ax.bar(range(len(heads)), [0.0 if s is None else s for s in shares], color="tab:blue")
        if attention["foreground_area"] is not None:
            ax.axhline(
                attention["foreground_area"], color="black", linestyle="--", linewidth=0.8, label="foreground area"
            )
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(heads)))
        ax.set_xticklabels([f"b{row['block']}h{row['head']}" for row in heads], rotation=90, fontsize=7)
    else:
        ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="[CLS] attention on the foreground", ylabel="share of the patch mass", ylim=(0, 1))


def _msc_panel(ax, maps: dict) -> None:
    entries = [(name, entry) for name, entry in maps.items() if entry.get("msc") is not None]
    if not entries:
        ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes)
        ax.set(title="mSC of each map")
        return
    y = np.arange(len(entries))[::-1]
    for (_, entry), position in zip(entries, y):
        ci = entry.get("msc_ci")
        error = None
        if ci and None not in ci:
            error = [[max(entry["msc"] - ci[0], 0.0)], [max(ci[1] - entry["msc"], 0.0)]]
        ax.errorbar(entry["msc"], position, xerr=error, fmt="o", capsize=3)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels([name for name, _ in entries], fontsize=8)
    ax.set(title="mSC of each map (higher: prefers the object)", xlabel="mSC (-100..100)")
