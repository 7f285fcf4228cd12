"""Reproduce the bundled ``shapes-tiny`` models: ``python -m captum_iclip.zoo.train``.

Three stages on the procedural world, with fixed seeds, on CPU or a GPU (``--device``):

1. **clip**: a tiny CLIP (open_clip ``CLIP`` from :data:`MODEL_CONFIG`, the real
   open_clip tokenizer) trained from scratch with the plain CLIP loss;
2. **dino**: a tiny ViT trained with DINO on the same images (the mask source);
3. **iclip**: the ICLIP interpretability projection trained on top, with masked
   max pooling, in the configuration the study's pre-registered rule picks
   (:data:`ICLIP_MODE`, :data:`ICLIP_MASKS`: the last vision block trains too, with
   the recognition loss beside the ICLIP one, over a fixed centre box;
   ``--iclip-mode projection`` keeps the CLIP's recognition outputs as they are).

Each stage writes its result atomically and is skipped when rerun, and the two
trainers resume from their own checkpoints, so a killed run continues where it
stopped. The last step writes the bundle (float16 weights and ``config.json``
with the training figures) into ``captum_iclip/zoo/weights/shapes-tiny``.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from captum_iclip._io import atomic_torch_save, atomic_write, atomic_write_text, json_text
from captum_iclip.models.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from captum_iclip.training.dino import DINOConfig
from captum_iclip.world import WorldVariant
from captum_iclip.zoo import WEIGHTS_DIR, build_clip, make_preprocess
from captum_iclip.zoo.quality import MASK_SCENES, REPORT_SCENES

IMAGE_SIZE = 96
TAU = 0.4
DINO_BLOCKS = (1,)
# The bundled ICLIP configuration: the one the study's pre-registered rule picks (docs/study/README.md).
ICLIP_MODE, ICLIP_MASKS = "last-1", "centre"
MODEL_CONFIG: dict = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 6, "width": 192, "head_width": 64, "patch_size": 12},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}


class RenderedWorld(Dataset):
    """World scenes rendered once into memory: items are (normalised image, caption).

    Rendering up front keeps the scenes identical across stages and epochs and
    keeps the generator's cost out of the training loops. Each scene depends only
    on its seed, so rendering in several processes gives the same world.

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
        workers: Rendering processes (``0``: in this process).
        cache_dir: Folder where the rendered world is kept (written atomically,
            read back memory-mapped), so that a resumed run or another stage skips
            the rendering; ``None`` renders every time.
        variant: The :class:`~captum_iclip.world.WorldVariant` of the images (default: the world itself).
        caption_background_prob: With ``caption_colour_prob``, the probability that a caption names
            the background (``None``: the world's own, 0.35).
    """

    def __init__(
        self,
        start_seed: int,
        length: int,
        size: int = IMAGE_SIZE,
        progress: bool = True,
        caption_colour_prob: float | None = None,
        caption_seed: int = 0,
        workers: int = 0,
        cache_dir: str | Path | None = None,
        variant: WorldVariant | None = None,
        caption_background_prob: float | None = None,
    ) -> None:
        if length < 1:
            raise ValueError(f"length: expected at least 1 scene, got {length}")
        if workers < 0:
            raise ValueError(f"workers: expected a non-negative int (0: render in this process), got {workers}")
        variant = WorldVariant() if variant is None else variant
        recipe = (start_seed, length, size, caption_colour_prob, caption_seed, variant, caption_background_prob)
        # The default world keeps the cache names of earlier runs.
        named = recipe[:5] + ((variant.name(), caption_background_prob) if recipe[5:] != (WorldVariant(), None) else ())
        stem = "world-" + "-".join(str(v) for v in named)
        cached = Path(cache_dir) / stem if cache_dir is not None else None
        if cached is not None and (cached / "captions.json").is_file():
            self.images = np.load(cached / "images.npy", mmap_mode="r")
            self.captions = json.loads((cached / "captions.json").read_text())
        else:
            self.images, self.captions = _render(recipe, workers, progress)
            if cached is not None:
                atomic_write(cached / "images.npy", lambda handle: np.save(handle, self.images))
                atomic_write_text(cached / "captions.json", json_text(self.captions))  # last: marks it complete
        self.preprocess = make_preprocess(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int):
        return self.preprocess(np.asarray(self.images[index])), self.captions[index]


_CHUNK = 500  # scenes per rendering task


def _render_chunk(recipe: tuple, first: int) -> tuple[np.ndarray, list[str]]:
    """Scenes ``first`` to ``first + _CHUNK`` (clipped) of the world ``recipe``."""
    from captum_iclip.world import generate_scene, sample_caption

    start_seed, length, size, colour_prob, caption_seed, variant, background_prob = recipe
    indices = range(first, min(first + _CHUNK, length))
    images = np.empty((len(indices), size, size, 3), dtype=np.uint8)
    captions = []
    for row, i in enumerate(indices):
        scene = generate_scene(start_seed + i, size=size, variant=variant)
        images[row] = scene.image
        if colour_prob is None:
            captions.append(scene.caption)
        else:
            rng = np.random.default_rng((caption_seed, start_seed + i))
            words = {} if background_prob is None else {"background_prob": background_prob}
            captions.append(sample_caption(scene, rng, colour_prob=colour_prob, **words))
    return images, captions


def _render(recipe: tuple, workers: int, progress: bool) -> tuple[np.ndarray, list[str]]:
    from functools import partial
    from multiprocessing import get_context

    length = recipe[1]
    firsts = range(0, length, _CHUNK)
    bar = tqdm(total=length, desc="render world", disable=not progress)
    images, captions = [], []
    pool = get_context("fork").Pool(workers) if workers else None
    try:
        chunks = (
            pool.imap(partial(_render_chunk, recipe), firsts) if pool else map(partial(_render_chunk, recipe), firsts)
        )
        for chunk_images, chunk_captions in chunks:
            images.append(chunk_images)
            captions.extend(chunk_captions)
            bar.update(len(chunk_captions))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
    return np.concatenate(images), captions


class CachedTokenizer:
    """A tokenizer that remembers the ids of every caption it has seen.

    Training on a rendered world revisits the same captions every epoch; looking
    their ids up keeps tokenisation off the step's critical path (it costs about
    as much as a GPU step for a batch of 512). Same output as ``tokenizer``.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.rows: dict[str, torch.Tensor] = {}

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self.rows))
        if missing:
            self.rows.update(zip(missing, self.tokenizer(missing)))
        return torch.stack([self.rows[t] for t in texts])


