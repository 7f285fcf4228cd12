"""One command for a lent GPU: half-precision agreement, speed, memory and throughput of every method.

Prepared so that a session with a few minutes of GPU time runs it unattended (default budget
7.5 minutes). In order of priority, each part checked against the ``--budget`` before it starts:

1. agreement: every registry method on fp16 and bf16 copies of the model, and under
   ``torch.autocast``, against float32 maps of the same weights (max |diff| of min-max
   normalised maps, smallest Spearman rank correlation; ``captum_iclip.evaluation.map_agreement``),
   on ViT-B-16 (as a DualProjectionCLIP, so that every method applies) and ViT-B-16-SigLIP
   (random weights, seeded; random unit text embeddings where the tokenizer is not offline);
2. speed and memory at ``--batch`` images, ``--resolutions`` and ``--prompts`` (``--dtype``):
   images/s and ratio to ``encode_image`` of every method (median of ``--repeats`` rounds after a
   warm-up, CUDA synchronised; :mod:`timing`), peak ``torch.cuda.max_memory_allocated`` above the
   model of each; every prompt's maps (``target=None``) up to ``--every-prompt-max`` prompts, one
   prompt per image beyond; ``ig``, ``occlusion`` and ``m2ib`` at the first resolution only; ``proxyclip``
   with a random timm DINO ViT-S/16 as its proxy (:data:`PROXY`);
3. host-device copies: CUDA memcpy events of one call of each method at batch 1 and at batch 4
   (``torch.profiler``); a count that grows with the batch is a copy inside a per-image loop;
4. eval throughput: ``captum-iclip eval --dataset world`` (the bundled model, ``raw``) on
   ``--eval-images`` scenes with ``--workers`` DataLoader workers, images/s;
5. the same run's CPU ratios: the timing of part 2 on the CPU at ``--cpu-batch`` images, the first
   resolution and prompt count;
6. speed and memory at the other resolutions.

A failing measurement (out of memory, a method a tower lacks) is recorded with its error and the
run goes on; what the device lacks (bf16, CUDA) is skipped with the reason. After every part the
results are written atomically to ``<out>/<device>-<date>.json`` and a Markdown table to ``.md``.

Usage::

    python benchmarks/device.py                    # on a CUDA machine: <= 8 minutes
    python benchmarks/device.py --device cuda:1 --budget 300
    python benchmarks/device.py --quick --out /tmp/results   # seconds on a CPU: tiny towers (the suite runs it)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import io
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# The GPU machines reach no network: a Hugging Face request would only wait for its timeout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from timing import time_rounds  # noqa: E402

from captum_iclip import CLIPSimilarity, DualProjectionCLIP  # noqa: E402
from captum_iclip._io import atomic_write_text, json_text  # noqa: E402
from captum_iclip.devices import check_device  # noqa: E402
from captum_iclip.evaluation import map_agreement  # noqa: E402
from captum_iclip.evaluation.methods import build_method, method_info, method_names  # noqa: E402

LONG = ("ig", "occlusion", "m2ib")  # timed at the first resolution only
PROXY = "vit_small_patch16_224.dino"  # ProxyCLIP's proxy: a timm DINO ViT-S/16, random weights (seeded)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(item) for item in text.split(",") if item.strip()]

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--quick", action="store_true", help="tiny towers and grid, seconds on a CPU")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (parts left: skipped)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder of the results")
    parser.add_argument("--batch", type=int, default=32, help="images per batch of the timing")
    parser.add_argument("--resolutions", type=ints, default=[224, 448])
    parser.add_argument("--prompts", type=ints, default=[1, 20, 1000])
    parser.add_argument("--every-prompt-max", type=int, default=20, help="most prompts timed with target=None")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="timing dtype (default fp16 on CUDA)")
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--cpu-batch", type=int, default=2, help="images per batch of the CPU ratios")
    parser.add_argument("--eval-images", type=int, default=256, help="world scenes of the eval throughput")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="eval DataLoader workers")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's; --quick: 1)")
    parser.add_argument("--methods", help=f"comma-separated registry names (default all): {', '.join(method_names())}")
    if parser.parse_args(argv).quick:  # --quick's defaults; options given with it still apply
        parser.set_defaults(batch=2, resolutions=[32, 64], prompts=[1, 50], repeats=2, threads=1, every_prompt_max=3)
        parser.set_defaults(ig_steps=4, cpu_batch=2, eval_images=4, workers=0)
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",") if args.methods else list(method_names())
    for name in args.methods:
        method_info(name)  # a ValueError naming the registered methods
    return args


# --------------------------------------------------------------------------- towers
def small_vit(image_size: int = 64) -> torch.nn.Module:
    """The --quick tower: a 2-block open_clip ViT, width 64, 16-px patches (open_clip's random init)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=16, image_size=image_size)
    text = CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)
    return CLIP(embed_dim=128, vision_cfg=vision, text_cfg=text)


