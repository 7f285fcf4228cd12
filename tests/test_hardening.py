"""Regression tests of the hardening pass: one test per defect found by an adversarial review.

Each test failed on the code before its fix. Models are tiny random architectures
(conftest) or the bundled shapes-tiny model where the defect is about it.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import make_images
from PIL import Image

import captum_iclip
from captum_iclip import CLIPSimilarity, DualProjectionCLIP, ITSMAttribution, MaskedMaxPoolingAttribution, zoo
from captum_iclip._io import load_torch_file, read_image
from captum_iclip.cli import main as cli_main

PACKAGE = Path(captum_iclip.__file__).parent
PROMPTS = ["a cat", "a dog", "a car"]


def one_error_line(capsys, prog: str) -> str:
    """The error a command printed: no traceback, and its last stderr line is ``<prog>: error: ...``
    (progress bars and log lines may come before); returns the message."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n"), err
    match = re.fullmatch(rf"{re.escape(prog)}: error: (.+)", err.splitlines()[-1].split("\r")[-1])
    assert match, err
    return match.group(1)


# --- 1. no code from checkpoints --------------------------------------------------------
def _torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
        ):
            yield node


def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for call in _torch_load_calls(ast.parse(path.read_text(encoding="utf-8"))):
            keyword = {k.arg: k.value for k in call.keywords}.get("weights_only")
            safe = isinstance(keyword, ast.Constant) and keyword.value is True
            calls.append((f"{path.relative_to(PACKAGE)}:{call.lineno}", safe))
    assert calls, "the scan found no torch.load call at all"
    assert [where for where, safe in calls if not safe] == []


class _RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_crafted_training_checkpoint_runs_no_code_on_resume(tmp_path):
    from test_training import random_dataset, tiny_vit, tokenizer

    from captum_iclip.training.iclip import CHECKPOINT_FORMAT, TrainConfig, train

    marker = tmp_path / "code-ran"
    crafted = tmp_path / "latest.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "payload": _RunsCode(marker)}, crafted)
    config = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=2, workers=0, resume=str(crafted), device="cpu")
    with pytest.raises(
        ValueError, match=r"resume: expected a torch checkpoint .*, got .*latest\.pt, which cannot be read"
    ):
        train(config, model=tiny_vit(), dataset=random_dataset(4, 32), tokenizer=tokenizer())
    assert not marker.exists()


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    from captum_iclip.training.iclip import _rng_state, _set_rng_state

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.standard_normal()  # a cached Gaussian in NumPy's state
    torch.save(_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    _set_rng_state(load_torch_file(tmp_path / "rng.pt"))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_checkpoints_name_the_file(tmp_path, damage):
    path = tmp_path / "head.pt"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint at all")
    with pytest.raises(
        ValueError, match=rf"path: expected a torch checkpoint .*, got {re.escape(str(path))}, which cannot be read"
    ):
        load_torch_file(path)
    clip = open_clip.model.CLIP(
        embed_dim=8,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=1, width=16, head_width=8, patch_size=4, image_size=8),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=8, vocab_size=100, width=16, heads=2, layers=1),
    )
    with pytest.raises(ValueError, match=re.escape(str(path))):
        DualProjectionCLIP(clip).load_interpretability(path)


# --- 2. the bundled model trains ---------------------------------------------------------
def _write_training_csv(folder: Path, images: int, corrupt: bool = False) -> Path:
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    rows = []
    for index in range(images):
        name = f"images/{index}.png"
        if corrupt:
            (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / name)
        rows.append(f"{name}\ta shape number {index}")
    path = folder / "train.csv"
    path.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.skipif("shapes-tiny" not in zoo.available(), reason="bundle not installed")
