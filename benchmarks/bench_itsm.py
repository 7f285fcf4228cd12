"""Wall time of the registry's explanation methods next to the image encoder.

Model: ``--model``, random weights (the cost does not depend on the weights), inputs
at the model's own resolution: an open_clip name (default ``ViT-B-16``; also the timm
towers ``ViT-B-16-SigLIP``, ``ViT-B-16-SigLIP2``, ``EVA02-B-16``, ``convnext_base``, ...)
or ``hf-siglip`` / ``hf-siglip2`` (Hugging Face ``SiglipModel`` / ``Siglip2Model`` with
the default configurations of google/siglip-base-patch16-224 / google/siglip2-base-patch16-naflex).
Prompts are embedded with the model's tokenizer when it is available offline, else replaced
by random unit text embeddings (same cost for the image side).

Methods: ``--methods``, names of the method registry
(:mod:`captum_iclip.evaluation.methods`), each built by ``build_method`` exactly as
``demo``, ``eval`` and ``audit`` build it and explaining the same ``CLIPSimilarity``;
by default every registered method that applies to the model except ``occlusion``
(one forward pass per patch). A named method that does not apply to the model is
left out with the registry's reason. Each runs on the whole batch:

* ``encode_image``: the model's own image embedding, the unit of the ratios;
* ``proxy forward``: the forward pass of ProxyCLIP's proxy, ``--proxy`` (a timm DINO with random weights,
  default ``vit_small_patch16_224.dino``; ``none`` leaves ``proxyclip`` out) on the batch in its own
  normalisation; ``proxyclip`` is timed against ``encode_image`` plus it, the two forward passes it needs;
* methods that take every prompt at once (the registry's ``every_prompt``: the ITSM
  methods ``raw``, ``surgery``, ``maskclip``, ``clearclip``, ``sclip``, ``naclip``, and
  ``mmp``, ``gem``, ``legrad``, ``chefer``, ``proxyclip``, ``gradeclip``): maps for *every* prompt (``target=None``)
  with their default post-processing (the prompt embeddings are computed once,
  outside ``attribute``);
* the others (``gradcam``, ``ig``, ``occlusion``, ``m2ib``): one prompt per image (``target=0``);
  ``ig`` with ``--ig-steps`` steps in chunks of ``--ig-batch`` images;
* ``gem-torch`` and ``legrad-torch`` (with ``--reference-python``, an environment with the
  authors' packages, which need open_clip <= 2.23; see ``reference_parity.py``): their maps on
  the same work as ``gem`` and ``legrad`` (every image, every prompt; GEM's ``GEMWrapper`` on the
  whole batch, LeGrad's ``LeWrapper`` one image at a time, as its API takes), timed in that
  environment on the same model and random weights, before the other methods;
* ``LeGrad, every one of P prompts`` (``--legrad-prompts P``): LeGrad's maps for P random prompt
  embeddings, timed ``--ig-repeats`` times (one backward pass per prompt through the last blocks
  is its floor: docs/methods.md §7, "Cost").

``--memory`` adds a table of the memory each method adds: every method (and ``encode_image``,
``gem-torch``, ``legrad-torch``) runs once in a fresh process of its own, after the model and
the inputs are built, and the table gives its peak resident memory above what the process held
before the call (``/proc/self/status`` ``VmHWM`` after resetting it, in MiB). ``--image-size S``
builds the open_clip model at S x S (``force_image_size``; position embeddings at that grid),
e.g. ``--image-size 448 --memory``.

The prompt-count row runs ``raw`` with ``target=0`` against 1 and against
``--many-prompts`` prompts. Those text embeddings are random unit vectors: embedding
prompts is a one-time cost paid when the ``CLIPSimilarity`` is built, outside ``attribute``.
The first line after the header is the parity of the dense features' global entry with
the model's own image embedding (max |difference|, absolute and relative to the
embedding's largest entry).

Timing: each method runs once to warm up, then ``--repeats`` rounds time every
method once per round (the order rotates between rounds, so a slow spell on a
shared machine does not land on one method); the median is reported. The long
methods (``ig``, ``occlusion``, ``m2ib``) are timed ``--ig-repeats`` times (default 1), ``ig``
after a short warm-up at the same chunk size.

Usage::

    python benchmarks/bench_itsm.py --repeats 3 --batch 8 --threads 1 \
        --reference-python /tmp/refvenv/bin/python   # optional; see benchmarks/reference_parity.py
    python benchmarks/bench_itsm.py --methods gem,legrad,chefer --image-size 448 --memory --repeats 1 \
        --reference-python /tmp/refvenv/bin/python
    python benchmarks/bench_itsm.py --model ViT-B-16-SigLIP --methods raw,surgery,gradcam
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from typing import NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from reference_packages import PACKAGES as REFERENCE_PACKAGES
from reference_packages import peak_mib
from timing import Timing, medians, seconds, time_rounds
from tqdm import tqdm

import captum_iclip
from captum_iclip import CLIPSimilarity, get_adapter
from captum_iclip.evaluation.methods import build_method, method_info, method_names
from captum_iclip.loading.loader import WeightsUnavailableError

PROMPTS = [
    f"a photo of a {name}."
    for name in (
        "aeroplane",
        "bicycle",
        "bird",
        "boat",
        "bottle",
        "bus",
        "car",
        "cat",
        "chair",
        "cow",
        "dining table",
        "dog",
        "horse",
        "motorbike",
        "person",
        "potted plant",
        "sheep",
        "sofa",
        "train",
        "tv monitor",
    )
]

TARGETS = {
    "raw": 1.15,
    "surgery": 1.5,
    "gem": 1.3,
    "gradeclip": 1.5,
    "maskclip": 1.2,
    "clearclip": 1.2,
    "sclip": 1.2,
    "naclip": 1.2,
}
"""Registry methods with a target ratio to ``encode_image`` (at most)."""
LONG = ("ig", "occlusion", "m2ib")  # timed --ig-repeats times, outside the rounds
DEFAULT_LEFT_OUT = ("occlusion",)  # one forward pass per patch: only when named
LEGRAD_TORCH_TARGET = 0.5  # our LeGrad at most half the time of legrad-torch
LEGRAD_MANY_TARGET = 10.0  # LeGrad for --legrad-prompts prompts (the 1000) at most 10 x encode_image
PROXYCLIP_TARGET = 1.3  # ProxyCLIP at most 1.3 x (encode_image + the proxy's forward pass)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name, hf-siglip or hf-siglip2")
    parser.add_argument(
        "--methods",
        help=f"comma-separated registry names (default: all that apply but {', '.join(DEFAULT_LEFT_OUT)}); "
        f"registered: {', '.join(method_names())}",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per method (median reported)")
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--prompts", type=int, default=20, help="prompts of the main table (at most 20)")
    parser.add_argument("--many-prompts", type=int, default=1000, help="prompt count of the scaling row")
    parser.add_argument("--ig-steps", type=int, default=50, help="Integrated Gradients steps (0: skip it)")
    parser.add_argument("--ig-batch", type=int, default=16, help="Integrated Gradients internal_batch_size")
    parser.add_argument("--ig-repeats", type=int, default=1, help="timed Integrated Gradients runs")
    parser.add_argument(
        "--reference-python", help="python of an environment with gem-torch and legrad-torch (open_clip <= 2.23)"
    )
    parser.add_argument("--image-size", type=int, help="build the open_clip model at this input size")
    parser.add_argument("--memory", action="store_true", help="the memory each method adds, one process each")
    parser.add_argument("--legrad-prompts", type=int, default=0, help="time LeGrad for this many prompts (0: no)")
    parser.add_argument(
        "--proxy", default="vit_small_patch16_224.dino", help="timm DINO of proxyclip, random weights ('none': none)"
    )
    parser.add_argument("--reference-worker", help=argparse.SUPPRESS)  # internal: inputs to time the packages on
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)  # internal: the one method to measure
    return parser.parse_args()


def run_reference(args: argparse.Namespace, name: str, inputs: str, memory: bool = False) -> object | None:
    """``reference_packages.py``'s JSON value for package ``name`` on the saved ``inputs``, run in
    ``--reference-python``'s environment (its own open_clip, not this project's); ``None``, with the
    reason printed, when the package fails (e.g. killed for running out of memory)."""
    here = os.path.dirname(os.path.abspath(__file__))
    command = [args.reference_python, os.path.join(here, "reference_packages.py"), "--inputs", inputs]
    command += ["--name", name, "--repeats", str(args.repeats), "--threads", str(args.threads)]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([*command, *(["--memory"] if memory else [])], capture_output=True, text=True, env=env)
    if done.returncode:
        why = f"killed by signal {-done.returncode}" if done.returncode < 0 else done.stderr.strip().splitlines()[-1]
        print(f"{name} failed ({why}; SIGKILL: out of memory)" if done.returncode == -9 else f"{name} failed ({why})")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])[name]


def save_reference_inputs(folder: str, model: torch.nn.Module, images: torch.Tensor, text: torch.Tensor, size) -> str:
    """The model's weights, the images and the prompt embeddings, for the packages' environment."""
    path = os.path.join(folder, "inputs.pt")
    torch.save({"state_dict": model.state_dict(), "images": images, "text": text, "image_size": size}, path)
    return path


def build_model(name: str, image_size: int | None = None):
    """The model with random weights and its tokenizer (``None`` when it cannot be had offline); an open_clip
    model at ``image_size`` x ``image_size`` when given."""
    if image_size:
        model = open_clip.create_model(name, force_image_size=image_size).eval().requires_grad_(False)
        return model, open_clip.get_tokenizer(name)
    if name == "hf-siglip":
        from transformers import SiglipConfig, SiglipModel

        return SiglipModel(SiglipConfig()).eval().requires_grad_(False), None
    if name == "hf-siglip2":
        from transformers import Siglip2Config, Siglip2Model

        return Siglip2Model(Siglip2Config()).eval().requires_grad_(False), None
    try:
        loaded = captum_iclip.load(name, from_scratch=True)  # random weights, offline
    except WeightsUnavailableError:  # SigLIP tokenizers live on the Hugging Face hub
        return open_clip.create_model(name).eval().requires_grad_(False), None
    return loaded.model.requires_grad_(False), loaded.tokenizer


def build_proxy(args: argparse.Namespace, sim: CLIPSimilarity):
    """ProxyCLIP's proxy: a ``DINOMaskProvider`` around ``--proxy`` with random weights, or ``None``."""
    if args.proxy == "none":
        return None
    import timm

    from captum_iclip.masks import DINOMaskProvider

    dino = timm.create_model(args.proxy, pretrained=False, num_classes=0, dynamic_img_size=True)
    return DINOMaskProvider(dino.eval(), input_mean=sim.adapter.image_mean, input_std=sim.adapter.image_std)


