"""Tests for captum_iclip.masks: top-mass threshold, DINO [CLS] attention, providers, cache."""

import pytest
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer

from captum_iclip.masks import (
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    CachedMaskProvider,
    DINOMaskProvider,
    MaskProvider,
    as_mask_provider,
    cls_attention,
    dino_provider,
    patch_features,
    top_mass_mask,
)


def tiny_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    config = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True)
    config.update(kwargs)
    return VisionTransformer(**config).eval()


def clip_to_dino(images: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    pixels = images * torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1) + torch.tensor(OPENAI_DATASET_MEAN).view(
        1, 3, 1, 1
    )
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class FixedAttentionProvider(DINOMaskProvider):
    """A DINO provider whose attention map is given, to test resampling alone."""

    def __init__(self, attention: torch.Tensor, **kwargs) -> None:
        super().__init__(tiny_vit(), **kwargs)
        self.fixed_attention = attention

    def attention(self, images):
        return self.fixed_attention.expand(images.shape[0], -1, -1)


# --------------------------------------------------------------------------- top_mass_mask
@pytest.mark.parametrize(
    "attention, tau, expected",
    [
        ([0.0, 0.0, 1.0, 0.0], 0.6, [0, 0, 1, 0]),  # one peak holds all the mass
        ([0.5, 0.25, 0.125, 0.125], 0.5, [1, 0, 0, 0]),  # reaching tau exactly stops there
        ([0.5, 0.25, 0.125, 0.125], 0.75, [1, 1, 0, 0]),
        ([0.5, 0.25, 0.125, 0.125], 0.76, [1, 1, 1, 0]),  # ties broken by the lower index
        ([0.25, 0.25, 0.25, 0.25], 0.5, [1, 1, 0, 0]),
        ([0.125, 0.5, 0.0, 0.375], 1.0, [1, 1, 0, 1]),  # tau = 1: every patch with mass
        ([2.0, 6.0, 0.0, 2.0], 0.6, [0, 1, 0, 0]),  # unnormalised maps: fraction of the total
        ([0.0, 0.0, 0.0, 0.0], 0.6, [0, 0, 0, 0]),  # no mass: nothing to select
    ],
)
def test_top_mass_mask_known_answers(attention, tau, expected):
    mask = top_mass_mask(torch.tensor([attention]), tau)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[bool(v) for v in expected]]


def test_top_mass_mask_grid_input_is_flattened_row_major():
    attention = torch.zeros(2, 3, 4)
    attention[0, 1, 2] = 1.0
    attention[1, 2, 0] = 1.0
    mask = top_mass_mask(attention, 0.6)
    assert mask.shape == (2, 12)
    assert mask.nonzero().tolist() == [[0, 1 * 4 + 2], [1, 2 * 4 + 0]]


def test_top_mass_mask_is_the_smallest_set_reaching_tau():
    torch.manual_seed(1)
    attention = torch.rand(50, 37) ** 3
    tau = 0.6
    mask = top_mass_mask(attention, tau)
    total = attention.sum(1)
    kept = (attention * mask).sum(1)
    smallest_kept = torch.where(mask, attention, torch.inf).min(1).values
    largest_dropped = torch.where(mask, -torch.inf, attention).max(1).values
    assert (kept >= tau * total - 1e-6).all()
    assert (kept - smallest_kept < tau * total).all()  # dropping any kept patch falls below tau
    assert (smallest_kept >= largest_dropped).all()  # kept patches are the heaviest


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.01, True])
def test_top_mass_mask_rejects_bad_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        top_mass_mask(torch.rand(1, 4), tau)


def test_top_mass_mask_rejects_bad_attention():
    with pytest.raises(ValueError, match="non-negative"):
        top_mass_mask(torch.tensor([[0.5, -0.1]]), 0.6)
    with pytest.raises(ValueError, match="attention"):
        top_mass_mask(torch.rand(4), 0.6)