def prompt_templates() -> list[str]:
    """The bundle's prompt templates: the world's caption templates and one per background phrase,
    chosen on the selection range (``python -m captum_iclip.zoo.select --templates``, docs/training-notes.md)."""
    from captum_iclip.world import caption_templates

    return caption_templates(backgrounds=True)


def bundle_figures(
    clip,
    tokenizer,
    mask_provider,
    prompts: list[str],
    templates: list[str] | None,
    recognition_scenes: int = REPORT_SCENES,
    mask_scenes: int = MASK_SCENES,
) -> dict[str, dict]:
    """The bundle's recorded quality figures, on the ``report`` seed range (never used to choose a recipe):
    zero-shot recognition over the shape prompts (ensembled over ``templates``) and the DINO masks on the
    CLIP patch grid."""
    from captum_iclip import CLIPSimilarity
    from captum_iclip.zoo.quality import mask_quality, recognition_report, scene_range

    preprocess = make_preprocess(IMAGE_SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    sim = CLIPSimilarity(clip, tokenizer, prompts, templates=templates).eval()
    side = IMAGE_SIZE // sim.adapter.patch_size[0]
    with torch.no_grad():
        recognition = recognition_report(sim, scene_range("report", recognition_scenes, IMAGE_SIZE), preprocess)
        masks = mask_quality(mask_provider, scene_range("report", mask_scenes, IMAGE_SIZE), preprocess, (side, side))
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
    parser.add_argument("--train-scenes", type=int, default=100000)
    parser.add_argument(
        "--dino-scenes", type=int, default=60000, help="the DINO trains on the first this many training scenes"
    )
    parser.add_argument(
        "--caption-colour-prob",
        type=float,
        default=0.3,
        help="probability that a training caption names an object's colour (the world's own captions: 0.9)",
    )
    parser.add_argument(
        "--caption-background-prob",
        type=float,
        default=None,
        help="probability that a training caption names the background (default: the world's own, 0.35)",
    )
    parser.add_argument(
        "--world-backgrounds",
        choices=("textured", "smooth", "uniform"),
        default="textured",
        help="backgrounds of the training world (default: %(default)s; see captum_iclip.world.WorldVariant)",
    )
    parser.add_argument(
        "--object-scale", type=float, default=1.0, help="factor on the training world's object sizes (default: 1)"
    )
    parser.add_argument("--clip-epochs", type=int, default=13)
    parser.add_argument("--clip-batch-size", type=int, default=512)
    parser.add_argument("--clip-lr", type=float, default=1e-3)
    parser.add_argument("--vision-layers", type=int, default=MODEL_CONFIG["vision_cfg"]["layers"])
    parser.add_argument("--vision-width", type=int, default=MODEL_CONFIG["vision_cfg"]["width"])
    parser.add_argument(
        "--patch-size",
        type=int,
        default=MODEL_CONFIG["vision_cfg"]["patch_size"],
        help="vision patch side in pixels; must divide the image side (default: %(default)s)",
    )
    parser.add_argument("--dino-steps", type=int, default=DINOConfig.steps)
    parser.add_argument("--dino-batch-size", type=int, default=DINOConfig.batch_size)
    parser.add_argument("--tau", type=float, default=TAU, help="DINO attention mass kept by the masks")
    parser.add_argument(
        "--dino-blocks",
        default=",".join(str(b) for b in DINO_BLOCKS),
        help="DINO blocks whose [CLS] attention the masks average (comma-separated; -1: the last)",
    )
    parser.add_argument(
        "--iclip-mode",
        default=ICLIP_MODE,
        help="what the ICLIP stage trains: projection, last-<k> or full (default: the study's pick)",
    )
    parser.add_argument(
        "--iclip-masks",
        choices=("dino", "centre", "all"),
        default=ICLIP_MASKS,
        help="foreground masks of the ICLIP stage's masked max pooling (default: the study's pick)",
    )
    parser.add_argument("--iclip-epochs", type=int, default=1)
    parser.add_argument("--iclip-batch-size", type=int, default=128)
    parser.add_argument("--recognition-scenes", type=int, default=REPORT_SCENES, help="report scenes, recognition")
    parser.add_argument("--mask-scenes", type=int, default=MASK_SCENES, help="report scenes, mask quality")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the stages train: cpu, cuda, cuda:1, ...")
    parser.add_argument("--render-workers", type=int, default=0, help="processes rendering the world (0: this one)")
    parser.add_argument("--data-workers", type=int, default=0, help="data-loader processes of each training stage")
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
    from captum_iclip.training.iclip import parse_mode

    try:
        parse_mode(args.iclip_mode)
    except ValueError as error:
        parser.error(f"--iclip-mode: {error}")
    if args.threads:
        torch.set_num_threads(args.threads)

    import open_clip

    from captum_iclip.world import TRAIN_SEED_START

    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    tokenizer = CachedTokenizer(open_clip.SimpleTokenizer(context_length=MODEL_CONFIG["text_cfg"]["context_length"]))
    todo = [
        stage
        for stage, done in (
            ("clip", "clip/final.pt"),
            ("dino", "dino/tiny_dino.pt"),
            ("iclip", "iclip/interpretability_head.pt"),
        )
        if stage in stages and not (work / done).is_file()
    ]
    if todo:
        world = RenderedWorld(
            TRAIN_SEED_START,
            args.train_scenes,
            progress=not args.no_progress,
            caption_colour_prob=args.caption_colour_prob,
            caption_seed=args.seed,
            workers=args.render_workers,
            cache_dir=work / "world",
            variant=WorldVariant(args.world_backgrounds, args.object_scale),
            caption_background_prob=args.caption_background_prob,
        )
    if "clip" in todo:
        _train_clip(args, work / "clip", world, tokenizer)
    if "dino" in todo:
        _train_dino(args, work / "dino", world)
    if "iclip" in todo:
        _train_iclip(args, work, world, tokenizer)
    if "bundle" in stages:
        _bundle(args, work, tokenizer)
    return 0


def clip_model_config(args: argparse.Namespace, work: Path) -> dict:
    """The tiny CLIP's open_clip config: the one the clip stage recorded, else :data:`MODEL_CONFIG`
    with the vision tower's depth, width and patch size from ``args``."""
    recorded = work / "clip" / "model_config.json"
    if recorded.is_file():
        return json.loads(recorded.read_text())
    config = copy.deepcopy(MODEL_CONFIG)
    patch = getattr(args, "patch_size", config["vision_cfg"]["patch_size"])
    if patch < 1 or IMAGE_SIZE % patch:
        raise ValueError(f"--patch-size: expected a divisor of the image side {IMAGE_SIZE}, got {patch}")
    config["vision_cfg"].update(layers=args.vision_layers, width=args.vision_width, patch_size=patch)
    return config


def _train_clip(args: argparse.Namespace, clip_dir: Path, world: RenderedWorld, tokenizer) -> None:
    """The tiny CLIP, from scratch, with the plain CLIP loss."""
    from captum_iclip.training.iclip import TrainConfig, train

    model_config = clip_model_config(args, clip_dir.parent)
    atomic_write_text(clip_dir / "model_config.json", json_text(model_config, indent=2))
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
            device=args.device,
            output_dir=str(clip_dir),
            save_every=25,
            resume="latest",
            workers=args.data_workers,
            progress=not args.no_progress,
        ),
        model=build_clip(model_config),
        dataset=world,
        tokenizer=tokenizer,
    )


