"""Captum's perturbation methods on image segments (docs/methods.md §11): known answers computed by hand from
the forward function, Shapley completeness, the patch grid against Captum's Occlusion, DINO segments of the
bundled model, and bad input."""

from __future__ import annotations

import pytest
import torch
from captum.attr import FeatureAblation, FeaturePermutation, Lime, Occlusion, ShapleyValues, ShapleyValueSampling
from conftest import make_images

from captum_iclip import CLIPSimilarity, ImageSegments, SegmentAttribution, zoo
from captum_iclip.world import HELDOUT_SEED_START, generate_scene


@pytest.fixture(scope="module")
def sim(small_vit):
    """A 3-block open_clip ViT, 16-px images of a 4x4 grid of 4-px patches, 3 random prompts."""
    return CLIPSimilarity(small_vit, text_features=torch.randn(3, 8, generator=torch.Generator().manual_seed(21)))


@pytest.fixture(scope="module")
def images():
    return make_images(2, 3, 16, 16, seed=22)


def user_labels() -> torch.Tensor:
    """Two images, segments of unequal sizes with gaps in their ids; image 1 lacks id 9."""
    labels = torch.zeros(2, 16, 16, dtype=torch.int32)
    labels[0, :, 5:] = 4
    labels[0, 10:, :] = 9
    labels[1, 3:13, 2:7] = 4
    return labels


def score(sim, images, target):
    with torch.no_grad():
        return sim(images)[torch.arange(images.shape[0]), target]


def test_feature_ablation_is_the_drop_when_each_segment_is_filled_with_the_baseline(sim, images):
    labels, colour, target = user_labels(), torch.tensor([0.5, -1.0, 0.2]), torch.tensor([2, 0])
    segments = ImageSegments(labels)
    assert segments.ids.tolist() == [0, 4, 9] and segments.present.tolist() == [[True, True, True], [True, True, False]]
    maps = SegmentAttribution(sim).attribute(images, target=target, segments=segments, baselines=colour)
    assert maps.shape == (2, 1, 16, 16)

    expected = torch.zeros(2, 3)
    for position, segment_id in enumerate(segments.ids):
        removed = torch.where((labels == segment_id)[:, None], colour.reshape(1, 3, 1, 1), images)
        expected[:, position] = score(sim, images, target) - score(sim, removed, target)
    assert expected[1, 2] == 0  # image 1 has no pixel of id 9: filling it changes nothing
    assert (segments.values(maps)[:, 0] - expected).abs().max() <= 1e-6
    # Every pixel holds its segment's value.
    assert torch.equal(
        maps[:, 0], torch.gather(segments.values(maps)[:, 0], 1, segments.labels.flatten(1)).view(2, 16, 16)
    )


def test_shapley_sampling_is_complete_for_every_prompt(sim, images):
    segments = ImageSegments(user_labels())
    torch.manual_seed(0)
    maps = SegmentAttribution(sim, ShapleyValueSampling).attribute(images, segments=segments, n_samples=3)
    assert maps.shape == (2, 3, 16, 16)
    with torch.no_grad():
        drop = sim(images) - sim(torch.zeros_like(images))  # every segment filled with the default baseline 0
    assert (segments.values(maps).sum(-1) - drop).abs().max() <= 1e-5
    # target=None is every prompt's own run.
    torch.manual_seed(0)
    one = SegmentAttribution(sim, ShapleyValueSampling).attribute(images, target=1, segments=segments, n_samples=3)
    assert (segments.values(one)[:, 0].sum(-1) - drop[:, 1]).abs().max() <= 1e-5


def test_patch_grid_aligns_with_the_patches_and_equals_captums_occlusion(sim, images):
    segments = ImageSegments.patch_grid(sim, images)
    patch_index = torch.arange(16).reshape(4, 4).repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.equal(segments.labels, patch_index[None])
    coarse = ImageSegments.patch_grid(sim, images, cell=(2, 3))  # a 2x2 grid of cells, the right ones cut short
    cells = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 1], [2, 2, 2, 3], [2, 2, 2, 3]])
    assert torch.equal(coarse.labels[0], cells.repeat_interleave(4, 0).repeat_interleave(4, 1))

    maps = SegmentAttribution(sim).attribute(images, target=[1, 2], segments=segments, perturbations_per_eval=4)
    with torch.no_grad():
        windows = Occlusion(sim).attribute(
            images, target=torch.tensor([1, 2]), sliding_window_shapes=(3, 4, 4), strides=(3, 4, 4), baselines=0.0
        )
    assert (maps - windows[:, :1]).abs().max() <= 1e-6


@pytest.fixture(scope="module")
def bundle():
    bundle = zoo.load("shapes-tiny")
    sim = CLIPSimilarity(bundle.clip, bundle.tokenizer, bundle.prompts, templates=bundle.templates)
    scenes = [generate_scene(HELDOUT_SEED_START + i, size=bundle.image_size) for i in range(2)]
    return bundle, sim, torch.stack([bundle.preprocess(scene.image) for scene in scenes])


