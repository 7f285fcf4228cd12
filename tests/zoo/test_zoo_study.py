"""The pre-registered study (``python -m captum_iclip.zoo.study``, docs/study/README.md)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from captum_iclip.zoo import study

SMALL = [
    "--quick",
    "--steps",
    "2",
    "--iclip-steps",
    "2",
    "--scenes",
    "12",
    "--selection-scenes",
    "8",
    "--bootstrap",
    "50",
    "--batch-size",
    "16",
    "--no-progress",
]
OTHER_SECTIONS = "# captum-iclip\n\nIntro kept as is.\n\n## Install\n\npip install captum-iclip\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One tiny quick run (the pooling row masked-max-oracle, the ICLIP cell projection/DINO, raw ITSM)."""
    root = tmp_path_factory.mktemp("study")
    readme = root / "README.md"
    readme.write_text(OTHER_SECTIONS)
    args = SMALL + ["--work-dir", str(root / "work"), "--out", str(root / "out"), "--readme", str(readme)]
    torch.set_num_threads(1)
    assert study.main(args) == 0
    return root, args


def test_quick_run_writes_results_table_figure_and_claims_from_the_json(quick_run):
    root, _ = quick_run
    document = json.loads((root / "out" / "results.json").read_text())
    runs = document["runs"]
    assert {(r["group"], r["pooling"], r["mode"], r["mask_source"]) for r in runs} == {
        ("training-free", "class-token", None, None),
        ("pooling", "masked-max-oracle", "full", "oracle"),
        ("iclip", "class-token", "projection", "dino"),
    }
    for run in runs:
        assert run["scenes"] == 12 and run["seed"] == 0 and 0.0 <= run["zero_shot"] <= 100.0
        for key in ("miou", "msc", "pointing"):
            mean, lo, hi = run[key]
            assert lo <= mean <= hi, (run["run"], key, run[key])
    trained = {r["group"]: r["train"] for r in runs}
    assert trained["training-free"] is None and trained["pooling"]["steps"] == 2 and trained["iclip"]["steps"] == 2
    # Projection mode leaves recognition bit-identical: the frozen CLIP's zero-shot is retained exactly.
    assert runs[2]["zero_shot"] == runs[0]["zero_shot"]
    # The weights the figures are of, by content: the bundle can be rebuilt after a study.
    bundled = study.default_clip_path()
    assert document["study"]["weights_sha256"]["clip"] == hashlib.sha256(bundled.read_bytes()).hexdigest()
    head = bundled.parent / "interpretability_head.pt"
    assert document["study"]["weights_sha256"]["bundle_interpretability_head"] == (
        hashlib.sha256(head.read_bytes()).hexdigest()
    )
    # The only label-free cell is picked on the selection scenes.
    assert document["picked_iclip"]["mode"] == "projection" and document["picked_iclip"]["mask_source"] == "dino"
    table = (root / "out" / "table.md").read_text()
    for run in runs:
        assert study._fmt(run["msc"]) in table and study._fmt(run["miou"]) in table
    readme = (root / "README.md").read_text()
    assert readme.startswith(OTHER_SECTIONS.rstrip("\n"))
    assert study.render_claims(document) in readme and readme.count(study.CLAIMS_START) == 1
    assert "| **H3**" in readme and "not run |" in readme  # H1, H2, H4 rows were not part of the quick run
    assert (root / "out" / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_claims_section_replaces_only_marker_lines():
    prose = f"# Pre-registration\n\nThe run fills `{study.CLAIMS_START}` to `{study.CLAIMS_END}` below.\n"
    section = f"{study.CLAIMS_START}\nresults\n{study.CLAIMS_END}\n"
    once = study.splice_section(prose, section)
    assert once == prose + "\n" + section  # markers named in prose are not a section: appended
    again = study.splice_section(once + "\nafter\n", section.replace("results", "new results"))
    assert again == prose + "\n" + section.replace("results", "new results") + "\nafter\n"


def test_report_only_rerenders_the_same_outputs_from_results_json(quick_run):
    root, args = quick_run
    table = root / "out" / "table.md"
    before, readme_before = table.read_text(), (root / "README.md").read_text()
    table.unlink()
    assert study.main(args + ["--report-only"]) == 0
    assert table.read_text() == before and (root / "README.md").read_text() == readme_before


def test_a_rerun_skips_finished_runs_and_redoes_only_a_missing_one(quick_run, monkeypatch):
    root, args = quick_run
    work = root / "work"
    results = sorted(work.rglob("result.json"))
    assert len(results) == 3
    stamps = {path: path.stat().st_mtime_ns for path in results}
    trained = []
    real_train_run = study.train_run
    monkeypatch.setattr(study, "train_run", lambda spec, *a: trained.append(spec.name) or real_train_run(spec, *a))
    assert study.main(args) == 0
    assert trained == [] and all(path.stat().st_mtime_ns == stamps[path] for path in results)
    missing = work / "iclip" / "projection-dino" / "seed0" / "result.json"
    missing.unlink()
    assert study.main(args) == 0
    assert trained == ["iclip/projection-dino/seed0"] and missing.is_file()
    assert all(path.stat().st_mtime_ns == stamps[path] for path in results if path != missing)


def test_oracle_masks_of_a_constructed_scene():
    from captum_iclip.masks import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, OracleMaskProvider
    from captum_iclip.preprocess import to_model_input
    from captum_iclip.zoo import make_preprocess

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    foreground = np.zeros((96, 96), dtype=bool)
    foreground[:48, :48] = True  # patches (0..3, 0..3) of the 8 x 8 grid of 12-px patches
    foreground[60:72, 84:90] = True  # half of patch (5, 7): foreground
    foreground[72:84, 0:5] = True  # 5/12 of patch (6, 0): not foreground
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, :4] = True
    expected[5, 7] = True
    other = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    oracle = OracleMaskProvider(np.stack([image, other]), np.stack([foreground, ~foreground]), (8, 8),
                                OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)  # fmt: skip
    mean, std = torch.tensor(OPENAI_DATASET_MEAN).reshape(3, 1, 1), torch.tensor(OPENAI_DATASET_STD).reshape(3, 1, 1)
    from PIL import Image

    # Recognised whatever preprocessing made the tensor (the zoo's and the evaluation's).
    for x in (make_preprocess(96, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)(image),
              to_model_input(Image.fromarray(image), (96, 96), mean, std)):  # fmt: skip
        masks = oracle(torch.stack([x, x]), (8, 8))
        assert torch.equal(masks[0].reshape(8, 8), expected) and torch.equal(masks[1], masks[0])
    unknown = make_preprocess(96, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)(255 - image)
    with pytest.raises(ValueError, match="images: expected images the oracle was built from"):
        oracle(unknown[None], (8, 8))
    with pytest.raises(ValueError, match=r"grid_size: expected \(8, 8\)"):
        oracle(unknown[None], (4, 4))


