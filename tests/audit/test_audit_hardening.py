"""Hardening of the audit: it never audits its own output, its report follows the folder, it reads only its
own files.

Each test failed on the code before its fix (the hardening passes: one test per defect an adversarial
review found). Models are tiny random architectures (conftest) or the bundled shapes-tiny model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import one_error_line

from captum_iclip.cli import main as cli_main


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


def test_audit_recomputes_a_record_whose_files_lie_outside_the_report(tmp_path):
    from test_audit import write_images

    from captum_iclip.audit import audit

    images = tmp_path / "photos"
    write_images(images, 2, corrupt=False)
    out = tmp_path / "report"
    kwargs = _audit_kwargs(out)
    audit(images, **kwargs)
    (tmp_path / "secret.png").write_bytes((out / "images").glob("*.png").__next__().read_bytes())
    records = sorted((out / "records").glob("*.json"))
    tampered = json.loads(records[0].read_text())
    tampered["thumbnail"] = "images/../../secret.png"
    records[0].write_text(json.dumps(tampered))
    other = json.loads(records[1].read_text())
    other["top"][0]["maps"]["raw"]["overlay"] = str(tmp_path / "secret.png")  # absolute
    records[1].write_text(json.dumps(other))

    summary = audit(images, **kwargs)
    assert (summary.computed, summary.reused) == (2, 0)
    page = summary.index.read_text(encoding="utf-8")
    assert "secret.png" not in page and "../" not in page
    sources = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert sources and all(s.startswith("images/") for s in sources)
