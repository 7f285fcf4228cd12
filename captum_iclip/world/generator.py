"""Seeded procedural image-text scenes with exact segmentation labels.

Every scene holds one to three coloured shapes drawn over a procedural
background, a per-pixel class map and a caption. Scenes are a pure function
of their seed, so train and held-out splits are disjoint seed ranges and any
image can be regenerated from its seed alone.

Design choices that matter to the methods tested on this world:

* **Colour separation.** Backgrounds use muted palettes (HSV saturation
  <= ``0.30``); objects use saturated colours (saturation >= ``0.80``) with a
  brightness-only shading ramp and grain, so an object is never trivially
  flat yet its hue and saturation stay those of its colour word.
* **Exact labels.** Each object is rasterised once, from its polygons, by
  an exact scanline (even-odd) test of ``SUPERSAMPLE x SUPERSAMPLE``
  sub-pixel centres per pixel, giving a per-pixel coverage in ``[0, 1]``.
  The same coverage alpha-composites the image and yields the label: after
  occlusion (later objects are drawn over earlier ones) every pixel is split
  into the area shares of the background and each object, and the label is
  the class with the largest share. Anti-aliased edge pixels therefore get
  the class that covers most of them and no pixel needs ``IGNORE_INDEX``
  (255), which stays reserved for readers.
* **Context bias.** As in real photographs, a category co-occurs with a
  preferred background: the background is the first object's preferred one
  with probability ``CONTEXT_BIAS`` (0.6), otherwise uniform over all
  ``BACKGROUNDS`` (so the preferred one has total probability 0.64)::

      circle  -> water      square  -> checker    triangle -> sand
      star    -> sky        cross   -> stripes    heart    -> grass
      ring    -> blobs      diamond -> snow       hexagon  -> noise
      crescent-> gradient

* **Splits.** Training uses seeds ``TRAIN_SEED_START`` (0) upwards, held-out
  evaluation seeds ``HELDOUT_SEED_START`` (10_000_000) upwards; a training set
  must hold fewer than ten million scenes to stay disjoint.
* **Size independence.** Layout, colours and caption come from one random
  stream and textures from another, so ``generate_scene(s, 64)`` and
  ``generate_scene(s, 224)`` show the same scene at two resolutions.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

__all__ = [
    "BACKGROUNDS",
    "CATEGORIES",
    "COLOURS",
    "CONTEXT_BIAS",
    "HELDOUT_SEED_START",
    "IGNORE_INDEX",
    "PREFERRED_BACKGROUND",
    "SEED_RANGES",
    "SUPERSAMPLE",
    "TRAIN_SEED_START",
    "Scene",
    "WorldDataset",
    "WorldObject",
    "WorldVariant",
    "class_names",
    "generate_scene",
    "prompt_for",
    "render_background",
    "render_objects",
    "sample_caption",
]

CATEGORIES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "heart",
    "ring",
    "diamond",
    "hexagon",
    "crescent",
)
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
BACKGROUNDS: tuple[str, ...] = (
    "noise",
    "stripes",
    "gradient",
    "blobs",
    "checker",
    "grass",
    "sand",
    "water",
    "sky",
    "snow",
)

PREFERRED_BACKGROUND: dict[str, str] = {
    "circle": "water",
    "square": "checker",
    "triangle": "sand",
    "star": "sky",
    "cross": "stripes",
    "heart": "grass",
    "ring": "blobs",
    "diamond": "snow",
    "hexagon": "noise",
    "crescent": "gradient",
}
CONTEXT_BIAS = 0.6
TRAIN_SEED_START = 0
HELDOUT_SEED_START = 10_000_000
# First seed of each held-out use, so that recipe selection, the reported figures, the demo and the ablation
# study never share a scene; each range holds fewer than a million scenes.
SEED_RANGES: dict[str, int] = {
    "demo": HELDOUT_SEED_START + 500_000,  # the demo's explanation table
    "selection": HELDOUT_SEED_START + 2_000_000,  # choosing training recipes
    "report": HELDOUT_SEED_START + 3_000_000,  # the bundle's recorded recognition and mask figures
    "study": HELDOUT_SEED_START + 4_000_000,  # the ablation study
}
IGNORE_INDEX = 255
SUPERSAMPLE = 4

# Hue (degrees) of each colour word; objects jitter it by at most +-6 degrees,
# well inside the 30-degree gaps between neighbouring words.
_COLOUR_HUE: dict[str, float] = {
    "red": 0.0,
    "orange": 28.0,
    "yellow": 55.0,
    "green": 120.0,
    "cyan": 185.0,
    "blue": 225.0,
    "purple": 275.0,
    "pink": 320.0,
}
# Radius (fraction of the image side) below / above which a caption may say
# "small" / "large".
_SMALL_BELOW = 0.15
_LARGE_ABOVE = 0.22
_SCALE_RANGE = (0.10, 0.27)
# An object keeps at least this fraction of its area visible after the
# objects drawn later have covered it.
_MIN_VISIBLE = 0.5
_PLACEMENT_TRIES = 20


@dataclass
class WorldObject:
    """One shape in a scene.

    Coordinates are fractions of the image side, so one object renders the
    same way at any resolution.

    Args:
        category: Shape name, one of ``CATEGORIES``.
        colour: Colour word, one of ``COLOURS``.
        centre: ``(x, y)`` of the shape centre, in ``[0, 1]`` (y points down).
        scale: Radius of the shape's circumscribed circle, as a fraction of
            the image side.
        angle: Rotation in degrees, counter-clockwise on screen.
        size_word: ``"small"``, ``"large"`` or ``""`` (medium), from ``scale``.
        rgb: Base RGB colour before shading, in ``[0, 1]``.
        shade: ``(direction in radians, strength)`` of the brightness ramp.
    """

    category: str
    colour: str
    centre: tuple[float, float]
    scale: float
    angle: float = 0.0
    size_word: str = ""
    rgb: tuple[float, float, float] = (1.0, 0.0, 0.0)
    shade: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"category: expected one of {CATEGORIES}, got {self.category!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"colour: expected one of {COLOURS}, got {self.colour!r}")
        if not self.scale > 0:
            raise ValueError(f"scale: expected a positive value, got {self.scale!r}")

    @property
    def class_id(self) -> int:
        """Index of this object's category in label maps (background is 0)."""
        return CATEGORIES.index(self.category) + 1

    @property
    def phrase(self) -> str:
        """Noun phrase with size and colour, e.g. ``"a small red star"``."""
        return _noun_phrase(self, with_colour=True, with_size=True)


