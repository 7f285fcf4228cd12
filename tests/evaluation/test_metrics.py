"""Known answers for the localization, segmentation and faithfulness metrics."""

from __future__ import annotations

import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from captum.attr import InputXGradient, Saliency

from captum_iclip.evaluation import (
    LocalizationMetrics,
    SegmentationMetrics,
    expand_attributions,
    gaussian_perturbation,
    infidelity_score,
    patch_perturbation,
    segment_from_maps,
    sensitivity_score,
    sliding_window,
)


def _square_scene(size: int = 32) -> torch.Tensor:
    gt = torch.zeros(size, size, dtype=torch.long)
    gt[4:12, 6:14] = 3
    return gt


# ---------------------------------------------------------------- localization


def test_perfect_map_scores_100():
    gt = _square_scene()
    metric = LocalizationMetrics(5)
    metric.update((gt == 3).float()[None] * 7.0 - 2.0, [3], gt)  # any affine scale
    result = metric.compute()
    assert result["miou"] == 100.0
    assert result["msc"] == 100.0
    assert result["pointing"] == 100.0
    assert result["per_class_iou"] == {3: 100.0}
    assert result["pairs"] == 1


def test_inverted_and_constant_maps():
    gt = _square_scene()
    inverted = LocalizationMetrics(5)
    inverted.update((gt != 3).float()[None], [3], gt)
    assert inverted.compute()["msc"] == -100.0
    assert inverted.compute()["miou"] == 0.0
    constant = LocalizationMetrics(5)
    constant.update(torch.full((1, 32, 32), 0.3), [3], gt)
    result = constant.compute()
    assert result["msc"] == 0.0
    assert result["miou"] == 0.0  # nothing reaches theta
    assert result["pointing"] == 0.0  # a constant map points nowhere


def test_ignore_pixels_are_excluded_everywhere():
    gt = _square_scene()
    gt[24:, 24:] = 255
    scores = (gt == 3).float()
    scores[24:, 24:] = 5.0  # hottest spot, but ignored and > 15 px from the square
    metric = LocalizationMetrics(5)
    metric.update(scores[None], [3], gt)
    result = metric.compute()
    assert (result["miou"], result["msc"], result["pointing"]) == (100.0, 100.0, 100.0)


def test_low_resolution_maps_are_resized_bilinearly():
    gt = torch.zeros(8, 8, dtype=torch.long)
    gt[:, :4] = 1
    metric = LocalizationMetrics(2)
    metric.update(torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), [1], gt)
    # Bilinear 2 -> 8 gives columns 1, 1, .875, .625, .375, .125, 0, 0.
    expected_sc = (1 + 1 + 0.875 + 0.625) / 4 - (0.375 + 0.125) / 4
    result = metric.compute()
    assert result["miou"] == 100.0
    assert result["msc"] == pytest.approx(100 * expected_sc, abs=1e-7)


