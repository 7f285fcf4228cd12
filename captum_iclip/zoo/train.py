"""Reproduce the bundled ``shapes-tiny`` models: ``python -m captum_iclip.zoo.train``.

Three stages on the procedural world, with fixed seeds, on CPU:

1. **clip**: a tiny CLIP (open_clip ``CLIP`` from :data:`MODEL_CONFIG`, the real
   open_clip tokenizer) trained from scratch with the plain CLIP loss;
2. **dino**: a tiny ViT trained with DINO on the same images (the mask source);
3. **iclip**: the ICLIP interpretability projection trained on top (``projection``
   mode: the CLIP weights and its recognition outputs stay as they are), with
   masked max pooling over the DINO foreground.

Each stage writes its result atomically and is skipped when rerun, and the two
trainers resume from their own checkpoints, so a killed run continues where it
stopped. The last step writes the bundle (float16 weights and ``config.json``
with the training figures) into ``captum_iclip/zoo/weights/shapes-tiny``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from captum_iclip._io import atomic_torch_save, atomic_write_text
from captum_iclip.models.adapters import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from captum_iclip.training.dino import DINOConfig
from captum_iclip.zoo import WEIGHTS_DIR, build_clip, make_preprocess

IMAGE_SIZE = 96
TAU = 0.6
MODEL_CONFIG: dict = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 4, "width": 128, "head_width": 64, "patch_size": 12},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}


class RenderedWorld(Dataset):
    """World scenes rendered once into memory: items are (normalised image, caption).

    Rendering up front keeps the scenes identical across stages and epochs and
    keeps the generator's cost out of the training loops.

    Args:
        start_seed: Seed of the first scene.
        length: Number of scenes.
        size: Image side in pixels.
        progress: Show a progress bar while rendering.
        caption_colour_prob: When given, each scene is re-captioned by
            :func:`~captum_iclip.world.sample_caption` with this probability of
            naming an object's colour (seeded by ``caption_seed`` and the scene's
            seed); ``None`` keeps the scenes' own captions (colour in 90 % of phrases).
        caption_seed: Seed of the re-captioning.
    """

    def __init__(
        self,
        start_seed: int,
        length: int,
        size: int = IMAGE_SIZE,
        progress: bool = True,
        caption_colour_prob: float | None = None,
        caption_seed: int = 0,
    ) -> None:
        from captum_iclip.world import generate_scene, sample_caption

        self.images = np.empty((length, size, size, 3), dtype=np.uint8)
        self.captions: list[str] = []
        for i in tqdm(range(length), desc="render world", disable=not progress):
            scene = generate_scene(start_seed + i, size=size)
            self.images[i] = scene.image
            if caption_colour_prob is None:
                self.captions.append(scene.caption)
            else:
                rng = np.random.default_rng((caption_seed, start_seed + i))
                self.captions.append(sample_caption(scene, rng, colour_prob=caption_colour_prob))
        self.preprocess = make_preprocess(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int):
        return self.preprocess(self.images[index]), self.captions[index]


RECOGNITION_SCENES = 1000  # held-out scenes of the recorded recognition figures
MASK_SCENES = 500  # held-out scenes of the recorded mask figures


def bundle_figures(clip, tokenizer, mask_provider, prompts: list[str]) -> dict[str, dict]:
    """The bundle's recorded quality figures, on the ``report`` seed range (never used to choose a recipe):
    zero-shot recognition over the shape prompts and the DINO masks on the CLIP patch grid."""
    from captum_iclip import CLIPSimilarity
    from captum_iclip.zoo.quality import mask_quality, recognition_report, scene_range

    preprocess = make_preprocess(IMAGE_SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    sim = CLIPSimilarity(clip, tokenizer, prompts).eval()
    side = IMAGE_SIZE // MODEL_CONFIG["vision_cfg"]["patch_size"]
    with torch.no_grad():
        recognition = recognition_report(sim, scene_range("report", RECOGNITION_SCENES, IMAGE_SIZE), preprocess)
        masks = mask_quality(mask_provider, scene_range("report", MASK_SCENES, IMAGE_SIZE), preprocess, (side, side))
    return {"recognition": recognition, "dino_masks": masks}


STAGES = ("clip", "dino", "iclip", "bundle")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m captum_iclip.zoo.train`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m captum_iclip.zoo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="runs/zoo", help="checkpoints and logs of the stages")
    parser.add_argument("--out", default=str(WEIGHTS_DIR / "shapes-tiny"), help="where the bundle is written")
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="stages to run now, in order (clip and dino are independent and may run in two processes)",
    )
    parser.add_argument("--train-scenes", type=int, default=60000)
    parser.add_argument(
        "--caption-colour-prob",
        type=float,
        default=0.3,
        help="probability that a training caption names an object's colour (the world's own captions: 0.9)",
    )
    parser.add_argument("--clip-epochs", type=int, default=10)
    parser.add_argument("--clip-batch-size", type=int, default=128)
    parser.add_argument("--clip-lr", type=float, default=2e-3)
    parser.add_argument("--dino-steps", type=int, default=DINOConfig.steps)
    parser.add_argument("--iclip-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {STAGES}")
    if args.threads:
        torch.set_num_threads(args.threads)

    import open_clip

    from captum_iclip.world import TRAIN_SEED_START

    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    world = RenderedWorld(
        TRAIN_SEED_START,
        args.train_scenes,
        progress=not args.no_progress,
        caption_colour_prob=args.caption_colour_prob,
        caption_seed=args.seed,
    )
    tokenizer = open_clip.SimpleTokenizer(context_length=MODEL_CONFIG["text_cfg"]["context_length"])
    if "clip" in stages and not (work / "clip" / "final.pt").is_file():
        _train_clip(args, work / "clip", world, tokenizer)
    if "dino" in stages and not (work / "dino" / "tiny_dino.pt").is_file():
        _train_dino(args, work / "dino", world)
    if "iclip" in stages and not (work / "iclip" / "interpretability_head.pt").is_file():
        _train_iclip(args, work, world, tokenizer)
    if "bundle" in stages:
        _bundle(args, work, tokenizer)
    return 0


def _train_clip(args: argparse.Namespace, clip_dir: Path, world: RenderedWorld, tokenizer) -> None:
    """The tiny CLIP, from scratch, with the plain CLIP loss."""
    from captum_iclip.training.iclip import TrainConfig, train

    train(
        TrainConfig(
            mode="full",
            objective="clip",
            batch_size=args.clip_batch_size,
            epochs=args.clip_epochs,
            lr=args.clip_lr,
            wd=0.1,
            warmup=100,
            grad_clip_norm=1.0,
            seed=args.seed,
            device="cpu",
            output_dir=str(clip_dir),
            save_every=25,
            resume="latest",
            workers=0,
            progress=not args.no_progress,
        ),
        model=build_clip(MODEL_CONFIG),
        dataset=world,
        tokenizer=tokenizer,
    )


def _train_dino(args: argparse.Namespace, dino_dir: Path, world: RenderedWorld) -> None:
    """The tiny DINO on the same images (no labels, no captions)."""
    from captum_iclip.training.dino import train_dino

    # One worker augments the next batches while the model trains (same result, faster).
    config = DINOConfig(image_size=IMAGE_SIZE, steps=args.dino_steps, seed=args.seed, data_workers=1)
    train_dino(world.images, config, out_dir=dino_dir, progress=not args.no_progress, resume=True)


def _train_iclip(args: argparse.Namespace, work: Path, world: RenderedWorld, tokenizer) -> None:
    """The interpretability projection over DINO foregrounds, CLIP frozen (projection mode)."""
    from captum_iclip.models.dual import DualProjectionCLIP
    from captum_iclip.training.dino import load_tiny_dino
    from captum_iclip.training.iclip import TrainConfig, train

    dual = DualProjectionCLIP(build_clip(MODEL_CONFIG)).load(work / "clip" / "final.pt")
    masks = _mask_provider(load_tiny_dino(work / "dino"))
    train(
        TrainConfig(
            mode="projection",
            objective="iclip",
            batch_size=args.clip_batch_size,
            epochs=args.iclip_epochs,
            lr=1e-3,
            wd=0.0,
            warmup=20,
            seed=args.seed,
            device="cpu",
            output_dir=str(work / "iclip"),
            save_every=25,
            resume="latest",
            workers=0,
            mask_cache=str(work / "mask-cache"),
            progress=not args.no_progress,
        ),
        model=dual,
        mask_provider=masks,
        dataset=world,
        tokenizer=tokenizer,
    )


def _mask_provider(dino):
    """The bundle's mask source: the tiny DINO's foreground at the bundle's tau, on CLIP-preprocessed inputs."""
    from captum_iclip.masks import DINOMaskProvider

    return DINOMaskProvider(dino, tau=TAU, input_mean=OPENAI_CLIP_MEAN, input_std=OPENAI_CLIP_STD)


