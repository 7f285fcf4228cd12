"""``captum-iclip audit``: the static report, its records, resumption, escaping and flags.

A tiny random dual-projection open_clip model (64-px images, 8x8 patch grid)
stands in for the bundled model; images are small PNGs written here, plus one
corrupt file. The browser check of the same page lives in test_audit_browser.py.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from PIL import Image

from captum_iclip import CLIPSimilarity
from captum_iclip.audit import audit, background_fraction
from captum_iclip.cli import audit as command
from captum_iclip.cli import main as cli_main
from captum_iclip.cli.audit import AuditModel
from captum_iclip.loading.loader import WeightsUnavailableError
from captum_iclip.models.dual import DualProjectionCLIP
from captum_iclip.zoo import make_preprocess

logging.getLogger("open_clip").setLevel(logging.ERROR)

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
IMAGE_SIZE, PATCH = 64, 8
GRID = IMAGE_SIZE // PATCH


def tiny_clip(seed: int = 0) -> CLIP:
    """A 2-block ViT CLIP with random weights: 64-px inputs, 8-px patches."""
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=PATCH, image_size=IMAGE_SIZE)
    text = CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)
    return CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval().requires_grad_(False)


@functools.lru_cache(maxsize=1)
def tokenizer() -> open_clip.SimpleTokenizer:
    """open_clip's BPE tokenizer (read-only, so shared: building it takes a moment)."""
    return open_clip.SimpleTokenizer(context_length=16)


def tiny_audit_model(prompts: list[str], *, dual: bool = True, masks: bool = True) -> AuditModel:
    """What ``load_audit_model`` returns for a bundled model, built from :func:`tiny_clip`.

    The mask provider marks the central 4x4 patches of the 8x8 grid as foreground.
    """
    model = DualProjectionCLIP(tiny_clip()).eval() if dual else tiny_clip()
    sim = CLIPSimilarity(model, tokenizer(), prompts, output="logits")
    centre = torch.zeros(1, GRID, GRID, dtype=torch.bool)
    centre[:, 2:6, 2:6] = True
    preprocess = make_preprocess(IMAGE_SIZE, sim.adapter.image_mean, sim.adapter.image_std)
    return AuditModel(sim, preprocess, centre if masks else None, "tiny-random")


def write_images(folder: Path, count: int, *, seed: int = 0, corrupt: bool = True) -> list[Path]:
    """``count`` seeded 80x72 PNGs (a coloured disc on noise) and, optionally, a corrupt ``broken.png``."""
    from PIL import ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 256, size=(72, 80, 3), dtype=np.uint8))
        x, y = rng.integers(10, 50, size=2)
        ImageDraw.Draw(image).ellipse(
            [int(x), int(y), int(x) + 24, int(y) + 24], fill=tuple(int(c) for c in rng.integers(0, 256, 3))
        )
        paths.append(folder / f"image {i}.png")
        image.save(paths[-1])
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return paths


