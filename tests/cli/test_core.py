"""The shared core of the commands: the one loader, the method registry, the attribution base, the world dataset."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

import captum_iclip
from captum_iclip import CLIPSimilarity, DualProjectionCLIP, ITSMAttribution, MaskedMaxPoolingAttribution, zoo
from captum_iclip.attr.base import CLIPMapAttribution
from captum_iclip.datasets import WorldScenes, build_dataset
from captum_iclip.evaluation.methods import (
    REGISTRY,
    MethodInfo,
    available_methods,
    build_method,
    method_names,
    register_method,
)
from captum_iclip.masks import DINOMaskProvider
from captum_iclip.world import HELDOUT_SEED_START, generate_scene

TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def bundled():
    if "shapes-tiny" not in zoo.available():
        pytest.fail("the bundled model shapes-tiny is missing from captum_iclip/zoo/weights")
    return captum_iclip.load()


def registered_tiny_model(folder, name: str):
    """A tiny open_clip ViT registered under ``name`` from a config file in ``folder``, its random weights
    saved as a checkpoint: ``(config path, checkpoint path, the model)``."""
    config = folder / f"{name}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    checkpoint = folder / f"{name}.pt"
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint, model


# --------------------------------------------------------------------------- loader
def test_load_defaults_to_the_bundled_model_with_its_mask_source(bundled):
    assert bundled.name == "shapes-tiny" and bundled.image_size == 96
    assert isinstance(bundled.model, DualProjectionCLIP) and isinstance(bundled.mask_provider, DINOMaskProvider)
    assert bundled.bundle.class_names[0] == "background"
    scene = generate_scene(HELDOUT_SEED_START)
    assert bundled.preprocess(scene.pil()).shape == (3, 96, 96)


def test_load_open_clip_from_a_model_config_and_checkpoint(tmp_path):
    config, checkpoint, reference = registered_tiny_model(tmp_path, "tiny-core-vit")

    loaded = captum_iclip.load(model_config=str(config), checkpoint=str(checkpoint))
    assert loaded.name == f"tiny-core-vit/{checkpoint}" and loaded.image_size == 32 and loaded.mask_provider is None
    for (name, ours), theirs in zip(loaded.model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), name
    with pytest.raises(ValueError, match=r"model: expected the name registered by model_config \('tiny-core-vit'"):
        captum_iclip.load("ViT-B-16", model_config=str(config))
    with pytest.raises(captum_iclip.loading.loader.WeightsUnavailableError, match="checkpoint: expected a file"):
        captum_iclip.load("tiny-core-vit", checkpoint=str(tmp_path / "missing.pt"))


def test_load_takes_what_iclip_training_wrote(tmp_path, capsys):
    config, checkpoint, base = registered_tiny_model(tmp_path, "tiny-iclip-vit")
    # A last-k run changes CLIP weights and the head: final.pt holds both, the head file the head alone.
    trained = DualProjectionCLIP(open_clip.create_model("tiny-iclip-vit")).eval()
    trained.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in trained.state_dict().items()})
    trained.save(tmp_path / "final.pt")
    trained.save_interpretability(tmp_path / "interpretability_head.pt")
    common = dict(model_config=str(config), checkpoint=str(checkpoint))

    whole = captum_iclip.load(**common, iclip=str(tmp_path / "final.pt")).model
    assert isinstance(whole, DualProjectionCLIP) and not whole.training
    for (name, ours), theirs in zip(whole.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(ours, theirs), name
    head_only = captum_iclip.load(**common, iclip=str(tmp_path / "interpretability_head.pt")).model
    for (name, ours), theirs in zip(head_only.clip.state_dict().items(), base.state_dict().values()):
        assert torch.equal(ours, theirs), name  # the checkpoint's CLIP, the trained head
    for ours, theirs in zip(head_only.interpretability_head.parameters(), trained.interpretability_head.parameters()):
        assert torch.equal(ours, theirs)

    with pytest.raises(ValueError, match="iclip: expected a final.pt or interpretability_head.pt file"):
        captum_iclip.load(**common, iclip=str(tmp_path / "missing.pt"))
    with pytest.raises(
        ValueError, match="iclip: expected a dual-projection model or an interpretability head saved by captum-iclip"
    ):
        captum_iclip.load(**common, iclip=str(checkpoint))
    with pytest.raises(ValueError, match="iclip: expected weights trained for shapes-tiny"):
        captum_iclip.load("shapes-tiny", iclip=str(tmp_path / "final.pt"))
    # The commands take it as --iclip, and their errors name the option.
    from captum_iclip.cli import main

    argv = ["explain", "x.png", "--prompts", "a", "--out", str(tmp_path / "o.png")]
    assert main([*argv, "--iclip", str(checkpoint)]) == 2
    assert "--iclip: expected a dual-projection model or an interpretability head" in capsys.readouterr().err


def test_load_reads_a_hugging_face_folder_given_as_the_spec(tmp_path, hf_tokenizer):
    config = CLIPConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=8,
            image_size=32,
        ),
        text_config=dict(
            vocab_size=len(hf_tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            bos_token_id=hf_tokenizer.bos_token_id,
            eos_token_id=hf_tokenizer.eos_token_id,
            pad_token_id=hf_tokenizer.pad_token_id,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    reference = CLIPModel(config).eval()
    folder = tmp_path / "hf-clip"
    reference.save_pretrained(folder)
    hf_tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)

    loaded = captum_iclip.load(str(folder))
    assert isinstance(loaded.model, CLIPModel) and loaded.name == str(folder) and loaded.image_size == 32
    image = generate_scene(HELDOUT_SEED_START, size=48).pil()
    pixels = loaded.preprocess(image)[None]
    assert pixels.shape == (1, 3, 32, 32)
    with torch.no_grad():
        ours = loaded.model.vision_model(pixel_values=pixels).pooler_output
        theirs = reference.vision_model(pixel_values=pixels).pooler_output
    assert torch.equal(ours, theirs)


def test_mask_source_reads_every_kind_of_dino_spec():
    assert captum_iclip.mask_source(None) is None
    tiny = captum_iclip.mask_source(str(zoo.WEIGHTS_DIR / "shapes-tiny" / "dino"), tau=0.5)
    assert isinstance(tiny, DINOMaskProvider) and tiny.tau == 0.5
    images = torch.zeros(2, 3, 96, 96)
    assert tiny(images, (6, 6)).shape == (2, 36)
    with pytest.raises(ValueError, match="dino_checkpoint: expected a timm model name"):
        captum_iclip.mask_source(str(zoo.WEIGHTS_DIR / "shapes-tiny" / "dino"), checkpoint="weights.pth")


# --------------------------------------------------------------------------- registry and "raw"
def test_raw_means_the_recognition_projection_everywhere(bundled):
    sim = CLIPSimilarity(bundled.model, bundled.tokenizer, bundled.bundle.prompts)
    images = torch.stack([bundled.preprocess(generate_scene(HELDOUT_SEED_START + i).pil()) for i in range(2)])
    target = torch.tensor([0, 3])
    itsm = ITSMAttribution(sim)
    raw = build_method("raw", sim)(images, target)
    iclip = build_method("iclip", sim)(images, target)
    assert torch.equal(raw, itsm.attribute(images, target=target, variant="plain", projection="recognition"))
    # On a dual model ITSM's default is the interpretability projection: the registry's "iclip".
    assert torch.equal(iclip, itsm.attribute(images, target=target))
    assert not torch.allclose(raw, iclip)


def test_registry_entries_build_maps_and_new_methods_are_one_call(bundled):
    assert method_names()[:7] == ("raw", "surgery", "iclip", "mmp", "gradcam", "ig", "occlusion")
    plain_sim = CLIPSimilarity(bundled.model.clip, bundled.tokenizer, bundled.bundle.prompts)
    assert available_methods(plain_sim)["iclip"] is False
    with pytest.raises(ValueError, match="method: expected a method that applies to this model, got 'iclip'"):
        build_method("iclip", plain_sim)
    with pytest.raises(ValueError, match=r"name: expected a new method name, got 'raw'"):
        register_method(REGISTRY["raw"])
    with pytest.raises(ValueError, match="kind: expected one of"):
        register_method(MethodInfo("x", "X", "k", "magic", REGISTRY["raw"].build))

    info = register_method(
        MethodInfo(
            "test-negated-raw",
            "negated raw",
            "black",
            "itsm",
            lambda sim, options: lambda x, t: -build_method("raw", sim)(x, t),
            itsm=("plain", "recognition"),
        )
    )
    try:
        assert "test-negated-raw" in method_names() and info.applies_to(plain_sim)
        images = bundled.preprocess(generate_scene(HELDOUT_SEED_START).pil())[None]
        assert torch.equal(
            build_method("test-negated-raw", plain_sim)(images, torch.tensor([1])),
            -build_method("raw", plain_sim)(images, torch.tensor([1])),
        )
    finally:
        del REGISTRY["test-negated-raw"]


def test_patch_grid_methods_give_their_maps_before_upsampling(bundled):
    sim = CLIPSimilarity(bundled.model, bundled.tokenizer, bundled.bundle.prompts)
    images = torch.stack([bundled.preprocess(generate_scene(HELDOUT_SEED_START + i).pil()) for i in range(2)])
    target = torch.tensor([0, 3])
    for name, info in REGISTRY.items():
        if not info.patch_grid:
            with pytest.raises(ValueError, match=f"upsample: expected True for '{name}'"):
                build_method(name, sim, mask_provider=bundled.mask_provider, upsample=False)
            continue
        grid = build_method(name, sim, mask_provider=bundled.mask_provider, upsample=False)(images, target)
        assert grid.shape == (2, 1, 8, 8), name  # 96 px, patch 12
    itsm = ITSMAttribution(sim)
    expected = itsm.attribute(images, target=target, variant="plain", projection="recognition", interpolate=False)
    assert torch.equal(build_method("raw", sim, upsample=False)(images, target), expected)
    # ProxyCLIP's maps are on its proxy's grid (12 x 12 for the bundled tiny DINO), not the patch grid.
    assert {n for n, i in REGISTRY.items() if not i.patch_grid} == {"ig", "occlusion", "proxyclip"}


def test_map_methods_share_one_base_and_differ_only_where_documented(bundled):
    sim = CLIPSimilarity(bundled.model, bundled.tokenizer, bundled.bundle.prompts)
    itsm, mmp = ITSMAttribution(sim), MaskedMaxPoolingAttribution(sim)
    assert isinstance(itsm, CLIPMapAttribution) and isinstance(mmp, CLIPMapAttribution)
    assert itsm.resolve_projection("auto") == mmp.resolve_projection("auto") == "interpretability"
    images = bundled.preprocess(generate_scene(HELDOUT_SEED_START).pil())[None]
    # MMP's per-call mask goes through the provider's checks: an empty mask means every patch.
    empty = torch.zeros(1, 64, dtype=torch.bool)  # the 8 x 8 patch grid
    torch.testing.assert_close(mmp.attribute(images, target=0, mask=empty), mmp.attribute(images, target=0))
    with pytest.raises(ValueError, match="mask"):
        mmp.attribute(images, target=0, mask=torch.full((1, 64), 2))


def test_dual_adapter_is_built_once_and_follows_a_new_head(bundled):
    dual = DualProjectionCLIP(bundled.model.clip)
    adapter = dual.adapter
    assert dual.adapter is adapter and adapter.interpretability_head is dual.interpretability_head
    dual.interpretability_head = dual.adapter.make_interpretability_head()
    assert dual.adapter is not adapter and dual.adapter.interpretability_head is dual.interpretability_head
    assert "_adapter" not in dict(dual.named_modules()) and all("_adapter" not in k for k in dual.state_dict())


# --------------------------------------------------------------------------- world dataset
def test_world_scenes_are_the_generators_scenes():
    scenes = build_dataset("world", str(HELDOUT_SEED_START + 7), limit=3)
    assert isinstance(scenes, WorldScenes) and len(scenes) == 3 and scenes.background_index == 0
    image, label, name = scenes[2]
    expected = generate_scene(HELDOUT_SEED_START + 9)
    assert np.array_equal(np.asarray(image), expected.image) and np.array_equal(label, expected.label)
    assert label.dtype == np.int64 and name == f"world-{HELDOUT_SEED_START + 9}"
    assert len(WorldScenes("heldout")) == 100
    with pytest.raises(ValueError, match="root: expected 'heldout' or a non-negative first seed, got 'VOCdevkit'"):
        WorldScenes("VOCdevkit")


def test_no_function_of_the_package_is_over_80_lines():
    import ast
    from pathlib import Path

    package = Path(captum_iclip.__file__).parent
    long = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.relative_to(package)}:{node.lineno} {node.name}")
    assert not long, long


def test_a_missing_extra_is_named_in_the_error(monkeypatch):
    import sys

    from captum_iclip._optional import require

    monkeypatch.setitem(sys.modules, "webdataset", None)  # what Python sees when a package is not installed
    with pytest.raises(
        ImportError, match=r"shards: expected the optional dependency 'webdataset'.*captum-iclip\[train\]"
    ):
        require("webdataset", "shards")
    assert require("numpy", "anything") is np
