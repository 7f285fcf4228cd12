"""Shared fixtures: real CLIP architectures with random weights, built once per session.

Building a ViT-B takes seconds on a CPU, so every model fixture is session-scoped
and tests only read from them (eval mode, no parameter updates). Images are tiny
batches (1-2) of seeded noise; parity and invariance checks do not need natural
images.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from captum_iclip import CLIPSimilarity

PROMPTS = ["a photo of a cat", "a photo of a dog", "a red car"]


def _seeded(build: Callable[[], torch.nn.Module], seed: int = 0, jitter: float = 0.0) -> torch.nn.Module:
    """Build ``model`` under ``seed``, frozen and in eval mode.

    ``jitter`` adds N(0, jitter^2) noise to every parameter, so that biases (zero
    at init) and norm scales (one at init) take generic values and a check that
    forgets one of them fails.
    """
    torch.manual_seed(seed)
    # open_clip warns (on the root logger) that no pretrained weights were loaded:
    # random weights are what these tests want.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        model = build().eval()
    finally:
        root.setLevel(level)
    model.requires_grad_(False)
    if jitter:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(jitter * torch.randn_like(param))
    return model


def make_images(*shape: int, seed: int = 0) -> torch.Tensor:
    """Seeded standard-normal images, shaped like preprocessed CLIP inputs."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


@pytest.fixture
def network_cut(monkeypatch, tmp_path):
    """No network (every connection and name lookup fails) and an empty Hugging Face cache."""
    from huggingface_hub import constants

    def cut(*args, **kwargs):
        raise OSError("network unreachable (cut by the test)")

    monkeypatch.setattr(socket.socket, "connect", cut)
    monkeypatch.setattr(socket, "getaddrinfo", cut)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture(scope="session", autouse=True)
def _one_cpu_thread():
    # On a shared, oversubscribed CPU, torch's intra-op threads spin-wait on each
    # other: one thread ran a ViT-B/32 forward ~8x faster than two when measured.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- full-size architectures ---------------------------------------------------------
@pytest.fixture(scope="session")
def vit_b16() -> CLIP:
    return _seeded(lambda: open_clip.create_model("ViT-B-16"))


@pytest.fixture(scope="session")
def vit_b32() -> CLIP:
    return _seeded(lambda: open_clip.create_model("ViT-B-32"), seed=1)


@pytest.fixture(scope="session")
def rn50() -> CLIP:
    return _seeded(lambda: open_clip.create_model("RN50"), seed=2)