def test_hand_computed_accumulation_over_images():
    # Maps already span [0, 1] on the valid pixels, so normalisation keeps them.
    gt_a = torch.tensor([[1, 1, 2, 2], [0, 0, 2, 2]])
    maps_a = torch.tensor(
        [
            [[1.0, 0.4, 0.6, 0.0], [0.2, 0.0, 0.0, 0.0]],  # class 1
            [[0.0, 0.0, 0.9, 1.0], [0.0, 0.0, 0.3, 0.7]],  # class 2
        ],
        dtype=torch.float64,
    )
    gt_b = torch.tensor([[1, 255, 0], [1, 1, 0]])
    maps_b = torch.tensor([[[0.5, 9.0, 1.0], [0.0, 0.9, 0.2]]], dtype=torch.float64)  # 9.0: ignored
    metric = LocalizationMetrics(3, pointing_tolerance=0)
    metric.update(maps_a, [1, 2], gt_a)
    metric.update(maps_b, torch.tensor([1]), gt_b.numpy())
    # Class 1, image A: predicted {(0,0),(0,2)}, mask {(0,0),(0,1)}: I=1, U=3.
    # Class 1, image B: predicted {(0,0),(0,2),(1,1)}, mask {(0,0),(1,0),(1,1)}: I=2, U=4.
    # Class 2, image A: predicted {(0,2),(0,3),(1,3)}, mask = columns 2-3: I=3, U=4.
    assert metric.intersection.tolist() == [0, 3, 3]
    assert metric.union.tolist() == [0, 7, 4]
    sc_1a = (1 + 0.4) / 2 - (0.6 + 0.2) / 6
    sc_2a = (0.9 + 1 + 0.3 + 0.7) / 4 - 0
    sc_1b = (0.5 + 0.0 + 0.9) / 3 - (1.0 + 0.2) / 2
    # Pointing (tolerance 0): A1 argmax (0,0) hit; A2 argmax (0,3) hit; B1 argmax (0,2) miss.
    result = metric.compute()
    assert result["pairs"] == 3
    assert result["per_class_iou"] == pytest.approx({1: 100 * 3 / 7, 2: 75.0})
    assert result["miou"] == pytest.approx((100 * 3 / 7 + 75.0) / 2)
    # Contrasts are summed in fixed point (2^-32 steps), hence the tolerance.
    assert result["msc"] == pytest.approx(100 * (sc_1a + sc_2a + sc_1b) / 3, abs=1e-7)
    assert result["pointing"] == pytest.approx(200 / 3)
    assert result["per_class_pointing"] == pytest.approx({1: 50.0, 2: 100.0})


def test_pointing_tolerance_is_a_disk():
    gt = torch.zeros(64, 64, dtype=torch.long)
    gt[10, 10] = 1

    def hit(row: int, col: int) -> float:
        metric = LocalizationMetrics(2, pointing_tolerance=15)
        scores = torch.zeros(1, 64, 64)
        scores[0, row, col] = 1.0
        metric.update(scores, [1], gt)
        return metric.compute()["pointing"]

    assert hit(25, 10) == 100.0  # distance 15
    assert hit(26, 10) == 0.0  # distance 16
    assert hit(19, 22) == 100.0  # distance 15 (9, 12)
    assert hit(21, 21) == 0.0  # distance 15.6: inside the square, outside the disk


def test_background_excluded_and_absent_classes_skipped():
    gt = _square_scene()
    maps = torch.stack([(gt == 0).float(), (gt == 3).float(), torch.rand(32, 32)])
    metric = LocalizationMetrics(5)
    metric.update(maps, [0, 3, 4], gt)  # 0 excluded, 4 absent from gt
    assert metric.compute()["pairs"] == 1
    everything = LocalizationMetrics(5, exclude=())
    everything.update(maps, [0, 3, 4], gt)
    result = everything.compute()
    assert result["pairs"] == 2 and result["miou"] == 100.0


def test_for_dataset_excludes_only_the_background():
    class Reader:
        num_classes, ignore_index = 4, 255

    with_background, without = Reader(), Reader()
    with_background.background_index, without.background_index = 0, None
    assert LocalizationMetrics.for_dataset(with_background).exclude == (0,)
    metric = LocalizationMetrics.for_dataset(without, theta=0.3)
    assert (metric.exclude, metric.theta, metric.num_classes) == ((), 0.3, 4)


def test_localization_rejects_bad_input():
    gt = _square_scene()
    metric = LocalizationMetrics(5)
    with pytest.raises(ValueError, match="one class per map"):
        metric.update(torch.rand(2, 32, 32), [3], gt)
    with pytest.raises(ValueError, match="distinct"):
        metric.update(torch.rand(2, 32, 32), [3, 3], gt)
    with pytest.raises(ValueError, match=r"classes: expected ids in \[0, 5\)"):
        metric.update(torch.rand(1, 32, 32), [5], gt)
    with pytest.raises(ValueError, match="finite"):
        metric.update(torch.full((1, 32, 32), math.nan), [3], gt)
    with pytest.raises(ValueError, match=r"gt: expected class ids in \[0, "):
        metric.update(torch.rand(1, 32, 32), [3], gt + 7)
    with pytest.raises(TypeError, match="gt: expected integer class ids"):
        metric.update(torch.rand(1, 32, 32), [3], gt.float())
    with pytest.raises(ValueError, match="theta"):
        LocalizationMetrics(5, theta=1.5)


def _random_scenes(count: int, num_classes: int = 6, seed: int = 0):
    """Deterministic (maps, classes, gt) triples with ignore pixels and odd map sizes."""
    generator = torch.Generator().manual_seed(seed)
    scenes = []
    for _ in range(count):
        gt = torch.randint(0, num_classes, (4, 5), generator=generator)
        gt = gt.repeat_interleave(6, 0).repeat_interleave(6, 1)  # blobs of 6x6
        gt[torch.rand(gt.shape, generator=generator) < 0.05] = 255
        classes = gt[gt != 255].unique()
        maps = torch.randn(len(classes), 12, 15, generator=generator)
        scenes.append((maps, classes, gt))
    return scenes


def _localization(scenes) -> LocalizationMetrics:
    metric = LocalizationMetrics(6)
    for maps, classes, gt in scenes:
        metric.update(maps, classes, gt)
    return metric


def _segmentation(scenes) -> SegmentationMetrics:
    metric = SegmentationMetrics(6)
    for maps, classes, gt in scenes:
        full = torch.nn.functional.interpolate(maps[None], size=gt.shape, mode="bilinear")[0]
        metric.update(segment_from_maps(full, classes=classes), gt)
    return metric


def test_merge_and_state_of_halves_equal_the_whole():
    scenes = _random_scenes(10)
    whole = _localization(scenes)
    first, second = _localization(scenes[:4]), _localization(scenes[4:])
    restored = LocalizationMetrics(6)
    restored.load_state(first.state())
    restored.merge(second)
    assert restored.compute() == whole.compute()
    assert whole.compute()["pairs"] > 20
    seg_whole = _segmentation(scenes)
    seg_merged = _segmentation(scenes[:4]).merge(_segmentation(scenes[4:]))
    assert seg_merged.compute() == seg_whole.compute()
    with pytest.raises(ValueError, match="configuration"):
        restored.merge(LocalizationMetrics(6, theta=0.3))
    with pytest.raises(ValueError, match="keys"):
        restored.load_state({"union": torch.zeros(6, dtype=torch.long)})


def _distributed_worker(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        scenes = _random_scenes(9)[rank::world_size]  # uneven shards: 5 and 4 images
        localization = _localization(scenes).all_reduce()
        segmentation = _segmentation(scenes).all_reduce()
        torch.save((localization.compute(), segmentation.compute()), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_gloo_processes_equals_one_process(tmp_path):
    world_size = 2
    mp.spawn(
        _distributed_worker,
        args=(world_size, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)),
        nprocs=world_size,
    )
    scenes = _random_scenes(9)
    expected = (_localization(scenes).compute(), _segmentation(scenes).compute())
    for rank in range(world_size):
        assert torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) == expected


def test_all_reduce_without_process_group_is_identity():
    metric = _localization(_random_scenes(2))
    before = metric.compute()
    assert metric.all_reduce().compute() == before


# ---------------------------------------------------------------- segmentation


def test_segmentation_confusion_known_answer():
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 1]])  # 3 sits on an ignored pixel
    metric = SegmentationMetrics(4)
    metric.update(pred, gt)
    # Class 0: TP 1, FP 1, FN 1 -> 1/3. Class 1: TP 3, FP 1 -> 3/4.
    # Class 2: TP 1, FN 1 -> 1/2. Class 3: never in gt or (valid) pred -> not counted.
    result = metric.compute()
    assert result["per_class_iou"] == pytest.approx({0: 100 / 3, 1: 75.0, 2: 50.0})
    assert result["miou"] == pytest.approx((100 / 3 + 75 + 50) / 3)
    assert result["pixel_accuracy"] == pytest.approx(100 * 5 / 7)
    assert result["mean_accuracy"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 2) / 3)
    assert result["pixels"] == 7


def test_segmentation_batch_equals_sum_of_images():
    generator = torch.Generator().manual_seed(1)
    gt = torch.randint(0, 5, (3, 7, 9), generator=generator)
    pred = torch.randint(0, 5, (3, 7, 9), generator=generator)
    batched, single = SegmentationMetrics(5), SegmentationMetrics(5)
    batched.update(pred, gt)
    for index in range(3):
        single.update(pred[index].numpy(), gt[index].numpy())
    assert torch.equal(batched.confusion, single.confusion)
    assert int(batched.confusion.sum()) == 3 * 7 * 9
    with pytest.raises(ValueError, match="pred: expected ids in"):
        batched.update(pred + 5, gt)


def test_segment_from_maps_argmax_and_threshold():
    maps = torch.tensor([[[0.1, 0.9, 0.4]], [[0.2, 0.3, 0.35]]])  # K=2, 1x3
    assert segment_from_maps(maps).tolist() == [[1, 0, 0]]
    assert segment_from_maps(maps, classes=[4, 9]).tolist() == [[9, 4, 4]]
    thresholded = segment_from_maps(maps, classes=[4, 9], background_index=0, background_threshold=0.38)
    assert thresholded.tolist() == [[0, 4, 4]]
    batched = segment_from_maps(torch.stack([maps, maps.flip(0)]), classes=[4, 9])
    assert batched.tolist() == [[[9, 4, 4]], [[4, 9, 9]]]
    with pytest.raises(ValueError, match="together"):
        segment_from_maps(maps, background_index=0)


def test_sliding_window_averages_overlaps():
    calls = []

    def numbered(crop: torch.Tensor) -> torch.Tensor:
        calls.append(crop.shape[-2:])
        return torch.full((1, 1, *crop.shape[-2:]), float(len(calls)))

    out = sliding_window(numbered, torch.zeros(1, 3, 1, 10), window=(1, 6), stride=(1, 4))
    # Windows [0, 6) -> 1 and [4, 10) -> 2; columns 4-5 are covered by both.
    assert out.flatten().tolist() == [1, 1, 1, 1, 1.5, 1.5, 2, 2, 2, 2]
    image = torch.randn(2, 3, 13, 17)
    identity = sliding_window(lambda crop: crop[:, :1] * 2, image, window=8, stride=5)
    torch.testing.assert_close(identity, image[:, :1] * 2)
    # A patch-grid predictor (stride-2 output) is resized to each crop.
    coarse = sliding_window(lambda crop: torch.ones(2, 4, 4, 4), image, window=8, stride=5)
    assert coarse.shape == (2, 4, 13, 17) and torch.all(coarse == 1)
    with pytest.raises(ValueError, match="stride"):
        sliding_window(lambda crop: crop, image, window=4, stride=5)


# ---------------------------------------------------------------- faithfulness


class _TinyConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.head(features.flatten(1))


def _channel_shared_linear():
    """f(x) = sum_{c,p} u_p x_{c,p} + b: its gradient is the same map on every channel."""
    torch.manual_seed(0)
    weight_map = torch.randn(1, 1, 8, 8, dtype=torch.float64)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return (x * weight_map).flatten(1).sum(1, keepdim=True) + 0.5

    return forward, weight_map


def test_infidelity_is_zero_for_exact_gradient_map_of_linear_model():
    forward, weight_map = _channel_shared_linear()
    inputs = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    one_channel = weight_map.expand(2, 1, 8, 8)
    for normalize in (False, True):
        scores = infidelity_score(forward, one_channel, inputs, 0, normalize=normalize)
        assert scores.shape == (2,)
        assert scores.abs().max() < 1e-10
    patch = infidelity_score(forward, one_channel, inputs, 0, perturb_func=patch_perturbation(4, drop_prob=0.5))
    assert patch.abs().max() < 1e-10
    # A wrong map is penalised.
    wrong = infidelity_score(forward, -one_channel.flip(-1), inputs, 0, normalize=False)
    assert wrong.min() > 1e-2


