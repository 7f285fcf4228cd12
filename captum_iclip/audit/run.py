"""The audit itself: score every image against the prompts, draw the maps of its
top prompts with every method, store one record per image, rebuild the page.

For each image the report shows its ``top_k`` prompts with the model's own
probabilities (softmax over the prompts for CLIP, sigmoid per prompt for SigLIP)
and, for each of them, an overlay per method (and, with ``text_method``, the
prompt's words coloured by their relevance for the image,
:func:`~captum_iclip.attr.text.explain_text`); a per-prompt summary; the run's
metadata; and the flagged cases:

* *looks at the background*: more than ``background_threshold`` of the
  top-1 prompt's (min-max normalised) map mass lies outside the foreground
  of ``mask_provider`` (see :func:`~captum_iclip.audit.records.background_fraction`);
  not computed without a mask provider;
* *low confidence*: the top-1 probability is below ``low_confidence``.

The run is resumable: each image leaves ``out_dir/records/<key>.json``
(key: the file's content hash and the settings), a rerun skips images
already recorded, and the page is rebuilt from every record made under the
same settings whose file is in this run or still exists unchanged (so audits
of several folders into one ``out_dir`` accumulate, while a deleted or
replaced image leaves no stale row; byte-identical files are audited and
shown once). A file that cannot be read or decoded (a dangling or looping
link too) is reported in the page. Files inside ``out_dir`` are never audited.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from captum_iclip._io import atomic_write_bytes, atomic_write_text, check_output_folder, read_image
from captum_iclip.attr.text import TEXT_METHODS, explain_text
from captum_iclip.audit import records as rec
from captum_iclip.audit.report import ReportContext, render_report
from captum_iclip.evaluation.methods import available_methods, build_method, method_names, requirement
from captum_iclip.similarity import CLIPSimilarity

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("raw", "surgery", "iclip", "mmp")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
Method = Callable[[Tensor, Tensor], Tensor]
PathLike = str | os.PathLike


@dataclass
class AuditSummary:
    """What one run did: the page it wrote and how many images it worked on."""

    index: Path
    computed: int  # images explained in this run
    reused: int  # input files whose record was already there (skipped)
    unreadable: int  # input files that could not be read or decoded, now or in an earlier run (listed in the page)
    skipped: int = 0  # files in the searched folders without an image suffix (listed in the page)


@dataclass(frozen=True)
class AuditOptions:
    """How :func:`audit` explains and flags, checked when made (the arguments of the same names)."""

    top_k: int = 3
    batch_size: int = 16
    model_name: str | None = None
    low_confidence: float = 0.5
    background_threshold: float = 0.5
    progress: bool = True
    warnings: tuple[str, ...] = ()
    text_method: str | None = None

    def __post_init__(self) -> None:
        if self.text_method is not None and self.text_method not in TEXT_METHODS:
            raise ValueError(f"text_method: expected one of {TEXT_METHODS} or None, got {self.text_method!r}")
        _check_fraction(self.low_confidence, "low_confidence")
        _check_fraction(self.background_threshold, "background_threshold")
        for value, name in ((self.top_k, "top_k"), (self.batch_size, "batch_size")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        object.__setattr__(self, "warnings", tuple(str(message) for message in self.warnings))


@dataclass
class _AuditRun:
    """What the steps of one audit share: the model, the methods, the options and where records go."""

    sim: CLIPSimilarity
    prompts: list[str]
    preprocess: Callable[[Any], Tensor]
    runners: dict[str, Method]
    mask_provider: Any
    options: AuditOptions  # top_k at most the number of prompts
    out: Path
    digest: str = field(init=False)  # of the settings that shape a record (_settings)

    def __post_init__(self) -> None:
        self.digest = rec.settings_digest(_settings(self))


def audit(
    images: PathLike | Sequence[PathLike],
    prompts: Sequence[str],
    *,
    sim: CLIPSimilarity,
    preprocess: Callable[[Any], Tensor],
    out_dir: PathLike,
    methods: Sequence[str] | Mapping[str, Method] | None = None,
    mask_provider: Any = None,
    top_k: int = 3,
    batch_size: int = 16,
    model_name: str | None = None,
    low_confidence: float = 0.5,
    background_threshold: float = 0.5,
    progress: bool = True,
    warnings: Sequence[str] = (),
    text_method: str | None = None,
) -> AuditSummary:
    """Audit a set of images and write a self-contained static HTML report.

    What the page shows, when an image is flagged and how reruns reuse earlier
    work is described in the module docstring.

    Args:
        images: folders, glob patterns or image files (see
            :func:`~captum_iclip.audit.records.find_images`).
        prompts: the K prompt texts, as ``sim`` scores them (the page's labels).
        sim: the forward function, holding the model and the prompt embeddings.
        preprocess: PIL RGB image -> (3, H, W) tensor in the model's input space.
        out_dir: the report folder (``index.html``, ``images/``, ``records/``); it may lie
            inside a searched folder (its files are left out).
        methods: method names of :mod:`captum_iclip.evaluation.methods` (default
            raw, surgery, iclip, mmp; iclip only if the model has an
            interpretability projection), or a mapping name ->
            ``fn(images, targets) -> (N, 1, H, W)`` for custom methods.
        mask_provider: foreground masks ``(images, grid_size) -> (N, h*w)`` (a
            DINO provider, a callable or a fixed mask tensor), used by ``mmp``
            and by the background flag; ``None`` skips that flag.
        top_k: prompts explained per image (at most K).
        batch_size: images per forward pass.
        model_name: the model's name for the page (default: its class name).
        low_confidence: top-1 probability below which an image is flagged.
        background_threshold: map mass fraction outside the foreground above
            which the top-1 map is flagged.
        progress: show a tqdm progress bar.
        warnings: lines shown at the top of the page (e.g. what a bundled model knows).
        text_method: also colour the words of each explained prompt by their relevance for the image,
            by a method of :data:`~captum_iclip.attr.text.TEXT_METHODS` (``None``: no words).

    Returns:
        :class:`AuditSummary`: ``index`` (the path of ``index.html``) and the work
        counts (images explained, reused from records, unreadable).

    Examples::

        >>> loaded = captum_iclip.load("shapes-tiny")
        >>> prompts = loaded.bundle.prompts
        >>> sim = CLIPSimilarity(loaded.model, loaded.tokenizer, prompts)
        >>> audit("photos/", prompts, sim=sim, preprocess=loaded.preprocess, mask_provider=loaded.mask_provider,
        ...       out_dir="audit").index   # doctest: +SKIP
        PosixPath('audit/index.html')
    """
    options = AuditOptions(
        top_k, batch_size, model_name, low_confidence, background_threshold, progress, warnings, text_method
    )
    run, paths = _start(images, prompts, sim, preprocess, out_dir, methods, mask_provider, options)
    out = run.out
    plan = _plan(paths, out, run.digest)
    _explain(plan, run)
    context = _context(run)
    context.skipped = _skipped(images, out)
    # Records of this run's files, and of files audited earlier into out_dir that are still there unchanged:
    # a deleted or replaced image leaves no stale row.
    shown = [r for r in rec.load_records(out, run.digest) if r["key"] in plan.contents or rec.source_unchanged(r)]
    index = atomic_write_text(out / "index.html", render_report(shown + plan.unreadable, context))
    return _summary(index, plan, context)


def _start(
    images: Any,
    prompts: Sequence[str],
    sim: CLIPSimilarity,
    preprocess: Callable[[Any], Tensor],
    out_dir: PathLike,
    methods: Any,
    mask_provider: Any,
    options: AuditOptions,
) -> tuple[_AuditRun, list[Path]]:
    """Check the arguments of :func:`audit` before any work, and the run they describe with its image files."""
    prompts = _check_prompts(prompts, sim)
    if not callable(preprocess):
        raise TypeError(f"preprocess: expected a callable PIL image -> tensor, got {type(preprocess).__name__}")
    out = check_output_folder(out_dir, "out_dir")
    paths = _find_images(images, out)
    mask_provider = None if mask_provider is None else _as_mask_provider(mask_provider)
    runners = _build_runners(methods, sim, mask_provider)
    if options.text_method is not None:
        sim.adapter.text_tower()  # a model whose text tower the text side does not read fails before any work
    options = dataclasses.replace(options, top_k=min(options.top_k, len(prompts)))
    return _AuditRun(sim, prompts, preprocess, runners, mask_provider, options, out), paths


def _skipped(images: Any, out: Path) -> list[str]:
    """The files of the searched folders that are not images (listed on the page), outside ``out``."""
    resolved_out = out.resolve()
    return [str(p) for p in rec.skipped_files(images) if not rec.is_inside(p, resolved_out)]


def _summary(index: Path, plan: _Plan, context: ReportContext) -> AuditSummary:
    summary = AuditSummary(index, plan.computed, plan.reused, plan.failed + len(plan.unreadable), len(context.skipped))
    logger.info(
        "audit: %d explained, %d reused, %d unreadable, %d skipped -> %s", *dataclasses.astuple(summary)[1:], index
    )
    return summary


def _context(run: _AuditRun) -> ReportContext:
    """What the page says about the run besides the records (the skipped files are added by the caller)."""
    options = run.options
    return ReportContext(
        prompts=run.prompts,
        methods=list(run.runners),
        top_k=options.top_k,
        model_name=options.model_name or type(run.sim.model).__name__,
        has_masks=run.mask_provider is not None,
        low_confidence=options.low_confidence,
        background_threshold=options.background_threshold,
        settings=run.digest,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        versions=library_versions(),
        foreign_records=rec.count_foreign_records(run.out, run.digest),
        warnings=list(options.warnings),
        text_method=options.text_method,
    )


def _explain(plan: _Plan, run: _AuditRun) -> None:
    """Explain the pending files batch by batch, writing one record per file."""
    batch_size = run.options.batch_size
    bar = tqdm(total=len(plan.pending), desc="audit", unit="image", disable=not run.options.progress)
    for start in range(0, len(plan.pending), batch_size):
        chunk = plan.pending[start : start + batch_size]
        decoded = _decode(chunk, run.preprocess, run.out, run.digest, plan)
        if decoded:
            for record in _audit_batch(decoded, run):
                rec.write_record(run.out, {**record, "content": plan.contents[record["key"]]})
            plan.computed += len(decoded)
        bar.update(len(chunk))
    bar.close()


def _settings(run: _AuditRun) -> dict[str, Any]:
    """Everything that shapes a record: records made under other settings are not reused."""
    mask_provider = run.mask_provider
    settings = {
        "schema": rec.RECORD_SCHEMA,
        "model": rec.fingerprint_module(run.sim),  # weights and prompt embeddings
        "prompts": run.prompts,
        "methods": {name: _describe(method) for name, method in run.runners.items()},
        "top_k": run.options.top_k,
        "mask_provider": mask_provider.cache_fingerprint() if mask_provider is not None else None,
        "preprocess": _describe(run.preprocess),
    }
    if run.options.text_method is not None:  # only then: the records of an audit without words keep their digest
        settings["text_method"] = run.options.text_method
    return settings


@dataclass
class _Plan:
    """What a run has to do, and its counts so far."""

    pending: list[tuple[str, Path, str]]  # (record key, file, content digest) to explain
    unreadable: list[dict[str, Any]]  # never stored: the file may be readable next time
    contents: dict[str, str]  # key -> content digest of this run's files
    reused: int = 0
    failed: int = 0
    computed: int = 0


def _plan(paths: Sequence[Path], out: Path, digest: str) -> _Plan:
    """The files without a record under these settings; byte-identical copies are audited once."""
    plan = _Plan([], [], {})
    queued = set()
    for path in paths:
        try:
            content = rec.hash_file(path)
        except OSError as error:
            plan.unreadable.append(
                _error_record(path, None, digest, f"cannot read the file: {error.strerror or error}")
            )
            continue
        key = rec.image_key(path, content, digest)
        plan.contents[key] = content
        if key in queued:  # a byte-identical copy of a file already queued: audited once
            plan.reused += 1
            continue
        record = rec.load_record(out, key)
        if record is None:
            plan.pending.append((key, path, content))
            queued.add(key)
        else:
            plan.reused += 1
            plan.failed += record["status"] != "ok"
    return plan


def _decode(
    chunk: Sequence[tuple[str, Path, str]], preprocess: Callable, out: Path, digest: str, plan: _Plan
) -> list[tuple[str, Path, Tensor]]:
    """The model inputs of a chunk of files; a file that fails gets an error record."""
    decoded: list[tuple[str, Path, Tensor]] = []
    for key, path, content in chunk:
        try:
            decoded.append((key, path, preprocess(read_image(path, "images"))))
        except Exception as error:  # any decoding/preprocessing failure belongs to the file: report it
            record = _error_record(path, key, digest, f"{type(error).__name__}: {error}")
            rec.write_record(out, {**record, "content": content})
            plan.failed += 1
    return decoded


def _as_mask_provider(mask_provider: Any) -> Any:
    from captum_iclip.masks import as_mask_provider

    return as_mask_provider(mask_provider)


def _find_images(images: Any, out: Path) -> list[Path]:
    """The images to audit; the report's own images are never audited (an out_dir inside a searched
    folder would grow each run)."""
    resolved_out = out.resolve()
    paths = [path for path in rec.find_images(images) if not rec.is_inside(path, resolved_out)]
    if not paths:
        raise ValueError(
            f"images: expected image files ({', '.join(rec.IMAGE_SUFFIXES)}) outside out_dir, got none in {images!r}"
        )
    return paths


def _check_prompts(prompts: Sequence[str], sim: CLIPSimilarity) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts: expected a list of strings, got {prompts!r}")
    prompts = list(prompts)
    if len(prompts) != sim.num_prompts:
        raise ValueError(f"prompts: expected the {sim.num_prompts} prompts sim scores, got {len(prompts)} texts")
    if sim.prompts is not None and sim.prompts != prompts:
        raise ValueError(
            f"prompts: expected sim.prompts {sim.prompts!r} (build sim with these prompts or call "
            f"sim.set_prompts), got {prompts!r}"
        )
    return prompts


def _check_fraction(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")


def _build_runners(methods: Any, sim: CLIPSimilarity, mask_provider: Any) -> dict[str, Method]:
    """Method name -> fn(images, targets); the default drops iclip for models without its head."""
    if isinstance(methods, Mapping):
        if not methods or not all(callable(fn) for fn in methods.values()):
            raise TypeError(f"methods: expected a non-empty mapping name -> fn(images, targets), got {methods!r}")
        return {str(name): fn for name, fn in methods.items()}
    usable = available_methods(sim, mask_provider=mask_provider)
    if methods is None:
        names = [name for name in DEFAULT_METHODS if usable[name]]
    else:
        if isinstance(methods, str):
            raise TypeError("methods: expected a list of method names, got a single string")
        names = list(dict.fromkeys(methods))
        if not names:
            raise ValueError(f"methods: expected at least one of {method_names()}, got none")
        unknown = [name for name in names if name not in method_names()]
        if unknown:
            raise ValueError(f"methods: expected names from {method_names()}, got the unknown {unknown}")
        unusable = [name for name in names if not usable[name]]
        if unusable:
            raise ValueError(
                "methods: expected methods that apply to this model, got "
                + "; ".join(f"{name!r} (it needs {requirement(name)})" for name in unusable)
            )
    return {name: build_method(name, sim, mask_provider=mask_provider) for name in names}


def _describe(obj: Any) -> str:
    """A text for the settings digest that is stable across runs: the ``repr`` without memory addresses
    (a ``transforms.Compose`` lists its steps), prefixed by the qualified name (closures, lambdas)."""
    name = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"
    return f"{name}: {_ADDRESS.sub('', repr(obj))}"


def _error_record(path: Path, key: str | None, settings: str, error: str) -> dict[str, Any]:
    return {
        "schema": rec.RECORD_SCHEMA,
        "key": key,
        "settings": settings,
        "source": str(path),
        "name": path.name,
        "status": "error",
        "error": error,
    }


def probabilities(sim: CLIPSimilarity, images: Tensor) -> Tensor:
    """The model's own probabilities (N, K), whatever ``sim.output`` is: a softmax over the
    prompts for CLIP, a sigmoid per prompt for SigLIP (see :class:`CLIPSimilarity`)."""
    return sim.probabilities(sim(images)).float()


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _audit_batch(decoded: Sequence[tuple[str, Path, Tensor]], run: _AuditRun) -> list[dict[str, Any]]:
    """Explain one batch: write its thumbnails and overlays, return its records."""
    from captum_iclip.viz import denormalize, overlay

    sim, mask_provider, top_k, out = run.sim, run.mask_provider, run.options.top_k, run.out
    began = time.perf_counter()
    adapter = sim.adapter
    param = adapter.parameter
    images = torch.stack([tensor for _, _, tensor in decoded]).to(param.device, param.dtype)
    grid = sim.check_inputs(images)
    with torch.no_grad():
        probs = probabilities(sim, images).cpu()
        foreground = None
        if mask_provider is not None:
            foreground = mask_provider(images, grid).reshape(len(decoded), *grid).cpu()
    top = probs.topk(top_k, dim=1)
    originals = denormalize(images.detach().float().cpu(), adapter.image_mean, adapter.image_std)
    height, width = originals.shape[-2:]

    records = []
    for i, (key, path, _) in enumerate(decoded):
        thumbnail = f"{rec.IMAGES_DIR}/{key}.png"
        atomic_write_bytes(out / thumbnail, _png(originals[i].permute(1, 2, 0).numpy()))
        records.append(
            {
                "schema": rec.RECORD_SCHEMA,
                "key": key,
                "settings": run.digest,
                "source": str(path),
                "name": path.name,
                "status": "ok",
                "thumbnail": thumbnail,
                "width": int(width),
                "height": int(height),
                "probabilities": [round(p, 6) for p in probs[i].tolist()],
                "top": [
                    {"prompt": int(top.indices[i, r]), "probability": round(float(top.values[i, r]), 6), "maps": {}}
                    for r in range(top_k)
                ],
            }
        )
    for rank in range(top_k):
        targets = top.indices[:, rank].to(param.device)
        for name, method in run.runners.items():
            maps = method(images, targets).detach().float().cpu()
            outside = rec.background_fraction(maps, foreground) if foreground is not None else None
            for i, record in enumerate(records):
                file_name = f"{rec.IMAGES_DIR}/{record['key']}-{rank + 1}-{rec.slug(name)}.png"
                atomic_write_bytes(out / file_name, _png(overlay(originals[i], maps[i])))
                fraction = None if outside is None or torch.isnan(outside[i]) else round(float(outside[i]), 6)
                record["top"][rank]["maps"][name] = {"overlay": file_name, "background_fraction": fraction}
    if run.options.text_method is not None:
        for i, record in enumerate(records):
            texts = [run.prompts[entry["prompt"]] for entry in record["top"]]
            explained = explain_text(sim, images[i : i + 1], run.options.text_method, texts)
            for entry, words in zip(record["top"], explained):
                entry["words"] = {
                    "tokens": list(words.tokens),
                    "relevance": [round(value, 6) for value in words.relevance.tolist()],
                }
    seconds = (time.perf_counter() - began) / len(records)
    for record in records:
        record["seconds"] = round(seconds, 4)
    return records


def library_versions() -> dict[str, str]:
    """Versions of this package and of the libraries that shape its results."""
    import platform
    from importlib import metadata

    import captum_iclip

    versions = {"captum-iclip": captum_iclip.__version__, "python": platform.python_version()}
    for dist in ("torch", "captum", "open_clip_torch", "timm", "transformers", "numpy", "Pillow"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions
