"""Wall time of ITSM next to the image encoder and Captum's gradient methods.

Model: ``--model``, random weights (the cost does not depend on the weights), inputs
at the model's own resolution: an open_clip name (default ``ViT-B-16``; also the timm
towers ``ViT-B-16-SigLIP``, ``ViT-B-16-SigLIP2``, ``EVA02-B-16``, ``convnext_base``, ...)
or ``hf-siglip`` / ``hf-siglip2`` (Hugging Face ``SiglipModel`` / ``Siglip2Model`` with
the default configurations of google/siglip-base-patch16-224 / google/siglip2-base-patch16-naflex).
Prompts are embedded with the model's tokenizer when it is available offline, else replaced
by random unit text embeddings (same cost for the image side).
Every method explains the same ``CLIPSimilarity``:

* ``encode_image``: the library's own image embedding, the unit of the ratios;
* ``ITSM raw`` / ``ITSM surgery``: maps for *every* prompt (``target=None``), with the
  default post-processing (min-max, bilinear upsampling to the input size);
* ``LayerGradCam``: one prompt (``target=0``) on ``sim.gradcam_layer()``, upsampled;
* ``GEM``, ``LeGrad``, ``Chefer relevancy`` and the ITSM variants ``MaskCLIP``,
  ``ClearCLIP``, ``SCLIP``, ``NACLIP``: maps for every prompt, default post-processing
  (the prompt embeddings are computed once, outside ``attribute``);
* ``legrad-torch`` (with ``--legrad-torch-python``): the authors' package on the same
  work (every image, every prompt; it takes one image at a time), timed in its own
  environment (it needs open_clip <= 2.23) on a ViT-B-16 with the same random weights,
  before the other methods; its ratio is to our LeGrad's time.
* ``IntegratedGradients``: one prompt, ``n_steps`` steps in chunks of
  ``--ig-batch`` images.

The prompt-count row runs ITSM raw with ``target=0`` against 1 and against 1000
prompts. The 1000 text embeddings are random unit vectors: embedding prompts is a
one-time cost paid when the ``CLIPSimilarity`` is built, outside ``attribute``.

Timing: each method runs once to warm up, then ``--repeats`` rounds time every
method once per round (the order rotates between rounds, so a slow spell on a
shared machine does not land on one method); the median is reported. The
Integrated Gradients run is long, so it is timed ``--ig-repeats`` times (default 1)
after a short warm-up at the same chunk size.

Usage::

    python benchmarks/bench_itsm.py --repeats 3 --batch 8 --threads 1 \
        --legrad-torch-python /tmp/refvenv/bin/python   # optional; see benchmarks/reference_parity.py
    python benchmarks/bench_itsm.py --model ViT-B-16-SigLIP --ig-steps 0   # another family, no IG
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

import open_clip
import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam
from tqdm import tqdm

import captum_iclip
from captum_iclip import (
    CheferRelevancy,
    CLIPSimilarity,
    GEMAttribution,
    ITSMAttribution,
    LeGradAttribution,
    get_adapter,
)
from captum_iclip.models.loading import WeightsUnavailableError

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

VARIANT_TITLES = {"maskclip": "MaskCLIP", "clearclip": "ClearCLIP", "sclip": "SCLIP", "naclip": "NACLIP"}
TARGETS = {
    "ITSM raw": 1.15,
    "ITSM surgery": 1.5,
    "GEM": 1.3,
    "MaskCLIP": 1.2,
    "ClearCLIP": 1.2,
    "SCLIP": 1.2,
    "NACLIP": 1.2,
}
LEGRAD_TORCH_TARGET = 0.5  # our LeGrad at most half the time of legrad-torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name, hf-siglip or hf-siglip2")
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
        "--legrad-torch-worker", help=argparse.SUPPRESS
    )  # internal: weights file to time legrad-torch on
    return parser.parse_args()


Timing = tuple[float, float]  # (wall seconds, CPU seconds of this process)


def seconds(run: Callable[[], object]) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def medians(timings: list[Timing]) -> Timing:
    return statistics.median(t[0] for t in timings), statistics.median(t[1] for t in timings)


def time_rounds(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, Timing]:
    """Median (wall, CPU) seconds of each method over ``repeats`` rounds, after one warm-up call each."""
    for run in tqdm(methods.values(), desc="warm-up", leave=False):
        run()
    names = list(methods)
    times: dict[str, list[Timing]] = {name: [] for name in names}
    for round_index in tqdm(range(repeats), desc="rounds", leave=False):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            times[name].append(seconds(methods[name]))
    return {name: medians(values) for name, values in times.items()}


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
    itsm = ITSMAttribution(sim)
    gradcam = LayerGradCam(sim, sim.gradcam_layer())
    integrated_gradients = IntegratedGradients(sim)
    gem, legrad, chefer = GEMAttribution(sim), LeGradAttribution(sim), CheferRelevancy(sim)

    # Hugging Face towers: the inputs their processor gives (flattened patches for SigLIP 2), made outside the timing.
    own_inputs = None if hasattr(model, "encode_image") else sim.adapter.own_image_inputs(images)
    with torch.no_grad():  # parity of the dense features' global entry with the model's own embedding
        parity = (sim.adapter.dense_features(images)[:, 0] - sim.adapter.own_image_features(images)).abs().max()

    def encode_image():
        with torch.no_grad():
            if own_inputs is None:
                return model.encode_image(images)
            return model.get_image_features(**own_inputs)

    def layer_gradcam():
        return LayerAttribution.interpolate(gradcam.attribute(images, target=0), size, "bilinear")

    def ig(n_steps: int = args.ig_steps):
        return integrated_gradients.attribute(images, target=0, n_steps=n_steps, internal_batch_size=args.ig_batch)

    main_methods = {
        "encode_image": encode_image,
        "ITSM raw": lambda: itsm.attribute(images),
        "ITSM surgery": lambda: itsm.attribute(images, variant="surgery"),
        "LayerGradCam": layer_gradcam,
        "GEM": lambda: gem.attribute(images),
        "LeGrad": lambda: legrad.attribute(images),
        "Chefer relevancy": lambda: chefer.attribute(images),
        **{
            title: (lambda variant=variant: itsm.attribute(images, variant=variant))
            for variant, title in VARIANT_TITLES.items()
        },
    }
    # Methods the tower does not have (surgery on a convolutional trunk, the block-loop methods
    # outside the class-token ViTs) are left out, with the library's own reason.
    skipped = {}
    requirements = {"ITSM surgery": lambda: sim.adapter.check_surgery_depth(1)}
    for name in ("GEM", "LeGrad", "Chefer relevancy", *VARIANT_TITLES.values()):
        requirements[name] = lambda name=name: sim.adapter.block_views(name)
    for name, check in requirements.items():
        try:
            check()
        except (TypeError, NotImplementedError) as error:
            skipped[name] = str(error)
            del main_methods[name]
    one_prompt = ITSMAttribution(CLIPSimilarity(model, text_features=sim.text_features[:1]))
    many_prompts = ITSMAttribution(
        CLIPSimilarity(model, text_features=torch.randn(args.many_prompts, sim.adapter.embed_dim))
    )
    prompt_methods = {
        "ITSM raw, 1 prompt": lambda: one_prompt.attribute(images, target=0),
        f"ITSM raw, {args.many_prompts} prompts": lambda: many_prompts.attribute(images, target=0),
    }

    load_start = os.getloadavg()
    results = {}
    if args.legrad_torch_python:
        results["legrad-torch"] = legrad_torch(args, model, images, sim.text_features)
    results.update(time_rounds(main_methods, args.repeats))
    results.update(time_rounds(prompt_methods, args.repeats))
    ig_label = f"IntegratedGradients({args.ig_steps})"
    if args.ig_steps:
        ig(n_steps=max(1, args.ig_batch // args.batch))  # warm-up at the timed chunk size
        results[ig_label] = medians([seconds(ig) for _ in tqdm(range(args.ig_repeats), desc="IG", leave=False)])
    load_end = os.getloadavg()

    text = "prompts" if tokenizer is not None else "random text embeddings (no tokenizer offline)"
    print(
        f"{args.model} ({sim.adapter.family}, random weights), batch {args.batch} at {size[0]}x{size[1]}, "
        f"{args.prompts} {text}; "
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load_start[0]:.1f} -> {load_end[0]:.1f}"
    )
    print(
        f"median of {args.repeats} rounds ({args.ig_repeats} for Integrated Gradients); "
        "CPU = this process's CPU time, steadier than wall time on a shared machine\n"
    )
    print(f"global entry of the dense features vs the model's own embedding: max|diff| {parity:.2e}")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    wall_unit, cpu_unit = results["encode_image"]
    print(f"{'method':<32} {'wall s':>9} {'x encode':>9} {'CPU s':>9} {'x encode':>9}")
    ig_rows = [ig_label] if args.ig_steps else []
    for name in [*main_methods, *(["legrad-torch"] if "legrad-torch" in results else []), *ig_rows, *prompt_methods]:
        wall, cpu = results[name]
        print(f"{name:<32} {wall:>9.3f} {wall / wall_unit:>9.2f} {cpu:>9.3f} {cpu / cpu_unit:>9.2f}")

    def verdict(ratio: float, limit: float, at_most: bool = True) -> str:
        return "met" if (ratio <= limit if at_most else ratio >= limit) else "MISSED"

    def ratio(numerator: str, denominator: str, clock: int) -> float:
        return results[numerator][clock] / results[denominator][clock]

    many = f"ITSM raw, {args.many_prompts} prompts"
    checks = [
        (f"{name} <= {limit} x encode_image", name, "encode_image", limit, True)
        for name, limit in TARGETS.items()
        if name in results
    ]
    checks.append((f"{args.many_prompts} prompts <= 1.25 x 1 prompt", many, "ITSM raw, 1 prompt", 1.25, True))
    if args.ig_steps:
        checks.append((f"{ig_label} >= 20 x ITSM raw", ig_label, "ITSM raw", 20.0, False))
    if "legrad-torch" in results:
        checks.append(
            (f"LeGrad <= {LEGRAD_TORCH_TARGET} x legrad-torch", "LeGrad", "legrad-torch", LEGRAD_TORCH_TARGET, True)
        )
    print("\ntargets (wall | CPU)")
    for label, numerator, denominator, limit, at_most in checks:
        wall, cpu = ratio(numerator, denominator, 0), ratio(numerator, denominator, 1)
        print(f"  {label}: {wall:.2f} {verdict(wall, limit, at_most)} | {cpu:.2f} {verdict(cpu, limit, at_most)}")


if __name__ == "__main__":
    main()