def test_infidelity_prefers_gradients_on_a_conv_net():
    torch.manual_seed(0)
    net = _TinyConvNet().eval()
    inputs = torch.randn(3, 3, 8, 8)
    gradient = Saliency(net).attribute(inputs, target=1, abs=False)
    noise = torch.randn_like(gradient)
    kwargs = dict(noise_std=1e-3, n_perturb_samples=16)
    faithful = infidelity_score(net, gradient, inputs, 1, **kwargs)
    random = infidelity_score(net, noise, inputs, 1, **kwargs)
    assert (faithful < 0.05 * random).all()


def test_sensitivity_of_linear_model_explanations():
    forward, weight_map = _channel_shared_linear()
    inputs = torch.randn(2, 3, 8, 8)
    gradient = sensitivity_score(Saliency(forward).attribute, inputs, 0, abs=False)
    assert gradient.tolist() == [0.0, 0.0]  # the gradient of a linear model is constant
    radius = 0.02
    input_x_gradient = sensitivity_score(InputXGradient(forward).attribute, inputs, 0, perturb_radius=radius)
    # ||w * d|| / ||w * x|| with |d| <= radius elementwise.
    full_weight = weight_map.expand(2, 3, 8, 8)
    explanation_norm = (full_weight * inputs).flatten(1).norm(dim=1)
    bound = radius * full_weight.flatten(1).norm(dim=1) / explanation_norm
    assert (input_x_gradient > 0).all() and (input_x_gradient <= bound + 1e-6).all()


def test_perturbations_and_expansion():
    noise, perturbed = gaussian_perturbation(0.5)(torch.ones(4, 3, 16, 16))
    torch.testing.assert_close(perturbed, 1 - noise)
    assert 0.4 < float(noise.std()) < 0.6
    torch.manual_seed(3)
    inputs = torch.randn(2, 3, 6, 6)
    delta, perturbed = patch_perturbation(4, drop_prob=0.5)(inputs)
    torch.testing.assert_close(inputs - perturbed, delta)
    dropped = (perturbed == 0).all(dim=1)  # fill 0 on every channel
    for rows in (slice(0, 4), slice(4, 6)):
        for cols in (slice(0, 4), slice(4, 6)):
            tile = dropped[:, rows, cols].flatten(1)
            assert torch.equal(tile.all(1), tile.any(1))  # a tile is dropped whole or not
    assert expand_attributions(torch.ones(2, 1, 6, 6), inputs).shape == (2, 3, 6, 6)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        expand_attributions(torch.ones(2, 2, 6, 6), inputs)
    with pytest.raises(ValueError, match="drop_prob"):
        patch_perturbation(4, drop_prob=0.0)


def test_bootstrap_intervals_over_recorded_images():
    from captum_iclip.evaluation.metrics import LocalizationMetrics

    gt = torch.zeros(8, 8, dtype=torch.long)
    gt[2:6, 2:6] = 1
    perfect, inverted = gt[None].float(), 1.0 - gt[None].float()
    same = LocalizationMetrics(num_classes=2).record_images()
    for _ in range(5):
        same.update(perfect, [1], gt)
    # Identical images: every resample gives the same figures, so the interval is a point.
    for key, (low, high) in same.bootstrap(("miou", "msc", "pointing"), resamples=50).items():
        assert low == high == same.compute()[key], key
    mixed = LocalizationMetrics(num_classes=2).record_images()
    for maps in (perfect, inverted, perfect, inverted, perfect, perfect):
        mixed.update(maps, [1], gt)
    (low, high), estimate = mixed.bootstrap(("msc",), resamples=400, seed=1)["msc"], mixed.compute()["msc"]
    assert -100.0 <= low < estimate < high <= 100.0
    # Recording does not change the sums: the same figures as an unrecorded metric.
    plain = LocalizationMetrics(num_classes=2)
    for maps in (perfect, inverted, perfect, inverted, perfect, perfect):
        plain.update(maps, [1], gt)
    assert plain.compute() == mixed.compute()
    with pytest.raises(RuntimeError, match="bootstrap: expected images recorded"):
        plain.bootstrap(("miou",))