@pytest.mark.parametrize("model", [[], ["--model", "shapes-tiny"]], ids=["default", "named"])
def test_train_command_trains_the_bundled_model(tmp_path, capsys, model):
    from captum_iclip import zoo

    csv_path = _write_training_csv(tmp_path / "data", 4)
    out = tmp_path / "run"
    status = cli_main(
        [
            "train",
            "--train-data",
            str(csv_path),
            *model,
            "--batch-size",
            "2",
            "--workers",
            "0",
            "--output-dir",
            str(out),
            "--device",
            "cpu",
            "--lr",
            "1e-2",
        ]
    )
    assert status == 0, capsys.readouterr().err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["steps"] == 2 and stats["samples"] == 4 and stats["mode"] == "projection"
    bundle = zoo.load("shapes-tiny")
    trained = load_torch_file(out / "interpretability_head.pt")["state_dict"]
    before = bundle.dual.interpretability_head.state_dict()
    # One head, the bundle's, trained (not a fresh copy of the projection wrapped around the bundle).
    assert trained.keys() == before.keys()
    assert any(not torch.equal(trained[k], before[k]) for k in trained)
    final = load_torch_file(out / "final.pt")["state_dict"]
    assert not any(k.startswith("clip.clip.") for k in final)
    assert all(torch.equal(final[f"clip.{k}"], v) for k, v in bundle.clip.state_dict().items())


def test_training_where_every_image_is_unreadable_fails(tmp_path, capsys):
    from test_training import write_model_config

    csv_path = _write_training_csv(tmp_path / "data", 4, corrupt=True)
    status = cli_main(
        [
            "train",
            "--train-data",
            str(csv_path),
            "--model-config",
            str(write_model_config(tmp_path)),
            "--from-scratch",
            "--batch-size",
            "2",
            "--workers",
            "0",
            "--output-dir",
            str(tmp_path / "run"),
            "--device",
            "cpu",
        ]
    )
    assert status == 2
    assert one_error_line(capsys, "captum-iclip train").startswith(
        "train_data: expected readable images (check the paths and the image files), got none: 4 skipped"
    )
    assert not (tmp_path / "run" / "final.pt").exists()


# --- 3. audits never audit their own output; the report follows the folder ------------------
def _audit_kwargs(out: Path, prompts=None):
    from test_audit import PROMPTS as AUDIT_PROMPTS
    from test_audit import tiny_audit_model

    model = tiny_audit_model(list(prompts or AUDIT_PROMPTS))
    return dict(
        prompts=list(prompts or AUDIT_PROMPTS),
        sim=model.sim,
        preprocess=model.preprocess,
        out_dir=out,
        mask_provider=model.mask_provider,
        methods=["raw"],
        top_k=1,
        progress=False,
    )


def test_audit_out_inside_images_is_not_audited(tmp_path):
    from test_audit import write_images

    from captum_iclip.audit import audit

    images = tmp_path / "photos"
    write_images(images, 3, corrupt=False)
    kwargs = _audit_kwargs(images / "report")
    first = audit(images, **kwargs)
    second = audit(images, **kwargs)
    assert (first.computed, first.reused, first.unreadable) == (3, 0, 0)
    assert (second.computed, second.reused, second.unreadable) == (0, 3, 0)
    assert len(list((images / "report" / "records").glob("*.json"))) == 3


def test_audit_lists_dangling_and_looping_links_as_unreadable(tmp_path):
    from test_audit import write_images

    from captum_iclip.audit import audit

    images = tmp_path / "photos"
    write_images(images, 1, corrupt=False)
    os.symlink(images / "gone.png", images / "dangling.png")
    os.symlink(images / "loop.png", images / "loop.png")
    summary = audit(images, **_audit_kwargs(tmp_path / "report"))
    assert (summary.computed, summary.unreadable) == (1, 2)
    page = summary.index.read_text(encoding="utf-8")
    unreadable = re.search(r'<section id="unreadable">(.*?)</section>', page, re.S).group(1)
    assert "dangling.png" in unreadable and "loop.png" in unreadable