def _bundle(args: argparse.Namespace, work: Path, tokenizer) -> None:
    """Measure the trained models as they will ship and write the bundle."""
    from captum_iclip.models.dual import DualProjectionCLIP
    from captum_iclip.training.dino import CONFIG_NAME, load_tiny_dino
    from captum_iclip.world import CATEGORIES, class_names, prompt_for

    clip_dir, dino_dir, iclip_dir = work / "clip", work / "dino", work / "iclip"
    dual = DualProjectionCLIP(build_clip(MODEL_CONFIG)).load(clip_dir / "final.pt")
    dual.load_interpretability(iclip_dir / "interpretability_head.pt")
    # The bundle ships float16 weights: measure the models exactly as they will be loaded.
    dual = dual.half().float().eval()
    dino = load_tiny_dino(dino_dir).half().float().eval()
    # Each stage's own statistics, also when an earlier (killed) run completed it.
    figures: dict = {
        "train_scenes": args.train_scenes,
        "clip": json.loads((clip_dir / "stats.json").read_text()),
        "dino": {
            k: v for k, v in json.loads((dino_dir / CONFIG_NAME).read_text()).get("stats", {}).items() if k != "losses"
        },
        "iclip": json.loads((iclip_dir / "stats.json").read_text()),
        **bundle_figures(dual.clip, tokenizer, _mask_provider(dino), [prompt_for(c) for c in CATEGORIES]),
    }
    write_bundle(Path(args.out), dual, dino_dir, figures, [prompt_for(c) for c in CATEGORIES], class_names())
    summary = {k: v for k, v in figures["recognition"].items() if k != "confusion"}
    print(json.dumps({"recognition": summary, "dino_masks": figures["dino_masks"]}, indent=2))