def build_tower(name: str, device: torch.device) -> tuple[torch.nn.Module, object]:
    """A seeded random-weight model (a DualProjectionCLIP, so that every method applies) and its tokenizer."""
    torch.manual_seed(0)
    if name == "small-vit":
        import open_clip

        model, tokenizer = small_vit(), open_clip.get_tokenizer("ViT-B-16", context_length=16)
    else:
        from bench_itsm import build_model

        model, tokenizer = build_model(name)
    model = model.eval().requires_grad_(False)
    return DualProjectionCLIP(model).to(device).eval(), tokenizer


def similarity(model: torch.nn.Module, tokenizer, count: int, seed: int = 0) -> CLIPSimilarity:
    """``count`` prompts: real ones through the tokenizer when there is one, else seeded random unit embeddings."""
    if tokenizer is not None and count <= 50:
        return CLIPSimilarity(model, tokenizer, [f"a photo of thing number {i}" for i in range(count)])
    dim = model.adapter.embed_dim
    generator = torch.Generator().manual_seed(seed)
    return CLIPSimilarity(model, text_features=torch.randn(count, dim, generator=generator))


def proxy_for(sim: CLIPSimilarity):
    """ProxyCLIP's proxy for ``sim``'s model: :data:`PROXY` in float32 on its device, seeded."""
    import timm

    from captum_iclip.masks import DINOMaskProvider

    torch.manual_seed(0)
    dino = timm.create_model(PROXY, pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    adapter = sim.adapter
    provider = DINOMaskProvider(dino, input_mean=adapter.image_mean, input_std=adapter.image_std)
    return provider.to(adapter.parameter.device)


def images_for(model: torch.nn.Module, batch: int, size: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    device = model.adapter.parameter.device
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator).to(device, dtype)


# --------------------------------------------------------------------------- bookkeeping
class Run:
    """The results, the budget, and an atomic write after every part."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device, self.began = args, device, time.perf_counter()
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
        self.device_name = name
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cpu"
        stamp = datetime.date.today().isoformat()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        self.json_path, self.md_path = out / f"{slug}-{stamp}.json", out / f"{slug}-{stamp}.md"
        self.results: dict = {
            "command": " ".join(["python", "benchmarks/device.py", *sys.argv[1:]]),
            "date": stamp,
            "device": str(device),
            "device_name": name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cpu_count": os.cpu_count(),
            "quick": args.quick,
            "budget_s": args.budget,
            "agreement": [],
            "timing": [],
            "copies": [],
            "eval": [],
            "cpu_ratios": [],
            "parts": {},
            "skipped": [],
            "errors": [],
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.began

    def has_time(self, what: str) -> bool:
        if self.elapsed() < self.args.budget:
            return True
        self.skip(what, f"time budget of {self.args.budget:.0f} s spent")
        return False

    def skip(self, what: str, reason: str) -> None:
        self.results["skipped"].append({"what": what, "reason": reason})
        log(f"skipped {what}: {reason}")

    def attempt(self, what: str, call: Callable[[], object]) -> object:
        """``call()``, or ``None`` with the error recorded (and CUDA's cache freed after running out of memory)."""
        try:
            return call()
        except Exception as error:  # one failure is recorded, the rest go on
            self.results["errors"].append({"what": what, "error": f"{type(error).__name__}: {error}"[:500]})
            log(f"error in {what}: {type(error).__name__}: {str(error)[:200]}")
            if os.environ.get("DEVICE_BENCH_DEBUG"):
                traceback.print_exc()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    def part(self, what: str, call: Callable[[], object]) -> None:
        """One part of the run: skipped when the budget is spent, its error recorded, its seconds kept, written."""
        if self.has_time(what):
            began = time.perf_counter()
            self.attempt(what, call)
            self.results["parts"][what] = round(time.perf_counter() - began, 1)
            self.write()

    def write(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        atomic_write_text(self.json_path, json_text(self.results, indent=1) + "\n")
        atomic_write_text(self.md_path, markdown(self.results))


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- 1. agreement
def half_dtypes(device: torch.device) -> dict[str, str | None]:
    """The half dtypes this device runs, with the reason of the others."""
    bf16 = device.type == "cpu" or torch.cuda.is_bf16_supported()
    return {"fp16": None, "bf16": None if bf16 else "this GPU has no bfloat16"}


def agreement(run: Run, tower: str) -> None:
    device, args = run.device, run.args
    model, tokenizer = build_tower(tower, device)
    size = model.adapter.image_size[0]
    sim32 = similarity(model, tokenizer, 3)
    images = images_for(model, 2, size, torch.float32, seed=1)
    target = torch.tensor([0, 2], device=device)
    proxy = proxy_for(sim32)
    names = [n for n in args.methods if method_info(n).applies_to(sim32, proxy)]
    for name in set(args.methods) - set(names):
        run.skip(f"agreement {tower} {name}", f"it needs {method_info(name).requirement}")
    variants: dict[str, Callable] = {}
    autocast_dtype = torch.bfloat16 if half_dtypes(device)["bf16"] is None else torch.float16
    for label, reason in half_dtypes(device).items():
        if reason is not None:
            run.skip(f"agreement {tower} {label}", reason)
            continue
        dtype = DTYPES[label]
        half = CLIPSimilarity(copy.deepcopy(model).to(dtype), text_features=sim32.text_features)
        variants[label] = lambda name, half=half, dtype=dtype: build_method(
            name, half, ig_steps=args.ig_steps, proxy=proxy
        )(images.to(dtype), target)

    def autocast(name: str) -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast_dtype):
            return build_method(name, sim32, ig_steps=args.ig_steps, proxy=proxy)(images, target)

    variants[f"autocast-{'bf16' if autocast_dtype == torch.bfloat16 else 'fp16'}"] = autocast
    for name in names:
        if not run.has_time(f"agreement {tower} {name}"):
            return
        reference = run.attempt(
            f"agreement {tower} {name} fp32",
            lambda name=name: build_method(name, sim32, ig_steps=args.ig_steps, proxy=proxy)(images, target),
        )
        if reference is None:
            continue
        for label, call in variants.items():
            began = time.perf_counter()
            maps = run.attempt(f"agreement {tower} {name} {label}", functools.partial(call, name))
            if maps is None:
                continue
            diff, rho = map_agreement(reference, maps)
            row = {"tower": tower, "method": name, "dtype": label, "max_abs_diff": diff, "rank_correlation": rho}
            row["seconds"] = round(time.perf_counter() - began, 3)
            run.results["agreement"].append(row)
            log(f"agreement {tower:>18} {name:>10} {label:>13}: max|diff| {diff:.4f}, rank {rho:.4f}")


# --------------------------------------------------------------------------- 2. timing and memory
def timing_cell(run: Run, model, tokenizer, size: int, count: int, dtype_label: str, batch: int, key: str) -> None:
    """Every method's images/s, ratio to encode_image and peak memory for one (resolution, prompts) cell."""
    args, device = run.args, model.adapter.parameter.device
    sim = similarity(model, tokenizer, count)
    images = images_for(model, batch, size, model.adapter.parameter.dtype)
    every = count <= args.every_prompt_max
    one_prompt = torch.zeros(batch, dtype=torch.long, device=device)
    calls: dict[str, Callable[[], object]] = {"encode_image": functools.partial(model.adapter.encode_image, images)}
    first = size == args.resolutions[0]
    proxy = proxy_for(sim)
    options = {"ig_steps": args.ig_steps, "ig_batch": batch, "proxy": proxy}
    for name in args.methods:
        info = method_info(name)
        if not info.applies_to(sim, proxy) or (name in LONG and (not first or key == "cpu")):
            continue
        target = None if every and info.every_prompt else one_prompt
        what = f"{key} {dtype_label} {size}px {count} prompts {name}"
        method = run.attempt(what, lambda name=name: build_method(name, sim, **options))
        if method is not None:
            calls[name] = functools.partial(method, images, target)
    every_prompt = {name for name in calls if name != "encode_image" and method_info(name).every_prompt}
    peaks: dict[str, float | None] = {}
    survivors: dict[str, Callable[[], object]] = {}
    for name, call in calls.items():  # the warm-up call, which also measures the peak memory
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        if run.attempt(f"{key} {dtype_label} {size}px {count} prompts {name}", call) is None:
            continue  # recorded; the other methods go on
        peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
        survivors[name] = call
    with torch.no_grad():

        def rounds():
            return time_rounds(survivors, args.repeats, device, progress=False, warm_up=False)

        times = run.attempt(f"{key} {size}px {count} prompts rounds", rounds)
    if not times or "encode_image" not in times:
        return
    unit = times["encode_image"][0]
    for name, (wall, cpu) in times.items():
        row = {
            "where": key,
            "dtype": dtype_label,
            "resolution": size,
            "batch": batch,
            "prompts": count,
            "targets": "" if name == "encode_image" else "every prompt" if every and name in every_prompt else "one",
            "method": name,
            "seconds": wall,
            "cpu_seconds": cpu,
            "images_per_s": batch / wall,
            "x_encode": wall / unit,
            "peak_mib": peaks.get(name),
        }
        run.results["cpu_ratios" if key == "cpu" else "timing"].append(row)
    log(
        f"{key} {dtype_label} {size}px {count} prompts: "
        + ", ".join(f"{n} {t[0] / unit:.2f}x" for n, t in times.items() if n != "encode_image")
    )


def timing(run: Run, resolutions: list[int], key: str = "timing") -> None:
    args, device = run.args, run.device if key != "cpu" else torch.device("cpu")
    label = "fp32" if device.type == "cpu" else (args.dtype or "fp16")
    tower = "small-vit" if args.quick else "ViT-B-16"
    model, tokenizer = build_tower(tower, device)
    model = model.to(DTYPES[label])
    batch = args.cpu_batch if key == "cpu" else args.batch
    counts = (args.prompts[1:2] or args.prompts) if key == "cpu" else args.prompts
    for size in resolutions:
        for count in counts:
            if run.has_time(f"{key} {label} {size}px {count} prompts"):
                timing_cell(run, model, tokenizer, size, count, label, batch, key)
                run.write()


# --------------------------------------------------------------------------- 3. host-device copies
def copies(run: Run) -> None:
    """CUDA memcpy events of one call of each method at batch 1 and 4 (growing with the batch: a per-image copy)."""
    from torch.profiler import ProfilerActivity, profile

    device, args = run.device, run.args
    model, tokenizer = build_tower("small-vit" if args.quick else "ViT-B-16", device)
    model = model.to(DTYPES[args.dtype or "fp16"])
    sim, size = similarity(model, tokenizer, 20), args.resolutions[0]
    proxy = proxy_for(sim)
    for name in args.methods:
        if name in LONG or not method_info(name).applies_to(sim, proxy) or not run.has_time(f"copies {name}"):
            continue
        method = build_method(name, sim, proxy=proxy)
        counts = {}
        for batch in (1, 4):
            images = images_for(model, batch, size, model.adapter.parameter.dtype)
            target = None if method_info(name).every_prompt else torch.zeros(batch, dtype=torch.long, device=device)
            method(images, target)  # warm-up outside the profile

            def profiled(method=method, images=images, target=target):
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    method(images, target)
                    torch.cuda.synchronize(device)
                return sum(1 for event in prof.events() if "memcpy" in event.name.lower())

            counts[batch] = run.attempt(f"copies {name} batch {batch}", profiled)
        if None not in counts.values():
            per_image = counts[4] > counts[1]
            run.results["copies"].append(
                {"method": name, "batch_1": counts[1], "batch_4": counts[4], "per_image_copy": per_image}
            )
            log(f"copies {name}: {counts[1]} at batch 1, {counts[4]} at batch 4")


# --------------------------------------------------------------------------- 4. eval throughput
def eval_throughput(run: Run) -> None:
    from captum_iclip.cli.eval import main as eval_main

    args = run.args
    with tempfile.TemporaryDirectory() as out:
        argv = ["--dataset", "world", "--root", "heldout", "--limit", str(args.eval_images), "--method", "raw"]
        argv += ["--batch-size", str(args.batch), "--workers", str(args.workers), "--device", str(run.device)]
        argv += ["--out", out, "--no-progress", "--examples", "0"]
        with contextlib.redirect_stdout(io.StringIO()):
            status = eval_main(argv)
        if status != 0:
            raise RuntimeError(f"captum-iclip eval exited with {status}")
        results = json.loads((Path(out) / "results.json").read_text())
    seconds = results["wall_seconds"]
    row = {"command": "captum-iclip eval " + " ".join("<tmp>" if a == out else a for a in argv)}
    row.update({"images": args.eval_images, "workers": args.workers, "seconds": seconds})
    row["images_per_s"] = args.eval_images / seconds
    run.results["eval"].append(row)
    log(f"eval: {row['images_per_s']:.1f} images/s with {args.workers} workers")


# --------------------------------------------------------------------------- report
def markdown(results: dict) -> str:
    lines = [
        f"# Device figures: {results['device_name']} ({results['device']}), {results['date']}",
        "",
        f"`{results['command']}`; torch {results['torch']}, CUDA {results['cuda']}, {results['cpu_count']} CPUs; "
        f"{results.get('elapsed_s', 0)} s of a {results['budget_s']:.0f} s budget.",
        "",
    ]
    if results["agreement"]:
        labels = sorted({row["dtype"] for row in results["agreement"]})
        lines += ["## Agreement with float32 (max |diff| of normalised maps / rank correlation)", ""]
        lines += ["| tower | method | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
        cells: dict[tuple[str, str], dict[str, str]] = {}
        for row in results["agreement"]:
            cell = f"{row['max_abs_diff']:.4f} / {row['rank_correlation']:.4f}"
            cells.setdefault((row["tower"], row["method"]), {})[row["dtype"]] = cell
        for (tower, method), by in cells.items():
            lines.append(f"| {tower} | {method} | " + " | ".join(by.get(label, "") for label in labels) + " |")
        lines.append("")
    for key, title in (("timing", "Speed and memory"), ("cpu_ratios", "CPU ratios (same run)")):
        if results[key]:
            lines += [f"## {title}", ""]
            lines += ["| dtype | res | batch | prompts | method | targets | images/s | x encode_image | peak MiB |"]
            lines += ["|---|---:|---:|---:|---|---|---:|---:|---:|"]
            for r in results[key]:
                peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
                lines.append(
                    f"| {r['dtype']} | {r['resolution']} | {r['batch']} | {r['prompts']} | {r['method']} | "
                    f"{r['targets']} | {r['images_per_s']:.1f} | {r['x_encode']:.2f} | {peak} |"
                )
            lines.append("")
    if results["copies"]:
        lines += ["## Host-device copies per call (CUDA memcpy events)", ""]
        lines += ["| method | batch 1 | batch 4 | per-image copy |", "|---|---:|---:|---|"]
        for r in results["copies"]:
            lines.append(
                f"| {r['method']} | {r['batch_1']} | {r['batch_4']} | {'yes' if r['per_image_copy'] else 'no'} |"
            )
        lines.append("")
    for r in results["eval"]:
        lines += ["## Eval throughput", "", f"`{r['command']}`: {r['images_per_s']:.1f} images/s", ""]
    for key in ("skipped", "errors"):
        if results[key]:
            lines += [f"## {key.capitalize()}", ""]
            lines += [f"- {r['what']}: {r.get('reason') or r.get('error')}" for r in results[key]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = check_device(args.device, "--device")
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random weights
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run(args, device)
    log(f"device benchmark on {run.device_name} ({device}), budget {args.budget:.0f} s -> {run.json_path}")
    towers = ["small-vit"] if args.quick else ["ViT-B-16", "ViT-B-16-SigLIP"]
    if args.quick:
        run.skip("agreement ViT-B-16, ViT-B-16-SigLIP", "--quick: a 2-block ViT only")
    for tower in towers:
        run.part(f"agreement {tower}", functools.partial(agreement, run, tower))
    run.part("timing", functools.partial(timing, run, args.resolutions[:1]))
    if device.type == "cuda":
        run.part("copies", functools.partial(copies, run))
    else:
        run.skip("host-device copies", "needs a CUDA device (the CUDA profiler counts the copies)")
    run.part("eval", functools.partial(eval_throughput, run))
    if device.type == "cpu":
        run.skip("CPU ratios", "the device is the CPU: the timing above is the CPU's")
    else:
        run.part("CPU ratios", functools.partial(timing, run, args.resolutions[:1], "cpu"))
    if len(args.resolutions) > 1:
        run.part("timing, other resolutions", functools.partial(timing, run, args.resolutions[1:]))
    run.write()
    print(markdown(run.results))
    log(f"wrote {run.json_path} and {run.md_path} in {run.elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