def test_audit_report_drops_deleted_and_replaced_images(tmp_path):
    from test_audit import write_images

    from captum_iclip.audit import audit
    from captum_iclip.audit import records as rec

    images = tmp_path / "photos"
    paths = write_images(images, 3, corrupt=False)
    kwargs = _audit_kwargs(tmp_path / "report")
    audit(images, **kwargs)
    paths[0].unlink()
    write_images(tmp_path / "other", 1, seed=9, corrupt=False)[0].replace(paths[1])  # same name, new content
    summary = audit(images, **kwargs)
    assert (summary.computed, summary.reused) == (1, 1)
    page = summary.index.read_text(encoding="utf-8")
    thumbnails = re.findall(r'<img[^>]*src="(images/[^"]*\.png)"', page)
    records = [json.loads(p.read_text()) for p in (tmp_path / "report" / "records").glob("*.json")]
    shown = {r["key"] for r in records if any(r["key"] in t for t in thumbnails)}
    # Two images left (the replaced one with its new content), three stale-or-current records on disk.
    assert len(records) == 4 and len(shown) == 2
    assert {r["name"] for r in records if r["key"] in shown} == {"image 1.png", "image 2.png"}
    new_content = [r for r in records if r["key"] in shown and r["name"] == "image 1.png"][0]["content"]
    assert new_content == rec.hash_file(paths[1])


def test_audit_missing_images_folder_and_out_file_are_errors(tmp_path, capsys):
    from captum_iclip.audit import audit

    with pytest.raises(ValueError, match="images: expected an existing file or folder, got"):
        audit(tmp_path / "nope", **_audit_kwargs(tmp_path / "report"))
    assert (
        cli_main(
            [
                "audit",
                "--images",
                str(tmp_path / "nope"),
                "--prompts",
                "a,b",
                "--out",
                str(tmp_path / "report"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "images: expected an existing file or folder, got" in one_error_line(capsys, "captum-iclip audit")
    (tmp_path / "file").write_text("x")
    assert cli_main(["audit", "--images", str(tmp_path), "--prompts", "a,b", "--out", str(tmp_path / "file")]) == 2
    assert one_error_line(capsys, "captum-iclip audit").startswith("--out: expected a folder, got the file")


# --- 4. no silently wrong result ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sim(tiny_vit, tiny_tokenizer) -> CLIPSimilarity:
    return CLIPSimilarity(DualProjectionCLIP(tiny_vit), tiny_tokenizer, PROMPTS)


@pytest.mark.parametrize(
    "target",
    [torch.tensor(1.5), 1.5, [0.0, 1.0], torch.tensor([0.0, 1.0]), True, torch.tensor(True)],
    ids=["tensor", "float", "list", "float tensor", "bool", "bool tensor"],
)
def test_float_and_bool_targets_are_refused(tiny_sim, target):
    images = make_images(2, 3, 8, 8, seed=1)
    for method in (ITSMAttribution(tiny_sim), MaskedMaxPoolingAttribution(tiny_sim)):
        with pytest.raises(TypeError, match="target: expected"):
            method.attribute(images, target=target)
    itsm = ITSMAttribution(tiny_sim)
    assert torch.equal(itsm.attribute(images, target=torch.tensor(1)), itsm.attribute(images, target=[1, 1]))
    assert torch.equal(itsm.attribute(images, target=np.int64(2)), itsm.attribute(images, target=2))


def test_sixteen_bit_float_and_rotated_images_are_read_correctly(tmp_path):
    ramp16 = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 256).astype(np.uint16)
    Image.fromarray(ramp16).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    rgb = np.asarray(read_image(tmp_path / "deep.png"))
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], np.round(ramp16 / 257.0).astype(np.uint8))
    # float images: intensities in [0, 1]
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "float.tif")
    np.testing.assert_array_equal(
        np.asarray(read_image(tmp_path / "float.tif"))[..., 1], np.round(ramp * 255).astype(np.uint8)
    )
    # EXIF orientation 6: stored 20 wide x 10 high, shown rotated (10 wide x 20 high)
    stored = Image.fromarray(np.zeros((10, 20, 3), dtype=np.uint8))
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif)
    assert read_image(tmp_path / "phone.jpg").size == (10, 20)