@dataclass
class Scene:
    """A generated image with its labels and caption.

    Args:
        image: ``(S, S, 3)`` uint8 RGB image.
        label: ``(S, S)`` uint8 class map: 0 background, ``c + 1`` for
            ``CATEGORIES[c]``, ``IGNORE_INDEX`` (255) reserved for "ignore".
        objects: Objects in drawing order (later ones occlude earlier ones).
        background: Background type, one of ``BACKGROUNDS``.
        caption: Natural-language description of the scene.
        seed: Seed the scene was generated from.
        instance: ``(S, S)`` uint8 map of the object that owns each pixel
            (1-based index into ``objects``, 0 background).
        overlaps: Whether the two objects of a two-object scene overlap (the
            caption may then say "behind").
    """

    image: np.ndarray
    label: np.ndarray
    objects: list[WorldObject]
    background: str
    caption: str
    seed: int
    instance: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0), np.uint8))
    overlaps: bool = False

    @property
    def categories(self) -> list[str]:
        """Categories present in the scene, in drawing order."""
        return [obj.category for obj in self.objects]

    def pil(self) -> Image.Image:
        """The image as an RGB ``PIL.Image``."""
        return Image.fromarray(self.image)


#: The background renderings of :class:`WorldVariant`.
BACKGROUND_KINDS = ("textured", "smooth", "uniform")


