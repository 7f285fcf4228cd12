"""Bundled offline models, loaded by name with no network (also ``captum_iclip.zoo.load``).

``shapes-tiny`` is a tiny CLIP (an open_clip model from a custom config, with the
real open_clip tokenizer), a tiny self-supervised DINO ViT used as the mask
source, and the ICLIP interpretability projection, all trained on the
procedural world (:mod:`captum_iclip.world`) by ``python -m captum_iclip.zoo.train``. Their weights ship
in ``captum_iclip/zoo/weights`` (package data beside the recipe that writes them).

Examples::

    >>> from captum_iclip import zoo, CLIPSimilarity, ITSMAttribution
    >>> bundle = zoo.load("shapes-tiny")
    >>> sim = CLIPSimilarity(bundle.dual, bundle.tokenizer, bundle.prompts, templates=bundle.templates)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from captum_iclip._io import load_torch_file
from captum_iclip.devices import check_device
from captum_iclip.masks import DINOMaskProvider
from captum_iclip.models.dual import DualProjectionCLIP
from captum_iclip.models.tiny_dino import load_tiny_dino
from captum_iclip.preprocess import make_preprocess

# CAPTUM_ICLIP_ZOO_DIR points at another folder of bundles (e.g. one trained with zoo.train --out).
WEIGHTS_DIR = Path(os.environ.get("CAPTUM_ICLIP_ZOO_DIR") or Path(__file__).parents[1] / "zoo" / "weights")


@dataclass
class ZooBundle:
    """Everything a bundled model needs to be used."""

    name: str
    clip: nn.Module  # the open_clip CLIP model (recognition)
    dual: nn.Module  # DualProjectionCLIP around ``clip`` (interpretability projection)
    tokenizer: Callable
    preprocess: Callable  # PIL image or uint8 (H, W, 3) array -> (3, S, S) tensor
    mask_provider: nn.Module  # DINO foreground masks on the CLIP patch grid
    class_names: list[str]
    prompts: list[str]  # one per class except the background
    image_size: int
    templates: list[str] | None = None  # prompt templates to ensemble over (CLIPSimilarity(templates=...))
    info: dict = field(default_factory=dict)  # training figures
    domain: str | None = None  # what the model was trained on (config.json "domain")
    vocabulary: dict = field(default_factory=dict)  # the words it knows: "classes", "colours", "backgrounds"

    @property
    def model(self) -> nn.Module:
        """The model to explain: the dual-projection CLIP."""
        return self.dual

    def prompts_outside(self, prompts) -> list[str]:
        """The prompts that name none of the bundle's classes (its vocabulary's ``classes``, plural or not).

        Examples::

            >>> bundle = load("shapes-tiny")
            >>> bundle.prompts_outside(["a red circle", "two stars", "a cat"])
            ['a cat']
        """
        classes = {word.lower() for word in self.vocabulary.get("classes", [])}
        if not classes:
            return []

        def names_a_class(prompt: str) -> bool:
            words = re.findall(r"[a-z]+", prompt.lower())
            return any(word in classes or (word.endswith("s") and word[:-1] in classes) for word in words)

        return [prompt for prompt in prompts if not names_a_class(prompt)]

    def domain_messages(self, prompts) -> list[str]:
        """What a command says about these prompts with this bundle: one note on its domain, and a warning
        naming the prompts outside its classes (empty when the bundle records no domain)."""
        if not self.domain:
            return []
        messages = [f"note: {self.name} is {self.domain}."]
        outside = self.prompts_outside(prompts)
        if outside:
            shown = ", ".join(repr(prompt) for prompt in outside[:5]) + (" ..." if len(outside) > 5 else "")
            messages.append(
                f"warning: {len(outside)} of {len(prompts)} prompts name none of {self.name}'s classes "
                f"({', '.join(self.vocabulary['classes'])}): {shown}; its scores and maps for them mean nothing"
            )
        return messages


def available() -> list[str]:
    """Names of the bundled models whose weights are present."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "config.json").is_file())


def build_clip(model_config: dict) -> nn.Module:
    """An open_clip ``CLIP`` from a model-config dict (as in open_clip's model_configs/*.json)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    return CLIP(
        embed_dim=model_config["embed_dim"],
        vision_cfg=CLIPVisionCfg(**model_config["vision_cfg"]),
        text_cfg=CLIPTextCfg(**model_config["text_cfg"]),
    )


def load(name: str = "shapes-tiny", device: str = "cpu") -> ZooBundle:
    """Load a bundled model offline.

    Args:
        name: a name from :func:`available`.
        device: torch device.

    Returns:
        A :class:`ZooBundle` in eval mode, in float32.
    """
    import open_clip

    check_device(device)
    if name not in available():
        raise ValueError(f"name: expected a bundled model, one of {available()}, got {name!r}")
    folder = WEIGHTS_DIR / name
    config = json.loads((folder / "config.json").read_text())
    clip = build_clip(config["model_config"])
    clip.load_state_dict(_float32(load_torch_file(folder / "clip.pt", "name")))
    mean, std = config["mean"], config["std"]
    clip.visual.image_mean, clip.visual.image_std = tuple(mean), tuple(std)
    clip = clip.to(device).eval()
    dual = DualProjectionCLIP(clip)
    head = load_torch_file(folder / "interpretability_head.pt", "name")
    dual.interpretability_head.load_state_dict(_float32(head))
    dual = dual.to(device).eval()
    dino = load_tiny_dino(folder / "dino").to(device).eval()
    blocks = tuple(config.get("dino_blocks", (-1,)))
    masks = DINOMaskProvider(dino, tau=config["tau"], input_mean=mean, input_std=std, blocks=blocks).to(device)
    tokenizer = open_clip.SimpleTokenizer(context_length=config["model_config"]["text_cfg"]["context_length"])
    return ZooBundle(
        name=name,
        clip=clip,
        dual=dual,
        tokenizer=tokenizer,
        preprocess=make_preprocess(config["image_size"], mean, std),
        mask_provider=masks,
        class_names=list(config["class_names"]),
        prompts=list(config["prompts"]),
        image_size=int(config["image_size"]),
        templates=config.get("templates"),
        info=config.get("training", {}),
        domain=config.get("domain"),
        vocabulary=config.get("vocabulary", {}),
    )


def _float32(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # Weights ship in float16 to stay small; compute in float32.
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