def test_every_command_reads_images_through_the_one_reader(tmp_path):
    """No module but the reader opens images (labels excepted), and each path gives its result."""
    from captum_iclip.cli.common import open_images
    from captum_iclip.datasets.base import load_rgb_image
    from captum_iclip.training.data import load_image
    from captum_iclip.zoo import make_preprocess

    openers = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if re.search(r'Image\.open\(|\.convert\("RGB"\)', path.read_text(encoding="utf-8"))
    ]
    assert sorted(openers) == ["_io.py", "datasets/base.py"]  # base.py: label PNGs, read as indices
    ramp16 = (np.arange(8 * 8, dtype=np.uint32).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(ramp16).save(tmp_path / "deep.png")
    expected = np.asarray(read_image(tmp_path / "deep.png"))
    assert expected.std() > 0 and expected.max() < 255  # not the all-white image convert("RGB") gives

    def to_tensor(image):
        return torch.from_numpy(np.array(image))

    assert np.array_equal(np.asarray(open_images([str(tmp_path / "deep.png")])[0]), expected)
    assert np.array_equal(np.asarray(load_rgb_image(tmp_path / "deep.png")), expected)
    assert np.array_equal(load_image(tmp_path / "deep.png", to_tensor).numpy(), expected)
    preprocess = make_preprocess(8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    direct = preprocess(Image.open(tmp_path / "deep.png"))
    assert torch.allclose(direct, torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255)


def test_class_list_with_a_utf8_bom_keeps_its_background(tmp_path):
    from captum_iclip.datasets import FolderDataset

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.array([[0, 1, 1, 0]] * 4, dtype=np.uint8)).save(tmp_path / "masks" / "a.png")
    (tmp_path / "classes.txt").write_text("\ufeffbackground\ncat\n", encoding="utf-8")
    dataset = FolderDataset(tmp_path)
    assert dataset.class_names == ["background", "cat"]
    assert dataset.background_index == 0 and dataset.foreground_classes == [1]


def test_mmp_delta_is_that_of_the_returned_attributions(tiny_sim):
    mmp = MaskedMaxPoolingAttribution(tiny_sim)
    images = make_images(2, 3, 8, 8, seed=2)
    raw, raw_delta = mmp.attribute(images, target=[0, 2], return_convergence_delta=True)
    scores = raw.flatten(1).sum(1).double() + raw_delta.double()  # the pooled scores S_k
    assert raw_delta.abs().max() < 1e-5  # completeness
    for interpolate in (True, False):
        norm, delta = mmp.attribute(
            images, target=[0, 2], normalize=True, interpolate=interpolate, return_convergence_delta=True
        )
        assert torch.allclose(delta.double(), scores - norm.flatten(1).sum(1).double(), atol=1e-5)
        assert delta.abs().min() > 1e-3  # a normalised map does not sum to the score, and the delta says so


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.full((2, 2, 2), 0.5), "only 0 and 1"),
        (torch.tensor([[[1.0, float("nan")], [1.0, 0.0]]] * 2), "only 0 and 1"),
        (torch.ones(2, 3, 3, dtype=torch.bool), r"grid \(3, 3\)"),
        (torch.ones(2, 5, dtype=torch.bool), "5 patches"),
        (torch.ones(3, 4, dtype=torch.bool), r"expected a batch of 3 images \(one per fixed mask\)"),
    ],
    ids=["fractional", "nan", "wrong grid", "wrong count", "wrong batch"],
)
def test_mmp_per_call_mask_is_checked(tiny_sim, mask, message):
    mmp = MaskedMaxPoolingAttribution(tiny_sim)
    images = make_images(2, 3, 8, 8, seed=3)
    with pytest.raises(ValueError, match=message):
        mmp.attribute(images, target=0, mask=mask)
    good = torch.tensor([[[True, False], [False, True]]]).expand(2, -1, -1)
    assert torch.equal(
        mmp.attribute(images, target=0, mask=good.float()),
        MaskedMaxPoolingAttribution(tiny_sim, mask_provider=good).attribute(images, target=0),
    )


