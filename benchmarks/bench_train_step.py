"""Cost of an ICLIP ``projection``-mode training step relative to a plain open_clip step.

Three steps on the same batch and the same randomly initialised weights, timed in
round-robin (in a rotating order) so that load on a shared machine affects them alike:

* ``iclip-projection``: the trainer's own :func:`~captum_iclip.training.iclip.train_step`
  in ``projection`` mode (dense forward, masked max pooling over masks read from a
  :class:`~captum_iclip.masks.CachedMaskProvider` that was filled beforehand, open_clip's
  ``ClipLoss``, backward into the interpretability head, AdamW step);
* ``clip-all-trainable``: open_clip's contrastive step with every weight trainable
  (``encode_image``/``encode_text``, ``ClipLoss``, backward, AdamW step);
* ``clip-frozen``: the same plain step with the same frozen set-up as ``projection``
  mode: only the recognition projection ``visual.proj`` (the counterpart of the
  interpretability head) trains, the towers are frozen and in eval mode.

Prints the median wall time of each and the two ratios (of the medians, and the
median of the ratios within a round).

Usage::

    python benchmarks/bench_train_step.py                  # ViT-B-16 at 224, batch 8
    python benchmarks/bench_train_step.py --model ViT-B-32 --steps 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from open_clip.loss import ClipLoss

import captum_iclip
from captum_iclip.masks import CachedMaskProvider, as_mask_provider
from captum_iclip.models.dual import DualProjectionCLIP
from captum_iclip.training.iclip import (
    ICLIPForward,
    TrainConfig,
    TrainStep,
    configure_trainable,
    parameter_groups,
    train_step,
)


def plain_clip_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: ClipLoss,
    images: torch.Tensor,
    tokens: torch.Tensor,
) -> float:
    """open_clip's contrastive step: features, ClipLoss, backward, optimizer step."""
    image_features = model.encode_image(images, normalize=True)
    text_features = model.encode_text(tokens, normalize=True)
    loss = loss_fn(image_features, text_features, model.logit_scale.exp())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def build_steps(model_name: str, batch_size: int, cache_dir: str) -> dict[str, Callable[[], float]]:
    torch.manual_seed(0)
    loaded = captum_iclip.load(model_name, from_scratch=True)  # random weights, offline
    base, tokenizer = loaded.model, loaded.tokenizer
    size = base.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(batch_size, 3, size, size)
    captions = [f"a photo of object number {i}" for i in range(batch_size)]
    tokens = tokenizer(captions)
    loss_fn = ClipLoss()

    all_trainable = copy.deepcopy(base).train()
    optimizer_all = torch.optim.AdamW(parameter_groups(all_trainable, 0.2), lr=1e-5)

    frozen = copy.deepcopy(base).eval().requires_grad_(False)
    frozen.visual.proj.requires_grad_(True)
    optimizer_frozen = torch.optim.AdamW(parameter_groups(frozen, 0.2), lr=1e-5)

    config = TrainConfig(mode="projection")
    dual = DualProjectionCLIP(copy.deepcopy(base))
    configure_trainable(dual, config)
    dual.eval()
    forward = ICLIPForward(dual, config.objective, with_recognition=False)
    optimizer_iclip = torch.optim.AdamW(parameter_groups(dual, 0.2), lr=1e-5)
    grid = dual.adapter.grid_size(size, size)
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(batch_size, grid[0] * grid[1], generator=generator) > 0.5
    provider = CachedMaskProvider(as_mask_provider(lambda x, g: masks[: x.shape[0]]), cache_dir, fingerprint="bench")
    provider(images, grid)  # fill the cache: the timed steps read masks from disk
    trainable = [p for p in dual.parameters() if p.requires_grad]
    parts = TrainStep(
        forward,
        loss_fn,
        optimizer_iclip,
        None,
        trainable,
        provider,
        dual,
        tokenizer,
        config,
        lambda_rec=0.0,
        autocast_dtype=None,
        device=torch.device("cpu"),
    )

    return {
        "iclip-projection": lambda: train_step(parts, images, captions),
        "clip-all-trainable": lambda: plain_clip_step(all_trainable, optimizer_all, loss_fn, images, tokens),
        "clip-frozen": lambda: plain_clip_step(frozen, optimizer_frozen, loss_fn, images, tokens),
    }


def main(argv: list[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture (random weights)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each kind (after one warm-up)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as cache_dir:
        steps = build_steps(args.model, args.batch_size, cache_dir)
        times: dict[str, list[float]] = {name: [] for name in steps}
        names = list(steps)
        for round_index in range(args.steps + 1):
            # Rotate the order: a step that follows the all-trainable one pays for its freed memory.
            for name in names[round_index % 3 :] + names[: round_index % 3]:
                step = steps[name]
                start = time.perf_counter()
                step()
                if round_index:  # round 0 warms up
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"model={args.model} batch={args.batch_size} threads={torch.get_num_threads()} "
        f"timed steps={args.steps} (median, seconds)"
    )
    for name, value in medians.items():
        print(f"  {name:20s} {value:8.3f}   all: {', '.join(f'{v:.3f}' for v in times[name])}")
    for baseline in ("clip-all-trainable", "clip-frozen"):
        # Ratios within a round share the machine's load at that moment: their median is the steadier figure.
        paired = statistics.median(a / b for a, b in zip(times["iclip-projection"], times[baseline]))
        print(
            f"ratio iclip-projection / {baseline:18s}: "
            f"of medians {medians['iclip-projection'] / medians[baseline]:.3f}, "
            f"median per round {paired:.3f}"
        )


if __name__ == "__main__":
    main()
