"""One tokenization rule per model family: ICLIP training embeds a caption exactly as the explanations
embed the same prompt (``VisionAdapter.text_inputs``), for open_clip CLIP, Hugging Face CLIP, SigLIP and
SigLIP 2, each with a tokenizer built here (the Hub is out of reach)."""

from __future__ import annotations

import json
import string

import open_clip
import pytest
import torch
from conftest import _seeded
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    Siglip2Config,
    Siglip2Model,
    SiglipConfig,
    SiglipModel,
)

from captum_iclip import CLIPSimilarity
from captum_iclip.training.iclip import ICLIPTrainer, TrainConfig, _setup_distributed

# Prompts of different lengths (padding matters) and with capitals (SigLIP 2 lowercases).
PROMPTS = ["a photo of a cat", "A Red Car", "dog"]
WORDS = ["<pad>", "<unk>", "a", "photo", "of", "cat", "dog", "red", "car"]
CONTEXT = 8
TOWER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
# SigLIP pools its last token; the default begin/end ids (of a 32k vocabulary) would not fit this one.
NO_BOS_EOS = dict(bos_token_id=None, eos_token_id=None)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer standing in for SigLIP's SentencePiece one (case-sensitive, like it)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", model_max_length=CONTEXT
    )


def clip_tokenizer(folder) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` on a character-level vocabulary (as conftest's ``hf_tokenizer``)."""
    symbols = string.ascii_lowercase
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({f"{s}</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder))


def open_clip_family(tmp_path):
    vision = CLIPVisionCfg(layers=1, width=16, head_width=8, patch_size=8, image_size=16)
    text = CLIPTextCfg(context_length=16, vocab_size=49408, width=16, heads=2, layers=1)
    model = _seeded(lambda: CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text), seed=30, jitter=0.1)
    return model, open_clip.get_tokenizer("ViT-B-16", context_length=16), 16


def hf_clip_family(tmp_path):
    tokenizer = clip_tokenizer(tmp_path)
    text = dict(
        TOWER,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(TOWER, patch_size=8, image_size=16)
    config = CLIPConfig(vision_config=vision, text_config=text, projection_dim=8)
    return _seeded(lambda: CLIPModel(config), seed=31, jitter=0.1), tokenizer, 16


def hf_siglip_family(tmp_path):
    text = dict(TOWER, vocab_size=len(WORDS), max_position_embeddings=CONTEXT, pad_token_id=0, **NO_BOS_EOS)
    config = SiglipConfig(vision_config=dict(TOWER, patch_size=8, image_size=16), text_config=text)
    return _seeded(lambda: SiglipModel(config), seed=32, jitter=0.1), word_tokenizer(), 16


def hf_siglip2_family(tmp_path):
    text = dict(TOWER, vocab_size=len(WORDS), max_position_embeddings=CONTEXT, pad_token_id=0, **NO_BOS_EOS)
    config = Siglip2Config(vision_config=dict(TOWER, patch_size=8, num_patches=4), text_config=text)
    return _seeded(lambda: Siglip2Model(config), seed=33, jitter=0.1), word_tokenizer(), 16


FAMILIES = {
    "open_clip": open_clip_family,
    "hf_clip": hf_clip_family,
    "hf_siglip": hf_siglip_family,
    "hf_siglip2": hf_siglip2_family,
}


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_training_embeds_a_caption_as_the_explanation_embeds_the_prompt(family, tmp_path):
    model, tokenizer, size = FAMILIES[family](tmp_path)
    config = TrainConfig(mode="projection", batch_size=2, epochs=1, workers=0, output_dir=str(tmp_path / "run"))
    dataset = [(torch.zeros(3, size, size), prompt) for prompt in PROMPTS]
    trainer = ICLIPTrainer(config, _setup_distributed("cpu"), model, dataset=dataset, tokenizer=tokenizer)
    parts = trainer.parts
    images = torch.zeros(len(PROMPTS), 3, size, size)
    # What train_step feeds the loss as the text side of a batch of these captions.
    trained = parts.forward(images, parts.text_inputs(PROMPTS), None)["text"]

    explained = CLIPSimilarity(trainer.dual, tokenizer, PROMPTS).text_features
    torch.testing.assert_close(trained, explained, rtol=0, atol=1e-6)
    assert not torch.allclose(explained[0], explained[1], atol=1e-3)  # the prompts are told apart
