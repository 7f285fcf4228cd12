"""The pre-registered ladder of miniature candidates (issue: the miniature and diagnostics)."""

from __future__ import annotations

import json

import pytest

from captum_iclip.zoo import ladder


def _row(name: str, msc: float, top1: float = 95.0, single: float = 97.0, min_class: float = 85.0, samples=100):
    return {
        "name": name,
        "samples": samples,
        "selection": {
            "recognition": {"top1_any": top1, "single_object": single, "min_class_recall": min_class},
            "diagnostics": {"maps": {"itsm": {"msc": msc}}},
        },
    }


def test_pick_is_the_lowest_raw_msc_among_candidates_that_recognise():
    rows = [
        _row("a", -30.0, top1=89.9),  # misses top-1
        _row("b", -20.0, min_class=79.0),  # misses a class
        _row("c", -12.0, samples=200),
        _row("d", -12.0, samples=100),  # tie: fewer samples wins
        _row("e", 5.0),
    ]
    assert ladder.pick(rows)["name"] == "d"
    assert ladder.pick(rows[:2]) is None


def test_gpu_order_follows_the_pilots_effects():
    rows = [_row("P0-base", 10.0), _row("P4-uniform", -5.0), _row("P1-depth8", 12.0), _row("P2-patch8", 3.0)]
    order = [c.name for c in ladder.gpu_order(rows)]
    assert order[:5] == ["G0-bundle", "G4-uniform", "G2-patch8", "G8-depth8", "G1-depth12"]
    assert sorted(order) == sorted(c.name for c in ladder.FULL)
    assert [c.name for c in ladder.gpu_order([])] == [c.name for c in ladder.FULL]


def test_quick_ladder_trains_measures_resumes_and_replicates(tmp_path, capsys):
    work = tmp_path / "ladder"
    assert ladder.main(["--quick", "--work-dir", str(work), "--no-progress", "--threads", "1"]) == 0
    results = json.loads((work / "ladder.json").read_text())
    assert [row["name"] for row in results["rows"]] == ["quick", "quick-uniform"]
    for row in results["rows"]:
        maps = row["selection"]["diagnostics"]["maps"]
        assert maps["itsm"]["msc_ci"][0] <= maps["itsm"]["msc"] <= maps["itsm"]["msc_ci"][1]
        assert len(row["selection"]["weights_sha256"]) == 64
    assert (work / "quick-uniform" / "world").is_dir()
    assert "| quick-uniform |" in (work / "ladder.md").read_text()
    # A rerun measures nothing again; the replication applies the rule (tiny models recognise nothing).
    capsys.readouterr()
    assert ladder.main(["--quick", "--work-dir", str(work), "--no-progress", "--replicate"]) == 0
    results = json.loads((work / "ladder.json").read_text())
    assert len(results["rows"]) == 2
    assert results["replication"] == {"pick": None, "reason": "no candidate meets the recognition targets"}


def test_unknown_candidate_names_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--only: expected names from"):
        ladder.main(["--quick", "--work-dir", str(tmp_path), "--only", "nope"])


def test_gpu_ladder_reads_the_pilots_and_respects_its_budget(tmp_path, capsys):
    pilots = tmp_path / "pilots.json"
    pilots.write_text(json.dumps({"rows": [_row("P0-base", 10.0), _row("P4-uniform", -5.0)]}))
    work = tmp_path / "gpu"
    assert ladder.main(["--gpu", str(pilots), "--budget", "0", "--work-dir", str(work), "--no-progress"]) == 0
    assert "not started: G0-bundle and the candidates after it" in capsys.readouterr().out
    assert not (work / "G0-bundle").exists()
