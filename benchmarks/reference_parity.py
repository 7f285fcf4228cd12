"""GEM and LeGrad maps next to the authors' pip packages, on the same random ViT-B-16 weights.

``gem-torch`` 1.0.1 and ``legrad-torch`` 1.1 need open_clip <= 2.23 (they assume its
sequence-first token layout), so they run in a separate virtual environment; this
script runs in both and compares through files:

1. ``make`` (this project's environment): a random open_clip ViT-B-16 (every
   parameter jittered, so biases and norm scales are generic), seeded images and
   random unit prompt embeddings, saved to ``--work``;
2. ``reference`` (the packages' environment): the same state dict loaded into
   open_clip 2.23's ViT-B-16, maps from ``gem.GEMWrapper`` (its own forward, with
   its text embedding replaced by ours) and ``legrad.LeWrapper.compute_legrad``
   (one image at a time, as its API takes);
3. ``ours`` (this project's environment): :class:`GEMAttribution` and
   :class:`LeGradAttribution` on the same inputs, three ways: upsampled like the
   references (``normalize=False``, bilinear to the image size) and min-max
   normalised per (image, prompt) over pixels here, as both packages do;
   ``normalize="reference"`` (the same order, inside the classes); and the default
   ``normalize=True`` (min-max on the patch grid, then upsampled);
4. ``compare``: max |difference| of each of the three from the packages' maps.

Usage (``all`` runs the four steps)::

    python -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install "open_clip_torch==2.23.0" gem-torch legrad-torch
    python benchmarks/reference_parity.py all --reference-python /tmp/refvenv/bin/python

Not part of the test suite (it needs the second environment).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def make(work: Path, images: int, prompts: int, seed: int) -> None:
    import open_clip

    torch.manual_seed(seed)
    logging.getLogger().setLevel(logging.ERROR)
    model = open_clip.create_model("ViT-B-16").eval()
    with torch.no_grad():
        for param in model.visual.parameters():
            param.add_(0.02 * torch.randn_like(param))
    state = {k: v for k, v in model.state_dict().items() if k.startswith("visual.") or k == "logit_scale"}
    torch.save(
        {
            "visual": state,
            "images": torch.randn(images, 3, 224, 224),
            "text": F.normalize(torch.randn(prompts, model.visual.output_dim), dim=-1),
        },
        work / "inputs.pt",
    )


def load_model(work: Path):
    import open_clip

    logging.getLogger().setLevel(logging.ERROR)
    data = torch.load(work / "inputs.pt")
    model = open_clip.create_model("ViT-B-16").eval()
    missing, unexpected = model.load_state_dict(data["visual"], strict=False)
    assert not unexpected and all(not k.startswith("visual.") for k in missing), (missing, unexpected)
    return model, data


def reference(work: Path) -> None:
    from gem.gem_wrapper import GEMWrapper
    from legrad import LeWrapper

    model, data = load_model(work)
    images, text = data["images"], data["text"]
    gem = GEMWrapper(model, tokenizer=None)  # defaults: depth=7, ss_attn_iter=1, ss_attn_temp=None
    gem.encode_text = lambda prompts: text[None]  # our prompt embeddings instead of its templates
    with torch.no_grad():
        gem_maps = torch.cat([gem(image[None], text=[""] * len(text)) for image in images])

    model, data = load_model(work)  # a fresh copy: GEMWrapper rewired the first one
    legrad = LeWrapper(model, layer_index=-2)
    legrad_maps = torch.cat([legrad.compute_legrad(text_embedding=text, image=image[None]) for image in images])
    torch.save({"gem": gem_maps.detach(), "legrad": legrad_maps.detach()}, work / "reference.pt")


def minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(2)
    low, high = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    return ((flat - low) / (high - low)).reshape(maps.shape)


def ours(work: Path) -> None:
    from captum_iclip import CLIPSimilarity, GEMAttribution, LeGradAttribution

    model, data = load_model(work)
    model.requires_grad_(False)
    sim = CLIPSimilarity(model, text_features=data["text"])
    images = data["images"]
    maps = {}
    for name, method in (("gem", GEMAttribution(sim)), ("legrad", LeGradAttribution(sim))):
        maps[name] = {
            "normalize=False, then min-max": minmax(method.attribute(images, normalize=False)),
            'normalize="reference"': method.attribute(images, normalize="reference"),
            "normalize=True (default)": method.attribute(images),
        }
    torch.save(maps, work / "ours.pt")


def compare(work: Path) -> None:
    theirs, mine = torch.load(work / "reference.pt"), torch.load(work / "ours.pt")
    for name in ("gem", "legrad"):
        for way, maps in mine[name].items():
            assert theirs[name].shape == maps.shape, (name, theirs[name].shape, maps.shape)
            difference = (theirs[name] - maps).abs()
            print(
                f"{name}, {way}: maps {tuple(maps.shape)}, max |difference| from the package "
                f"{difference.max().item():.2e} (mean {difference.mean().item():.2e})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["make", "reference", "ours", "compare", "all"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/reference-parity"))
    parser.add_argument("--reference-python", default="/tmp/refvenv/bin/python")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step == "all":
        here = [sys.executable, __file__, "--work", str(args.work)]
        subprocess.run(
            [
                *here[:2],
                "make",
                *here[2:],
                "--images",
                str(args.images),
                "--prompts",
                str(args.prompts),
                "--seed",
                str(args.seed),
            ],
            check=True,
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the packages' own open_clip
        subprocess.run([args.reference_python, __file__, "reference", "--work", str(args.work)], check=True, env=env)
        subprocess.run([*here[:2], "ours", *here[2:]], check=True)
        compare(args.work)
        return
    {
        "make": lambda: make(args.work, args.images, args.prompts, args.seed),
        "reference": lambda: reference(args.work),
        "ours": lambda: ours(args.work),
        "compare": lambda: compare(args.work),
    }[args.step]()


if __name__ == "__main__":
    main()