def test_the_pooling_rows_build_the_models_they_claim():
    from captum_iclip.models.dual import DualProjectionCLIP
    from captum_iclip.models.open_clip_towers import attention_pool_value_path
    from captum_iclip.zoo import build_clip

    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96)
    built = {}
    for pooling in ("class-token", "attention", "average"):
        clip = build_clip(study.model_config(pooling, (2, 128))).eval()  # --pooling-tower 2x128
        dual = DualProjectionCLIP(clip)
        with torch.no_grad():
            reference = clip.encode_image(x)
            assert torch.allclose(dual.adapter.encode_image(x), reference, atol=1e-5)
            assert torch.allclose(dual.encode_dense(x)[:, 0], reference, atol=1e-5)  # index 0: the pooled embedding
        built[pooling] = (clip.visual, dual.adapter.pooling)
    visual, pooling = built["attention"]
    assert pooling == "attention" and visual.attn_pool.query.shape == (1, 128) and visual.pool_type == "tok"
    assert len(visual.transformer.resblocks) == 2
    assert built["average"][0].pool_type == "avg" and built["average"][0].attn_pool is None
    assert built["class-token"][0].pool_type == "tok" and built["class-token"][0].attn_pool is None
    # The attention pool's per-patch projection is the pool itself when the query sees that patch alone.
    token = torch.randn(3, 1, 128)
    with torch.no_grad():
        alone = visual.ln_post(visual.attn_pool(token))[:, 0] @ visual.proj
        assert torch.allclose(attention_pool_value_path(visual, token)[:, 0], alone, atol=1e-5)
    assert study.pooling_run("max", 0).mask_source == "all" and study.pooling_run("max", 0).method == "iclip"
    assert study.pooling_run("masked-max-dino", 1).mask_source == "dino"
    assert study.pooling_run("class-token", 2).mask_source is None and study.pooling_run("attention", 0).method == "raw"
    with pytest.raises(ValueError, match="pooling: expected one of"):
        study.model_config("median")