def registry_methods(args: argparse.Namespace, sim: CLIPSimilarity, images: torch.Tensor, proxy=None):
    """The timed calls of the ``--methods`` that apply to ``sim`` (``proxyclip`` with ``proxy``), built through
    the registry: ``{name: call}`` for the rounds, ``{name: (call, warm_up)}`` for the long ones, and
    ``{name: reason}`` for those left out."""
    names = args.methods.split(",") if args.methods else [n for n in method_names() if n not in DEFAULT_LEFT_OUT]
    if not args.ig_steps and not args.methods:
        names = [name for name in names if name != "ig"]
    one_prompt = torch.zeros(images.shape[0], dtype=torch.long)
    rounds, long, skipped = {}, {}, {}
    for name in names:
        info = method_info(name)  # a ValueError naming the registered methods for a wrong name
        if not info.applies_to(sim, proxy):
            skipped[name] = f"it needs {info.requirement}"
            continue
        target = None if info.every_prompt else one_prompt
        method = build_method(name, sim, ig_steps=args.ig_steps, ig_batch=args.ig_batch, proxy=proxy)
        call = functools.partial(method, images, target)
        if name in LONG:
            warm = build_method(name, sim, ig_steps=max(1, args.ig_batch // args.batch), ig_batch=args.ig_batch)
            long[name] = (call, functools.partial(warm, images, one_prompt) if name == "ig" else None)
        else:
            rounds[name] = call
    return rounds, long, skipped


def label(name: str, args: argparse.Namespace) -> str:
    """The table row of a registry method: its title, and what it explains."""
    if name.startswith("legrad x "):
        return f"LeGrad, every one of {name.split()[-1]} prompts"
    if name not in method_names():
        return name
    info = method_info(name)
    steps = f"({args.ig_steps})" if name == "ig" else ""
    return f"{info.title}{steps}, {'every prompt' if info.every_prompt else '1 prompt'}"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random weights
    bench = setup(args)
    if args.memory_worker:  # one method's memory, in this fresh process
        call = bench.units.get(args.memory_worker) or bench.rounds.get(args.memory_worker)
        call = call or bench.long[args.memory_worker][0]
        print(json.dumps({args.memory_worker: peak_mib(call)}))
        return

    load_start = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        inputs = None
        if args.reference_python:
            inputs = save_reference_inputs(folder, bench.model, bench.images, bench.sim.text_features, args.image_size)
            for name in REFERENCE_PACKAGES:
                timing = run_reference(args, name, inputs)
                if timing is not None:
                    results[name] = tuple(timing)
        results.update(time_rounds({**bench.units, **bench.rounds}, args.repeats))
        results.update(time_rounds(bench.prompt_rows, args.repeats))
        for name, (call, warm_up) in bench.long.items():
            if warm_up is not None:
                warm_up()  # at the timed chunk size
            results[name] = medians([seconds(call) for _ in tqdm(range(args.ig_repeats), desc=name, leave=False)])
        load_end = os.getloadavg()
        memory = measure_memory(args, bench, inputs) if args.memory else {}

    print_header(args, bench, load_start, load_end)
    if "proxy forward" in results:
        print(f"proxy of proxyclip: {args.proxy} (timm, random weights)")
        results["encode_image + proxy forward"] = tuple(
            results["encode_image"][clock] + results["proxy forward"][clock] for clock in (0, 1)
        )
    packages = [name for name in REFERENCE_PACKAGES if name in results]
    rows = ["encode_image", *bench.units, *bench.rounds, *packages, *bench.long]
    report(args, results, list(dict.fromkeys(rows)))
    report_prompts(args, results, list(bench.prompt_rows))
    if memory:
        report_memory(memory)


class Bench(NamedTuple):
    """What the timings and memory workers run: the model, its similarity, the inputs and the calls."""

    model: torch.nn.Module
    tokenizer: object
    sim: CLIPSimilarity
    images: torch.Tensor
    parity: tuple[float, float]
    units: dict
    rounds: dict
    long: dict
    skipped: dict
    prompt_rows: dict


def setup(args: argparse.Namespace) -> Bench:
    """The model with random weights, its similarity for ``--prompts``, the batch and every timed call."""
    model, tokenizer = build_model(args.model, args.image_size)
    prompts = PROMPTS[: args.prompts]
    if tokenizer is not None:
        sim = CLIPSimilarity(model, tokenizer, prompts)
    else:
        sim = CLIPSimilarity(model, text_features=torch.randn(len(prompts), get_adapter(model).embed_dim))
    images = torch.randn(args.batch, 3, *sim.adapter.image_size)
    proxy = build_proxy(args, sim)
    rounds, long, skipped = registry_methods(args, sim, images, proxy)
    units = {"encode_image": None}  # filled below: the forward passes the ratios are to

    # Hugging Face towers: the inputs their processor gives (flattened patches for SigLIP 2), made outside the timing.
    own_inputs = None if hasattr(model, "encode_image") else sim.adapter.own_image_inputs(images)
    with torch.no_grad():  # parity of the dense features' global entry with the model's own embedding
        own = sim.adapter.own_image_features(images)
        parity = (sim.adapter.dense_features(images)[:, 0] - own).abs().max()
        parity_relative = parity / own.abs().max()

    def encode_image():
        with torch.no_grad():
            if own_inputs is None:
                return model.encode_image(images)
            return model.get_image_features(**own_inputs)

    units["encode_image"] = encode_image
    if proxy is not None and "proxyclip" in rounds:
        proxy_input = images * proxy.scale + proxy.shift  # the proxy's own normalisation, outside the timing

        def proxy_forward():
            with torch.no_grad():
                return proxy.model.forward_features(proxy_input)

        units["proxy forward"] = proxy_forward
    if args.legrad_prompts:  # LeGrad for many prompts: one backward pass per prompt, timed as a long method
        many = CLIPSimilarity(
            model, text_features=F.normalize(torch.randn(args.legrad_prompts, sim.adapter.embed_dim), dim=-1)
        )
        long[f"legrad x {args.legrad_prompts}"] = (functools.partial(build_method("legrad", many), images, None), None)
    return Bench(
        model,
        tokenizer,
        sim,
        images,
        (float(parity), float(parity_relative)),
        units,
        rounds,
        long,
        skipped,
        prompt_count_rows(args, model, sim, images),
    )


def prompt_count_rows(
    args: argparse.Namespace, model: torch.nn.Module, sim: CLIPSimilarity, images: torch.Tensor
) -> dict:
    """``raw`` for one prompt among 1 and among ``--many-prompts`` (random unit text embeddings)."""
    one_prompt = CLIPSimilarity(model, text_features=sim.text_features[:1])
    many_prompts = CLIPSimilarity(model, text_features=torch.randn(args.many_prompts, sim.adapter.embed_dim))
    first = torch.zeros(args.batch, dtype=torch.long)
    raw_one, raw_many = build_method("raw", one_prompt), build_method("raw", many_prompts)
    rows = {"raw ITSM, 1 of 1 prompt": lambda: raw_one(images, first)}
    rows[f"raw ITSM, 1 of {args.many_prompts} prompts"] = lambda: raw_many(images, first)
    return rows


def measure_memory(args: argparse.Namespace, bench: Bench, inputs: str | None) -> dict[str, float]:
    """The peak MiB each timed call adds, each in a fresh process (``--memory-worker``); the packages' too."""
    argv = [arg for arg in sys.argv[1:] if arg not in ("--memory",)]
    memory = {}
    names = [*bench.units, *bench.rounds, *bench.long]
    for name in tqdm(names, desc="memory", leave=False):
        command = [sys.executable, os.path.abspath(__file__), *argv, "--memory-worker", name]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        memory[name] = json.loads(out.strip().splitlines()[-1])[name]
    if inputs is not None:
        for name in REFERENCE_PACKAGES:
            peak = run_reference(args, name, inputs, memory=True)
            if peak is not None:
                memory[name] = peak
    return memory


def report_memory(memory: dict[str, float]) -> None:
    """The table of the memory each call adds over the model and the inputs."""
    print(f"\n{'memory: peak added over the model and inputs':<46} {'MiB':>9}")
    for name, mib in memory.items():
        print(f"{name:<46} {mib:>9.0f}")


def print_header(args: argparse.Namespace, bench: Bench, load_start, load_end) -> None:
    size = bench.sim.adapter.image_size
    text = "prompts" if bench.tokenizer is not None else "random text embeddings (no tokenizer offline)"
    print(
        f"{args.model} ({bench.sim.adapter.family}, random weights), batch {args.batch} at {size[0]}x{size[1]}, "
        f"{args.prompts} {text}; "
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load_start[0]:.1f} -> {load_end[0]:.1f}"
    )
    print(
        f"median of {args.repeats} rounds ({args.ig_repeats} for {', '.join(LONG)} and many-prompt LeGrad); "
        "CPU = this process's CPU time, steadier than wall time on a shared machine"
    )
    parity, relative = bench.parity
    print(
        f"global entry of the dense features vs the model's own embedding: max|diff| {parity:.2e} "
        f"({relative:.1e} of its largest entry)\n"
    )
    for name, reason in bench.skipped.items():
        print(f"left out {name}: {reason}")


def report(args: argparse.Namespace, results: dict[str, Timing], rows: list[str]) -> None:
    """The table of times and ratios to ``encode_image``, and the targets."""
    wall_unit, cpu_unit = results["encode_image"]
    print(f"{'method':<40} {'wall s':>9} {'x encode':>9} {'CPU s':>9} {'x encode':>9}")
    for name in rows:
        wall, cpu = results[name]
        print(f"{label(name, args):<40} {wall:>9.3f} {wall / wall_unit:>9.2f} {cpu:>9.3f} {cpu / cpu_unit:>9.2f}")

    checks = [
        (f"{name} <= {limit} x encode_image", name, "encode_image", limit, True)
        for name, limit in TARGETS.items()
        if name in results
    ]
    if "ig" in results and "raw" in results:
        checks.append((f"ig({args.ig_steps}) >= 20 x raw", "ig", "raw", 20.0, False))
    if "legrad-torch" in results and "legrad" in results:
        checks.append(
            (f"legrad <= {LEGRAD_TORCH_TARGET} x legrad-torch", "legrad", "legrad-torch", LEGRAD_TORCH_TARGET, True)
        )
    if "gem-torch" in results and "gem" in results:
        checks.append(("gem <= 1 x gem-torch", "gem", "gem-torch", 1.0, True))
    many = [name for name in results if name.startswith("legrad x ")]
    checks += [
        (f"{name} <= {LEGRAD_MANY_TARGET} x encode_image", name, "encode_image", LEGRAD_MANY_TARGET, True)
        for name in many
    ]
    if "proxyclip" in results and "encode_image + proxy forward" in results:
        unit = "encode_image + proxy forward"
        checks.append((f"proxyclip <= {PROXYCLIP_TARGET} x ({unit})", "proxyclip", unit, PROXYCLIP_TARGET, True))
    print_checks(results, checks)


def report_prompts(args: argparse.Namespace, results: dict[str, Timing], rows: list[str]) -> None:
    """The prompt-count rows: raw ITSM for one prompt among 1 and among ``--many-prompts``."""
    print()
    for name in rows:
        wall, cpu = results[name]
        print(f"{name:<40} {wall:>9.3f} {'':>9} {cpu:>9.3f}")
    one, many = rows
    print_checks(results, [(f"{args.many_prompts} prompts <= 1.25 x 1 prompt", many, one, 1.25, True)])


def print_checks(results: dict[str, Timing], checks: list[tuple[str, str, str, float, bool]]) -> None:
    print("targets (wall | CPU)")
    for text, numerator, denominator, limit, at_most in checks:
        ratios = [results[numerator][clock] / results[denominator][clock] for clock in (0, 1)]
        verdicts = ["met" if (r <= limit if at_most else r >= limit) else "MISSED" for r in ratios]
        print(f"  {text}: {ratios[0]:.2f} {verdicts[0]} | {ratios[1]:.2f} {verdicts[1]}")


if __name__ == "__main__":
    main()