@dataclass(frozen=True)
class WorldVariant:
    """A change of the world's image statistics, for training recipes that test what a model learns from them.

    The default is the world as documented above, bit for bit. A background variant draws every scene
    from the same random streams, so a seed gives the same objects, layout and caption, only the
    background rendered differently; a changed ``object_scale`` also changes where objects fit, so the
    layout (and the background drawn after it) of a seed may differ.

    Args:
        backgrounds: ``"textured"`` (the procedural textures), ``"smooth"`` (each texture low-pass filtered
            with a box of a quarter of the side, keeping its colours and slow variations) or ``"uniform"``
            (each texture replaced by its mean colour): backgrounds with less information per patch.
        object_scale: factor on every object's radius (``0.6``: smaller objects, more background); the
            caption's "small" / "large" keep their absolute thresholds.

    Examples:
        >>> generate_scene(3, variant=WorldVariant(backgrounds="uniform")).image[0, 0].tolist() == (
        ...     generate_scene(3, variant=WorldVariant(backgrounds="uniform")).image[-1, -1].tolist())
        True
    """

    backgrounds: str = "textured"
    object_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.backgrounds not in BACKGROUND_KINDS:
            raise ValueError(f"backgrounds: expected one of {BACKGROUND_KINDS}, got {self.backgrounds!r}")
        if not 0.2 <= float(self.object_scale) <= 1.5:
            raise ValueError(f"object_scale: expected a factor in [0.2, 1.5], got {self.object_scale!r}")

    @property
    def is_default(self) -> bool:
        return self == WorldVariant()

    def name(self) -> str:
        """A short name for file names and tables, e.g. ``"uniform-x0.6"``; ``"default"`` for the default."""
        if self.is_default:
            return "default"
        return f"{self.backgrounds}-x{self.object_scale:g}"

    def render_background(self, texture: np.ndarray) -> np.ndarray:
        """The variant's background from the procedural ``texture`` (S, S, 3)."""
        if self.backgrounds == "uniform":
            return np.broadcast_to(texture.mean(axis=(0, 1), keepdims=True), texture.shape).astype(np.float32)
        if self.backgrounds == "smooth":
            box = max(1, texture.shape[0] // 4) | 1  # odd, so that the filter is centred
            tensor = torch.from_numpy(np.ascontiguousarray(texture)).permute(2, 0, 1)[None]
            padded = torch.nn.functional.pad(tensor, (box // 2,) * 4, mode="reflect")
            smooth = torch.nn.functional.avg_pool2d(padded, box, stride=1)
            return smooth[0].permute(1, 2, 0).numpy().astype(np.float32)
        return texture


def class_names() -> list[str]:
    """Names of the label-map classes, index = class id.

    Returns:
        ``["background", *CATEGORIES]``.

    Examples:
        >>> class_names()[:3]
        ['background', 'circle', 'square']
    """
    return ["background", *CATEGORIES]


def prompt_for(category: str) -> str:
    """A natural text prompt naming one category, for zero-shot scoring.

    Args:
        category: One of ``CATEGORIES``, or ``"background"``.

    Returns:
        A prompt such as ``"a star"``; ``"the background"`` for background.

    Examples:
        >>> prompt_for("star")
        'a star'
    """
    if category == "background":
        return "the background"
    if category not in CATEGORIES:
        raise ValueError(f"category: expected one of {CATEGORIES} or 'background', got {category!r}")
    return f"a {category}"


# --------------------------------------------------------------------- shapes
def _regular_polygon(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _star() -> np.ndarray:
    t = -math.pi / 2 + math.pi * np.arange(10) / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    # The curve spans x in [-16, 16] and y in [-17, 12]; centre it vertically
    # and flip y because image rows grow downwards.
    return np.stack([x, -(y + 2.5)], axis=1) / 16.5


def _cross(half_width: float = 0.3, arm: float = 0.95) -> np.ndarray:
    w, a = half_width, arm
    return np.array(
        [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
    )


def _crescent(bite_offset: float = 0.45, bite_radius: float = 0.8, tilt: float = -0.3) -> np.ndarray:
    """Unit disc minus a disc of ``bite_radius`` centred ``bite_offset`` to its right."""
    d, r = bite_offset, bite_radius
    # The two circles meet at (xi, +-yi).
    xi = (d * d + 1.0 - r * r) / (2.0 * d)
    yi = math.sqrt(1.0 - xi * xi)
    theta_i, phi_i = math.atan2(yi, xi), math.atan2(yi, xi - d)
    t = np.linspace(theta_i, 2 * math.pi - theta_i, 48)
    outer = np.stack([np.cos(t), np.sin(t)], axis=1)
    p = np.linspace(2 * math.pi - phi_i, phi_i, 34)[1:-1]
    inner = np.stack([d + r * np.cos(p), r * np.sin(p)], axis=1)
    rotation = np.array([[math.cos(tilt), -math.sin(tilt)], [math.sin(tilt), math.cos(tilt)]])
    return np.concatenate([outer, inner]) @ rotation.T


# Each shape is a list of closed contours in unit coordinates (extent <= 1),
# filled with the even-odd rule so that an inner contour cuts a hole (ring).
_SHAPES: dict[str, list[np.ndarray]] = {
    "circle": [_regular_polygon(64)],
    "square": [np.array([(-0.72, -0.72), (0.72, -0.72), (0.72, 0.72), (-0.72, 0.72)])],
    "triangle": [_regular_polygon(3)],
    "star": [_star()],
    "cross": [_cross()],
    "heart": [_heart()],
    "ring": [_regular_polygon(64), _regular_polygon(64, 0.55)],
    "diamond": [np.array([(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)])],
    "hexagon": [_regular_polygon(6, phase=0.0)],
    "crescent": [_crescent()],
}


def _edges(contours: list[np.ndarray]) -> np.ndarray:
    """``(E, 2, 2)`` array of (start, end) points of every contour edge."""
    return np.concatenate([np.stack([c, np.roll(c, -1, axis=0)], axis=1) for c in contours])


_SHAPE_EDGES: dict[str, np.ndarray] = {name: _edges(contours) for name, contours in _SHAPES.items()}


def _object_edges(obj: WorldObject, size: int) -> np.ndarray:
    """The object's polygon edges in pixel coordinates (pixel j spans [j, j+1))."""
    theta = math.radians(obj.angle)
    # Counter-clockwise on screen with y pointing down.
    rotation = np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
    centre = np.asarray(obj.centre) * size
    return _SHAPE_EDGES[obj.category] @ rotation.T * (obj.scale * size) + centre


def _even_odd_hits(edges: np.ndarray, rows: int, cols: int, k: int) -> np.ndarray:
    """Count sub-pixel centres inside a polygon set, per pixel of a ``rows x cols`` grid.

    Each pixel is split into ``k x k`` sub-pixels; a sub-pixel is inside when
    its centre is (even-odd rule, half-open at edges so that shapes sharing an
    edge never both claim a sub-pixel). Scanlines through the sub-pixel rows
    give sorted crossings; consecutive pairs bound the inside spans, which are
    clipped against every pixel column.

    Args:
        edges: ``(E, 2, 2)`` edges (start, end) of closed polygons, in pixel
            coordinates of the grid.
        rows: Grid height in pixels.
        cols: Grid width in pixels.
        k: Sub-pixels per pixel side.

    Returns:
        ``(rows, cols)`` float32 counts in ``[0, k * k]``.
    """
    x0, y0, x1, y1 = (edges[:, i, j] * k for i in (0, 1) for j in (0, 1))
    scan_y = np.arange(rows * k) + 0.5
    crosses = (y0 <= scan_y[:, None]) != (y1 <= scan_y[:, None])
    row, edge = np.nonzero(crosses)
    hits = np.zeros((rows, cols), np.float32)
    if row.size == 0:
        return hits
    x0, y0, x1, y1 = x0[edge], y0[edge], x1[edge], y1[edge]
    x = x0 + (scan_y[row] - y0) * (x1 - x0) / (y1 - y0)
    # Index of the first sub-pixel whose centre lies right of the crossing.
    first = np.clip(np.floor(x + 0.5), 0, cols * k)
    order = np.lexsort((first, row))
    row, first = row[order], first[order]
    span_row, span_start, span_end = row[0::2] // k, first[0::2], first[1::2]
    column_start = np.arange(cols) * k
    inside = np.clip(span_end[:, None] - column_start, 0, k) - np.clip(span_start[:, None] - column_start, 0, k)
    # Spans are sorted by row: sum each pixel row's spans in one pass.
    group_start = np.flatnonzero(np.concatenate([[True], span_row[1:] != span_row[:-1]]))
    hits[span_row[group_start]] = np.add.reduceat(inside, group_start, axis=0)
    return hits


def _coverage_box(obj: WorldObject, size: int, k: int = SUPERSAMPLE) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Fraction of each pixel covered by the object, within its bounding box.

    Coverage is the share of the ``k x k`` sub-pixel centres that fall
    inside the shape, so it is an exact multiple of ``1 / k**2`` computed
    from the polygons themselves.

    Returns:
        ``(alpha, (rows, cols))``: float32 coverage of the box and the slices
        that place it in the ``(size, size)`` frame.
    """
    edges = _object_edges(obj, size)
    x0 = min(max(int(math.floor(edges[..., 0].min())), 0), size)
    y0 = min(max(int(math.floor(edges[..., 1].min())), 0), size)
    x1 = max(min(int(math.ceil(edges[..., 0].max())), size), x0)
    y1 = max(min(int(math.ceil(edges[..., 1].max())), size), y0)
    box = (slice(y0, y1), slice(x0, x1))
    if x1 == x0 or y1 == y0:
        return np.zeros((y1 - y0, x1 - x0), np.float32), box
    hits = _even_odd_hits(edges - np.array([x0, y0], np.float64), y1 - y0, x1 - x0, k)
    return hits / (k * k), box


def _coverage(obj: WorldObject, size: int, k: int = SUPERSAMPLE) -> np.ndarray:
    """Full-frame ``(size, size)`` coverage of the object."""
    alpha, box = _coverage_box(obj, size, k)
    frame = np.zeros((size, size), np.float32)
    frame[box] = alpha
    return frame


def _object_texture(
    obj: WorldObject, size: int, box: tuple[slice, slice], rng: np.random.Generator | None
) -> np.ndarray:
    """Object colour over ``box``: base colour times a brightness ramp and grain.

    Scaling all channels by one factor keeps hue and saturation, so shading
    never moves an object towards the muted background palette.
    """
    rows, cols = box
    direction, strength = obj.shade
    x = (np.arange(cols.start, cols.stop, dtype=np.float32) + 0.5) / size - obj.centre[0]
    y = (np.arange(rows.start, rows.stop, dtype=np.float32) + 0.5) / size - obj.centre[1]
    ramp = np.cos(direction) * x[None, :] + np.sin(direction) * y[:, None]
    # Darken only (by up to ``strength`` on the far side) so that no channel
    # clips at 1, which would shift hue and saturation.
    brightness = 1.0 - strength * (0.5 + 0.5 * np.clip(ramp / obj.scale, -1.0, 1.0))
    if rng is not None:
        brightness = brightness * (1.0 - 0.06 * np.abs(rng.standard_normal(brightness.shape, dtype=np.float32)))
    return np.asarray(obj.rgb, np.float32) * brightness[..., None]


def render_objects(
    background: np.ndarray,
    objects: Sequence[WorldObject],
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw objects over a background and derive exact labels.

    Args:
        background: ``(S, S, 3)`` float image in ``[0, 1]``.
        objects: Objects in drawing order; later ones occlude earlier ones.
        rng: Generator for the object grain; ``None`` draws flat objects with
            only their shading ramp.

    Returns:
        ``(image, label, instance)``: the ``(S, S, 3)`` uint8 image, the
        ``(S, S)`` uint8 class map and the ``(S, S)`` uint8 map of which
        object (1-based drawing index, 0 background) owns each pixel.

    Examples:
        >>> bg = np.full((32, 32, 3), 0.5, np.float32)
        >>> obj = WorldObject("square", "red", (0.5, 0.5), 0.25)
        >>> image, label, _ = render_objects(bg, [obj])
        >>> int(label[16, 16]), int(label[0, 0])
        (2, 0)
    """
    background = np.asarray(background, dtype=np.float32)
    if background.ndim != 3 or background.shape[2] != 3 or background.shape[0] != background.shape[1]:
        raise ValueError(f"background: expected shape (S, S, 3), got {background.shape}")
    size = background.shape[0]
    image = background.copy()
    # shares[i] is the visible area fraction of layer i in each pixel; layer 0
    # is the background.
    shares = np.zeros((len(objects) + 1, size, size), np.float32)
    shares[0] = 1.0
    for i, obj in enumerate(objects, start=1):
        alpha, box = _coverage_box(obj, size)
        colour = _object_texture(obj, size, box, rng)
        image[box] = image[box] * (1.0 - alpha[..., None]) + colour * alpha[..., None]
        shares[(slice(0, i), *box)] *= 1.0 - alpha
        shares[(i, *box)] = alpha
    instance = shares.argmax(axis=0).astype(np.uint8)
    class_of_layer = np.array([0] + [obj.class_id for obj in objects], np.uint8)
    image_u8 = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return image_u8, class_of_layer[instance], instance


# ---------------------------------------------------------------- backgrounds
def _muted(
    rng: np.random.Generator, hue: float, value: tuple[float, float], sat: tuple[float, float] = (0.08, 0.30)
) -> np.ndarray:
    """A low-saturation RGB colour near ``hue`` (degrees)."""
    h = ((hue + rng.uniform(-12, 12)) % 360) / 360
    return np.array(colorsys.hsv_to_rgb(h, rng.uniform(*sat), rng.uniform(*value)), np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: tuple[int, int]) -> np.ndarray:
    """Value noise in ``[0, 1]``: a ``cells`` (rows, cols) grid upsampled bicubically."""
    grid = Image.fromarray(rng.random(cells, dtype=np.float32))
    noise = np.asarray(grid.resize((size, size), Image.BICUBIC), dtype=np.float32)
    return np.clip(noise, 0.0, 1.0)


def _blend(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-pixel mix of colours ``a`` and ``b`` with weight ``t`` on ``b``."""
    return a + (b - a) * t[..., None]


def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return coords[None, :], coords[:, None]


def _bg_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    hue = rng.uniform(0, 360)
    a, b = _muted(rng, hue, (0.3, 0.6)), _muted(rng, hue + 40, (0.6, 0.9))
    cells = int(rng.integers(4, 9))
    t = 0.6 * _smooth_noise(rng, size, (cells, cells)) + 0.4 * _smooth_noise(rng, size, (3 * cells, 3 * cells))
    return _blend(a, b, t)


def _bg_stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    hue = rng.uniform(0, 360)
    a, b = _muted(rng, hue, (0.35, 0.6)), _muted(rng, hue + rng.uniform(-60, 60), (0.65, 0.9))
    x, y = _unit_grid(size)
    theta, period = rng.uniform(0, math.pi), rng.uniform(0.08, 0.25)
    phase = (np.cos(theta) * x + np.sin(theta) * y) / period
    t = 0.5 + 0.5 * np.tanh(4.0 * np.sin(2 * math.pi * phase))
    return _blend(a, b, t)


def _bg_gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    a = _muted(rng, rng.uniform(0, 360), (0.25, 0.5))
    b = _muted(rng, rng.uniform(0, 360), (0.6, 0.95))
    x, y = _unit_grid(size)
    theta = rng.uniform(0, 2 * math.pi)
    t = np.cos(theta) * (x - 0.5) + np.sin(theta) * (y - 0.5)
    return _blend(a, b, np.clip(t / 1.42 + 0.5, 0, 1))


def _bg_blobs(rng: np.random.Generator, size: int) -> np.ndarray:
    hue = rng.uniform(0, 360)
    a, b = _muted(rng, hue, (0.3, 0.55)), _muted(rng, hue + 180, (0.6, 0.9))
    noise = _smooth_noise(rng, size, (5, 5))
    t = 1.0 / (1.0 + np.exp(-(noise - 0.5) * 25.0))
    return _blend(a, b, t)


def _bg_checker(rng: np.random.Generator, size: int) -> np.ndarray:
    hue = rng.uniform(0, 360)
    a, b = _muted(rng, hue, (0.3, 0.5)), _muted(rng, hue, (0.65, 0.9))
    x, y = _unit_grid(size)
    cells = int(rng.integers(3, 9))
    theta = rng.uniform(-0.4, 0.4)
    u = np.cos(theta) * x + np.sin(theta) * y
    v = -np.sin(theta) * x + np.cos(theta) * y
    t = (np.floor(u * cells) + np.floor(v * cells)) % 2
    return _blend(a, b, t.astype(np.float32))


def _bg_grass(rng: np.random.Generator, size: int) -> np.ndarray:
    dark, light = _muted(rng, 95, (0.25, 0.4), (0.2, 0.3)), _muted(rng, 85, (0.5, 0.7), (0.18, 0.28))
    # Blades: noise that varies fast across columns and slowly along rows.
    blades = _smooth_noise(rng, size, (max(size // 24, 2), max(size // 2, 4)))
    patches = _smooth_noise(rng, size, (4, 4))
    return _blend(dark, light, 0.65 * blades + 0.35 * patches)


def _bg_sand(rng: np.random.Generator, size: int) -> np.ndarray:
    base = _muted(rng, 38, (0.7, 0.85), (0.15, 0.28))
    x, y = _unit_grid(size)
    ripples = 0.06 * np.sin(2 * math.pi * (y * rng.uniform(5, 10) + 0.15 * _smooth_noise(rng, size, (3, 3))))
    grain = 0.05 * rng.standard_normal((size, size), dtype=np.float32)
    return base * (1.0 + ripples + grain)[..., None]


def _bg_water(rng: np.random.Generator, size: int) -> np.ndarray:
    deep, shallow = _muted(rng, 205, (0.35, 0.5), (0.2, 0.3)), _muted(rng, 190, (0.6, 0.75), (0.15, 0.25))
    x, y = _unit_grid(size)
    warp = _smooth_noise(rng, size, (4, 4))
    waves = 0.5 + 0.5 * np.sin(2 * math.pi * (y * rng.uniform(4, 8) + 0.6 * warp + 0.3 * x))
    return _blend(deep, shallow, 0.6 * waves + 0.4 * _smooth_noise(rng, size, (6, 6)))


def _bg_sky(rng: np.random.Generator, size: int) -> np.ndarray:
    top, horizon = _muted(rng, 210, (0.65, 0.8), (0.2, 0.3)), _muted(rng, 200, (0.85, 0.95), (0.08, 0.15))
    _, y = _unit_grid(size)
    sky = _blend(top, horizon, np.broadcast_to(y, (size, size)))
    clouds = np.clip((_smooth_noise(rng, size, (4, 6)) - 0.55) * 3.0, 0, 1)
    return _blend(sky, np.full(3, 0.96, np.float32), clouds)


def _bg_snow(rng: np.random.Generator, size: int) -> np.ndarray:
    base = _muted(rng, 215, (0.82, 0.95), (0.03, 0.1))
    drifts = 0.08 * (_smooth_noise(rng, size, (5, 5)) - 0.5)
    sparkle = 0.03 * rng.standard_normal((size, size), dtype=np.float32)
    return base * (1.0 + drifts + sparkle)[..., None]


_BACKGROUND_RENDERERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "noise": _bg_noise,
    "stripes": _bg_stripes,
    "gradient": _bg_gradient,
    "blobs": _bg_blobs,
    "checker": _bg_checker,
    "grass": _bg_grass,
    "sand": _bg_sand,
    "water": _bg_water,
    "sky": _bg_sky,
    "snow": _bg_snow,
}


def render_background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render a procedural background texture.

    Args:
        kind: One of ``BACKGROUNDS``.
        size: Side length in pixels.
        rng: Source of randomness for the texture.

    Returns:
        ``(size, size, 3)`` float32 image in ``[0, 1]`` with muted colours.

    Examples:
        >>> render_background("sand", 16, np.random.default_rng(0)).shape
        (16, 16, 3)
    """
    if kind not in _BACKGROUND_RENDERERS:
        raise ValueError(f"kind: expected one of {BACKGROUNDS}, got {kind!r}")
    return np.clip(_BACKGROUND_RENDERERS[kind](rng, size), 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------ captions
_BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "noise": ("on a noisy background", "on a mottled background"),
    "stripes": ("on a striped background", "on stripes"),
    "gradient": ("on a gradient background", "on a smooth gradient"),
    "blobs": ("on a blotchy background", "on a background of blobs"),
    "checker": ("on a checkered background", "on a checkerboard"),
    "grass": ("on grass", "on the grass", "on a lawn"),
    "sand": ("on sand", "on the beach", "on sandy ground"),
    "water": ("on water", "floating on water", "over the sea"),
    "sky": ("in the sky", "against the sky"),
    "snow": ("on snow", "in the snow"),
}
_PLAIN_TEMPLATES = (
    "{objects}",
    "a photo of {objects}",
    "a picture of {objects}",
    "an image with {objects}",
    "a drawing of {objects}",
)
_BACKGROUND_TEMPLATES = (
    "{objects} {where}",
    "a photo of {objects} {where}",
    "there is {objects} {where}",
    "a picture of {objects} {where}",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(obj: WorldObject, *, with_colour: bool, with_size: bool) -> str:
    words = ([obj.size_word] if with_size and obj.size_word else []) + ([obj.colour] if with_colour else [])
    words.append(obj.category)
    return f"{_article(words[0])} {' '.join(words)}"


def _relation(first: WorldObject, second: WorldObject, overlaps: bool) -> str:
    """How ``first`` sits relative to ``second`` (drawn after it)."""
    if overlaps:
        return "behind"
    dx = first.centre[0] - second.centre[0]
    dy = first.centre[1] - second.centre[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


# How often a scene's own caption names an object's colour and the background.
CAPTION_COLOUR_PROB = 0.9
CAPTION_BACKGROUND_PROB = 0.35


def _caption(
    objects: list[WorldObject],
    background: str,
    overlaps: bool,
    rng: np.random.Generator,
    colour_prob: float = CAPTION_COLOUR_PROB,
    background_prob: float = CAPTION_BACKGROUND_PROB,
) -> str:
    """Caption naming every object (with colour with probability ``colour_prob``),
    sometimes a relation, and the background with probability ``background_prob``.
    The random stream is consumed the same way whatever the probabilities."""
    phrases = [
        _noun_phrase(obj, with_colour=rng.random() < colour_prob, with_size=rng.random() < 0.5) for obj in objects
    ]
    if len(objects) == 2 and rng.random() < 0.5:
        first, second = objects[0], objects[1]
        if rng.random() < 0.5 and not overlaps:
            relation = "next to"
        else:
            relation = _relation(first, second, overlaps)
        listed = f"{phrases[0]} {relation} {phrases[1]}"
    elif len(objects) == 1:
        listed = phrases[0]
    else:
        ordered = [phrases[i] for i in rng.permutation(len(objects))]
        listed = ", ".join(ordered[:-1]) + " and " + ordered[-1]
    if rng.random() < background_prob:
        where = _BACKGROUND_PHRASES[background][rng.integers(len(_BACKGROUND_PHRASES[background]))]
        template = _BACKGROUND_TEMPLATES[rng.integers(len(_BACKGROUND_TEMPLATES))]
        return template.format(objects=listed, where=where)
    return _PLAIN_TEMPLATES[rng.integers(len(_PLAIN_TEMPLATES))].format(objects=listed)


def caption_templates(*, backgrounds: bool = False) -> list[str]:
    """Prompt templates in the style of the world's captions, for prompt ensembling.

    Args:
        backgrounds: Also ``"{} <phrase>"`` for every background phrase of the captions
            (``"{} on grass"``, ...), so that an average over them holds no one background.

    Returns:
        Templates with one ``{}`` slot for a prompt such as ``"a circle"``.

    Examples:
        >>> caption_templates()[:2]
        ['{}', 'a photo of {}']
    """
    templates = [t.replace("{objects}", "{}") for t in _PLAIN_TEMPLATES]
    if backgrounds:
        templates += ["{} " + phrase for phrases in _BACKGROUND_PHRASES.values() for phrase in phrases]
    return templates


def sample_caption(
    scene: Scene,
    rng: np.random.Generator,
    colour_prob: float = CAPTION_COLOUR_PROB,
    background_prob: float = CAPTION_BACKGROUND_PROB,
) -> str:
    """Another caption of ``scene``, drawn like its own with other word probabilities.

    Training recipes use it to vary how often captions name colours and
    backgrounds without changing the scenes (or their exported captions).

    Args:
        scene: A generated scene.
        rng: Random stream of the caption (e.g. seeded by scene and epoch).
        colour_prob: Probability that an object's phrase names its colour.
        background_prob: Probability that the caption names the background.

    Returns:
        A caption in the world's caption style.

    Examples:
        >>> scene = generate_scene(5)
        >>> scene.caption
        'a photo of a small red hexagon and a large blue diamond'
        >>> sample_caption(scene, np.random.default_rng(1), colour_prob=0.0, background_prob=0.0)
        'a photo of a hexagon next to a diamond'
    """
    for name, value in (("colour_prob", colour_prob), ("background_prob", background_prob)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: expected a probability in [0, 1], got {value!r}")
    return _caption(scene.objects, scene.background, scene.overlaps, rng, colour_prob, background_prob)


# --------------------------------------------------------------------- scene
def _sample_object(category: str, rng: np.random.Generator, object_scale: float = 1.0) -> WorldObject:
    colour = COLOURS[rng.integers(len(COLOURS))]
    hue = (_COLOUR_HUE[colour] + rng.uniform(-6, 6)) % 360 / 360
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.8, 1.0), rng.uniform(0.78, 1.0))
    scale = float(rng.uniform(*_SCALE_RANGE)) * object_scale
    size_word = "small" if scale < _SMALL_BELOW else "large" if scale > _LARGE_ABOVE else ""
    return WorldObject(
        category=category,
        colour=colour,
        centre=(0.5, 0.5),
        scale=scale,
        angle=float(rng.uniform(-35, 35)),
        size_word=size_word,
        rgb=tuple(float(c) for c in rgb),
        shade=(float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0.1, 0.3))),
    )


# Layout checks run on a fixed coarse grid so that the scene content does not
# depend on the output resolution.
_LAYOUT_SIZE = 48
_LAYOUT_SUPERSAMPLE = 2


def _place(
    candidate: WorldObject, visible: list[np.ndarray], areas: list[float], rng: np.random.Generator
) -> np.ndarray | None:
    """Move ``candidate`` to a spot that leaves every placed object visible enough.

    Args:
        candidate: Object to place; its ``centre`` is overwritten.
        visible: Visible coverage of each placed object on the layout grid;
            updated in place on success.
        areas: Full (unoccluded) coverage sum of each placed object.
        rng: Layout random stream.

    Returns:
        The candidate's layout coverage, or ``None`` when no tried spot works.
    """
    margin = candidate.scale
    for _ in range(_PLACEMENT_TRIES):
        candidate.centre = (float(rng.uniform(margin, 1 - margin)), float(rng.uniform(margin, 1 - margin)))
        alpha = _coverage(candidate, _LAYOUT_SIZE, _LAYOUT_SUPERSAMPLE)
        covered = [vis * (1.0 - alpha) for vis in visible]
        if all(c.sum() >= _MIN_VISIBLE * area for c, area in zip(covered, areas)):
            visible[:] = covered
            return alpha
    return None


def generate_scene(seed: int, size: int = 96, variant: WorldVariant | None = None) -> Scene:
    """Generate one scene, a pure function of ``seed`` (and ``size`` and ``variant``).

    Args:
        seed: Non-negative integer seed. Train seeds start at
            ``TRAIN_SEED_START``, held-out seeds at ``HELDOUT_SEED_START``.
        size: Image side in pixels, 16 to 1024.
        variant: A :class:`WorldVariant` of the image statistics; ``None`` is the world as documented.

    Returns:
        The ``Scene``: image, exact label map, objects, background, caption.

    Examples:
        >>> scene = generate_scene(0)
        >>> scene.image.shape, scene.label.shape
        ((96, 96, 3), (96, 96))
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 16 <= size <= 1024:
        raise ValueError(f"size: expected an int in [16, 1024], got {size!r}")
    variant = WorldVariant() if variant is None else variant
    if not isinstance(variant, WorldVariant):
        raise TypeError(f"variant: expected a WorldVariant or None, got {type(variant).__name__}")
    layout_rng, texture_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(2))

    count = int(layout_rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    categories = layout_rng.choice(len(CATEGORIES), size=count, replace=False)
    objects: list[WorldObject] = []
    layout: list[np.ndarray] = []  # full layout coverage of each placed object
    visible: list[np.ndarray] = []
    for c in categories:
        candidate = _sample_object(CATEGORIES[int(c)], layout_rng, variant.object_scale)
        alpha = _place(candidate, visible, [float(a.sum()) for a in layout], layout_rng)
        if alpha is not None:
            objects.append(candidate)
            layout.append(alpha)
            visible.append(alpha)
    overlaps = len(objects) == 2 and bool((layout[0] * layout[1]).any())

    preferred = PREFERRED_BACKGROUND[objects[0].category]
    background = preferred if layout_rng.random() < CONTEXT_BIAS else BACKGROUNDS[layout_rng.integers(len(BACKGROUNDS))]
    caption = _caption(objects, background, overlaps, layout_rng)

    canvas = variant.render_background(render_background(background, size, texture_rng))
    image, label, instance = render_objects(canvas, objects, texture_rng)
    return Scene(
        image=image,
        label=label,
        objects=objects,
        background=background,
        caption=caption,
        seed=int(seed),
        instance=instance,
        overlaps=overlaps,
    )


# ------------------------------------------------------------------- dataset
class WorldDataset(torch.utils.data.Dataset):
    """Map-style dataset of consecutive seeds, generated on the fly.

    Args:
        start_seed: Seed of item 0; item ``i`` is ``generate_scene(start_seed + i)``.
        length: Number of items.
        size: Image side in pixels.
        transform: Optional callable applied to the PIL image (e.g. an
            open_clip preprocess); without it items hold ``PIL.Image``.

    Examples:
        >>> data = WorldDataset(HELDOUT_SEED_START, length=4)
        >>> image, caption = data[0]
        >>> image.size
        (96, 96)
        >>> data.scene(0).seed == HELDOUT_SEED_START
        True
    """

    def __init__(self, start_seed: int, length: int, size: int = 96, transform: Callable | None = None) -> None:
        if isinstance(start_seed, bool) or not isinstance(start_seed, (int, np.integer)) or start_seed < 0:
            raise ValueError(f"start_seed: expected a non-negative int, got {start_seed!r}")
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
            raise ValueError(f"length: expected a non-negative int, got {length!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform: expected callable or None, got {type(transform).__name__}")
        self.start_seed = int(start_seed)
        self.length = int(length)
        self.size = size
        self.transform = transform

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        """The full ``Scene`` (labels, objects, caption) behind item ``index``."""
        if not -self.length <= index < self.length:
            raise IndexError(f"index: expected -{self.length}..{self.length - 1}, got {index}")
        return generate_scene(self.start_seed + index % self.length, self.size)

    def __getitem__(self, index: int) -> tuple[object, str]:
        scene = self.scene(index)
        image = scene.pil()
        if self.transform is not None:
            image = self.transform(image)
        return image, scene.caption