def test_templates_given_as_one_string_are_refused(tiny_vit, tiny_tokenizer):
    with pytest.raises(TypeError, match="templates: expected a list of templates, got the single string"):
        CLIPSimilarity(tiny_vit, tiny_tokenizer, PROMPTS, templates="a photo of {}.")
    sim = CLIPSimilarity(tiny_vit, tiny_tokenizer, PROMPTS, templates=["a photo of {}."])
    with pytest.raises(TypeError, match="templates"):
        sim.templates = "a {}"


def test_empty_prompt_embedding_follows_the_templates(tiny_vit, tiny_tokenizer):
    sim = CLIPSimilarity(tiny_vit, tiny_tokenizer, ["a cat"])
    plain = sim.empty_prompt_feature()
    sim.templates = ["a photo of {}.", "a drawing of {}."]
    ensembled = sim.empty_prompt_feature()
    assert torch.equal(ensembled, sim.encode_prompts([""]))
    assert not torch.allclose(plain, ensembled)


def test_text_features_of_another_float_dtype_are_cast_and_bad_ones_refused(tiny_vit, tiny_tokenizer):
    reference = CLIPSimilarity(tiny_vit, tiny_tokenizer, PROMPTS)
    images = make_images(2, 3, 8, 8, seed=4)
    sim = CLIPSimilarity(tiny_vit, text_features=reference.text_features.double())
    assert sim.text_features.dtype == torch.float32
    torch.testing.assert_close(sim(images), reference(images))
    torch.testing.assert_close(ITSMAttribution(sim).attribute(images), ITSMAttribution(reference).attribute(images))
    with pytest.raises(TypeError, match="text_features: expected a floating-point"):
        CLIPSimilarity(tiny_vit, text_features=torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="text_features: expected finite"):
        CLIPSimilarity(tiny_vit, text_features=torch.full((3, 8), float("nan")))


def test_a_model_in_train_mode_is_explained_in_eval_mode_and_left_as_given(tiny_resnet, tiny_tokenizer):
    images = make_images(2, 3, 64, 64, seed=5)
    evaluated = CLIPSimilarity(tiny_resnet, tiny_tokenizer, PROMPTS)
    expected = (
        evaluated(images),
        ITSMAttribution(evaluated).attribute(images, target=1),
        MaskedMaxPoolingAttribution(evaluated).attribute(images, target=1),
    )
    model = copy.deepcopy(tiny_resnet).train()
    statistics = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    sim = CLIPSimilarity(model, tiny_tokenizer, PROMPTS)
    got = (
        sim(images),
        ITSMAttribution(sim).attribute(images, target=1),
        MaskedMaxPoolingAttribution(sim).attribute(images, target=1),
    )
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert all(module.training for module in model.modules())  # the caller's mode is given back
    assert all(torch.equal(model.state_dict()[k], v) for k, v in statistics.items())  # BatchNorm untouched