def _train_dino(args: argparse.Namespace, dino_dir: Path, world: RenderedWorld) -> None:
    """The tiny DINO on the same images (no labels, no captions)."""
    from captum_iclip.training.dino import train_dino

    # One worker augments the next batches while the model trains (same result, faster).
    config = DINOConfig(
        image_size=IMAGE_SIZE,
        steps=args.dino_steps,
        batch_size=args.dino_batch_size,
        seed=args.seed,
        data_workers=max(args.data_workers, 1),
        device=args.device,
    )
    images = world.images[: args.dino_scenes]
    train_dino(images, config, out_dir=dino_dir, progress=not args.no_progress, resume=True)


def _train_iclip(args: argparse.Namespace, work: Path, world: RenderedWorld, tokenizer) -> None:
    """The interpretability projection (``--iclip-mode``: with the last blocks or every weight too) over
    the ``--iclip-masks`` foregrounds, on the trained CLIP."""
    from captum_iclip.masks import FixedMaskProvider
    from captum_iclip.models.dual import DualProjectionCLIP
    from captum_iclip.models.tiny_dino import load_tiny_dino
    from captum_iclip.training.iclip import TrainConfig, parse_mode, train
    from captum_iclip.zoo.quality import centre_box

    model_config = clip_model_config(args, work)
    dual = DualProjectionCLIP(build_clip(model_config)).load(work / "clip" / "final.pt")
    side = model_config["vision_cfg"]["image_size"] // model_config["vision_cfg"]["patch_size"]
    masks = {
        "dino": lambda: _mask_provider(load_tiny_dino(work / "dino"), args).to(args.device),
        "centre": lambda: FixedMaskProvider(centre_box((side, side))[None]),
        "all": lambda: None,
    }[args.iclip_masks]()
    mode, unlock_blocks = parse_mode(args.iclip_mode)
    train(
        TrainConfig(
            mode=mode,
            unlock_blocks=unlock_blocks,
            objective="iclip",
            batch_size=args.iclip_batch_size,
            epochs=args.iclip_epochs,
            lr=1e-3,
            wd=0.0,
            warmup=20,
            seed=args.seed,
            device=args.device,
            output_dir=str(work / "iclip"),
            save_every=25,
            resume="latest",
            workers=args.data_workers,
            mask_cache=str(work / "mask-cache") if args.iclip_masks == "dino" else None,
            progress=not args.no_progress,
        ),
        model=dual,
        mask_provider=masks,
        dataset=world,
        tokenizer=tokenizer,
    )


