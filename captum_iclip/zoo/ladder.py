"""The ladder of miniature candidates: ``python -m captum_iclip.zoo.ladder``.

Does a tiny CLIP trained on the procedural world show the paper's phenomenon, a raw ITSM map
that prefers the background, and which ingredient brings it? Each candidate is the bundle
recipe's ``clip`` stage (:mod:`captum_iclip.zoo.train`) with one or more ingredients changed
(depth, width, patch size, training length); each trained candidate is measured on the
*selection* seed range with

* zero-shot recognition (:func:`~captum_iclip.zoo.quality.recognition_report`, the shape
  prompts alone);
* every diagnostic of :class:`~captum_iclip.diagnostics.Diagnostics` (raw ITSM mSC with a 95 %
  bootstrap interval, its last-block decomposition, the attention-scaled maps, token norms).

The candidates, scene counts and the rule that picks one are fixed in advance in
docs/training-notes.md ("The miniature ladder"); :func:`pick` applies the rule, and
``--replicate`` measures the pick on the *report* range, which nothing else reads. Each
candidate's row is written to ``ladder.json`` atomically as soon as it is measured, and a
rerun skips the rows already there (the training stage resumes from its own checkpoint).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from captum_iclip._io import atomic_write_text, json_text
from captum_iclip.world import WorldVariant
from captum_iclip.zoo.quality import LADDER_SCENES

BOOTSTRAP = 1000
RECOGNITION_TARGETS = {"top1_any": 90.0, "single_object": 95.0, "min_class_recall": 80.0}


@dataclass(frozen=True)
class Candidate:
    """One recipe of the ``clip`` stage (the other settings are the bundle recipe's)."""

    name: str
    layers: int
    width: int
    patch_size: int = 12
    train_scenes: int = 20_000
    epochs: int = 5
    batch_size: int = 256
    backgrounds: str = "textured"
    object_scale: float = 1.0
    caption_background_prob: float | None = None

    @property
    def variant(self) -> WorldVariant:
        """The world it trains on, and is measured on."""
        return WorldVariant(self.backgrounds, self.object_scale)

    @property
    def samples(self) -> int:
        return self.train_scenes * self.epochs


#: The CPU pilots, pre-registered in docs/training-notes.md: one ingredient changed at a time
#: from P0 (4 blocks of width 128, patch 12 at 96 px, 100k samples).
_PILOT_RECIPE = Candidate("P0-base", layers=4, width=128)
PILOTS = (
    _PILOT_RECIPE,
    replace(_PILOT_RECIPE, name="P1-depth8", layers=8),
    replace(_PILOT_RECIPE, name="P2-patch8", patch_size=8),
    replace(_PILOT_RECIPE, name="P3-long", epochs=10),
    # Amendment before any pilot was measured: the world's ingredients.
    replace(_PILOT_RECIPE, name="P4-uniform", backgrounds="uniform"),
    replace(_PILOT_RECIPE, name="P5-small", object_scale=0.6),
    replace(_PILOT_RECIPE, name="P6-bg-always", caption_background_prob=1.0),
    replace(_PILOT_RECIPE, name="P7-bg-never", caption_background_prob=0.0),
    # Amendment 2, after P0 and P1 were measured: does depth's opposite map survive longer training?
    replace(_PILOT_RECIPE, name="P8-depth8-long", layers=8, epochs=15),
)
#: The order the pilots run in (amendment 2: P8 right after P1).
PILOT_ORDER = ("P0-base", "P1-depth8", "P8-depth8-long", "P2-patch8", "P3-long", "P4-uniform", "P5-small")
PILOT_ORDER += ("P6-bg-always", "P7-bg-never")
#: The full candidates, for a GPU (the bundle's 6 x 192 tower and 1.3M samples, one ingredient changed at a
#: time). ``--gpu`` runs them in the order the pre-registered rule gives: their pilot's raw-mSC drop from
#: P0 on the selection range, largest first (G0, the bundle recipe itself, always first).
_BUNDLE_RECIPE = Candidate("G0-bundle", layers=6, width=192, train_scenes=100_000, epochs=13, batch_size=512)
FULL = (
    _BUNDLE_RECIPE,
    replace(_BUNDLE_RECIPE, name="G8-depth8", layers=8),  # amendment 2
    replace(_BUNDLE_RECIPE, name="G1-depth12", layers=12),
    replace(_BUNDLE_RECIPE, name="G2-patch8", patch_size=8),
    replace(_BUNDLE_RECIPE, name="G3-long", epochs=26),
    replace(_BUNDLE_RECIPE, name="G4-uniform", backgrounds="uniform"),
    replace(_BUNDLE_RECIPE, name="G5-small", object_scale=0.6),
    replace(_BUNDLE_RECIPE, name="G6-bg-always", caption_background_prob=1.0),
    replace(_BUNDLE_RECIPE, name="G7-bg-never", caption_background_prob=0.0),
)
#: Which pilot stands for each full candidate in the ordering rule.
PILOT_OF = {
    "G8-depth8": "P1-depth8",
    "G1-depth12": "P1-depth8",
    "G2-patch8": "P2-patch8",
    "G3-long": "P3-long",
    "G4-uniform": "P4-uniform",
    "G5-small": "P5-small",
    "G6-bg-always": "P6-bg-always",
    "G7-bg-never": "P7-bg-never",
}
#: The tiny candidates of ``--quick`` (tests): the recipe and a world variant.
_QUICK_RECIPE = Candidate("quick", layers=2, width=64, patch_size=24, train_scenes=64, epochs=1, batch_size=32)
QUICK = (
    _QUICK_RECIPE,
    replace(_QUICK_RECIPE, name="quick-uniform", backgrounds="uniform", object_scale=0.6, caption_background_prob=0.0),
)


def train_candidate(
    candidate: Candidate,
    work: Path,
    threads: int | None,
    device: str,
    progress: bool,
    render_workers: int = 0,
    data_workers: int = 0,
) -> Path:
    """Train (or resume) the candidate's ``clip`` stage; returns its ``clip`` folder."""
    from captum_iclip.zoo import train

    argv = [
        "--work-dir",
        str(work / candidate.name),
        "--stages",
        "clip",
        "--vision-layers",
        str(candidate.layers),
        "--vision-width",
        str(candidate.width),
        "--patch-size",
        str(candidate.patch_size),
        "--train-scenes",
        str(candidate.train_scenes),
        "--clip-epochs",
        str(candidate.epochs),
        "--clip-batch-size",
        str(candidate.batch_size),
        "--world-backgrounds",
        candidate.backgrounds,
        "--object-scale",
        str(candidate.object_scale),
        "--device",
        device,
        "--render-workers",
        str(render_workers),
        "--data-workers",
        str(data_workers),
    ]
    if candidate.caption_background_prob is not None:
        argv += ["--caption-background-prob", str(candidate.caption_background_prob)]
    if threads:
        argv += ["--threads", str(threads)]
    if not progress:
        argv.append("--no-progress")
    train.main(argv)
    return work / candidate.name / "clip"


@torch.no_grad()
def measure(
    clip_dir: Path,
    seed_range: str,
    scenes: int,
    bootstrap: int,
    device: str = "cpu",
    variant: WorldVariant | None = None,
) -> dict:
    """Recognition and the diagnostics of a trained ``clip`` folder on ``scenes`` scenes of ``seed_range``,
    rendered in ``variant`` (the world it was trained on)."""
    import open_clip

    from captum_iclip import CLIPSimilarity
    from captum_iclip.diagnostics import Diagnostics
    from captum_iclip.models.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from captum_iclip.models.dual import DualProjectionCLIP
    from captum_iclip.world import CATEGORIES, class_names, prompt_for
    from captum_iclip.zoo import build_clip, make_preprocess
    from captum_iclip.zoo.quality import recognition_report, scene_range

    config = json.loads((clip_dir / "model_config.json").read_text())
    size = config["vision_cfg"]["image_size"]
    model = DualProjectionCLIP(build_clip(config)).load(clip_dir / "final.pt").clip.to(device).eval()
    tokenizer = open_clip.SimpleTokenizer(context_length=config["text_cfg"]["context_length"])
    preprocess = make_preprocess(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    world = scene_range(seed_range, scenes, size, variant)

    shapes = CLIPSimilarity(model, tokenizer, [prompt_for(c) for c in CATEGORIES]).eval()
    recognition = recognition_report(lambda x: shapes(x.to(device)), world, preprocess)
    # Prompt k explains class k (the background's prompt included), as eval's prompts do.
    sim = CLIPSimilarity(model, tokenizer, [prompt_for(c) for c in class_names()]).eval()
    diagnostics = Diagnostics(sim, num_classes=len(class_names()), bootstrap=bootstrap)
    for start in range(0, len(world), 50):
        chunk = world[start : start + 50]
        diagnostics.update(torch.stack([preprocess(s.image) for s in chunk]).to(device), [s.label for s in chunk])
    summary = diagnostics.summary()
    return {
        "recognition": {k: recognition[k] for k in ("top1_any", "single_object", "min_class_recall")},
        "diagnostics": summary,
        "weights_sha256": _sha256(clip_dir / "final.pt"),
    }


def gpu_order(pilot_rows: Sequence[dict]) -> list[Candidate]:
    """:data:`FULL` in the pre-registered order: G0 first, then by their pilot's raw-mSC drop from P0
    (largest first); candidates whose pilot has no row come last, in their listed order."""
    msc = {row["name"]: row["selection"]["diagnostics"]["maps"]["itsm"]["msc"] for row in pilot_rows}
    base = msc.get("P0-base")

    def drop(candidate: Candidate) -> float:
        pilot = msc.get(PILOT_OF.get(candidate.name, ""))
        return -math.inf if base is None or pilot is None else base - pilot

    first, rest = FULL[0], list(FULL[1:])
    return [first, *sorted(rest, key=drop, reverse=True)]  # sorted is stable: ties keep their order


def meets_targets(row: dict) -> bool:
    """Whether a row's recognition meets :data:`RECOGNITION_TARGETS`."""
    return all(row["selection"]["recognition"][k] >= v for k, v in RECOGNITION_TARGETS.items())


def pick(rows: Sequence[dict]) -> dict | None:
    """The pre-registered rule: among rows meeting the recognition targets on the selection range, the
    lowest raw ITSM mSC there (ties: the fewer training samples); ``None`` when none meets them."""
    eligible = [row for row in rows if meets_targets(row)]
    if not eligible:
        return None
    return min(eligible, key=lambda row: (row["selection"]["diagnostics"]["maps"]["itsm"]["msc"], row["samples"]))


def summary_columns(measured: dict) -> dict:
    """The table's columns of one measurement."""
    diagnostics = measured["diagnostics"]
    maps = diagnostics["maps"]
    last_norms = diagnostics["token_norms"][-1]
    biggest = max(row["max_ratio"] for row in diagnostics["token_norms"])
    return {
        "top1": measured["recognition"]["top1_any"],
        "single": measured["recognition"]["single_object"],
        "min_class": measured["recognition"]["min_class_recall"],
        "raw_msc": maps["itsm"]["msc"],
        "raw_msc_ci": maps["itsm"].get("msc_ci"),
        "residual_msc": maps["residual"]["msc"],
        "attention_msc": maps["attention"]["msc"],
        "mlp_msc": maps["mlp"]["msc"],
        "alpha5_msc": maps["alpha=5"]["msc"],
        "shared_removed_msc": maps["shared-removed"]["msc"],
        "max_norm_ratio": biggest,
        "last_block_share_above_4": last_norms["share_above_4"],
    }


def markdown(rows: Sequence[dict]) -> str:
    """The ladder table (selection range) in Markdown."""

    def num(value, digits=1):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [
        "| candidate | samples | top-1 % | single % | min class % | raw mSC [95 % CI] | residual | attention "
        "| MLP | α=5 | shared removed | max norm ÷ median | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c = summary_columns(row["selection"])
        ci = c["raw_msc_ci"]
        interval = f" [{num(ci[0])}, {num(ci[1])}]" if ci else ""
        lines.append(
            f"| {row['name']} | {row['samples']:,} | {num(c['top1'])} | {num(c['single'])} | {num(c['min_class'])} "
            f"| {num(c['raw_msc'])}{interval} | {num(c['residual_msc'])} | {num(c['attention_msc'])} "
            f"| {num(c['mlp_msc'])} | {num(c['alpha5_msc'])} | {num(c['shared_removed_msc'])} "
            f"| {num(c['max_norm_ratio'], 2)} | {num(row.get('train_seconds'), 0)} |"
        )
    return "\n".join(lines) + "\n"


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m captum_iclip.zoo.ladder", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work-dir", default="runs/ladder", help="training folders and ladder.json (default: %(default)s)"
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated candidate names to run (default: every pilot, in order)"
    )
    parser.add_argument(
        "--scenes", type=int, default=LADDER_SCENES, help="selection scenes per row (default: %(default)s)"
    )
    parser.add_argument("--bootstrap", type=int, default=BOOTSTRAP, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument(
        "--replicate",
        action="store_true",
        help="also measure the rule's pick on the report range (run once, at the end)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--device", default="cpu", help="where candidates train: cpu, cuda, cuda:1 (default: %(default)s)"
    )
    parser.add_argument(
        "--render-workers", type=int, default=0, help="processes rendering each world (default: %(default)s)"
    )
    parser.add_argument(
        "--data-workers", type=int, default=0, help="data-loader processes of each training (default: %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="two tiny candidates on a few scenes (the tests)")
    parser.add_argument(
        "--gpu",
        default=None,
        metavar="PILOTS_JSON",
        help="run the full candidates (FULL) in the order their pilots' rows in PILOTS_JSON give (a GPU's job)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds after which no further candidate starts (default: none); the rows done so far are kept",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    by_name = {c.name: c for c in PILOTS}
    candidates = QUICK if args.quick else tuple(by_name[name] for name in PILOT_ORDER)
    if args.gpu is not None:
        candidates = tuple(gpu_order(json.loads(Path(args.gpu).read_text())["rows"]))
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {c.name for c in candidates})
        if unknown:
            raise SystemExit(f"--only: expected names from {[c.name for c in candidates]}, got {unknown}")
        candidates = tuple(c for c in candidates if c.name in names)
    scenes, bootstrap = (20, 20) if args.quick else (args.scenes, args.bootstrap)
    work = Path(args.work_dir)
    results_path = work / "ladder.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": [], "replication": None}
    done = {row["name"] for row in results["rows"]}
    clock = time.perf_counter()
    for candidate in candidates:
        if candidate.name in done:
            continue
        if args.budget is not None and time.perf_counter() - clock > args.budget:
            print(f"budget: {args.budget:g} s spent; not started: {candidate.name} and the candidates after it")
            break
        clip_dir = train_candidate(
            candidate, work, args.threads, args.device, not args.no_progress, args.render_workers, args.data_workers
        )
        stats = json.loads((clip_dir / "stats.json").read_text())  # the trainer's own wall time, resumes included
        row = {
            **asdict(candidate),
            "samples": stats["samples"],
            "train_seconds": stats["wall_time_s"],
            "device": args.device,
            "threads": torch.get_num_threads(),
            "command": f"python -m captum_iclip.zoo.ladder --only {candidate.name}",
            "selection": measure(clip_dir, "selection", scenes, bootstrap, args.device, candidate.variant),
        }
        results["rows"].append(row)
        atomic_write_text(results_path, json_text(results, indent=1))
        print(markdown([row]), end="")
    if args.replicate:
        chosen = pick(results["rows"])
        if chosen is None:
            results["replication"] = {"pick": None, "reason": "no candidate meets the recognition targets"}
        else:
            clip_dir = work / chosen["name"] / "clip"
            variant = WorldVariant(chosen.get("backgrounds", "textured"), chosen.get("object_scale", 1.0))
            count = LADDER_SCENES if not args.quick else scenes
            report = measure(clip_dir, "report", count, bootstrap, args.device, variant)
            results["replication"] = {"pick": chosen["name"], "report": report}
        atomic_write_text(results_path, json_text(results, indent=1))
    atomic_write_text(work / "ladder.md", markdown(results["rows"]))
    print(markdown(results["rows"]), end="")
    print(f"wrote {results_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
