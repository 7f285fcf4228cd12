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
* ``legrad-torch`` (with ``--legrad-torch-python``): the authors' package on the same
  work as ``legrad`` (every image, every prompt; it takes one image at a time), timed in
  its own environment (it needs open_clip <= 2.23) on a ViT-B-16 with the same random
  weights, before the other methods; its ratio is to our LeGrad's time.

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
        --legrad-torch-python /tmp/refvenv/bin/python   # optional; see benchmarks/reference_parity.py
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
import tempfile

import open_clip
import torch
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
    parser.add_argument("--legrad-torch-python", help="python of an environment with legrad-torch (open_clip <= 2.23)")
    parser.add_argument(
        "--proxy", default="vit_small_patch16_224.dino", help="timm DINO of proxyclip, random weights ('none': none)"
    )
    parser.add_argument(
        "--legrad-torch-worker", help=argparse.SUPPRESS
    )  # internal: weights file to time legrad-torch on
    return parser.parse_args()


def time_legrad_torch(args: argparse.Namespace) -> None:
    """Worker run in legrad-torch's environment: its time on the batch, every prompt, as JSON on stdout."""
    import open_clip as legacy_open_clip  # the environment's open_clip (<= 2.23)
    from legrad import LeWrapper

    data = torch.load(args.legrad_torch_worker)
    model = legacy_open_clip.create_model("ViT-B-16").eval()
    model.load_state_dict(data["state_dict"])
    legrad = LeWrapper(model, layer_index=-2)
    images, text = data["images"], data["text"]

    def run():
        return [legrad.compute_legrad(text_embedding=text, image=image[None]) for image in images]

    run()
    timings = [seconds(run) for _ in range(args.repeats)]
    print(json.dumps({"legrad-torch": medians(timings)}))


def legrad_torch(args: argparse.Namespace, model: torch.nn.Module, images: torch.Tensor, text: torch.Tensor) -> Timing:
    """Median (wall, CPU) seconds of legrad-torch on ``images`` and ``text``, timed in its own environment."""
    with tempfile.TemporaryDirectory() as folder:
        weights = os.path.join(folder, "inputs.pt")
        torch.save({"state_dict": model.state_dict(), "images": images, "text": text}, weights)
        # Its own open_clip comes first; this repository only for this script's imports.
        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
        command = [
            args.legrad_torch_python,
            __file__,
            "--legrad-torch-worker",
            weights,
            "--repeats",
            str(args.repeats),
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return tuple(json.loads(out.strip().splitlines()[-1])["legrad-torch"])


def build_model(name: str):
    """The model with random weights and its tokenizer (``None`` when it cannot be had offline)."""
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
    if name not in method_names():
        return name
    info = method_info(name)
    steps = f"({args.ig_steps})" if name == "ig" else ""
    return f"{info.title}{steps}, {'every prompt' if info.every_prompt else '1 prompt'}"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.legrad_torch_worker:
        return time_legrad_torch(args)
    torch.manual_seed(0)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random weights

    model, tokenizer = build_model(args.model)
    prompts = PROMPTS[: args.prompts]
    if tokenizer is not None:
        sim = CLIPSimilarity(model, tokenizer, prompts)
    else:
        sim = CLIPSimilarity(model, text_features=torch.randn(len(prompts), get_adapter(model).embed_dim))
    size = sim.adapter.image_size
    images = torch.randn(args.batch, 3, *size)
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

    one_prompt = CLIPSimilarity(model, text_features=sim.text_features[:1])
    many_prompts = CLIPSimilarity(model, text_features=torch.randn(args.many_prompts, sim.adapter.embed_dim))
    first = torch.zeros(args.batch, dtype=torch.long)
    raw_one, raw_many = build_method("raw", one_prompt), build_method("raw", many_prompts)
    prompt_rows = {"raw ITSM, 1 of 1 prompt": lambda: raw_one(images, first)}
    prompt_rows[f"raw ITSM, 1 of {args.many_prompts} prompts"] = lambda: raw_many(images, first)

    load_start = os.getloadavg()
    results = {}
    if args.legrad_torch_python:
        results["legrad-torch"] = legrad_torch(args, model, images, sim.text_features)
    results.update(time_rounds({**units, **rounds}, args.repeats))
    results.update(time_rounds(prompt_rows, args.repeats))
    for name, (call, warm_up) in long.items():
        if warm_up is not None:
            warm_up()  # at the timed chunk size
        results[name] = medians([seconds(call) for _ in tqdm(range(args.ig_repeats), desc=name, leave=False)])
    load_end = os.getloadavg()

    text = "prompts" if tokenizer is not None else "random text embeddings (no tokenizer offline)"
    print(
        f"{args.model} ({sim.adapter.family}, random weights), batch {args.batch} at {size[0]}x{size[1]}, "
        f"{args.prompts} {text}; "
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load_start[0]:.1f} -> {load_end[0]:.1f}"
    )
    print(
        f"median of {args.repeats} rounds ({args.ig_repeats} for {', '.join(LONG)}); "
        "CPU = this process's CPU time, steadier than wall time on a shared machine"
    )
    print(
        f"global entry of the dense features vs the model's own embedding: max|diff| {parity:.2e} "
        f"({parity_relative:.1e} of its largest entry)\n"
    )
    for name, reason in skipped.items():
        print(f"left out {name}: {reason}")
    if "proxy forward" in results:
        print(f"proxy of proxyclip: {args.proxy} (timm, random weights)")
        results["encode_image + proxy forward"] = tuple(
            results["encode_image"][clock] + results["proxy forward"][clock] for clock in (0, 1)
        )
    rows = ["encode_image", *units, *rounds, *(["legrad-torch"] if "legrad-torch" in results else []), *long]
    report(args, results, list(dict.fromkeys(rows)))
    report_prompts(args, results, list(prompt_rows))


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