def _dino_blocks(args: argparse.Namespace) -> tuple[int, ...]:
    return tuple(int(b) for b in str(args.dino_blocks).split(",") if b.strip())


def _mask_provider(dino, args: argparse.Namespace):
    """The bundle's mask source: the tiny DINO's foreground (``--tau``, ``--dino-blocks``) on CLIP inputs."""
    from captum_iclip.masks import DINOMaskProvider

    return DINOMaskProvider(
        dino, tau=args.tau, input_mean=OPENAI_CLIP_MEAN, input_std=OPENAI_CLIP_STD, blocks=_dino_blocks(args)
    )


def _bundle(args: argparse.Namespace, work: Path, tokenizer) -> None:
    """Measure the trained models as they will ship and write the bundle."""
    from captum_iclip.models.dual import DualProjectionCLIP
    from captum_iclip.models.tiny_dino import CONFIG_NAME, load_tiny_dino
    from captum_iclip.world import CATEGORIES, class_names, prompt_for

    clip_dir, dino_dir, iclip_dir = work / "clip", work / "dino", work / "iclip"
    model_config = clip_model_config(args, work)
    # The ICLIP stage's whole model: beyond projection mode it trained CLIP weights too.
    dual = DualProjectionCLIP(build_clip(model_config)).load(iclip_dir / "final.pt")
    # The bundle ships float16 weights: measure the models exactly as they will be loaded.
    dual = dual.half().float().eval()
    dino = load_tiny_dino(dino_dir).half().float().eval()
    prompts, templates = [prompt_for(c) for c in CATEGORIES], prompt_templates()
    # Each stage's own statistics, also when an earlier (killed) run completed it.
    figures: dict = {
        "train_scenes": args.train_scenes,
        "clip": json.loads((clip_dir / "stats.json").read_text()),
        "dino": {
            k: v for k, v in json.loads((dino_dir / CONFIG_NAME).read_text()).get("stats", {}).items() if k != "losses"
        },
        "iclip": json.loads((iclip_dir / "stats.json").read_text()),
        **bundle_figures(
            dual.clip,
            tokenizer,
            _mask_provider(dino, args),
            prompts,
            templates,
            args.recognition_scenes,
            args.mask_scenes,
        ),
    }
    settings = {
        "tau": args.tau,
        "dino_blocks": list(_dino_blocks(args)),
        "templates": templates,
        "iclip_head": {"mode": args.iclip_mode, "masks": args.iclip_masks},
    }
    write_bundle(Path(args.out), dual, model_config, dino_dir, figures, prompts, class_names(), settings)
    summary = {k: v for k, v in figures["recognition"].items() if k != "confusion"}
    print(json_text({"recognition": summary, "dino_masks": figures["dino_masks"]}, indent=2))