def _cell(mode, source, msc, zero_shot):
    return {"group": "iclip", "mode": mode, "mask_source": source, "selection": {"msc": msc, "zero_shot": zero_shot}}


def test_the_pick_uses_selection_figures_label_free_masks_and_the_zero_shot_floor():
    cells = [
        _cell("projection", "oracle", 50.0, 60.0),  # best, but needs labels
        _cell("full", "dino", 40.0, 50.0),  # best label-free, but recognition fell by 10 points
        _cell("last-1", "centre", 20.0, 59.5),
        _cell("projection", "all", 20.0, 60.0),  # same mSC: the simpler mode wins
        _cell("last-2", "dino", 10.0, 61.0),
    ]
    picked = study.pick_iclip(cells, baseline_zero_shot=60.0)
    assert (picked["mode"], picked["mask_source"]) == ("projection", "all")
    assert study.pick_iclip(cells[:2], baseline_zero_shot=60.0) is None


def _row(group, pooling, msc, miou=(10.0, 5.0, 15.0), zero_shot=60.0, **extra):
    return {"group": group, "pooling": pooling, "msc": list(msc), "miou": list(miou), "zero_shot": zero_shot,
            "method": extra.pop("method", "raw"), "mode": None, "mask_source": None, **extra}  # fmt: skip


def test_verdict_rules_as_pre_registered():
    low = [_row("pooling", "class-token", (-3, -6, 1)), _row("pooling", "attention", (2, 0, 4.9))]
    assert study.verdict_h1(low)[0] == "reproduced"
    assert study.verdict_h1([low[0], _row("pooling", "attention", (8, 5, 11))])[0] == "not reproduced"
    assert study.verdict_h1([low[0], _row("pooling", "attention", (4, 1, 7))])[0] == "inconclusive"
    assert study.verdict_h1(low[:1])[0] == "not run"
    positive = [_row("pooling", "masked-max-dino", (5, 1, 9)), _row("pooling", "masked-max-oracle", (9, 4, 14))]
    assert study.verdict_h2(positive)[0] == "reproduced"
    assert study.verdict_h2([positive[0], _row("pooling", "masked-max-oracle", (-5, -9, 0))])[0] == "not reproduced"
    raw = _row("training-free", "class-token", (-3, -6, 0), miou=(6, 4, 8), zero_shot=60.0)
    picked = {"mode": "projection", "mask_source": "dino"}

    def iclip(msc, miou, zero_shot):
        return _row("iclip", "class-token", msc, miou, zero_shot, method="iclip", mode="projection", mask_source="dino")

    assert study.verdict_h3([raw, iclip((8, 2, 14), (12, 9, 15), 60.0)], picked)[0] == "reproduced"
    assert study.verdict_h3([raw, iclip((8, 2, 14), (12, 9, 15), 58.0)], picked)[0] == "not reproduced"
    assert study.verdict_h3([raw, iclip((-1, -4, 3), (7, 5, 9), 60.0)], picked)[0] == "inconclusive"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps: expected a positive integer, got 0"),
        (["--seeds", "0,x"], "--seeds: expected distinct non-negative integers such as 0,1,2, got '0,x'"),
        (["--seeds", "1,1"], "--seeds: expected distinct non-negative integers"),
        (["--device", "toaster"], "--device: expected a torch device"),
        (["--clip", "no/such/clip.pt"], "--clip: expected a CLIP weights file"),
        (["--pooling-tower", "4x100"], "--pooling-tower: expected LAYERSxWIDTH with WIDTH a multiple of 64"),
        (["--pooling-tower", "wide"], "--pooling-tower: expected LAYERSxWIDTH"),
        (["--report-only", "--out", "no/such/folder"], "--report-only: expected no/such/folder/results.json"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