def test_dino_segments_are_the_foreground_and_the_background_and_shapley_values_are_exact(bundle):
    bundle, sim, images = bundle
    foreground = bundle.mask_provider(images, (8, 8)).reshape(2, 8, 8)
    segments = ImageSegments.from_masks(bundle.mask_provider, sim, images)
    assert torch.equal(segments.labels, foreground.long().repeat_interleave(12, 1).repeat_interleave(12, 2))

    maps = SegmentAttribution(sim, ShapleyValues).attribute(images, target=0, segments=segments)
    # With two players, phi_fg = ((v(fg) - v(none)) + (v(all) - v(bg))) / 2, where v(S) keeps the segments S.
    pixels = foreground.repeat_interleave(12, 1).repeat_interleave(12, 2)[:, None]

    def v(keep: torch.Tensor) -> torch.Tensor:
        return score(sim, torch.where(keep, images, torch.zeros(())), 0)

    none, fg, bg, every = v(torch.zeros_like(pixels)), v(pixels), v(~pixels), v(torch.ones_like(pixels))
    expected = torch.stack([((bg - none) + (every - fg)) / 2, ((fg - none) + (every - bg)) / 2], dim=1)
    assert (segments.values(maps)[:, 0] - expected).abs().max() <= 1e-6


def test_components_split_the_foreground_into_its_4_connected_parts(sim, images):
    foreground = torch.zeros(2, 4, 4, dtype=torch.bool)
    # Three parts in image 0: cells that touch only at a corner are not connected.
    foreground[0, 0, :2] = foreground[0, 1, 2] = foreground[0, 2, 3] = foreground[0, 3, 2:] = True
    foreground[1, 1:3, 1:3] = True
    segments = ImageSegments.from_masks(foreground, sim, images, components=True)
    expected = torch.tensor(
        [
            [[1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 3], [0, 0, 3, 3]],
            [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]],
        ]
    )
    assert torch.equal(segments.labels, expected.repeat_interleave(4, 1).repeat_interleave(4, 2))
    assert segments.present.tolist() == [[True, True, True, True], [True, True, False, False]]


def test_lime_runs_as_captums_own_on_the_feature_mask(sim, images):
    from captum._utils.models.linear_model import SGDLasso

    segments = ImageSegments.patch_grid(sim, images, cell=2)
    torch.manual_seed(3)
    ours = SegmentAttribution(sim, Lime, interpretable_model=SGDLasso()).attribute(
        images[:1], target=1, segments=segments, n_samples=12
    )
    torch.manual_seed(3)
    theirs = Lime(sim, interpretable_model=SGDLasso()).attribute(
        images[:1], target=1, feature_mask=segments.feature_mask(images[:1]), n_samples=12, baselines=0.0
    )
    assert torch.equal(ours, theirs[:, :1])


@pytest.mark.parametrize(
    "labels, error, message",
    [
        (torch.rand(2, 16, 16), TypeError, r"segments: expected integer segment labels, got dtype torch.float32"),
        (torch.zeros(2, 8, 8, dtype=torch.long), ValueError, r"segments: expected labels of shape \(2, 16, 16\)"),
        (torch.zeros(3, 16, 16, dtype=torch.long), ValueError, r"segments: expected labels of shape \(2, 16, 16\)"),
        (torch.zeros(16, 16, dtype=torch.long), ValueError, r"segments: expected \(N, H, W\) labels, got shape"),
        (torch.zeros(2, 0, 16, dtype=torch.long), ValueError, r"segments: expected at least one pixel"),
        (-torch.ones(2, 16, 16, dtype=torch.long), ValueError, r"segments: expected non-negative segment ids, got -1"),
        ([[0, 1]], TypeError, r"segments: expected an \(N, H, W\) tensor of integer labels, got list"),
    ],
    ids=["float", "size", "batch", "rank", "empty", "negative", "list"],
)
def test_bad_segments_name_the_argument(sim, images, labels, error, message):
    with pytest.raises(error, match=message):
        SegmentAttribution(sim).attribute(images, target=0, segments=labels)


def test_bad_arguments_name_the_argument(sim, images):
    segments = ImageSegments.patch_grid(sim, images, cell=2)
    for method in (Occlusion, FeaturePermutation, FeatureAblation(sim)):
        with pytest.raises(TypeError, match=r"method: expected one of Captum's classes FeatureAblation, "):
            SegmentAttribution(sim, method)
    with pytest.raises(TypeError, match=r"forward_func: expected a captum_iclip.CLIPSimilarity"):
        SegmentAttribution(lambda x: x.sum((1, 2, 3)))
    with pytest.raises(ValueError, match=r"cell: expected a positive int or a pair of positive ints"):
        ImageSegments.patch_grid(sim, images, cell=0)
    run = SegmentAttribution(sim).attribute
    with pytest.raises(ValueError, match=r"feature_mask: expected none \(the segments give"):
        run(images, target=0, segments=segments, feature_mask=segments.feature_mask(images))
    with pytest.raises(ValueError, match=r"baselines: expected a \(3,\) colour or a tensor broadcastable"):
        run(images, target=0, segments=segments, baselines=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"baselines: expected a finite number, got inf"):
        run(images, target=0, segments=segments, baselines=float("inf"))
    with pytest.raises(ValueError, match=r"baselines: expected finite values"):
        run(images, target=0, segments=segments, baselines=torch.tensor([0.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match=r"target: expected prompt indices in 0..2"):
        run(images, target=3, segments=segments)
    with pytest.raises(ValueError, match=r"attributions: expected \(N, K, 16, 16\) maps"):
        segments.values(torch.zeros(2, 1, 8, 8))