# --------------------------------------------------------------------------- cls_attention
def last_block_probabilities(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Full attention matrix of the last block, read from timm's explicit (unfused) path."""
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    captured = []
    handle = attn.attn_drop.register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        model(images)
    handle.remove()
    return captured[0]


@pytest.mark.parametrize("extra", [{}, {"reg_tokens": 3, "qk_norm": True}])
def test_cls_attention_matches_timm_attention_probabilities(extra):
    model = tiny_vit(**extra)
    images = torch.randn(2, 3, 40, 56)  # non-square, not the model's 32 x 32
    with torch.no_grad():
        attention = cls_attention(model, images)
    probabilities = last_block_probabilities(model, images)
    prefix = model.num_prefix_tokens
    assert prefix == 1 + extra.get("reg_tokens", 0)
    assert attention.shape == (2, 5, 7)
    expected = probabilities[:, :, 0, prefix:].mean(1).reshape(2, 5, 7)
    torch.testing.assert_close(attention, expected, rtol=1e-5, atol=1e-7)
    # what is not on the patches went to the prefix tokens
    prefix_mass = probabilities[:, :, 0, :prefix].sum(-1).mean(1)
    torch.testing.assert_close(attention.sum((1, 2)) + prefix_mass, torch.ones(2))


def test_cls_attention_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        cls_attention(tiny_vit(), torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match="dynamic_img_size"):
        cls_attention(tiny_vit(dynamic_img_size=False), torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="images"):
        cls_attention(tiny_vit(), torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="VisionTransformer"):
        cls_attention(torch.nn.Identity(), torch.randn(1, 3, 32, 32))


# --------------------------------------------------------------------------- DINOMaskProvider
def test_dino_provider_converts_normalisation_and_thresholds_on_the_dino_grid():
    model = tiny_vit()
    provider = DINOMaskProvider(model, tau=0.6, image_size=32)
    images = torch.randn(3, 3, 32, 32)
    expected_attention = cls_attention(model, clip_to_dino(images)).detach()
    torch.testing.assert_close(provider.attention(images), expected_attention, rtol=1e-5, atol=1e-7)
    mask = provider(images, (4, 4))  # the DINO grid itself: no resampling
    assert torch.equal(mask, top_mass_mask(expected_attention, 0.6))
    assert not any(p.requires_grad for p in provider.parameters())
    provider.train()
    assert not provider.model.training


def test_dino_provider_resizes_to_the_native_size_by_default():
    provider = DINOMaskProvider(tiny_vit(img_size=48))
    assert provider.dino_size == (48, 48)
    assert provider.attention(torch.randn(1, 3, 224, 224)).shape == (1, 6, 6)


def quadrant_attention(size: int = 14) -> torch.Tensor:
    attention = torch.zeros(1, size, size)
    attention[:, : size // 2, : size // 2] = 1.0
    return attention


@pytest.mark.parametrize("grid, rows", [((7, 7), 4), ((28, 28), 14)])
def test_nearest_resampling_of_a_quadrant_known_answer(grid, rows):
    provider = FixedAttentionProvider(quadrant_attention(), tau=1.0, resample="nearest")
    mask = provider(torch.zeros(2, 3, 32, 32), grid).view(2, *grid)
    expected = torch.zeros(grid, dtype=torch.bool)
    expected[:rows, :rows] = True  # CLIP cell i samples DINO cell floor(i * 14 / grid)
    assert torch.equal(mask, expected.expand(2, -1, -1))


@pytest.mark.parametrize("grid", [(7, 7), (9, 12), (28, 28)])
def test_bilinear_resampling_keeps_a_quadrant_in_its_quadrant(grid):
    provider = FixedAttentionProvider(quadrant_attention(), tau=0.6, resample="bilinear")
    mask = provider(torch.zeros(1, 3, 32, 32), grid).view(*grid)
    rows, cols = mask.nonzero().unbind(1)
    assert mask[0, 0]
    assert rows.max() < (grid[0] + 1) // 2 and cols.max() < (grid[1] + 1) // 2
    assert provider.num_empty_fallbacks == 0


def test_bilinear_threshold_is_applied_after_resampling():
    attention = torch.rand(1, 14, 14)
    provider = FixedAttentionProvider(attention, tau=0.6)
    resampled = torch.nn.functional.interpolate(
        attention[:, None], size=(7, 7), mode="bilinear", align_corners=False, antialias=True
    )[:, 0]
    assert torch.equal(provider(torch.zeros(1, 3, 32, 32), (7, 7)), top_mass_mask(resampled, 0.6))


def test_empty_masks_fall_back_to_all_patches_and_are_counted():
    peak = torch.zeros(1, 14, 14)
    peak[0, 1, 1] = 1.0  # nearest 14 -> 7 samples even rows/cols only: the peak is lost
    provider = FixedAttentionProvider(peak, tau=0.6, resample="nearest")
    mask = provider(torch.zeros(3, 3, 32, 32), (7, 7))
    assert mask.all()
    assert provider.num_empty_fallbacks == 3
    provider(torch.zeros(2, 3, 32, 32), (14, 14))  # on its own grid the peak survives
    assert provider.num_empty_fallbacks == 3

    zero = FixedAttentionProvider(torch.zeros(1, 14, 14), tau=0.6)
    assert zero(torch.zeros(2, 3, 32, 32), (7, 7)).all()
    assert zero.num_empty_fallbacks == 2


def test_dino_provider_rejects_bad_arguments(monkeypatch):
    with pytest.raises(ValueError, match="tau"):
        DINOMaskProvider(tiny_vit(), tau=0.0)
    with pytest.raises(ValueError, match="resample"):
        DINOMaskProvider(tiny_vit(), resample="bicubic")
    with pytest.raises(ValueError, match="image_size"):
        DINOMaskProvider(tiny_vit(), image_size=30)
    with pytest.raises(ValueError, match="model: expected a timm model name, a Hugging Face id or a local folder"):
        DINOMaskProvider("not_a_model_name")
    with pytest.raises(TypeError, match="model"):
        DINOMaskProvider(3)

    import timm

    def offline_create_model(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("Name or service not known")
        return VisionTransformer(**kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create_model)
    with pytest.raises(RuntimeError, match="checkpoint="):
        DINOMaskProvider("vit_small_patch16_224.dino", pretrained=True)


def test_dino_provider_loads_a_wrapped_state_dict_checkpoint(tmp_path):
    import timm

    source = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    path = tmp_path / "dino_teacher.pth"
    # The layout of the original DINO checkpoints: {"teacher": {"backbone.*": ..., "head.*": ...}}
    teacher = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    teacher["head.last_layer.weight"] = torch.zeros(4, 4)
    torch.save({"teacher": teacher}, path)
    provider = DINOMaskProvider("vit_tiny_patch16_224", checkpoint=str(path))
    for name, value in source.state_dict().items():
        assert torch.equal(provider.model.state_dict()[name], value), name
    assert provider.model.dynamic_img_size


# --------------------------------------------------------------------------- Hugging Face
@pytest.fixture(scope="module")
def hf_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=32
    )
    return Dinov2Model(config).eval()


def test_hf_dinov2_provider_agrees_with_output_attentions(hf_dinov2):
    provider = DINOMaskProvider(hf_dinov2, tau=0.6)
    assert hf_dinov2.config._attn_implementation == "eager"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outputs = hf_dinov2(pixel_values=clip_to_dino(images), output_attentions=True)
    expected = outputs.attentions[-1][:, :, 0, 1:].mean(1).reshape(2, 4, 4)
    torch.testing.assert_close(provider.attention(images), expected, rtol=1e-5, atol=1e-7)
    mask = provider(images, (7, 7))
    assert mask.shape == (2, 49) and mask.dtype == torch.bool
    # any size divisible by the patch size, positional embeddings interpolated
    assert cls_attention(hf_dinov2, torch.randn(1, 3, 40, 64)).shape == (1, 5, 8)


# --------------------------------------------------------------------------- patch features (ProxyCLIP's proxy)
def test_patch_features_are_the_last_normed_patch_tokens_as_dinov2_reads_them(hf_dinov2, tmp_path):
    model = tiny_vit(reg_tokens=2, qk_norm=True)
    images = torch.randn(2, 3, 40, 24)
    with torch.no_grad():
        found = patch_features(model, images)
        # DINOv2's get_intermediate_layers(x, reshape=True) (ProxyCLIP's call): the prefix tokens dropped.
        expected = model.get_intermediate_layers(images, n=1, norm=True)[0]
        assert found.grid == (5, 3) and expected.shape == (2, 15, 32)
        torch.testing.assert_close(found.features, F.normalize(expected, dim=-1), rtol=0, atol=1e-6)
        torch.testing.assert_close(found.features.norm(dim=-1), torch.ones(2, 15))
        hf = patch_features(hf_dinov2, images[..., :32, :])
        outputs = hf_dinov2(pixel_values=images[..., :32, :], output_hidden_states=True)
        tokens = hf_dinov2.layernorm(outputs.hidden_states[-1])[:, 1:]
        assert hf.grid == (4, 3)
        torch.testing.assert_close(hf.features, F.normalize(tokens, dim=-1), rtol=0, atol=1e-6)
        # The provider converts CLIP inputs to the DINO normalisation, keeping their size unless told.
        provider = DINOMaskProvider(model)
        converted = patch_features(model, clip_to_dino(images))
        torch.testing.assert_close(provider.patch_features(images).features, converted.features)
        assert provider.patch_features(images, (16, 32)).grid == (2, 4)
    with pytest.raises(TypeError, match="model: expected a timm VisionTransformer"):
        patch_features(torch.nn.Conv2d(3, 3, 8), images)
    with pytest.raises(ValueError, match="divisible"):
        patch_features(model, torch.randn(1, 3, 36, 32))
    cached = CachedMaskProvider(provider, tmp_path)
    assert dino_provider(cached) is provider and dino_provider(provider) is provider
    assert dino_provider(as_mask_provider(torch.ones(1, 4, dtype=torch.bool))) is None


def test_hf_cls_attention_needs_eager_attention():
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=32
    )
    model = ViTModel(config, add_pooling_layer=False).eval()
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="eager"):
        cls_attention(model, torch.randn(1, 3, 32, 32))
    model.set_attn_implementation("eager")
    assert cls_attention(model, torch.randn(1, 3, 48, 40)).shape == (1, 6, 5)