class PageParser(HTMLParser):
    """Collects what the tests check: ids, image sources, table rows' texts, flag rows."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: list[str] = []
        self.images: list[str] = []
        self.texts: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data):
        if data.strip():
            self.texts.append(data.strip())


def parse(index: Path) -> PageParser:
    parser = PageParser()
    parser.feed(index.read_text(encoding="utf-8"))
    return parser


def section(html: str, name: str) -> str:
    """The HTML of ``<section id="name">``."""
    match = re.search(rf'<section id="{name}">(.*?)</section>', html, re.S)
    assert match, f"no section {name}"
    return match.group(1)


def ok_records(out: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]
    return [r for r in records if r["status"] == "ok"]


@pytest.fixture
def patched_loader(monkeypatch):
    """Make the command load the tiny model (built with the command's own prompts)."""
    built = {}

    def load(args, prompts):
        built["model"] = tiny_audit_model(prompts)
        return built["model"]

    monkeypatch.setattr(command, "load_audit_model", load)
    return built


def run_command(capsys, images: Path, out: Path, *extra: str) -> list[int]:
    """Run ``captum-iclip audit`` and return its (explained, reused, unreadable) counts."""
    status = cli_main(
        ["audit", "--images", str(images), "--prompts", ",".join(PROMPTS), "--out", str(out), "--no-progress", *extra]
    )
    assert status == 0
    line = re.search(
        r"audit: (\d+) images explained, (\d+) reused from records, (\d+) unreadable", capsys.readouterr().out
    )
    assert line, "the command prints its work counts"
    return [int(n) for n in line.groups()]


def test_command_writes_a_complete_report_and_resumes(tmp_path, capsys, patched_loader):
    images, out = tmp_path / "in", tmp_path / "report"
    write_images(images, 3)
    assert run_command(capsys, images, out, "--top-k", "2") == [3, 0, 1]

    index = out / "index.html"
    html = index.read_text(encoding="utf-8")
    page = parse(index)
    for name in ("prompts", "flagged", "unreadable", "images", "run"):
        assert name in page.ids
    # Self-contained: no script, no external resource.
    assert (
        "<script" not in html
        and "http://" not in html
        and "https://" not in html
        and '<link rel="stylesheet"' not in html
    )
    # 3 images: one thumbnail and top-2 prompts x 4 methods (iclip included: the model is dual) each.
    assert len(page.images) == 3 * (1 + 2 * 4)
    assert all((out / src).is_file() and (out / src).stat().st_size > 0 for src in page.images)
    records = ok_records(out)
    assert sorted(r["name"] for r in records) == ["image 0.png", "image 1.png", "image 2.png"]
    for record in records:
        assert [entry["probability"] for entry in record["top"]] == sorted(record["probabilities"], reverse=True)[:2]
        assert abs(sum(record["probabilities"]) - 1) < 1e-4
        assert list(record["top"][0]["maps"]) == ["raw", "surgery", "iclip", "mmp"]
        assert f'id="img-{record["key"]}"' in html
    # The corrupt file is a row of the unreadable section, with its name and the decoder's error.
    broken = section(html, "unreadable")
    assert "broken.png" in broken and "UnidentifiedImageError" in broken
    # Per-prompt table: the top-1 counts add up to the number of images.
    counts = [int(n) for n in re.findall(r'<td class="num">(\d+) \(\d+%\)</td>', section(html, "prompts"))]
    assert len(counts) == len(PROMPTS) and sum(counts) == 3
    assert "captum-iclip" in section(html, "run") and "tiny-random" in section(html, "run")

    # Rerun: nothing is recomputed, the records are untouched, the page is rebuilt.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "records").glob("*.json")}
    overlay_stamps = {p: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    index.unlink()
    assert run_command(capsys, images, out, "--top-k", "2") == [0, 4, 1]
    assert {p: p.stat().st_mtime_ns for p in (out / "records").glob("*.json")} == stamps
    assert {p: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")} == overlay_stamps
    assert sorted(parse(index).images) == sorted(page.images)

    # A new image is the only work of the next run; a changed setting (the methods) redoes everything.
    write_images(tmp_path / "more", 1, seed=7, corrupt=False)[0].rename(images / "new.png")
    assert run_command(capsys, images, out, "--top-k", "2") == [1, 4, 1]
    assert len(parse(index).images) == 4 * (1 + 2 * 4)
    assert run_command(capsys, images, out, "--top-k", "2", "--methods", "raw") == [4, 0, 1]
    assert len(parse(index).images) == 4 * (1 + 2 * 1)
    assert "record(s) in records/ were made with other settings" in index.read_text()


def test_user_strings_are_escaped(tmp_path):
    prompts = ['<b>&"', "a <script>alert(1)</script>", "plain"]
    model = tiny_audit_model(prompts)
    images = tmp_path / "in"
    write_images(images, 1, corrupt=False)[0].rename(images / 'x<i>&"y.png')
    summary = audit(
        images,
        prompts,
        sim=model.sim,
        preprocess=model.preprocess,
        out_dir=tmp_path / "out",
        methods=["raw"],
        progress=False,
    )
    html = summary.index.read_text(encoding="utf-8")
    assert '<b>&"' not in html and "<script" not in html and "<i>" not in html
    assert "&lt;b&gt;&amp;&quot;" in html and "x&lt;i&gt;&amp;&quot;y.png" in html
    # Parsed back, the page shows the strings exactly as given.
    texts = parse(summary.index).texts
    assert '<b>&"' in texts and "a <script>alert(1)</script>" in texts and 'x<i>&"y.png' in texts


def test_background_flag_on_a_constructed_case(tmp_path):
    """A fixed mask (left half of the grid) and methods whose maps' mass is known."""
    model = tiny_audit_model(PROMPTS)
    left_half = torch.zeros(1, GRID, GRID, dtype=torch.bool)
    left_half[:, :, : GRID // 2] = True

    def right_and_top_left(images, targets):
        # Mass: right half (2048 px) outside, top-left quarter (1024 px) inside: 2/3 outside.
        maps = torch.zeros(images.shape[0], 1, IMAGE_SIZE, IMAGE_SIZE)
        maps[..., IMAGE_SIZE // 2 :] = 1.0
        maps[..., : IMAGE_SIZE // 2, : IMAGE_SIZE // 2] = 1.0
        return maps

    def left(images, targets):
        maps = torch.zeros(images.shape[0], 1, IMAGE_SIZE, IMAGE_SIZE)
        maps[..., : IMAGE_SIZE // 2] = 3.0
        return maps - 1.0  # min-max normalisation makes the offset irrelevant

    images = tmp_path / "in"
    write_images(images, 2, corrupt=False)
    summary = audit(
        images,
        PROMPTS,
        sim=model.sim,
        preprocess=model.preprocess,
        out_dir=tmp_path / "out",
        methods={"spread": right_and_top_left, "left": left},
        mask_provider=left_half,
        top_k=1,
        low_confidence=0.6,
        progress=False,
    )
    records = ok_records(tmp_path / "out")
    assert len(records) == 2
    for record in records:
        maps = record["top"][0]["maps"]
        assert maps["spread"]["background_fraction"] == pytest.approx(2 / 3, abs=1e-6)
        assert maps["left"]["background_fraction"] == 0.0
    flagged = section(summary.index.read_text(encoding="utf-8"), "flagged")
    assert flagged.count("looks at the background</span>") == 2
    assert flagged.count("spread 67% outside") == 2 and "left:" not in flagged
    # Low confidence: exactly the images whose top-1 probability is below 0.6.
    expected_low = sum(r["top"][0]["probability"] < 0.6 for r in records)
    assert flagged.count("low confidence</span>") == expected_low


def test_without_masks_the_background_flag_is_not_computed(tmp_path):
    model = tiny_audit_model(PROMPTS, dual=False, masks=False)
    images = tmp_path / "in"
    write_images(images, 1, corrupt=False)
    summary = audit(
        images,
        PROMPTS,
        sim=model.sim,
        preprocess=model.preprocess,
        out_dir=tmp_path / "out",
        methods=["raw", "mmp"],
        top_k=1,
        progress=False,
    )
    html = summary.index.read_text(encoding="utf-8")
    assert "<em>not computed</em>: no foreground mask provider" in section(html, "flagged")
    assert "looks at the background</span>" not in html
    (record,) = ok_records(tmp_path / "out")
    assert all(cell["background_fraction"] is None for cell in record["top"][0]["maps"].values())


def test_default_methods_follow_the_model_and_bad_input_is_named(tmp_path):
    images = tmp_path / "in"
    write_images(images, 1, corrupt=False)
    plain = tiny_audit_model(PROMPTS, dual=False, masks=False)
    kwargs = dict(sim=plain.sim, preprocess=plain.preprocess, out_dir=tmp_path / "out", top_k=1, progress=False)
    audit(images, PROMPTS, **kwargs)
    (record,) = ok_records(tmp_path / "out")
    assert list(record["top"][0]["maps"]) == ["raw", "surgery", "mmp"]  # no interpretability head: no iclip
    with pytest.raises(ValueError, match="methods: .*iclip.*DualProjectionCLIP"):
        audit(images, PROMPTS, methods=["iclip"], **kwargs)
    with pytest.raises(ValueError, match="methods: expected names from .*, got the unknown"):
        audit(images, PROMPTS, methods=["nope"], **kwargs)
    with pytest.raises(ValueError, match="prompts: expected sim.prompts"):
        audit(images, ["x", "y", "z"], **kwargs)
    with pytest.raises(ValueError, match="images: expected a glob pattern that matches files"):
        audit(str(tmp_path / "none" / "*.png"), PROMPTS, **kwargs)
    with pytest.raises(ValueError, match="top_k"):
        audit(images, PROMPTS, **{**kwargs, "top_k": 0})


def test_prompts_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# shapes\na red circle, filled\n\n  a blue square  \n", encoding="utf-8")
    args = command.build_parser().parse_args(["--images", "x", "--prompts-file", str(path), "--out", "o"])
    assert command.read_prompts(args) == ["a red circle, filled", "a blue square"]
    path.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ValueError, match="--prompts-file: expected at least one prompt line"):
        command.read_prompts(args)


def test_background_fraction_known_answers():
    maps = torch.zeros(3, 1, 4, 4)
    maps[0, :, :, 2:] = 1.0  # right half
    maps[1, :, :2, :2] = 2.0  # top-left quarter, on a shifted base
    maps[1] += 5.0
    foreground = torch.zeros(3, 2, 2, dtype=torch.bool)
    foreground[:, :, 0] = True  # left column of the 2x2 grid = left half of the pixels
    fractions = background_fraction(maps, foreground)
    assert fractions[0].item() == 1.0
    assert fractions[1].item() == 0.0
    assert torch.isnan(fractions[2])  # constant map: no mass
    ramp = torch.arange(4.0).repeat(4, 1)[None, None]  # columns 0..3: mass 0,1,2,3 per row
    assert background_fraction(ramp, foreground[:1]).item() == pytest.approx(5 / 6)
    # Sizes that are no multiple of the grid: nearest upsampling of a 2x2 grid to 3x3 pixels
    # gives the top-left patch pixels (0..1, 0..1); a map of ones but a 0 at (2, 2) has 4 of its 8 there.
    ones = torch.ones(1, 1, 3, 3)
    ones[..., 2, 2] = 0.0
    top_left = torch.tensor([[[True, False], [False, False]]])
    assert background_fraction(ones, top_left).item() == 0.5
    with pytest.raises(ValueError, match="foreground"):
        background_fraction(maps, foreground[:2])


def test_default_model_is_the_bundled_one(monkeypatch):
    from captum_iclip import zoo
    from captum_iclip.loading import bundled

    args = command.build_parser().parse_args(["--images", "x", "--prompts", "a,b", "--out", "o", "--device", "cpu"])
    if "shapes-tiny" in zoo.available():
        loaded = command.load_audit_model(args, ["a", "b"])
        assert isinstance(loaded.sim.model, DualProjectionCLIP) and loaded.mask_provider is not None
        assert loaded.sim.prompts == ["a", "b"] and loaded.name == "shapes-tiny"
    monkeypatch.setattr(bundled, "available", lambda: [])
    with pytest.raises(WeightsUnavailableError, match="bundled model shapes-tiny, which is not installed"):
        command.load_audit_model(args, ["a", "b"])


def test_text_method_colours_each_prompts_words(tmp_path, capsys, patched_loader):
    prompts = PROMPTS + ['a <b>&"']
    model = tiny_audit_model(prompts)
    images = tmp_path / "in"
    write_images(images, 2, corrupt=False)
    options = dict(sim=model.sim, preprocess=model.preprocess, methods=["raw"], top_k=2, progress=False)
    plain = audit(images, prompts, out_dir=tmp_path / "plain", **options)
    summary = audit(images, prompts, out_dir=tmp_path / "words", text_method="chefer", **options)
    # Without text_method the records and the page have no words (and their settings digest is the one before).
    assert all("words" not in entry for record in ok_records(tmp_path / "plain") for entry in record["top"])
    assert 'class="words"' not in plain.index.read_text(encoding="utf-8")
    records = ok_records(tmp_path / "words")
    assert records[0]["settings"] != ok_records(tmp_path / "plain")[0]["settings"]
    preprocess = model.preprocess
    from captum_iclip import explain_text
    from captum_iclip._io import read_image

    for record in records:
        image = preprocess(read_image(record["source"], "images"))[None]
        texts = [prompts[entry["prompt"]] for entry in record["top"]]
        for entry, expected in zip(record["top"], explain_text(model.sim, image, "chefer", texts)):
            assert entry["words"]["tokens"] == list(expected.tokens)
            assert entry["words"]["relevance"] == pytest.approx(expected.relevance.tolist(), abs=1e-6)
    html = summary.index.read_text(encoding="utf-8")
    words = re.findall(r'<div class="words"[^>]*>(.*?)</div>', html)
    assert len(words) == 2 * 2  # every explained prompt of every image
    for record in records:  # the first prompt's words in the record's card, in order, with their values
        card = html[html.index(f'id="img-{record["key"]}"') :]
        first = re.search(r'<div class="words"[^>]*>(.*?)</div>', card).group(1)
        spans = re.findall(r'<span style="background: #([0-9a-f]{6})" title="([+-][0-9.]+)">(.*?)</span>', first)
        words = record["top"][0]["words"]
        assert [token for _, _, token in spans] == [escape(t) for t in words["tokens"]]
        assert [float(value) for _, value, _ in spans] == pytest.approx(words["relevance"], abs=1e-4)
        strongest = max(range(len(spans)), key=lambda j: words["relevance"][j])
        assert spans[strongest][0] != "ffffff"  # the most relevant word is coloured
    assert "Chefer et al.&#x27;s text relevancy rollout" in html
    # The command's option reaches the audit.
    assert run_command(capsys, images, tmp_path / "cli", "--methods", "raw", "--text-method", "gradeclip") == [2, 0, 0]
    assert all("words" in entry for record in ok_records(tmp_path / "cli") for entry in record["top"])