def write_bundle(out: Path, dual, dino_dir: Path, figures: dict, prompts: list[str], names: list[str]) -> None:
    """Write float16 weights and ``config.json`` (written last: its presence marks a complete bundle)."""
    from captum_iclip.training.dino import CONFIG_NAME, WEIGHTS_NAME

    def half(state):
        return {k: v.detach().cpu().half() if v.is_floating_point() else v.cpu() for k, v in state.items()}

    out.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(half(dual.clip.state_dict()), out / "clip.pt")
    atomic_torch_save(half(dual.interpretability_head.state_dict()), out / "interpretability_head.pt")
    dino_state = torch.load(dino_dir / WEIGHTS_NAME, map_location="cpu", weights_only=True)
    atomic_torch_save(half(dino_state), out / "dino" / WEIGHTS_NAME)
    atomic_write_text(out / "dino" / CONFIG_NAME, (dino_dir / CONFIG_NAME).read_text())
    config = {
        "model_config": MODEL_CONFIG,
        "image_size": IMAGE_SIZE,
        "mean": list(OPENAI_CLIP_MEAN),
        "std": list(OPENAI_CLIP_STD),
        "tau": TAU,
        "class_names": names,
        "prompts": prompts,
        "training": figures,
    }
    atomic_write_text(out / "config.json", json.dumps(config, indent=2, default=str) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