def world_domain() -> dict:
    """The ``domain`` and ``vocabulary`` entries of a bundle trained on the procedural world (what it knows)."""
    from captum_iclip.world.generator import BACKGROUNDS, CATEGORIES, COLOURS

    return {
        "domain": WORLD_DOMAIN,
        "vocabulary": {"classes": list(CATEGORIES), "colours": list(COLOURS), "backgrounds": list(BACKGROUNDS)},
    }


WORLD_DOMAIN = (
    "a miniature for the procedural world of captum_iclip.world: 96-px scenes of ten shapes in eight colours over "
    "ten textured backgrounds, trained on nothing else; its scores on photographs or on prompts outside its "
    "classes are not meaningful"
)


def write_bundle(
    out: Path,
    dual,
    model_config: dict,
    dino_dir: Path,
    figures: dict,
    prompts: list[str],
    names: list[str],
    settings: dict,
) -> None:
    """Write float16 weights and ``config.json`` (written last: its presence marks a complete bundle);
    ``settings`` (mask ``tau`` and ``dino_blocks``, prompt ``templates``, the ``iclip_head`` configuration)
    go into it as they are."""
    from captum_iclip.models.tiny_dino import CONFIG_NAME, WEIGHTS_NAME

    def half(state):
        return {k: v.detach().cpu().half() if v.is_floating_point() else v.cpu() for k, v in state.items()}

    out.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(half(dual.clip.state_dict()), out / "clip.pt")
    atomic_torch_save(half(dual.interpretability_head.state_dict()), out / "interpretability_head.pt")
    dino_state = torch.load(dino_dir / WEIGHTS_NAME, map_location="cpu", weights_only=True)
    atomic_torch_save(half(dino_state), out / "dino" / WEIGHTS_NAME)
    atomic_write_text(out / "dino" / CONFIG_NAME, (dino_dir / CONFIG_NAME).read_text())
    config = {
        "model_config": model_config,
        "image_size": IMAGE_SIZE,
        "mean": list(OPENAI_CLIP_MEAN),
        "std": list(OPENAI_CLIP_STD),
        **settings,
        "class_names": names,
        "prompts": prompts,
        **world_domain(),
        "training": figures,
    }
    atomic_write_text(out / "config.json", json_text(config, indent=2, default=str) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