@pytest.fixture(scope="session")
def tokenizer():
    """open_clip's BPE tokenizer (bundled with the package, no download)."""
    return open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` read from a character-level vocab.json / merges.txt.

    The Hub is out of reach, so the files are written here in the format
    ``from_pretrained`` reads: every letter as a word piece and as a word end.
    """
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    symbols = string.ascii_lowercase + ".,'"
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({f"{s}</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="session")
def hf_clip(hf_tokenizer) -> CLIPModel:
    """transformers ``CLIPModel`` with a ViT-B/16 vision tower (a 2-layer text tower keeps it quick)."""
    config = CLIPConfig(
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            patch_size=16,
            image_size=224,
        ),
        text_config=dict(
            vocab_size=len(hf_tokenizer),
            num_hidden_layers=2,
            bos_token_id=hf_tokenizer.bos_token_id,
            eos_token_id=hf_tokenizer.eos_token_id,
            pad_token_id=hf_tokenizer.pad_token_id,
        ),
        projection_dim=512,
    )
    return _seeded(lambda: CLIPModel(config), seed=3)


# --- tiny architectures for hand-checkable surgery -------------------------------------
# open_clip's own BPE vocabulary, so that ``tiny_tokenizer`` can feed the text tower.
TINY_TEXT = CLIPTextCfg(context_length=16, vocab_size=49408, width=16, heads=2, layers=1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """open_clip's BPE tokenizer cut to the tiny text tower's 16-token context."""
    return open_clip.get_tokenizer("ViT-B-16", context_length=16)


@pytest.fixture(scope="session")
def tiny_vit() -> CLIP:
    """open_clip ViT: 2 blocks, width 16, 2 heads of 8, 4-px patches on 8x8 images (2x2 grid)."""
    vision = CLIPVisionCfg(layers=2, width=16, head_width=8, patch_size=4, image_size=8)
    return _seeded(lambda: CLIP(embed_dim=8, vision_cfg=vision, text_cfg=TINY_TEXT), seed=4, jitter=0.1)


@pytest.fixture(scope="session")
def tiny_resnet() -> CLIP:
    """open_clip ModifiedResNet: one bottleneck per stage, width 8, 64x64 images (2x2 grid)."""
    vision = CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, head_width=8, image_size=64)
    return _seeded(lambda: CLIP(embed_dim=8, vision_cfg=vision, text_cfg=TINY_TEXT), seed=5, jitter=0.1)


def _hf_clip(layers: int, image_size: int, seed: int) -> CLIPModel:
    """A random transformers CLIPModel of width 16, 2 heads and 4-px patches (jittered, eval mode)."""
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        patch_size=4,
        image_size=image_size,
    )
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(vision_config=vision, text_config=text, projection_dim=8)
    return _seeded(lambda: CLIPModel(config), seed=seed, jitter=0.1)


@pytest.fixture(scope="session")
def tiny_hf() -> CLIPModel:
    """transformers CLIPModel: 2 layers, 8x8 images."""
    return _hf_clip(layers=2, image_size=8, seed=6)


@pytest.fixture(scope="session")
def small_vit() -> CLIP:
    """open_clip ViT: 3 blocks, width 16, 2 heads, 4-px patches on 16x16 images (4x4 grid)."""
    vision = CLIPVisionCfg(layers=3, width=16, head_width=8, patch_size=4, image_size=16)
    return _seeded(lambda: CLIP(embed_dim=8, vision_cfg=vision, text_cfg=TINY_TEXT), seed=11, jitter=0.1)


@pytest.fixture(scope="session")
def small_hf() -> CLIPModel:
    """transformers CLIPModel: 3 layers, 16x16 images (4x4 grid)."""
    return _hf_clip(layers=3, image_size=16, seed=12)


# --- the other families, small: open_clip timm towers, Hugging Face SigLIP ---------------------
#: Input side of the small SigLIP, EVA and Hugging Face SigLIP towers: a 4x4 grid of 8-px patches.
TOWER_SIDE = 32
TOWER_TEXT = CLIPTextCfg(
    context_length=8, vocab_size=64, width=16, heads=2, layers=1, no_causal_mask=True, pool_type="last", proj_bias=True
)


def timm_clip(trunk_builder, embed_dim: int, pool: str, proj, image_size: int, logit_bias=None, shell=None):
    """An open_clip ``CustomTextCLIP`` whose ``TimmModel`` tower runs ``trunk_builder()``.

    open_clip's ``TimmModel`` takes a timm model *name*; a small trunk of the same class
    and pooling is swapped in after construction (``shell`` is the cheap registered
    name open_clip builds first; ``None`` builds the trunk by name directly).
    """

    def build():
        vision = CLIPVisionCfg(
            timm_model_name=shell or trunk_builder, timm_pool=pool, timm_proj=proj, image_size=image_size
        )
        model = open_clip.CustomTextCLIP(embed_dim, vision, TOWER_TEXT, init_logit_bias=logit_bias)
        if shell is not None:
            model.visual.trunk = trunk_builder()
        return model

    return _seeded(build, seed=7, jitter=0.05)


def siglip_tower(logit_bias: float | None = -10.0, **blocks):
    """ViT-B-16-SigLIP's tower (timm VisionTransformer, no class token, MAP head), small; ``blocks`` go to
    the VisionTransformer (e.g. another ``block_fn``)."""
    from timm.models.vision_transformer import VisionTransformer

    return timm_clip(
        lambda: VisionTransformer(
            img_size=TOWER_SIDE,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            class_token=False,
            global_pool="map",
            num_classes=0,
            **blocks,
        ),
        32,
        pool="map",
        proj="none",
        image_size=TOWER_SIDE,
        logit_bias=logit_bias,
        shell="vit_tiny_patch16_224",
    )


@pytest.fixture(scope="session")
def siglip():
    return siglip_tower()


@pytest.fixture(scope="session")
def vit_avg():
    """A timm ViT with a class token, 2 registers and average pooling (fc_norm after the pool)."""
    from timm.models.vision_transformer import VisionTransformer

    return timm_clip(
        lambda: VisionTransformer(
            img_size=TOWER_SIDE,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            reg_tokens=2,
            global_pool="avg",
            num_classes=16,
        ),
        16,
        pool="avg",
        proj=None,
        image_size=TOWER_SIDE,
        shell="vit_tiny_patch16_224",
    )


@pytest.fixture(scope="session")
def eva02():
    """EVA02-B-16's tower (timm Eva: rotary embedding, SwiGLU, inner attention norm, token pool), small."""
    from timm.models.eva import Eva

    return timm_clip(
        lambda: Eva(
            img_size=TOWER_SIDE,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            qkv_fused=False,
            mlp_ratio=4 * 2 / 3,
            swiglu_mlp=True,
            scale_mlp=True,
            scale_attn_inner=True,
            use_rot_pos_emb=True,
            ref_feat_shape=(4, 4),
            global_pool="token",
            num_classes=16,
        ),
        16,
        pool="token",
        proj=None,
        image_size=TOWER_SIDE,
        shell="vit_tiny_patch16_224",
    )


def _siglip_text() -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
        max_position_embeddings=8,
    )


@pytest.fixture(scope="session")
def hf_siglip():
    """transformers SiglipModel: 2 layers of width 32, 8-px patches on 32x32 images."""
    from transformers import SiglipConfig, SiglipModel

    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=8,
        image_size=TOWER_SIDE,
    )
    return _seeded(
        lambda: SiglipModel(SiglipConfig(vision_config=vision, text_config=_siglip_text())), seed=8, jitter=0.05
    )


@pytest.fixture(scope="session")
def hf_siglip2():
    """Siglip2Model (NaFlex: linear patch embedding, resized position grid), 4x4 position grid of 8-px patches."""
    from transformers import Siglip2Config, Siglip2Model

    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8, num_patches=16
    )
    return _seeded(
        lambda: Siglip2Model(Siglip2Config(vision_config=vision, text_config=_siglip_text())), seed=9, jitter=0.05
    )


# --- forward functions -----------------------------------------------------------------
@pytest.fixture(scope="session")
def sim_b32(vit_b32, tokenizer) -> CLIPSimilarity:
    return CLIPSimilarity(vit_b32, tokenizer, PROMPTS)


# --- helpers of the tests of several folders (hardening, fuzzing) ------------------------------
def one_error_line(capsys, prog: str) -> str:
    """The error a command printed: no traceback, and its last stderr line is ``<prog>: error: ...``
    (progress bars and log lines may come before); returns the message."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n"), err
    match = re.fullmatch(rf"{re.escape(prog)}: error: (.+)", err.splitlines()[-1].split("\r")[-1])
    assert match, err
    return match.group(1)


def _write_training_csv(folder: Path, images: int, corrupt: bool = False) -> Path:
    """A tab-separated training CSV of ``images`` random 40-px PNGs (or, with ``corrupt``, files that are none)."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    rows = []
    for index in range(images):
        name = f"images/{index}.png"
        if corrupt:
            (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / name)
        rows.append(f"{name}\ta shape number {index}")
    path = folder / "train.csv"
    path.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def _tiny_open_clip_config(folder: Path) -> Path:
    """A tiny open_clip architecture written to ``folder`` and registered with open_clip under its file's stem."""
    path = folder / "tiny-hardening.json"
    path.write_text(
        json.dumps(
            {
                "embed_dim": 8,
                "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
                "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
            }
        )
    )
    open_clip.add_model_config(path)
    return path


def strict_json(text: str):
    """``json.loads`` as a strict reader (JavaScript's JSON.parse, jq) parses: no NaN / Infinity."""

    def refuse(token: str):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


@dataclass
class Part:
    """One argument of a fuzz case: its value, whether it is valid, and what it means when it is."""

    value: Any
    valid: bool
    meaning: Any = None


# --- datasets in the training-free segmentation benchmarks' on-disk formats ------------------------
def _write_jpeg(path: Path, rng: np.random.Generator, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=95)


def _write_label_png(path: Path, label: np.ndarray, palette: bool = False) -> None:
    """An 8-bit label PNG: greyscale, or (VOC) palette indices whose colours are not the indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        image.putpalette(list(range(255, -1, -1)) * 3)
    image.save(path)


def write_benchmark_dataset(root: Path, benchmark: str, sizes: list[tuple[int, int]], seed: int = 0) -> Path:
    """A tiny dataset of ``benchmark`` (a name of ``evaluation.benchmarks.BENCHMARKS``) in its real layout,
    one random image and label per (height, width) of ``sizes``; returns the root ``--root`` takes.

    Label values cover the raw encoding of each format: VOC's palette indices with 255 borders, PASCAL
    Context's 0..59, COCO-Stuff's raw category ids − 1 (things, stuff, 255 unlabeled), Cityscapes' train
    ids with 255, ADE20K's 0..150.
    """
    rng = np.random.default_rng(seed)
    ids = [f"s{i:03d}" for i in range(len(sizes))]

    def labels(values: np.ndarray, height: int, width: int) -> np.ndarray:
        # Blocks of a few classes, so that a class covers an area (the area threshold has work to do).
        blocks = rng.choice(values, size=(-(-height // 8), -(-width // 8)))
        return np.kron(blocks, np.ones((8, 8), dtype=np.int64))[:height, :width]

    if benchmark in ("voc21", "voc20", "context60", "context59"):
        voc = benchmark.startswith("voc")
        base = root / "VOCdevkit" / ("VOC2012" if voc else "VOC2010")
        label_dir, split_dir = (
            ("SegmentationClass", "Segmentation") if voc else ("SegmentationClassContext", "SegmentationContext")
        )
        values = np.array([0, 3, 8, 15, 20, 255]) if voc else np.array([0, 1, 7, 30, 59, 255])
        for sample, (height, width) in zip(ids, sizes):
            _write_jpeg(base / "JPEGImages" / f"{sample}.jpg", rng, height, width)
            _write_label_png(base / label_dir / f"{sample}.png", labels(values, height, width), palette=voc)
        split = base / "ImageSets" / split_dir / "val.txt"
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_text("\n".join(ids) + "\n")
        return root
    if benchmark in ("coco-object", "coco-stuff"):
        for sample, (height, width) in zip(ids, sizes):
            _write_jpeg(root / "images" / "val2017" / f"{sample}.jpg", rng, height, width)
            raw = labels(np.array([0, 2, 61, 95, 156, 180, 255]), height, width)  # things, stuff, unlabeled
            _write_label_png(root / "annotations" / "val2017" / f"{sample}.png", raw)
        return root
    if benchmark == "cityscapes":
        for sample, (height, width) in zip(ids, sizes):
            stem = f"bonn_000000_{sample[1:]}"
            _write_jpeg(root / "leftImg8bit" / "val" / "bonn" / f"{stem}_leftImg8bit.png", rng, height, width)
            label = labels(np.array([0, 2, 10, 13, 18, 255]), height, width)
            _write_label_png(root / "gtFine" / "val" / "bonn" / f"{stem}_gtFine_labelTrainIds.png", label)
        return root
    if benchmark == "ade20k":
        base = root / "ADEChallengeData2016"
        for number, (height, width) in enumerate(sizes, start=1):
            stem = f"ADE_val_{number:08d}"
            _write_jpeg(base / "images" / "validation" / f"{stem}.jpg", rng, height, width)
            _write_label_png(
                base / "annotations" / "validation" / f"{stem}.png", labels(np.array([0, 1, 13, 150]), height, width)
            )
        return root
    raise ValueError(f"benchmark: expected a benchmark name, got {benchmark!r}")
