"""The paper's claims, tested in the miniature: ``python -m captum_iclip.zoo.study``.

A pre-registered ablation (``docs/study/README.md``: hypotheses, rows, scenes, seeds,
metrics and verdict rules) of Li et al., arXiv 2209.07046 (docs/methods.md):

* **pooling grid**: tiny CLIPs trained from scratch with class-token, attention,
  average, global max and masked max pooling (DINO or oracle masks);
* **ICLIP grid**: interpretability projections trained on the frozen bundled CLIP,
  modes ``projection`` / ``last-1`` / ``last-2`` / ``full`` x mask sources oracle /
  DINO / centre box / all patches;
* **training-free rows** on the frozen CLIP: raw ITSM, CLIP Surgery, masked max
  pooling attribution, LayerGradCam, IntegratedGradients.

Every run is trained with :func:`captum_iclip.training.iclip.train` and scored with
:func:`captum_iclip.evaluation.run.run_evaluation` (mIoU, mSC, pointing game, 95 %
bootstrap intervals over scenes) and :func:`captum_iclip.zoo.quality.recognition_report`
(zero-shot). Each run's result is written atomically to ``<work-dir>/<run>/result.json``
and a rerun skips finished runs (the trainer itself resumes from its checkpoints).
``results.json``, ``table.md``, ``figure.png`` and the README section "The paper's
claims, tested" are generated from the results (``--report-only`` re-renders them).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_iclip._io import atomic_write_text, json_text
from captum_iclip.zoo.quality import STUDY_SCENES, STUDY_SELECTION_SCENES

POOLINGS = ("class-token", "attention", "average", "max", "masked-max-dino", "masked-max-oracle")
MODES = ("projection", "last-1", "last-2", "full")
MASK_SOURCES = ("oracle", "dino", "centre", "all")
SOURCE_TITLES = {"oracle": "oracle masks", "dino": "DINO masks", "centre": "centre box", "all": "all patches"}
TRAINING_FREE = ("raw", "surgery", "mmp", "gradcam", "ig")
# The pick's candidates: mask sources a user has without labels, in the tie-break order.
PICKABLE_SOURCES = ("dino", "centre", "all")
RECIPE_SCENES = 60000  # the training set of python -m captum_iclip.zoo.train
BATCH_SIZE = 128
FULL_STEPS = 468  # one epoch of the recipe's scenes at batch 128
BOOTSTRAP = 1000
ZERO_SHOT_TOLERANCE = 1.0  # points of zero-shot accuracy that count as "unchanged" (H3, the pick)
H1_LOW = 5.0  # mSC points below which a map counts as "low" (H1)
CLAIMS_START, CLAIMS_END = "<!-- study:claims:start -->", "<!-- study:claims:end -->"
HYPOTHESES = {
    "H1": "class-token or attention pooling gives negative or low ITSM mSC",
    "H2": "masked max pooling trained from scratch gives positive ITSM mSC",
    "H3": "an interpretability projection trained with masked max pooling raises ITSM mSC and mIoU over raw "
    "ITSM on the same frozen CLIP, with zero-shot accuracy unchanged",
    "H4": "the gain depends on mask quality (oracle > DINO > centre box > all patches)",
}


# ---------------------------------------------------------------------------- the runs
@dataclass(frozen=True)
class RunSpec:
    """One run of the study: what is trained (if anything) and which method's maps are scored.

    Attributes:
        group: ``"pooling"``, ``"iclip"`` or ``"training-free"``.
        pooling: a name of :data:`POOLINGS` (``"class-token"`` for the frozen CLIP's rows).
        mode: the trainer's mode (``"full"`` from scratch; :data:`MODES` for ICLIP); ``None`` untrained.
        mask_source: a name of :data:`MASK_SOURCES` or ``None``.
        seed: the training seed.
        method: the registry method scored (``"raw"``, ``"iclip"``, ...).
    """

    group: str
    pooling: str
    mode: str | None
    mask_source: str | None
    seed: int
    method: str

    @property
    def name(self) -> str:
        """The run's folder name under the work directory."""
        if self.group == "training-free":
            return f"training-free/{self.method}"
        if self.group == "pooling":
            return f"pooling/{self.pooling}/seed{self.seed}"
        return f"iclip/{self.mode}-{self.mask_source}/seed{self.seed}"

    @property
    def config_key(self) -> tuple:
        """What a configuration is, seeds aside."""
        return (self.group, self.pooling, self.mode, self.mask_source, self.method)


def pooling_run(pooling: str, seed: int) -> RunSpec:
    """A from-scratch pooling row; the max rows are scored on the projection they were trained through."""
    source = {"max": "all", "masked-max-dino": "dino", "masked-max-oracle": "oracle"}.get(pooling)
    return RunSpec("pooling", pooling, "full", source, seed, "iclip" if source else "raw")


def iclip_run(mode: str, source: str, seed: int) -> RunSpec:
    """An ICLIP cell on the frozen class-token CLIP, scored by ICLIP ITSM."""
    return RunSpec("iclip", "class-token", mode, source, seed, "iclip")


def training_free_run(method: str) -> RunSpec:
    """A registry method on the frozen CLIP (``mmp`` with the DINO masks)."""
    return RunSpec("training-free", "class-token", None, "dino" if method == "mmp" else None, 0, method)


@dataclass
class StudySettings:
    """The options of one study (see :func:`build_parser`)."""

    steps: int = FULL_STEPS
    iclip_steps: int = FULL_STEPS
    seeds: tuple[int, ...] = (0, 1, 2)
    scenes: int = STUDY_SCENES
    selection_scenes: int = STUDY_SELECTION_SCENES
    batch_size: int = BATCH_SIZE
    bootstrap: int = BOOTSTRAP
    poolings: tuple[str, ...] = POOLINGS
    cells: tuple[tuple[str, str], ...] = tuple((m, s) for m in MODES for s in MASK_SOURCES)
    training_free: tuple[str, ...] = TRAINING_FREE
    device: str = "cpu"
    clip: str = ""
    work_dir: str = "runs/study"
    out: str = "docs/study"
    readme: str = "README.md"
    progress: bool = True
    quick: bool = False
    pooling_tower: tuple[int, int] | None = None
    extra: dict = field(default_factory=dict)


def planned_runs(settings: StudySettings) -> list[RunSpec]:
    """Every run that does not depend on the pick, in the order they run."""
    runs = [training_free_run(method) for method in settings.training_free]
    runs += [pooling_run(pooling, seed) for pooling in settings.poolings for seed in settings.seeds]
    runs += [iclip_run(mode, source, settings.seeds[0]) for mode, source in settings.cells]
    return runs


def pick_iclip(results: Sequence[dict], baseline_zero_shot: float | None) -> dict | None:
    """The pre-registered pick (docs/study/README.md), on the selection scenes only.

    Among the first-seed ICLIP cells with a label-free mask source whose selection zero-shot is at
    least the frozen CLIP's minus :data:`ZERO_SHOT_TOLERANCE`, the highest selection mSC; ties go to
    the simpler mode, then to the mask source order of :data:`PICKABLE_SOURCES`.
    """
    candidates = [
        r
        for r in results
        if r["group"] == "iclip"
        and r["mask_source"] in PICKABLE_SOURCES
        and "selection" in r
        and (baseline_zero_shot is None or r["selection"]["zero_shot"] >= baseline_zero_shot - ZERO_SHOT_TOLERANCE)
    ]
    if not candidates:
        return None

    def order(r: dict) -> tuple:
        msc = r["selection"]["msc"]
        return (
            -(msc if msc is not None else -math.inf),
            MODES.index(r["mode"]),
            PICKABLE_SOURCES.index(r["mask_source"]),
        )

    return min(candidates, key=order)


# ---------------------------------------------------------------------------- shared resources
def bundle_model_config() -> dict:
    """The bundled CLIP's open_clip model config (``config.json``), else the recipe's :data:`MODEL_CONFIG`."""
    from captum_iclip.zoo.train import MODEL_CONFIG

    recorded = default_clip_path().parent / "config.json"
    if recorded.is_file():
        return json.loads(recorded.read_text())["model_config"]
    return copy.deepcopy(MODEL_CONFIG)


def model_config(pooling: str, tower: tuple[int, int] | None = None) -> dict:
    """The open_clip model config of a pooling row: the bundle's architecture with that pooling
    (and, when ``tower`` is given, a vision tower of ``tower = (layers, width)`` instead of the bundle's)."""
    config = bundle_model_config()
    if tower is not None:
        config["vision_cfg"].update(layers=tower[0], width=tower[1])
    if pooling == "attention":
        config["vision_cfg"].update(attentional_pool=True, attn_pooler_queries=1, attn_pooler_heads=2)
    elif pooling == "average":
        config["vision_cfg"]["pool_type"] = "avg"
    elif pooling not in POOLINGS:
        raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
    return config


class StudyContext:
    """What the runs share, built when first needed: the frozen CLIP, the mask sources, the scenes.

    Args:
        settings: the study's options.
    """

    def __init__(self, settings: StudySettings) -> None:
        from captum_iclip.devices import check_device

        self.settings = settings
        self.device = check_device(settings.device, "device")
        self.work = Path(settings.work_dir)
        self._cache: dict = {}

    def _get(self, key: str, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def bundle(self):
        """The bundled ``shapes-tiny`` models, with the CLIP weights of ``settings.clip`` when given."""
        return self._get("bundle", self._load_bundle)

    def _load_bundle(self):
        from captum_iclip import zoo
        from captum_iclip._io import load_torch_file

        bundle = zoo.load("shapes-tiny", device=str(self.device))
        if self.settings.clip and Path(self.settings.clip).resolve() != default_clip_path().resolve():
            state = load_torch_file(self.settings.clip, "clip")
            bundle.clip.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return bundle

    @property
    def grid(self) -> tuple[int, int]:
        """The CLIP patch grid of the bundle's input size."""
        return tuple(self.bundle.clip.visual.grid_size)

    @property
    def image_size(self) -> int:
        return self.bundle.image_size

    def scenes(self, name: str) -> list:
        """The evaluation scenes of seed range ``"study"`` or ``"selection"``."""
        from captum_iclip.zoo.quality import scene_range

        count = self.settings.scenes if name == "study" else self.settings.selection_scenes
        return self._get(f"scenes/{name}", lambda: scene_range(name, count, self.image_size))

    def world(self, steps: int):
        """The recipe's training scenes for a run of ``steps`` steps, and its epochs."""
        from torch.utils.data import Subset

        from captum_iclip.world import TRAIN_SEED_START
        from captum_iclip.zoo.train import RenderedWorld

        wanted = steps * self.settings.batch_size
        size = min(RECIPE_SCENES, max(self.settings.steps, self.settings.iclip_steps) * self.settings.batch_size)
        world = self._get(
            "world",
            lambda: RenderedWorld(
                TRAIN_SEED_START,
                size,
                size=self.image_size,
                progress=self.settings.progress,
                caption_colour_prob=0.3,
                cache_dir=self.work / "world",  # a rerun reads the rendered scenes back
            ),
        )
        if wanted <= len(world):
            return Subset(world, range(wanted)), 1
        return world, math.ceil(wanted / len(world))

    @property
    def tokenizer(self):
        """The bundle's tokenizer, remembering the ids of the captions it has seen (training revisits them)."""
        from captum_iclip.zoo.train import CachedTokenizer

        return self._get("tokenizer", lambda: CachedTokenizer(self.bundle.tokenizer))

    def mask_provider(self, source: str | None):
        """The provider of a mask source (``None`` for ``"all"`` and no source: every patch)."""
        from captum_iclip.masks import FixedMaskProvider
        from captum_iclip.zoo.quality import centre_box

        if source in (None, "all"):
            return None
        if source == "dino":
            return self.bundle.mask_provider
        if source == "centre":
            return FixedMaskProvider(centre_box(self.grid)[None])
        if source == "oracle":
            return self._get("oracle", self._oracle)
        raise ValueError(f"mask_source: expected one of {MASK_SOURCES}, got {source!r}")

    def _oracle(self):
        """Ground-truth masks of the training scenes in use and of the evaluation scenes."""
        from captum_iclip.masks import OracleMaskProvider
        from captum_iclip.world import TRAIN_SEED_START, generate_scene

        count = min(RECIPE_SCENES, max(self.settings.steps, self.settings.iclip_steps) * self.settings.batch_size)
        images, foreground = [], []
        for seed in range(TRAIN_SEED_START, TRAIN_SEED_START + count):
            scene = generate_scene(seed, size=self.image_size)
            images.append(scene.image)
            foreground.append(scene.label > 0)
        for scene in self.scenes("study") + self.scenes("selection"):
            images.append(scene.image)
            foreground.append(scene.label > 0)
        bundle = self.bundle
        mean, std = bundle.clip.visual.image_mean, bundle.clip.visual.image_std
        return OracleMaskProvider(np.stack(images), np.stack(foreground), self.grid, mean, std)


def default_clip_path() -> Path:
    """The bundled CLIP weights."""
    from captum_iclip.zoo import WEIGHTS_DIR

    return WEIGHTS_DIR / "shapes-tiny" / "clip.pt"


# ---------------------------------------------------------------------------- training
def train_run(spec: RunSpec, ctx: StudyContext, out_dir: Path) -> tuple[nn.Module, dict]:
    """Train the run's model (resuming from its checkpoints); returns the dual model and the trainer's stats."""
    from captum_iclip.models.dual import DualProjectionCLIP
    from captum_iclip.training.iclip import TrainConfig, parse_mode, train
    from captum_iclip.zoo import build_clip

    settings = ctx.settings
    if spec.group == "pooling":
        steps, torch_seed = settings.steps, spec.seed
        torch.manual_seed(torch_seed)  # the random initialisation
        dual = DualProjectionCLIP(build_clip(model_config(spec.pooling, ctx.settings.pooling_tower)))
        options = dict(mode="full", lr=2e-3, wd=0.1, warmup=min(100, steps // 4), grad_clip_norm=1.0)
        if spec.mask_source:  # the max rows: the masked-max-pooling term alone, on W_int
            options.update(objective="iclip", rec_weight=0.0)
        else:
            options.update(objective="clip")
    else:
        steps = settings.iclip_steps
        dual = DualProjectionCLIP(copy.deepcopy(ctx.bundle.clip))
        mode, unlock = parse_mode(spec.mode)
        options = dict(mode=mode, unlock_blocks=unlock, objective="iclip", lr=1e-3, wd=0.0, warmup=min(20, steps // 4))
    dataset, epochs = ctx.world(steps)
    config = TrainConfig(
        batch_size=settings.batch_size,
        epochs=epochs,
        seed=spec.seed,
        device=str(ctx.device),
        output_dir=str(out_dir),
        save_every=50,
        resume="latest",
        workers=0,
        progress=False,
        mask_cache=str(ctx.work / "mask-cache") if spec.mask_source == "dino" else None,
        **options,
    )
    provider = ctx.mask_provider(spec.mask_source)
    stats = train(config, model=dual, mask_provider=provider, dataset=dataset, tokenizer=ctx.tokenizer)
    return dual.eval(), stats


# ---------------------------------------------------------------------------- evaluation
class PooledScore(nn.Module):
    """Zero-shot scores of a max-pooled model: masked max pooling (docs/methods.md §3) of its
    interpretability-projected patches, the embedding it was trained with, against the prompts.

    Args:
        dual: the trained model.
        text: (K, D) normalised prompt embeddings.
        provider: the mask source the model was trained with (``None``: every patch).
    """

    def __init__(self, dual: nn.Module, text: Tensor, provider: nn.Module | None) -> None:
        super().__init__()
        from captum_iclip.pooling import MaskedMaxPooling

        self.dual, self.text, self.provider, self.pool = dual, text, provider, MaskedMaxPooling()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        images = images.to(self.text.device)
        patches = self.dual.encode_dense(images, projection="interpretability")[:, 1:]
        if self.provider is None:
            mask = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
        else:
            mask = self.provider(images, self.dual.adapter.grid_size(*images.shape[-2:]))
        return F.normalize(self.pool(patches, mask), dim=-1) @ self.text.T


def zero_shot(dual: nn.Module, spec: RunSpec, ctx: StudyContext, scenes: list) -> float:
    """Percentage of scenes whose best shape prompt names one of their objects (``top1_any``)."""
    from captum_iclip.similarity import CLIPSimilarity
    from captum_iclip.zoo.quality import recognition_report

    bundle = ctx.bundle
    sim = CLIPSimilarity(dual, bundle.tokenizer, list(bundle.prompts), templates=bundle.templates).to(ctx.device)
    if spec.group == "pooling" and spec.mask_source:
        score = PooledScore(dual, sim.text_features, ctx.mask_provider(spec.mask_source))
    else:
        score = lambda images: sim(images.to(ctx.device))  # noqa: E731 - the recognition scores
    return float(recognition_report(score, scenes, bundle.preprocess)["top1_any"])


def localization(dual: nn.Module, spec: RunSpec, ctx: StudyContext, name: str, bootstrap: int) -> dict:
    """The registry method's localization figures on the scenes of seed range ``name``
    (:func:`~captum_iclip.evaluation.run.run_evaluation`, bootstrap intervals when ``bootstrap``)."""
    from captum_iclip.datasets import WorldScenes
    from captum_iclip.demo import pointing_tolerance_for
    from captum_iclip.evaluation.config import EvalConfig
    from captum_iclip.evaluation.run import class_prompts, run_evaluation
    from captum_iclip.similarity import CLIPSimilarity
    from captum_iclip.world import SEED_RANGES

    count = len(ctx.scenes(name))
    dataset = WorldScenes(SEED_RANGES[name], limit=count, size=ctx.image_size)
    prompts = class_prompts(dataset, ctx.bundle)
    sim = CLIPSimilarity(dual, ctx.bundle.tokenizer, prompts, templates=ctx.bundle.templates).to(ctx.device)
    config = EvalConfig(
        "world",
        str(SEED_RANGES[name]),
        methods=(spec.method,),
        tasks=("localization",),
        batch_size=16,
        pointing_tolerance=pointing_tolerance_for(ctx.image_size),
        examples=0,
        bootstrap=bootstrap,
        out=None,
        progress=False,
    )
    provider = ctx.mask_provider(spec.mask_source) if spec.method == "mmp" else None
    results, _, _ = run_evaluation(config, sim, dataset=dataset, mask_provider=provider)
    return results["methods"][spec.method]


def evaluate_run(dual: nn.Module, spec: RunSpec, ctx: StudyContext) -> dict:
    """Zero-shot and [mean, lo, hi] of mIoU, mSC and pointing on the study scenes; the first-seed
    ICLIP cells and the frozen CLIP's raw row are also measured on the selection scenes (the pick)."""
    entry = localization(dual, spec, ctx, "study", ctx.settings.bootstrap)
    result = {"zero_shot": zero_shot(dual, spec, ctx, ctx.scenes("study"))}
    for key in ("miou", "msc", "pointing"):
        result[key] = [entry[key], *entry[f"{key}_ci"]]
    result["pairs"] = entry["pairs"]
    first_iclip = spec.group == "iclip" and spec.seed == ctx.settings.seeds[0]
    if first_iclip or (spec.group == "training-free" and spec.method == "raw"):
        selection = localization(dual, spec, ctx, "selection", 0)
        result["selection"] = {
            "scenes": len(ctx.scenes("selection")),
            "msc": selection["msc"],
            "zero_shot": zero_shot(dual, spec, ctx, ctx.scenes("selection")),
        }
    return result


def run_one(spec: RunSpec, ctx: StudyContext) -> dict:
    """Train and evaluate one run, or read its result when a previous run finished it."""
    out_dir = ctx.work / spec.name
    path = out_dir / "result.json"
    if path.is_file():
        return json.loads(path.read_text())
    began = time.monotonic()
    stats = None
    if spec.group == "training-free":
        dual = ctx.bundle.dual
    else:
        dual, stats = train_run(spec, ctx, out_dir)
    trained = time.monotonic()
    result = {"run": spec.name, **asdict(spec), "scenes": len(ctx.scenes("study")), **evaluate_run(dual, spec, ctx)}
    result["train"] = (
        None if stats is None else {k: stats[k] for k in ("steps", "samples", "wall_time_s", "final_loss")}
    )
    result["seconds"] = {"train": trained - began, "evaluate": time.monotonic() - trained}
    atomic_write_text(path, json_text(result, indent=2) + "\n")
    return result


def mask_quality_figures(ctx: StudyContext) -> dict:
    """IoU of the DINO masks, the centre box and all patches with the object patches, on the study scenes."""
    from captum_iclip.zoo.quality import mask_quality

    path = ctx.work / "mask_quality.json"
    if not path.is_file():
        bundle = ctx.bundle
        # mask_quality compares with CPU ground truth: measure a CPU copy of the provider.
        provider = copy.deepcopy(bundle.mask_provider).cpu()
        figures = mask_quality(provider, ctx.scenes("study"), bundle.preprocess, ctx.grid)
        atomic_write_text(path, json_text(figures, indent=2) + "\n")
    return json.loads(path.read_text())


def run_study(settings: StudySettings) -> dict:
    """Every run (finished ones are read back), the pick and its extra seeds; writes the outputs."""
    from tqdm.auto import tqdm

    ctx = StudyContext(settings)
    runs = planned_runs(settings)
    bar = tqdm(total=len(runs) + len(settings.seeds) - 1, desc="study", unit="run", disable=not settings.progress)
    results = []

    def do(spec: RunSpec) -> None:
        bar.set_postfix_str(spec.name)
        results.append(run_one(spec, ctx))
        bar.update(1)

    for spec in runs:
        do(spec)
    raw = next((r for r in results if r["group"] == "training-free" and r["method"] == "raw"), None)
    picked = pick_iclip(results, raw["selection"]["zero_shot"] if raw else None)
    if picked is not None:
        for seed in settings.seeds[1:]:
            do(iclip_run(picked["mode"], picked["mask_source"], seed))
    bar.close()
    document = {
        "study": study_record(settings),
        "picked_iclip": None if picked is None else pick_record(picked, raw),
        "mask_quality": mask_quality_figures(ctx),
        "runs": results,
    }
    out = Path(settings.out)
    atomic_write_text(out / "results.json", json_text(document, indent=2) + "\n")
    write_report(document, settings)
    return document


def study_record(settings: StudySettings) -> dict:
    """The options a results file was produced with."""
    from captum_iclip.world import SEED_RANGES

    record = {k: v for k, v in asdict(settings).items() if k not in ("progress", "extra", "out", "readme")}
    clip = Path(settings.clip or default_clip_path())
    head = default_clip_path().parent / "interpretability_head.pt"  # the bundle's, scored by the mmp row
    record.update(
        study_first_seed=SEED_RANGES["study"],
        selection_first_seed=SEED_RANGES["selection"],
        clip=str(clip),
        # The bundle can be rebuilt after a study: the hashes say which weights these figures are of.
        weights_sha256={"clip": _sha256(clip), "bundle_interpretability_head": _sha256(head)},
    )
    return record


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def pick_record(picked: dict, raw: dict | None) -> dict:
    """What the pick chose and on which figures (selection scenes)."""
    return {
        "mode": picked["mode"],
        "mask_source": picked["mask_source"],
        "selection": picked["selection"],
        "frozen_clip_selection_zero_shot": raw["selection"]["zero_shot"] if raw else None,
        "rule": "docs/study/README.md, 'The rule that picks the bundled ICLIP configuration'",
    }


# ---------------------------------------------------------------------------- report
METRICS = ("miou", "msc", "pointing")


def aggregate(runs: Sequence[dict]) -> list[dict]:
    """One row per configuration: seed means, the envelope interval [min lo, max hi] over seeds
    (covering the scene bootstrap and the seed spread) and the seeds' standard deviation of mSC."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        key = (run["group"], run["pooling"], run["mode"], run["mask_source"], run["method"])
        groups.setdefault(key, []).append(run)
    rows = []
    for (group, pooling, mode, source, method), members in groups.items():
        row = {"group": group, "pooling": pooling, "mode": mode, "mask_source": source, "method": method}
        row["seeds"] = sorted(m["seed"] for m in members)
        row["scenes"] = members[0]["scenes"]
        row["zero_shot"] = float(np.mean([m["zero_shot"] for m in members]))
        for key in METRICS:
            means = [m[key][0] for m in members if m[key][0] is not None]
            los = [m[key][1] for m in members if m[key][1] is not None]
            his = [m[key][2] for m in members if m[key][2] is not None]
            row[key] = [
                float(np.mean(means)) if means else None,
                min(los) if los else None,
                max(his) if his else None,
            ]
        mscs = [m["msc"][0] for m in members if m["msc"][0] is not None]
        row["msc_seed_sd"] = float(np.std(mscs, ddof=1)) if len(mscs) > 1 else None
        rows.append(row)
    return rows


def row_label(row: dict) -> str:
    """A configuration's name in tables and figures."""
    if row["group"] == "training-free":
        from captum_iclip.evaluation.methods import method_title

        return method_title(row["method"]) + (" (DINO masks)" if row["method"] == "mmp" else "")
    if row["group"] == "pooling":
        return f"{row['pooling']} pooling"
    return f"ICLIP {row['mode']} / {SOURCE_TITLES[row['mask_source']]}"


def _fmt(triple: Sequence[float | None] | None) -> str:
    if triple is None or triple[0] is None:
        return "n/a"
    lo, hi = ("?" if v is None else f"{v:.1f}" for v in triple[1:])
    return f"{triple[0]:.1f} [{lo}, {hi}]"


def render_table(document: dict) -> str:
    """``table.md``: every configuration's figures, with the intervals."""
    rows = aggregate(document["runs"])
    lines = [
        "| group | configuration | scored maps | seeds | zero-shot % | mIoU | mSC | mSC seed s.d. | pointing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        sd = "" if row["msc_seed_sd"] is None else f"{row['msc_seed_sd']:.1f}"
        lines.append(
            f"| {row['group']} | {row_label(row)} | {row['method']} | {','.join(map(str, row['seeds']))} | "
            f"{row['zero_shot']:.1f} | {_fmt(row['miou'])} | {_fmt(row['msc'])} | {sd} | {_fmt(row['pointing'])} |"
        )
    study = document["study"]
    return (
        f"# Study results\n\nGenerated from `results.json` by `python -m captum_iclip.zoo.study --report-only`. "
        f"{study['scenes']} study scenes (first seed {study['study_first_seed']}); figures are the mean over "
        "seeds with the 95 % interval `[min lo, max hi]` over seeds of each seed's bootstrap interval over "
        "scenes. Zero-shot: the best shape prompt names an object of the scene (ICLIP rows: the recognition "
        "projection after training; max-pooled rows: their own pooling).\n\n" + "\n".join(lines) + "\n"
    )


def _find(rows: Sequence[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _pooling_verdict(
    rows: Sequence[dict],
    poolings: tuple[str, str],
    holds: Callable[[float, float], bool],
    fails: Callable[[float, float], bool],
) -> tuple[str, str]:
    """A verdict on pooling rows: *reproduced* when ``holds(lo, hi)`` for every row's mSC interval,
    *not reproduced* when ``fails(lo, hi)`` for one, *inconclusive* otherwise."""
    targets = [_find(rows, group="pooling", pooling=p) for p in poolings]
    if None in targets:
        return "not run", f"rows {' and '.join(poolings)} were not both run"
    if any(t["msc"][1] is None or t["msc"][2] is None for t in targets):
        return "inconclusive", "an interval is undefined"
    text = "; ".join(f"{row_label(t)}: mSC {_fmt(t['msc'])}" for t in targets)
    if all(holds(*t["msc"][1:]) for t in targets):
        return "reproduced", text
    if any(fails(*t["msc"][1:]) for t in targets):
        return "not reproduced", text
    return "inconclusive", text


def verdict_h1(rows: Sequence[dict]) -> tuple[str, str]:
    """H1 on the class-token and attention pooling rows: both below :data:`H1_LOW`."""
    return _pooling_verdict(rows, ("class-token", "attention"), lambda lo, hi: hi < H1_LOW, lambda lo, hi: lo >= H1_LOW)


def verdict_h2(rows: Sequence[dict]) -> tuple[str, str]:
    """H2 on the masked-max rows trained from scratch: both above 0."""
    return _pooling_verdict(
        rows, ("masked-max-dino", "masked-max-oracle"), lambda lo, hi: lo > 0, lambda lo, hi: hi <= 0
    )


def verdict_h3(rows: Sequence[dict], picked: dict | None) -> tuple[str, str]:
    """H3: the picked ICLIP row against raw ITSM on the same frozen CLIP."""
    raw = _find(rows, group="training-free", method="raw")
    row = picked and _find(rows, group="iclip", mode=picked["mode"], mask_source=picked["mask_source"])
    if raw is None or not row:
        return "not run", "the picked ICLIP row or raw ITSM on the frozen CLIP was not run"
    drop = raw["zero_shot"] - row["zero_shot"]
    text = (
        f"{row_label(row)}: mSC {_fmt(row['msc'])}, mIoU {_fmt(row['miou'])}, zero-shot {row['zero_shot']:.1f} %; "
        f"raw ITSM: mSC {_fmt(raw['msc'])}, mIoU {_fmt(raw['miou'])}, zero-shot {raw['zero_shot']:.1f} %"
    )
    bounds = [row["msc"][1], row["msc"][2], raw["msc"][1], raw["msc"][2]]
    bounds += [row["miou"][1], row["miou"][2], raw["miou"][1], raw["miou"][2]]
    if any(b is None for b in bounds):
        return "inconclusive", text
    if row["msc"][1] > raw["msc"][2] and row["miou"][1] > raw["miou"][2] and abs(drop) <= ZERO_SHOT_TOLERANCE:
        return "reproduced", text
    if row["msc"][2] < raw["msc"][1] or row["miou"][2] < raw["miou"][1] or drop > ZERO_SHOT_TOLERANCE:
        return "not reproduced", text
    return "inconclusive", text


def verdict_h4(runs: Sequence[dict], picked: dict | None, first_seed: int) -> tuple[str, str]:
    """H4: the four mask sources in the picked mode, first seed."""
    if picked is None:
        return "not run", "no ICLIP configuration was picked"
    cells = [
        next(
            (
                r
                for r in runs
                if r["group"] == "iclip"
                and r["mode"] == picked["mode"]
                and r["mask_source"] == s
                and r["seed"] == first_seed
            ),
            None,
        )
        for s in MASK_SOURCES
    ]
    if None in cells:
        return "not run", f"not every mask source was run in mode {picked['mode']}"
    text = f"mode {picked['mode']}: " + "; ".join(f"{s} mSC {_fmt(c['msc'])}" for s, c in zip(MASK_SOURCES, cells))
    if any(v is None for c in cells for v in c["msc"]):
        return "inconclusive", text
    means = [c["msc"][0] for c in cells]
    if all(a > b for a, b in zip(means, means[1:])) and cells[0]["msc"][1] > cells[-1]["msc"][2]:
        return "reproduced", text
    reversed_pairs = [(a, b) for i, a in enumerate(cells) for b in cells[i + 1 :] if a["msc"][2] < b["msc"][1]]
    return ("not reproduced" if reversed_pairs else "inconclusive"), text


def render_claims(document: dict) -> str:
    """The README section "The paper's claims, tested", between its markers."""
    rows, runs, picked = aggregate(document["runs"]), document["runs"], document["picked_iclip"]
    verdicts = {
        "H1": verdict_h1(rows),
        "H2": verdict_h2(rows),
        "H3": verdict_h3(rows, picked),
        "H4": verdict_h4(runs, picked, document["study"]["seeds"][0]),
    }
    study, masks = document["study"], document["mask_quality"]
    lines = [
        CLAIMS_START,
        "## The paper's claims, tested",
        "",
        f"Generated from `docs/study/results.json` by `python -m captum_iclip.zoo.study --report-only`; "
        f"hypotheses, rows and verdict rules were pre-registered in `docs/study/README.md`. "
        f"{study['scenes']} held-out study scenes; 95 % intervals over scenes and seeds in brackets; "
        f"{study['steps']} steps per from-scratch run, {study['iclip_steps']} per ICLIP run, seeds "
        f"{', '.join(map(str, study['seeds']))}.",
        "",
        "| claim | our result | verdict |",
        "|---|---|---|",
    ]
    lines += [f"| **{h}**: {HYPOTHESES[h]} | {text} | {verdict} |" for h, (verdict, text) in verdicts.items()]
    if picked:
        lines += [
            "",
            f"Picked ICLIP configuration (selection scenes only): mode `{picked['mode']}`, "
            f"mask source `{picked['mask_source']}`.",
        ]
    lines += [
        f"Mask quality on the study scenes (IoU with the object patches): DINO {masks['dino_iou']:.1f} %, "
        f"centre box {masks['centre_box_iou']:.1f} %, all patches {masks['all_patches_iou']:.1f} %, oracle 100 %.",
        "Every figure: `docs/study/table.md`, `docs/study/figure.png`.",
        CLAIMS_END,
    ]
    return "\n".join(lines) + "\n"


def splice_section(text: str, section: str) -> str:
    """``text`` with the marked section replaced by ``section`` (appended when absent). A marker counts
    only as a line of its own: prose that names the markers (as the pre-registration does) stays as it is."""
    lines = text.splitlines(keepends=True)
    bare = [line.strip() for line in lines]
    if CLAIMS_START in bare and CLAIMS_END in bare[bare.index(CLAIMS_START) :]:
        start = bare.index(CLAIMS_START)
        end = bare.index(CLAIMS_END, start)
        return "".join(lines[:start]) + section.rstrip("\n") + "\n" + "".join(lines[end + 1 :])
    return text.rstrip("\n") + "\n\n" + section


def draw_figure(document: dict, path: Path) -> None:
    """``figure.png``: mSC and mIoU of every configuration with their intervals, coloured by group."""
    from captum_iclip.viz import metrics_chart

    colours = {"pooling": "tab:blue", "iclip": "tab:green", "training-free": "tab:gray"}
    figures = (("mSC of the scored maps", "msc"), ("explanation mIoU (%)", "miou"))
    rows = [
        {"title": row_label(r), "colour": colours[r["group"]], "figures": {name: tuple(r[k]) for name, k in figures}}
        for r in aggregate(document["runs"])
    ]
    title = f"{document['study']['scenes']} study scenes, 95 % intervals over scenes and seeds"
    metrics_chart(rows, title=title, path=str(path), dpi=120)


def write_report(document: dict, settings: StudySettings) -> dict[str, Path]:
    """Render ``table.md``, ``figure.png`` and the claims section (into ``out/README.md`` and ``--readme``)."""
    out = Path(settings.out)
    paths = {"table": out / "table.md", "figure": out / "figure.png", "section": out / "README.md"}
    atomic_write_text(paths["table"], render_table(document))
    draw_figure(document, paths["figure"])
    section = render_claims(document)
    targets = [paths["section"]] + ([Path(settings.readme)] if settings.readme else [])
    for target in targets:
        text = target.read_text(encoding="utf-8") if target.is_file() else ""
        atomic_write_text(target, splice_section(text, section))
    return paths


# ---------------------------------------------------------------------------- command line
QUICK = dict(
    steps=10,
    iclip_steps=10,
    seeds=(0,),
    scenes=50,
    selection_scenes=20,
    batch_size=32,
    bootstrap=200,
    poolings=("masked-max-oracle",),
    cells=(("projection", "dino"),),
    training_free=("raw",),
    work_dir="runs/study-quick/work",
    out="runs/study-quick",
    readme="",
)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m captum_iclip.zoo.study`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m captum_iclip.zoo.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 configurations, tiny steps, 50 scenes (a smoke run)")
    parser.add_argument("--steps", type=int, help=f"steps of each from-scratch run (default {FULL_STEPS})")
    parser.add_argument("--iclip-steps", type=int, help=f"steps of each ICLIP run (default {FULL_STEPS})")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; the first is the ICLIP grid's)")
    parser.add_argument("--scenes", type=int, help=f"study scenes (default {STUDY_SCENES})")
    parser.add_argument("--selection-scenes", type=int, help=f"selection scenes (default {STUDY_SELECTION_SCENES})")
    parser.add_argument("--batch-size", type=int, help=f"training batch (default {BATCH_SIZE})")
    parser.add_argument("--bootstrap", type=int, help=f"bootstrap resamples (default {BOOTSTRAP})")
    parser.add_argument(
        "--pooling-tower",
        help="vision tower of the from-scratch pooling rows as LAYERSxWIDTH, e.g. 4x128 (default: the bundle's)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--clip", default="", help="CLIP weights for the ICLIP grid (default: the bundled clip.pt)")
    parser.add_argument("--work-dir", help="run folders (default runs/study)")
    parser.add_argument("--out", help="where results.json, table.md and figure.png go (default docs/study)")
    parser.add_argument("--readme", help="README to put the claims section in (default README.md; '' for none)")
    parser.add_argument("--report-only", action="store_true", help="re-render the outputs from results.json")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def settings_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> StudySettings:
    """The settings of the parsed arguments (quick defaults first); bad values end in ``parser.error``."""
    settings = StudySettings(**(QUICK if args.quick else {}))
    for name in ("steps", "iclip_steps", "scenes", "selection_scenes", "batch_size", "bootstrap"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                parser.error(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")
            setattr(settings, name, value)
    if args.seeds is not None:
        try:
            seeds = tuple(int(s) for s in args.seeds.split(","))
        except ValueError:
            seeds = ()
        if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
            parser.error(f"--seeds: expected distinct non-negative integers such as 0,1,2, got {args.seeds!r}")
        settings.seeds = seeds
    for name in ("work_dir", "out", "readme"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if args.pooling_tower is not None:
        layers, _, width = args.pooling_tower.partition("x")
        if not (layers.isdigit() and width.isdigit() and int(layers) > 0 and int(width) > 0 and int(width) % 64 == 0):
            parser.error(
                f"--pooling-tower: expected LAYERSxWIDTH with WIDTH a multiple of 64, got {args.pooling_tower!r}"
            )
        settings.pooling_tower = (int(layers), int(width))
    if args.clip and not Path(args.clip).is_file():
        parser.error(f"--clip: expected a CLIP weights file, got {args.clip!r} (no such file)")
    settings.device, settings.clip, settings.progress = args.device, args.clip, not args.no_progress
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study (or ``--report-only``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = settings_from_args(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report_only:
        results = Path(settings.out) / "results.json"
        if not results.is_file():
            parser.error(f"--report-only: expected {results} from an earlier run, got no such file")
        paths = write_report(json.loads(results.read_text()), settings)
    else:
        try:
            StudyContext(settings)  # checks the device before anything runs
        except ValueError as error:
            parser.error(f"--{error}")
        began = time.monotonic()
        run_study(settings)
        paths = {"results": Path(settings.out) / "results.json", **write_report_paths(settings)}
        print(f"study: {time.monotonic() - began:.0f} s")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def write_report_paths(settings: StudySettings) -> dict[str, Path]:
    """Where :func:`write_report` wrote."""
    out = Path(settings.out)
    return {"table": out / "table.md", "figure": out / "figure.png", "section": out / "README.md"}


if __name__ == "__main__":
    raise SystemExit(main())
