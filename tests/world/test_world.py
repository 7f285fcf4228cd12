"""Tests for the procedural image-text world (captum_iclip.world)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import PurePosixPath

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, ImageFilter

from captum_iclip._io import atomic_write
from captum_iclip.cli.world import main
from captum_iclip.world import (
    BACKGROUNDS,
    CATEGORIES,
    COLOURS,
    CONTEXT_BIAS,
    PREFERRED_BACKGROUND,
    WorldDataset,
    WorldObject,
    class_names,
    export_image_text,
    export_voc,
    generate_scene,
    prompt_for,
    render_objects,
    voc_colormap,
)
from captum_iclip.world import export as world_export
from captum_iclip.world.generator import _COLOUR_HUE

GREY = np.full((96, 96, 3), 0.5, np.float32)


def _square(colour: str, left: float, top: float, side: float, size: int = 96) -> WorldObject:
    """Axis-aligned square whose edges sit on the given pixel coordinates."""
    # The unit square spans +-0.72, so half its side is 0.72 * scale * size.
    centre = ((left + side / 2) / size, (top + side / 2) / size)
    return WorldObject("square", colour, centre, scale=side / 2 / (0.72 * size), rgb=(1.0, 0.0, 0.0))


def _hsv(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).convert("HSV"), np.float64) / 255.0


def _eroded(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels whose whole ``width x width`` neighbourhood lies in ``mask``."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.filter(ImageFilter.MinFilter(width))) > 0


# ------------------------------------------------------------------ generator
def test_same_seed_gives_identical_scene_and_seeds_differ():
    first, again = generate_scene(123), generate_scene(123)
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.label, again.label)
    assert first.caption == again.caption and first.objects == again.objects and first.background == again.background
    images = [generate_scene(seed).image for seed in range(6)]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not np.array_equal(images[i], images[j])


def test_scene_content_does_not_depend_on_resolution():
    small, large = generate_scene(42, size=64), generate_scene(42, size=160)
    assert small.image.shape == (64, 64, 3) and large.label.shape == (160, 160)
    assert small.caption == large.caption and small.objects == large.objects and small.background == large.background
    # Each object's pixel area scales with the squared resolution.
    for k, _ in enumerate(small.objects, start=1):
        ratio = (large.instance == k).sum() / (small.instance == k).sum()
        assert ratio == pytest.approx((160 / 64) ** 2, rel=0.08)


def test_axis_aligned_square_covers_exactly_its_pixels():
    image, label, instance = render_objects(GREY, [_square("red", 36, 20, 24)])
    rows, cols = np.nonzero(label)
    assert (label == CATEGORIES.index("square") + 1).sum() == 24 * 24 == rows.size
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (20, 43, 36, 59)
    assert set(np.unique(instance)) == {0, 1}
    # Pixels fully inside are the object's flat colour, outside the background.
    np.testing.assert_array_equal(image[30, 40], [255, 0, 0])
    np.testing.assert_array_equal(image[10, 10], [128, 128, 128])


def test_circle_and_ring_areas_match_geometry():
    radius = 20.0
    circle = WorldObject("circle", "blue", (0.5, 0.5), radius / 96)
    ring = WorldObject("ring", "blue", (0.5, 0.5), radius / 96)
    # The shapes are 64-gons; the ring's hole has 0.55 of the outer radius.
    polygon_area = 32 * np.sin(2 * np.pi / 64) * radius**2
    circle_pixels = (render_objects(GREY, [circle])[1] > 0).sum()
    ring_label = render_objects(GREY, [ring])[1]
    assert circle_pixels == pytest.approx(polygon_area, rel=0.01)
    assert (ring_label > 0).sum() == pytest.approx(polygon_area * (1 - 0.55**2), rel=0.02)
    assert ring_label[48, 48] == 0 and ring_label[48, 48 + 16] == CATEGORIES.index("ring") + 1


def test_top_object_owns_the_overlap():
    bottom, top = _square("red", 20, 20, 40), _square("blue", 40, 40, 40)
    bottom.rgb, top.rgb = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)
    image, _, instance = render_objects(GREY, [bottom, top])
    assert (instance == 2).sum() == 40 * 40
    assert (instance == 1).sum() == 40 * 40 - 20 * 20
    assert (instance[40:60, 40:60] == 2).all()
    np.testing.assert_array_equal(image[50, 50], [0, 0, 255])
    np.testing.assert_array_equal(image[25, 25], [255, 0, 0])


def test_label_pixels_carry_their_objects_colour_and_background_is_muted():
    for seed in range(40):
        scene = generate_scene(seed)
        hsv = _hsv(scene.image)
        for k, obj in enumerate(scene.objects, start=1):
            inside = _eroded(scene.instance == k, 3)
            assert inside.any(), f"seed {seed}: object {obj.category} has no interior"
            assert (scene.label[scene.instance == k] == obj.class_id).all()
            hue_error = np.abs((hsv[..., 0][inside] * 360 - _COLOUR_HUE[obj.colour] + 180) % 360 - 180)
            assert hue_error.max() < 20, f"seed {seed}: {obj.colour} {obj.category} hue off by {hue_error.max():.1f}"
            assert hsv[..., 1][inside].min() > 0.6
        far_background = _eroded(scene.label == 0, 5)
        assert hsv[..., 1][far_background].max() < 0.33, f"seed {seed}: saturated background"


def test_each_object_stays_visible():
    for seed in range(40):
        scene = generate_scene(seed)
        for k, obj in enumerate(scene.objects, start=1):
            alone = render_objects(GREY, [obj])[2]
            # Placement keeps half of every object visible; allow for the
            # coarser layout grid the check runs on.
            assert (scene.instance == k).sum() >= 0.4 * (alone == 1).sum()


def test_caption_names_every_object_and_no_other_category():
    with_colour = 0
    for seed in range(60):
        scene = generate_scene(seed)
        words = set(re.findall(r"[a-z]+", scene.caption))
        for category in CATEGORIES:
            assert (category in words) == (category in scene.categories), (seed, scene.caption)
        with_colour += sum(obj.colour in words for obj in scene.objects)
        assert 1 <= len(scene.objects) <= 3 and len(set(scene.categories)) == len(scene.objects)
    total = sum(len(generate_scene(seed).objects) for seed in range(60))
    assert with_colour >= 0.8 * total


def test_backgrounds_follow_the_context_bias():
    seeds = range(500)
    scenes = [generate_scene(seed, size=32) for seed in seeds]
    preferred = np.mean([s.background == PREFERRED_BACKGROUND[s.objects[0].category] for s in scenes])
    expected = CONTEXT_BIAS + (1 - CONTEXT_BIAS) / len(BACKGROUNDS)
    assert preferred == pytest.approx(expected, abs=0.07)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {c for s in scenes for c in s.categories} == set(CATEGORIES)
    assert {o.colour for s in scenes for o in s.objects} == set(COLOURS)


def test_vocabulary_helpers():
    assert class_names() == ["background", *CATEGORIES]
    assert len(CATEGORIES) >= 8 and len(COLOURS) >= 6
    assert set(PREFERRED_BACKGROUND) == set(CATEGORIES) and set(PREFERRED_BACKGROUND.values()) <= set(BACKGROUNDS)
    assert prompt_for("star") == "a star"
    with pytest.raises(ValueError, match="category"):
        prompt_for("dog")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: generate_scene(-1), "seed"),
        (lambda: generate_scene(1.5), "seed"),
        (lambda: generate_scene(0, size=8), "size"),
        (lambda: WorldObject("blob", "red", (0.5, 0.5), 0.1), "category"),
        (lambda: WorldObject("star", "teal", (0.5, 0.5), 0.1), "colour"),
        (lambda: render_objects(np.zeros((8, 9, 3)), []), "background"),
        (lambda: WorldDataset(0, -1), "length"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_dataset_items_match_scenes():
    data = WorldDataset(1000, length=3, size=64)
    image, caption = data[2]
    scene = data.scene(2)
    assert len(data) == 3 and scene.seed == 1002 and caption == scene.caption
    np.testing.assert_array_equal(np.asarray(image), scene.image)
    shapes = WorldDataset(1000, length=3, size=64, transform=lambda im: np.asarray(im).shape)
    assert shapes[0] == ((64, 64, 3), generate_scene(1000, 64).caption)
    with pytest.raises(IndexError):
        data[3]


# -------------------------------------------------------------------- exports
def test_voc_colormap_matches_pascal_voc():
    cmap = voc_colormap()
    assert cmap.shape == (256, 3)
    expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128)}
    expected.update({8: (64, 0, 0), 20: (0, 64, 128)})
    for index, colour in expected.items():
        assert tuple(cmap[index]) == colour
    assert tuple(cmap[255]) == (224, 224, 192)


def test_export_voc_reads_back(tmp_path):
    root = export_voc(tmp_path / "voc", 5, seed=500, size=64)
    names = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert names == [f"world_{seed:08d}" for seed in range(500, 505)]
    assert (root / "class_names.txt").read_text().splitlines() == class_names()
    captions = json.loads((root / "captions.json").read_text())
    for seed, name in zip(range(500, 505), names):
        scene = generate_scene(seed, 64)
        mask = Image.open(root / "SegmentationClass" / f"{name}.png")
        assert mask.mode == "P"
        assert mask.getpalette() == voc_colormap().reshape(-1).tolist()
        np.testing.assert_array_equal(np.asarray(mask), scene.label)
        photo = Image.open(root / "JPEGImages" / f"{name}.jpg")
        assert photo.format == "JPEG" and photo.mode == "RGB" and photo.size == (64, 64)
        # Quality 95 with PIL's default 4:2:0 chroma subsampling, as in VOC.
        assert np.abs(np.asarray(photo, np.float64) - scene.image).mean() < 6.0
        assert captions[name] == scene.caption
    assert not list(root.rglob("*.partial"))


def test_export_image_text_reads_back_as_csv_and_webdataset(tmp_path):
    out = tmp_path / "text"
    info = export_image_text(out, 7, seed=30, size=48, shard_size=3)
    scenes = {f"world_{seed:08d}": generate_scene(seed, 48) for seed in range(30, 37)}

    assert [p.name for p in info["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    samples = list(wds.WebDataset(info["wds_url"], shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == list(scenes)
    for sample in samples:
        scene = scenes[sample["__key__"]]
        np.testing.assert_array_equal(np.asarray(sample["png"]), scene.image)
        assert sample["txt"] == scene.caption

    with open(info["csv"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [PurePosixPath(r["filepath"]).stem for r in rows] == list(scenes)
    for row in rows:
        scene = scenes[PurePosixPath(row["filepath"]).stem]
        np.testing.assert_array_equal(np.asarray(Image.open(out / row["filepath"])), scene.image)
        assert row["title"] == scene.caption
    assert info["num_samples"] == 7 and not list(out.rglob("*.partial"))


def test_interrupted_export_leaves_no_partial_file_under_a_final_name(tmp_path, monkeypatch):
    calls = []

    def failing_generate(seed, size):
        if len(calls) == 4:
            raise RuntimeError("killed")
        calls.append(seed)
        return generate_scene(seed, size)

    monkeypatch.setattr(world_export, "generate_scene", failing_generate)
    out = tmp_path / "text"
    with pytest.raises(RuntimeError, match="killed"):
        export_image_text(out, 10, size=32, shard_size=3)
    # One full shard of three samples survives; the open one is dropped and
    # no CSV claims a complete export.
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-000000.tar"]
    assert len(list(wds.WebDataset(str(out / "shards/shard-000000.tar"), shardshuffle=False))) == 3
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"world_{s:08d}.png" for s in range(4)]
    assert not (out / "train.csv").exists()

    def failing_write(handle):
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "file.bin", failing_write)
    assert not (tmp_path / "file.bin").exists() and not list(tmp_path.glob(".file.bin*"))


def test_export_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="formats"):
        export_image_text(tmp_path, 2, formats=("csv", "parquet"))
    with pytest.raises(TypeError, match="formats"):
        export_image_text(tmp_path, 2, formats="csv")
    with pytest.raises(ValueError, match="shard_size"):
        export_image_text(tmp_path, 2, shard_size=0)
    with pytest.raises(ValueError, match="split"):
        export_voc(tmp_path, 2, split="../val")


def test_cli_writes_both_layouts(tmp_path, capsys):
    assert main(["export-voc", "--root", str(tmp_path / "voc"), "-n", "3", "--size", "32"]) == 0
    assert len(list((tmp_path / "voc/JPEGImages").glob("*.jpg"))) == 3
    assert main(["export-text", "--out", str(tmp_path / "txt"), "-n", "2", "--size", "32", "--formats", "wds"]) == 0
    assert [p.name for p in (tmp_path / "txt/shards").iterdir()] == ["shard-000000.tar"]
    assert not (tmp_path / "txt/train.csv").exists()
    assert "wrote 2 scenes" in capsys.readouterr().out


def test_sample_caption_controls_colour_and_background_words():
    from captum_iclip.world import sample_caption
    from captum_iclip.world.generator import _BACKGROUND_PHRASES

    scenes = [generate_scene(seed) for seed in range(40)]
    for scene in scenes:
        plain = sample_caption(scene, np.random.default_rng(scene.seed), colour_prob=0.0, background_prob=0.0)
        words = set(plain.replace(",", " ").split())
        assert not words & set(COLOURS), plain
        assert all(category in plain for category in scene.categories)
        assert not any(phrase in plain for phrase in _BACKGROUND_PHRASES[scene.background])
        full = sample_caption(scene, np.random.default_rng(scene.seed), colour_prob=1.0, background_prob=1.0)
        assert all(obj.colour in full.split() for obj in scene.objects), full
        assert any(phrase in full for phrase in _BACKGROUND_PHRASES[scene.background]), full
        # Same stream, same caption.
        assert sample_caption(scene, np.random.default_rng(7)) == sample_caption(scene, np.random.default_rng(7))
    assert len(BACKGROUNDS) == len(_BACKGROUND_PHRASES)
    # Overlapping pairs keep their "behind" relation available to re-captions.
    assert any(scene.overlaps for scene in scenes) and not any(s.overlaps for s in scenes if len(s.objects) != 2)
    with pytest.raises(ValueError, match="colour_prob: expected a probability"):
        sample_caption(scenes[0], np.random.default_rng(0), colour_prob=1.5)


def test_caption_templates_rebuild_the_captions_of_single_objects():
    from captum_iclip.world import caption_templates, sample_caption
    from captum_iclip.world.generator import _BACKGROUND_PHRASES

    plain, with_backgrounds = caption_templates(), caption_templates(backgrounds=True)
    assert all(t.count("{}") == 1 for t in with_backgrounds)
    assert with_backgrounds[: len(plain)] == plain
    assert len(with_backgrounds) == len(plain) + sum(len(p) for p in _BACKGROUND_PHRASES.values())
    singles = [s for s in (generate_scene(seed) for seed in range(60)) if len(s.objects) == 1]
    assert len(singles) >= 5
    for scene in singles:
        (obj,) = scene.objects
        phrases = {f"a {obj.category}", f"a {obj.size_word} {obj.category}"}
        caption = sample_caption(scene, np.random.default_rng(scene.seed), colour_prob=0.0, background_prob=0.0)
        assert caption in {t.format(p) for t in plain for p in phrases}, caption
        for phrase in _BACKGROUND_PHRASES[scene.background]:
            assert "{} " + phrase in with_backgrounds


def test_world_variants_change_only_what_they_name():
    from captum_iclip.world import WorldVariant

    seed = 10_000_321
    base = generate_scene(seed)
    same = generate_scene(seed, variant=WorldVariant())
    assert (same.image == base.image).all() and same.caption == base.caption  # the default is the world
    for kind in ("smooth", "uniform"):
        scene = generate_scene(seed, variant=WorldVariant(backgrounds=kind))
        # Same objects, layout, labels and caption; only the background's pixels differ.
        assert scene.caption == base.caption and (scene.label == base.label).all()
        objects = base.label > 0
        inside = objects.copy()  # away from the anti-aliased edges, where the background blends in
        inside[1:-1, 1:-1] &= objects[:-2, 1:-1] & objects[2:, 1:-1] & objects[1:-1, :-2] & objects[1:-1, 2:]
        assert (scene.image[inside] == base.image[inside]).all(-1).mean() > 0.99  # thin parts blend too
        near = objects.copy()  # the objects and their anti-aliased rim
        near[1:-1, 1:-1] |= objects[:-2, 1:-1] | objects[2:, 1:-1] | objects[1:-1, :-2] | objects[1:-1, 2:]
        background = scene.image[~near].astype(float)
        if kind == "uniform":
            colours, counts = np.unique(background, axis=0, return_counts=True)
            assert counts.max() / len(background) > 0.95  # one colour, but near the objects' soft rims
        else:  # low-pass: far less pixel-to-pixel variation than the texture
            step = np.abs(np.diff(scene.image.astype(float), axis=1))[~objects[:, 1:]].mean()
            texture_step = np.abs(np.diff(base.image.astype(float), axis=1))[~objects[:, 1:]].mean()
            assert step < 0.5 * texture_step
    small = generate_scene(seed, variant=WorldVariant(object_scale=0.6))
    assert [o.category for o in small.objects] == [o.category for o in base.objects]
    assert (small.label > 0).mean() < 0.6 * (base.label > 0).mean()
    assert WorldVariant("uniform", 0.6).name() == "uniform-x0.6" and WorldVariant().name() == "default"
    with pytest.raises(ValueError, match="backgrounds: expected one of"):
        WorldVariant(backgrounds="plain")
    with pytest.raises(ValueError, match="object_scale: expected a factor"):
        WorldVariant(object_scale=3.0)
    with pytest.raises(TypeError, match="variant: expected a WorldVariant"):
        generate_scene(seed, variant="uniform")