# --------------------------------------------------------------------------- as_mask_provider
def test_as_mask_provider_with_a_fixed_tensor():
    grid = torch.zeros(2, 3, 3, dtype=torch.bool)
    grid[0, 0, 0] = grid[1, 2, 2] = True
    provider = as_mask_provider(grid)
    assert torch.equal(provider(torch.zeros(2, 3, 48, 48), (3, 3)), grid.flatten(1))
    # 0/1 floats, flat layout, and one mask broadcast over the batch
    flat = as_mask_provider(torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    assert flat(torch.zeros(3, 3, 32, 32), (2, 2)).tolist() == [[False, True, True, False]] * 3


def test_as_mask_provider_rejects_bad_masks():
    with pytest.raises(ValueError, match="0 and 1"):
        as_mask_provider(torch.tensor([[0.0, 2.0]]))
    with pytest.raises(ValueError, match="mask"):
        as_mask_provider(torch.ones(2, 2, 2, 2))
    with pytest.raises(ValueError, match="grid"):
        as_mask_provider(torch.ones(2, 3, 3))(torch.zeros(2, 3, 32, 32), (3, 4))
    with pytest.raises(ValueError, match="patches"):
        as_mask_provider(torch.ones(2, 9))(torch.zeros(2, 3, 32, 32), (3, 4))
    with pytest.raises(ValueError, match="batch"):
        as_mask_provider(torch.ones(2, 3, 3))(torch.zeros(3, 3, 32, 32), (3, 3))
    with pytest.raises(TypeError, match="mask_provider: expected a MaskProvider"):
        as_mask_provider("foreground")


def test_as_mask_provider_with_a_callable():
    def left_half(images, grid_size):
        mask = torch.zeros(images.shape[0], *grid_size)
        mask[:, :, : grid_size[1] // 2] = 1
        return mask

    provider = as_mask_provider(left_half)
    mask = provider(torch.zeros(2, 3, 32, 32), (2, 4))
    assert mask.tolist() == [[True, True, False, False, True, True, False, False]] * 2
    assert as_mask_provider(provider) is provider

    bad = as_mask_provider(lambda images, grid_size: torch.ones(images.shape[0], 5))
    with pytest.raises(ValueError, match="shape"):
        bad(torch.zeros(2, 3, 32, 32), (2, 2))
    with pytest.raises(ValueError, match="grid_size"):
        provider(torch.zeros(2, 3, 32, 32), (2, 0))


def test_fixed_empty_masks_fall_back_and_are_counted():
    provider = as_mask_provider(torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))
    assert provider(torch.zeros(2, 3, 16, 16), (2, 2)).tolist() == [[True, False, False, False], [True] * 4]
    assert provider.num_empty_fallbacks == 1


# --------------------------------------------------------------------------- CachedMaskProvider
class CountingProvider(MaskProvider):
    """Foreground = patches whose mean image value is positive; counts the images it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.images_seen = 0

    def compute_mask(self, images, grid_size):
        self.images_seen += images.shape[0]
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.mean(1, keepdim=True), grid_size)
        return (pooled > 0).flatten(1)


def test_cached_provider_hits_misses_and_identical_results(tmp_path):
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    inner = CountingProvider()
    cached = CachedMaskProvider(inner, tmp_path / "masks")
    first = cached(images, (4, 4))
    assert (cached.hits, cached.misses, inner.images_seen) == (0, 4, 4)
    assert torch.equal(first, CountingProvider()(images, (4, 4)))

    second = cached(images, (4, 4))
    assert (cached.hits, cached.misses, inner.images_seen) == (4, 4, 4)
    assert torch.equal(first, second)

    # only the new image is computed; a new grid is a new key
    mixed = torch.cat([images[:2], torch.randn(1, 3, 32, 32)])
    assert torch.equal(cached(mixed, (4, 4))[:2], first[:2])
    assert (cached.hits, cached.misses, inner.images_seen) == (6, 5, 5)
    cached(images[:1], (2, 2))
    assert (cached.hits, cached.misses) == (6, 6)

    files = sorted((tmp_path / "masks").rglob("*"))
    assert len([f for f in files if f.suffix == ".pt"]) == 6
    assert not [f for f in files if f.suffix in (".tmp", ".partial")]

    # a fresh cache object on the same folder reads the same masks
    reopened = CachedMaskProvider(CountingProvider(), tmp_path / "masks")
    assert torch.equal(reopened(images, (4, 4)), first)
    assert (reopened.hits, reopened.misses) == (4, 0)


def test_cached_provider_keys_depend_on_provider_settings(tmp_path):
    images = torch.randn(2, 3, 32, 32)
    model = tiny_vit()
    loose = CachedMaskProvider(DINOMaskProvider(model, tau=0.9), tmp_path)
    strict = CachedMaskProvider(DINOMaskProvider(model, tau=0.3), tmp_path)
    loose_masks, strict_masks = loose(images, (4, 4)), strict(images, (4, 4))
    assert strict.misses == 2 and strict.hits == 0
    assert torch.equal(loose_masks, DINOMaskProvider(model, tau=0.9)(images, (4, 4)))
    assert torch.equal(strict_masks, DINOMaskProvider(model, tau=0.3)(images, (4, 4)))
    assert (loose_masks.sum() > strict_masks.sum()).item()