def test_weights_options_are_never_ignored(tmp_path, capsys):
    from captum_iclip.loading.loader import load_clip

    with pytest.raises(ValueError, match="pretrained: expected it together with model_name"):
        load_clip(None, "openai")
    with pytest.raises(ValueError, match="checkpoint: expected it together with model_name"):
        load_clip(None, checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(
        ValueError,
        match="model_name: expected with pretrained .* got 'RN50' without weights; pass .*random_weights=True",
    ):
        load_clip("RN50")
    tiny = _tiny_open_clip_config(tmp_path).stem
    assert isinstance(load_clip(tiny, random_weights=True).model, open_clip.model.CLIP)  # the explicit opt-in
    if "shapes-tiny" in zoo.available():
        with pytest.raises(
            ValueError,
            match=r"checkpoint: expected it together with an open_clip .* got the bundled model 'shapes-tiny'",
        ):
            load_clip("shapes-tiny", checkpoint=str(tmp_path / "x.pt"))
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    assert (
        cli_main(
            [
                "explain",
                str(image),
                "--prompts",
                "a",
                "--checkpoint",
                str(tmp_path / "missing.pt"),
                "--out",
                str(tmp_path / "o.png"),
            ]
        )
        == 2
    )
    assert one_error_line(capsys, "captum-iclip explain").startswith(
        "--checkpoint: expected it together with model_name"
    )
    assert cli_main(["explain", str(image), "--prompts", "a", "--model", "RN50", "--out", str(tmp_path / "o.png")]) == 2
    assert "--random-weights" in one_error_line(capsys, "captum-iclip explain")


# --- 5. one-line errors ----------------------------------------------------------------------
def _tiny_open_clip_config(folder: Path) -> Path:
    path = folder / "tiny-hardening.json"
    path.write_text(
        json.dumps(
            {
                "embed_dim": 8,
                "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
                "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
            }
        )
    )
    open_clip.add_model_config(path)
    return path


def _folder_dataset(root: Path, damage: str) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nthing\n")
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(root / "masks" / "a.png")
    (root / ("images" if damage == "image" else "masks") / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


@pytest.mark.parametrize(
    "case",
    [
        "unknown model",
        "cuda without GPU",
        "explain out is a folder",
        "explain resolution",
        "demo zero images",
        "demo out is a file",
        "corrupt open_clip checkpoint",
        "eval corrupt image",
        "eval corrupt mask",
        "train corrupt resume",
        "train cuda without GPU",
        "world zero scenes",
        "world root is a file",
        "audit pretrained without model",
        "eval checkpoint without model",
    ],
)
def test_command_errors_are_one_line_naming_the_argument(tmp_path, capsys, case):
    if "cuda" in case and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    needs_bundle = case in ("explain resolution", "eval corrupt image", "eval corrupt mask")
    if needs_bundle and "shapes-tiny" not in zoo.available():
        pytest.skip("bundle not installed")
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    (tmp_path / "a-file").write_text("x")
    explain = ["explain", str(image), "--prompts", "a,b", "--out", str(tmp_path / "o.png")]
    train = [
        "train",
        "--train-data",
        str(_write_training_csv(tmp_path / "data", 2)),
        "--workers",
        "0",
        "--batch-size",
        "2",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")

    def folder_eval(damage):
        return [
            "eval",
            "--dataset",
            "folder",
            "--root",
            str(_folder_dataset(tmp_path / "ds", damage)),
            "--out",
            str(tmp_path / "e"),
            "--no-progress",
            "--examples",
            "0",
            "--device",
            "cpu",
        ]

    def tiny_model():
        return _tiny_open_clip_config(tmp_path).stem

    cases = {  # case -> (argv, subcommand, what the message says)
        "unknown model": lambda: (explain + ["--model", "no-such-model"], "explain", "--model: expected an open_clip"),
        "cuda without GPU": lambda: (
            explain + ["--device", "cuda"],
            "explain",
            "--device: expected a device this machine has (torch sees no CUDA GPU",
        ),
        "explain out is a folder": lambda: (explain[:-1] + [str(tmp_path)], "explain", "--out: expected a file name"),
        "explain resolution": lambda: (
            explain + ["--resolution", "100"],
            "explain",
            "--resolution: expected a positive multiple of the model's patch size",
        ),
        "demo zero images": lambda: (
            ["demo", "-n", "0", "--out", str(tmp_path / "d")],
            "demo",
            "--num-images: expected at least 1, got 0",
        ),
        "demo out is a file": lambda: (["demo", "--out", str(tmp_path / "a-file")], "demo", "--out: expected a folder"),
        "corrupt open_clip checkpoint": lambda: (
            explain + ["--model", tiny_model(), "--checkpoint", str(bad)],
            "explain",
            "--checkpoint: expected weights of open_clip",
        ),
        "eval corrupt image": lambda: (folder_eval("image"), "eval", "expected a decodable image"),
        "eval corrupt mask": lambda: (folder_eval("mask"), "eval", "label file: expected a decodable image"),
        "train corrupt resume": lambda: (
            train + ["--device", "cpu", "--resume", str(bad)],
            "train",
            f"resume: expected a torch checkpoint of tensors and plain containers, got {bad}",
        ),
        "train cuda without GPU": lambda: (
            train + ["--device", "cuda"],
            "train",
            "device: expected a device this machine has (torch sees no CUDA GPU",
        ),
        "world zero scenes": lambda: (
            ["world", "export-text", "--out", str(tmp_path / "w"), "-n", "0"],
            "world",
            "-n: expected at least 1 scene, got 0",
        ),
        "world root is a file": lambda: (
            ["world", "export-voc", "--root", str(tmp_path / "a-file"), "-n", "1"],
            "world",
            "--root: expected a folder, got the file",
        ),
        "audit pretrained without model": lambda: (
            [
                "audit",
                "--images",
                str(image),
                "--prompts",
                "a,b",
                "--out",
                str(tmp_path / "r"),
                "--pretrained",
                "openai",
            ],
            "audit",
            "--pretrained: expected it together with model_name",
        ),
        "eval checkpoint without model": lambda: (
            ["eval", "--dataset", "folder", "--root", str(tmp_path), "--checkpoint", str(bad)],
            "eval",
            "--checkpoint: expected it together with model_name",
        ),
    }
    argv, prog, expected = cases[case]()
    assert cli_main(argv) == 2
    assert expected in one_error_line(capsys, f"captum-iclip {prog}")
    with pytest.raises(Exception):  # noqa: B017 - whatever the command raised, re-raised
        cli_main(["--debug", *argv])  # --debug keeps the traceback


def test_corrupt_mask_cache_entry_is_recomputed(tmp_path):
    from captum_iclip.masks import CachedMaskProvider

    calls = []

    def centre(images, grid):
        calls.append(len(images))
        mask = torch.zeros(len(images), *grid, dtype=torch.bool)
        mask[:, 1:, 1:] = True
        return mask

    cached = CachedMaskProvider(centre, tmp_path / "cache", fingerprint="centre")
    images = make_images(2, 3, 8, 8, seed=6)
    expected = cached(images, (2, 2))
    entries = sorted((tmp_path / "cache").rglob("*.pt"))
    entries[0].write_bytes(entries[0].read_bytes()[:20])  # truncated
    torch.save(torch.ones(9, dtype=torch.bool), entries[1])  # a mask of another grid
    with pytest.warns(RuntimeWarning, match="recomputing"):
        again = CachedMaskProvider(centre, tmp_path / "cache", fingerprint="centre")(images, (2, 2))
    assert torch.equal(again, expected) and calls == [2, 2]
    assert torch.equal(CachedMaskProvider(centre, tmp_path / "cache", fingerprint="centre")(images, (2, 2)), expected)
    assert calls == [2, 2]  # rewritten: the third pass reads both from disk


def test_dino_mask_provider_refuses_a_module_that_is_no_vit():
    from captum_iclip.masks import DINOMaskProvider

    with pytest.raises(TypeError, match="model: expected a timm VisionTransformer or a Hugging Face ViT/DINOv2"):
        DINOMaskProvider(torch.nn.Linear(3, 3))
