"""The authors' packages, gem-torch 1.0.1 and legrad-torch 1.1, timed or measured on given inputs.

They need open_clip <= 2.23, so this script runs in their own environment (see
``reference_parity.py`` for how to make it) and imports nothing of this project: ``bench_itsm.py``
saves the model's state dict, the images and the prompt embeddings to a file and runs::

    /tmp/refvenv/bin/python benchmarks/reference_packages.py --inputs FILE --name gem-torch --repeats 5

which prints one JSON line: the median (wall, CPU) seconds of the package's maps for every image
and every prompt (``--memory``: the peak resident memory the call adds, in MiB, see :func:`peak_mib`).

* ``gem-torch``: ``gem.GEMWrapper`` (its defaults: depth 7, one self-self iteration, its own
  temperature) on the whole batch, its text embedding replaced by the given prompt embeddings;
* ``legrad-torch``: ``legrad.LeWrapper(model, layer_index=-2).compute_legrad``, one image at a time
  (its API takes one), every prompt at once.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from timing import time_rounds

PACKAGES = ("gem-torch", "legrad-torch")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_mib(call: Callable[[], object]) -> float:
    """The peak resident memory ``call()`` adds to this process, in MiB: the high-water mark (``VmHWM``,
    reset through ``/proc/self/clear_refs`` just before the call) less the resident memory before it.
    Linux only; run each measurement in a fresh process (a freed allocation may be reused)."""
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    call()
    return (_status_kib("VmHWM") - before) / 1024


def package_call(name: str, data: dict) -> Callable[[], object]:
    """The package's maps of every image for every prompt, on open_clip's ViT-B-16 with ``data``'s weights."""
    import open_clip  # this environment's (<= 2.23)

    logging.getLogger().setLevel(logging.ERROR)
    size = data.get("image_size")
    model = open_clip.create_model("ViT-B-16", **({"force_image_size": size} if size else {})).eval()
    model.load_state_dict(data["state_dict"])
    images, text = data["images"], data["text"]
    if name == "gem-torch":
        from gem.gem_wrapper import GEMWrapper

        gem = GEMWrapper(model, tokenizer=None)
        gem.encode_text = lambda prompts: text[None]  # the given prompt embeddings instead of its templates

        def gem_maps():
            with torch.no_grad():
                return gem(images, text=[""] * len(text))

        return gem_maps
    if name == "legrad-torch":
        from legrad import LeWrapper

        legrad = LeWrapper(model, layer_index=-2)
        return lambda: [legrad.compute_legrad(text_embedding=text, image=image[None]) for image in images]
    raise ValueError(f"--name: expected one of {PACKAGES}, got {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=Path, required=True, help="file saved by bench_itsm.py")
    parser.add_argument("--name", choices=PACKAGES, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory", action="store_true", help="the peak memory of one call instead of times")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    call = package_call(args.name, torch.load(args.inputs))
    if args.memory:
        print(json.dumps({args.name: peak_mib(call)}))
        return
    timings = time_rounds({args.name: call}, args.repeats, progress=False)
    print(json.dumps({args.name: timings[args.name]}))


if __name__ == "__main__":
    main()
