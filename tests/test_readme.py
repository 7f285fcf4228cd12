"""Every code block of README.md and docs/ runs as written without network access, or fails in our words.

Python blocks run in one child process with the network cut (every socket connection fails) and an empty
Hugging Face cache, with the one substitution the README tells offline readers to make: a pretrained tag
becomes ``random_weights=True``. A block whose first line is ``# continues the block above`` shares the
namespace of the block before it; every other block starts from a fresh namespace. After each block the
child reports its peak resident memory (``ru_maxrss``, the peak so far, so an upper bound for the block),
which must stay under 4 GB. A block may instead fail with :class:`WeightsUnavailableError` saying that the
machine is offline, within seconds.

Shell blocks: each command line runs in-process through the command's ``main`` (the same code path as the
installed script) with the network cut, in a fresh folder, and must succeed or fail with one line of ours
(exit status 2, ``captum-iclip <command>: error: ...``) within seconds. Lines that install, lint, run this
suite, stand for elided arguments (``...``) or reproduce hour-long training runs are listed in
:data:`NOT_RUN` with the reason.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PEAK_LIMIT_MB = 4 * 1024
OFFLINE_FAILURE_S = 5.0
CONTINUES = "# continues the block above"

# Shell lines that are not run, each with why.
NOT_RUN = {
    "pip install": "installs the package (the suite runs on the installed package)",
    "install-browser.sh": "installs Chromium with apt",
    "ruff check": "the lint and test run itself",
    "captum-iclip demo --out demo-out": "72 s on 2 cores; tests/zoo/test_zoo_demo.py runs the demo on fewer scenes",
    "...": "stands for elided arguments",
    "python -m captum_iclip.zoo.study": "reproduces the study (hours; --quick minutes); tests/zoo/test_zoo_study.py",
    "python benchmarks/device.py": "GPU measurements (minutes); tests/benchmarks/test_device_benchmark.py runs --quick",
}


def code_blocks(path: Path) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of every fenced block of a Markdown file."""
    blocks, language, lines, start = [], None, [], 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence and language is None:
            language, lines, start = fence.group(1) or "text", [], number
        elif line.startswith("```") and language is not None:
            blocks.append((language, "\n".join(lines), start))
            language = None
        elif language is not None:
            lines.append(line)
    return blocks


def offline_substitution(code: str) -> str:
    """What the README tells offline readers to do: a pretrained tag becomes ``random_weights=True``."""
    return re.sub(r'captum_iclip\.load\(("[^"]+"), "[^"]+"\)', r"captum_iclip.load(\1, random_weights=True)", code)


def python_blocks() -> list[dict]:
    return [
        {"where": f"{path.relative_to(ROOT)}:{line}", "code": offline_substitution(code)}
        for path in DOCUMENTS
        for language, code, line in code_blocks(path)
        if language == "python"
    ]


def shell_lines() -> list[tuple[str, str]]:
    lines = []
    for path in DOCUMENTS:
        for language, code, start in code_blocks(path):
            if language not in ("bash", "sh", "text", "console"):
                continue
            for offset, line in enumerate(code.replace("\\\n", " ").splitlines()):
                line = line.split("  #")[0].strip()
                if line and not line.startswith("#"):
                    lines.append((f"{path.relative_to(ROOT)}:{start + offset + 1}", line))
    return lines


RUNNER = textwrap.dedent(
    """
    import json, os, resource, socket, sys, time, traceback

    def cut(*args, **kwargs):
        raise OSError("network unreachable (cut by tests/test_readme.py)")

    socket.socket.connect = cut
    socket.getaddrinfo = cut
    blocks = json.loads(sys.stdin.read())
    namespace = {}
    for block in blocks:
        if not block["code"].startswith(CONTINUES):
            namespace = {"__name__": "__main__"}
        began = time.perf_counter()
        report = {"where": block["where"], "ok": True}
        try:
            exec(compile(block["code"], block["where"], "exec"), namespace)
        except Exception as error:
            report.update(ok=False, error=type(error).__name__, message=str(error), trace=traceback.format_exc())
        report["seconds"] = time.perf_counter() - began
        report["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("REPORT " + json.dumps(report), flush=True)
    """
).replace("CONTINUES", repr(CONTINUES))


def test_documents_have_code_blocks():
    assert len(python_blocks()) >= 7
    assert any("captum-iclip audit" in line for _, line in shell_lines())


def test_python_blocks_run_offline_within_4gb(tmp_path):
    blocks = python_blocks()
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),  # an empty cache: nothing was downloaded before
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
        "TORCH_HOME": str(tmp_path / "torch"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("HF_HUB_OFFLINE", None)  # the network cut alone must be detected
    run = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(blocks),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    reports = [json.loads(line[7:]) for line in run.stdout.splitlines() if line.startswith("REPORT ")]
    assert len(reports) == len(blocks), run.stderr[-3000:]
    print("\nREADME python blocks (peak RSS so far, MB; seconds):")
    for report in reports:
        outcome = "ran" if report["ok"] else f"{report['error']}: {report['message'][:100]}"
        print(f"  {report['where']}: {report['peak_mb']:.0f} MB, {report['seconds']:.1f} s, {outcome}")
    for report in reports:
        assert report["peak_mb"] <= PEAK_LIMIT_MB, report
        if not report["ok"]:
            assert report["error"] == "WeightsUnavailableError", report["trace"]
            assert "this machine is offline" in report["message"], report
            advice = report["message"].split("this machine is offline")[1]
            assert not re.search(r"--(checkpoint|hf-model|dino|random-weights)", advice), report  # Python terms
            assert report["seconds"] <= OFFLINE_FAILURE_S, report
    assert sum(report["ok"] for report in reports) >= 4, reports  # most blocks run with random weights


def _command_main(words: list[str]):
    """The ``main`` a shell line runs and its arguments (``captum-iclip X``, ``python -m captum_iclip.X``)."""
    import importlib

    from captum_iclip import cli

    if words[0] == "captum-iclip":
        return cli.main, words[1:]
    if words[:2] == ["python", "-m"] or words[:2] == ["python3", "-m"]:
        module = importlib.import_module(words[2])
        return module.main, words[3:]
    return None, words


def test_shell_lines_run_or_fail_in_our_words(tmp_path, monkeypatch, network_cut):
    monkeypatch.chdir(tmp_path)
    ran = []
    for where, line in shell_lines():
        skip = next((reason for key, reason in NOT_RUN.items() if key in line), None)
        words = shlex.split(line)
        if skip is not None:
            ran.append((where, line, "not run: " + skip))
            continue
        main, argv = _command_main(words)
        assert main is not None, f"{where}: {line!r} is neither a command of ours nor in NOT_RUN"
        out, err = io.StringIO(), io.StringIO()
        began = time.perf_counter()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                status = main(argv)
            except SystemExit as exit_:
                status = exit_.code
        seconds = time.perf_counter() - began
        ran.append((where, line, f"status {status}, {seconds:.1f} s"))
        message = err.getvalue().strip().splitlines()
        if status != 0:
            assert status == 2, (where, line, err.getvalue())
            assert "Traceback" not in err.getvalue()
            assert re.match(r"captum-iclip [\w-]+: error: ", message[-1]), (where, line, err.getvalue())
            assert seconds <= OFFLINE_FAILURE_S, (where, line, seconds)
    print("\nREADME / docs shell lines:")
    for where, line, outcome in ran:
        print(f"  {where}: {line[:70]} -> {outcome}")
