"""Loading SigLIP offline: a Hugging Face ``SiglipModel`` folder (--hf-model DIR) through the loader and
the ``explain`` command, and the clear message when a tokenizer cannot be fetched."""

from __future__ import annotations

import open_clip
import pytest
import torch
from conftest import _seeded
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel

from captum_iclip import CLIPSimilarity
from captum_iclip.cli import main
from captum_iclip.loading.loader import WeightsUnavailableError, load_clip

WORDS = ["<pad>", "<unk>", "a", "photo", "of", "cat", "dog", "red", "car"]


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    """A SiglipModel folder as save_pretrained writes it: weights, image processor; no tokenizer yet."""
    folder = tmp_path_factory.mktemp("siglip")
    config = SiglipConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=8,
            image_size=32,
        ),
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=len(WORDS),
            max_position_embeddings=8,
            pad_token_id=0,
        ),
    )
    _seeded(lambda: SiglipModel(config), seed=20, jitter=0.05).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def add_tokenizer(folder):
    """A word-level fast tokenizer (the hub's SentencePiece files are out of reach offline)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", model_max_length=8
    ).save_pretrained(folder)


def test_missing_tokenizers_get_the_offline_message(siglip_folder, monkeypatch):
    with pytest.raises(WeightsUnavailableError, match="hf_model: expected a tokenizer available offline") as err:
        load_clip(hf_model=str(siglip_folder))
    assert "CLIPSimilarity(model, text_features=...)" in str(err.value)

    def offline(name, *args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights must not be fetched before the tokenizer")

    monkeypatch.setattr(open_clip, "get_tokenizer", offline)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_weights)
    with pytest.raises(WeightsUnavailableError, match=r"hf download timm/ViT-B-16-SigLIP2"):
        load_clip("ViT-B-16-SigLIP2", "webli")


def test_hf_siglip_folder_loads_and_explains(siglip_folder, tmp_path):
    add_tokenizer(siglip_folder)
    loaded = load_clip(hf_model=str(siglip_folder))
    assert isinstance(loaded.model, SiglipModel)
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    pixels = loaded.preprocess(image)
    assert pixels.shape == (3, 32, 32)

    prompts = ["a red car", "a photo of a dog"]
    sim = CLIPSimilarity(loaded.model, loaded.tokenizer, prompts, output="logits")
    batch = loaded.tokenizer(prompts, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        expected = loaded.model(input_ids=batch["input_ids"], pixel_values=pixels[None]).logits_per_image
        torch.testing.assert_close(sim(pixels[None]), expected, rtol=1e-5, atol=1e-5)

    image.save(tmp_path / "red.png")
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "explain",
                str(tmp_path / "red.png"),
                "--hf-model",
                str(siglip_folder),
                "--prompts",
                "a red car,a photo of a dog",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert out.stat().st_size > 0


def test_hf_siglip2_folder_matches_its_own_processor(tmp_path):
    """A Siglip2Model folder: our (3, H, W) preprocessing and dense adapter give the embedding that the
    model computes from its own NaFlex image processor's output."""
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model

    config = Siglip2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=8,
            num_patches=16,
        ),
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=len(WORDS),
            max_position_embeddings=8,
            pad_token_id=0,
        ),
    )
    _seeded(lambda: Siglip2Model(config), seed=21, jitter=0.05).save_pretrained(tmp_path)
    processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=16)
    processor.save_pretrained(tmp_path)
    add_tokenizer(tmp_path)
    loaded = load_clip(hf_model=str(tmp_path))
    assert isinstance(loaded.model, Siglip2Model)

    generator = torch.Generator().manual_seed(22)
    image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy())
    pixels = loaded.preprocess(image)
    assert pixels.shape == (3, 32, 32)
    sim = CLIPSimilarity(loaded.model, loaded.tokenizer, ["a red car", "a cat"])
    with torch.no_grad():
        own = loaded.model.get_image_features(**processor(images=image, return_tensors="pt"))
        own = own if isinstance(own, torch.Tensor) else own.pooler_output
        torch.testing.assert_close(sim.adapter.encode_image(pixels[None]), own, rtol=0, atol=1e-5)
