"""Throughput of the registry's map methods (default ``raw`` and ``surgery`` ITSM) against the image encoder.

For every resolution, batch size and number of prompts K of the grid, times on
one randomly initialised open_clip model:

* ``encode_image``: the model's own image embedding (the cost of a zero-shot
  prediction), measured once per (resolution, batch size);
* each of ``--methods``, names of the method registry
  (:mod:`captum_iclip.evaluation.methods`) built by ``build_method`` as ``demo``,
  ``eval`` and ``audit`` build them: the maps of all K prompts (``target=None``) for
  the methods that take every prompt at once (the registry's ``every_prompt``), one
  prompt per image otherwise; default post-processing (for ITSM: min–max normalised,
  upsampled to the input). ``raw`` is ITSM, ``surgery`` ITSM with CLIP Surgery
  (value-value attention in the last blocks and feature surgery; with K = 1 the empty
  prompt is embedded on every call, as the attribution does).

Each figure is the median of ``--repeats`` timed calls after one warm-up,
without gradients, the calls timed in turn (round-robin) so that a
shared machine's load affects them alike; the text embeddings are computed
before timing. Printed: images/s of each, and the ratio of each method's time
to ``encode_image``'s time on the same batch, measured in the same run. On a
small shared CPU, ``--threads 1`` is often much faster than more threads.

Usage::

    python benchmarks/bench_throughput.py                       # ViT-B-16, the full grid
    python benchmarks/bench_throughput.py --quick               # reduced grid for a small CPU
    python benchmarks/bench_throughput.py --device cuda --batch-sizes 1,8,32 --resolutions 224,448
    python benchmarks/bench_throughput.py --quick --methods raw,gem,naclip
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch
from timing import time_rounds

import captum_iclip
from captum_iclip import CLIPSimilarity
from captum_iclip.evaluation.methods import build_method, method_info, method_names


def _ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def round_robin_medians(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall time of each function without gradients (:func:`timing.time_rounds`)."""
    with torch.no_grad():
        return {name: wall for name, (wall, _) in time_rounds(fns, repeats, device, progress=False).items()}


def run(
    model_name: str,
    device: torch.device,
    batch_sizes: list[int],
    resolutions: list[int],
    prompt_counts: list[int],
    repeats: int,
    methods: list[str],
    patch_grid: bool = False,
) -> list[dict[str, float]]:
    """Time the grid; returns one row per (resolution, batch size, K)."""
    torch.manual_seed(0)
    loaded = captum_iclip.load(model_name, from_scratch=True, device=str(device))  # random weights, offline
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = []
    for resolution in resolutions:
        # open_clip's encode_image at the model's own size; elsewhere the adapter's, which is the
        # same computation with the positional embedding interpolated (as on the ITSM path).
        native = tuple(model.visual.image_size) == (resolution, resolution)
        adapter = CLIPSimilarity(model, tokenizer, ["a photo"]).adapter
        encode_image = model.encode_image if native else adapter.encode_image
        for batch_size in batch_sizes:
            images = torch.randn(batch_size, 3, resolution, resolution, device=device)
            one_prompt = torch.zeros(batch_size, dtype=torch.long, device=device)
            for count in prompt_counts:
                sim = CLIPSimilarity(model, tokenizer, [f"a photo of thing number {i}" for i in range(count)])
                calls = {"encode": functools.partial(encode_image, images)}
                for name in methods:
                    target = None if method_info(name).every_prompt else one_prompt
                    method = build_method(name, sim, upsample=not patch_grid)
                    calls[name] = functools.partial(method, images, target)
                seconds = round_robin_medians(calls, repeats, device)
                rows.append({"resolution": resolution, "batch": batch_size, "prompts": count, **seconds})
                print(_format_row(rows[-1], methods), flush=True)
    return rows


def _format_row(row: dict[str, float], methods: list[str]) -> str:
    n = row["batch"]
    cells = [row["resolution"], n, row["prompts"], f"{n / row['encode']:.2f}"]
    for name in methods:
        cells += [f"{n / row[name]:.2f}", f"{row[name] / row['encode']:.2f}"]
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture (random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32])
    parser.add_argument("--resolutions", type=_ints, default=[224, 448])
    parser.add_argument("--prompts", type=_ints, default=[1, 20, 100])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--methods",
        default="raw,surgery",
        help=f"comma-separated registry names (default raw,surgery); registered: {', '.join(method_names())}",
    )
    parser.add_argument("--patch-grid", action="store_true", help="time the maps on the patch grid, before upsampling")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="reduced grid for a small CPU: ViT-B-32, batches 1 and 8, 224 px, 3 repeats",
    )
    args = parser.parse_args()
    if args.quick:
        args.model, args.batch_sizes, args.resolutions, args.repeats = "ViT-B-32", [1, 8], [224], 3
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"{args.model} (random weights) on {device}"
        + (
            f" ({torch.cuda.get_device_name(device)})"
            if device.type == "cuda"
            else f" ({torch.get_num_threads()} threads)"
        )
        + f"; median of {args.repeats}; maps as the method registry builds them, "
        + ("on the patch grid" if args.patch_grid else "upsampled to the input")
    )
    methods = args.methods.split(",")
    for name in methods:
        info = method_info(name)  # a ValueError naming the registered methods for a wrong name
        if args.patch_grid and not info.patch_grid:
            parser.error(f"--patch-grid: expected methods computed on the patch grid, got {name!r}")
    header = ["res", "batch", "prompts", "encode_image img/s"]
    for name in methods:
        header += [f"{name} img/s", f"{name} / encode"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---:|" * len(header))
    run(args.model, device, args.batch_sizes, args.resolutions, args.prompts, args.repeats, methods, args.patch_grid)


if __name__ == "__main__":
    main()
