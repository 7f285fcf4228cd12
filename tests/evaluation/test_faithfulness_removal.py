"""The removal metrics of faithfulness (docs/methods.md §5.1): deletion and insertion curves, confidence drop
and increase, ROAD's noisy linear imputation; known answers on constructed "models", literal re-implementations
of the references' loops, and ``captum-iclip eval --task faithfulness`` on the bundled model."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from conftest import strict_json

from captum_iclip.evaluation.faithfulness import (
    FILL_IMAGES,
    confidence_change,
    deletion_curve,
    fill_image,
    insertion_curve,
    noisy_linear_imputation,
    road_scores,
    trapezoid_auc,
)


def region_sum(regions: torch.Tensor):
    """A linear "model": the score of prompt k is the sum of the pixels (all channels) in region k (K, H, W)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nchw,khw->nk", x, regions.to(x))

    return forward


def raster_descending(n: int, h: int, w: int) -> torch.Tensor:
    """A map that ranks the pixels in raster order (the first pixel highest)."""
    return -torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w).expand(n, 1, h, w)


# ---------------------------------------------------------------- deletion and insertion
def test_trapezoid_rule_is_exact_on_uneven_steps():
    # 0.1 · (1 + 3) / 2 + 0.4 · (3 + 2) / 2 = 0.2 + 1.0
    area = trapezoid_auc(torch.tensor([0.0, 0.1, 0.5], dtype=torch.float64), torch.tensor([[1.0, 3.0, 2.0]]).double())
    assert area.tolist() == pytest.approx([1.2], abs=1e-15)
    with pytest.raises(ValueError, match="fractions: expected non-decreasing"):
        trapezoid_auc(torch.tensor([0.0, 0.5, 0.1]), torch.ones(3))


def test_grad_eclip_steps_on_a_region_sum_have_the_hand_computed_curve():
    # 20 x 20 image of ones, 3 channels; the score is the sum over columns 0-4 (300 at the start).
    # Grad-ECLIP's steps: 100 steps of max(1, ⌊400 / 200⌋) = 2 pixels, scored every 10: one 20-pixel row
    # (5 region pixels x 3 channels = 15) per point, 11 points over half the image.
    regions = torch.zeros(1, 20, 20, dtype=torch.float64)
    regions[0, :, :5] = 1
    x = torch.ones(1, 3, 20, 20, dtype=torch.float64)
    deletion = deletion_curve(region_sum(regions), x, raster_descending(1, 20, 20), 0, fill=0.0)
    assert deletion.fractions.tolist() == [t / 20 for t in range(11)]
    assert deletion.scores.tolist() == [[300.0 - 15 * t for t in range(11)]]
    # Σ_t 0.05 · (s_t + s_t+1) / 2 = 0.05 · Σ_t (292.5 − 15 t) = 0.05 · (2925 − 675)
    assert deletion.auc.tolist() == pytest.approx([112.5], abs=1e-12)
    insertion = insertion_curve(region_sum(regions), x, raster_descending(1, 20, 20), 0, fill=0.0)
    assert insertion.scores.tolist() == [[15.0 * t for t in range(11)]]
    assert insertion.auc.tolist() == pytest.approx([37.5], abs=1e-12)


def grad_eclip_loop(score, image, heatmap, fill, steps, score_every, insert):
    """Grad-ECLIP's deletion / insertion loop, literally: pixels taken in ``argsort(-heatmap)`` order
    (stable here), ``max(1, int(area / (2 L)))`` per step, the image scored every ``score_every`` steps."""
    h, w = heatmap.shape
    order = np.argsort(-heatmap.reshape(-1), kind="stable")
    per_step = max(1, int(h * w / (2 * steps)))
    current = (fill if insert else image).copy()
    scores = [score(current)]
    for step in range(1, steps + 1):
        ys, xs = np.unravel_index(order[(step - 1) * per_step : step * per_step], (h, w))
        current[:, ys, xs] = (image if insert else fill)[:, ys, xs]
        if step % score_every == 0:
            scores.append(score(current))
    return scores


def test_deletion_and_insertion_equal_the_reference_loop_for_every_image_and_target():
    generator = torch.Generator().manual_seed(0)
    regions = (torch.rand(3, 12, 14, generator=generator, dtype=torch.float64) > 0.5).double()
    forward = region_sum(regions)
    x = torch.rand(2, 3, 12, 14, generator=generator, dtype=torch.float64)
    fill = torch.rand(2, 3, 12, 14, generator=generator, dtype=torch.float64)
    # Coarse values: many ties, broken in raster order; and a patch-grid map (upsampled bilinearly).
    maps = (torch.rand(2, 1, 12, 14, generator=generator, dtype=torch.float64) * 4).floor()
    targets = [2, 0]
    for curve, insert in ((deletion_curve, False), (insertion_curve, True)):
        found = curve(forward, x, maps, targets, fill=fill, steps=20, score_every=4, max_examples_per_batch=5)
        for i, target in enumerate(targets):
            expected = grad_eclip_loop(
                lambda image, target=target: float(forward(torch.from_numpy(image)[None])[0, target]),
                x[i].numpy(),
                maps[i, 0].numpy(),
                fill[i].numpy(),
                20,
                4,
                insert,
            )
            torch.testing.assert_close(found.scores[i], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    grid = torch.rand(2, 1, 3, 2, generator=generator, dtype=torch.float64)
    upsampled = torch.nn.functional.interpolate(grid, size=(12, 14), mode="bilinear", align_corners=False)
    torch.testing.assert_close(
        deletion_curve(forward, x, grid, targets, fill=fill).scores,
        deletion_curve(forward, x, upsampled, targets, fill=fill).scores,
    )


def test_curves_refuse_bad_input_with_the_arguments_name():
    forward = region_sum(torch.ones(2, 4, 4))
    x, maps = torch.ones(1, 3, 4, 4), torch.rand(1, 1, 4, 4)
    cases = {
        "attributions: expected one map per image": dict(attributions=torch.rand(1, 3, 4, 4)),
        "attributions: expected finite": dict(attributions=torch.full((1, 1, 4, 4), math.nan)),
        "score_every: expected a divisor of steps": dict(score_every=7),
        "fraction: expected a share": dict(fraction=1.5),
        "target: expected a prompt index per image": dict(target=None),
        "target: expected prompt indices in 0..1": dict(target=5),
        "fill: expected a tensor broadcastable": dict(fill=torch.zeros(2, 3, 4, 4)),
        "max_examples_per_batch: expected a positive int": dict(max_examples_per_batch=0),
    }
    for message, change in cases.items():
        arguments = dict(attributions=maps, target=0, fill=0.0) | change
        with pytest.raises(ValueError, match=message):
            deletion_curve(forward, x, **arguments)
    with pytest.raises(ValueError, match="inputs: expected a floating-point tensor"):
        insertion_curve(forward, torch.ones(3, 4, 4), maps, 0, fill=0.0)


def test_fill_images_black_random_and_riseblur():
    mean, std = (0.5, 0.25, 0.75), (0.5, 0.25, 0.25)
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    black = fill_image(x, "black", mean, std)
    torch.testing.assert_close(black[:, :, 0, 0], torch.tensor([[-1.0, -1.0, -3.0]] * 2))
    random = fill_image(x, "random", mean, std, generator=torch.Generator().manual_seed(5))
    pixels = random * torch.tensor(std).reshape(1, 3, 1, 1) + torch.tensor(mean).reshape(1, 3, 1, 1)
    assert float(pixels.min()) >= 0 and float(pixels.max()) <= 1 and 0.45 < float(pixels.mean()) < 0.55
    assert torch.equal(random, fill_image(x, "random", mean, std, generator=torch.Generator().manual_seed(5)))
    # RISE's kernel: scipy's gaussian_filter(delta, 5) on 11 x 11, i.e. the 1-D Gaussian (radius 20) correlated
    # with the delta mirrored half-sample ("reflect": np.pad's "symmetric", repeated).
    radius, centre = 20, 5
    weights = np.exp(-0.5 * (np.arange(-radius, radius + 1) / 5.0) ** 2)
    weights /= weights.sum()
    delta = np.pad(np.eye(1, 11, centre)[0], radius, mode="symmetric")
    line = np.array([weights @ delta[i : i + 2 * radius + 1] for i in range(11)])
    kernel = torch.from_numpy(np.outer(line, line))
    blurred = fill_image(x.double(), "blur", mean, std)
    expected = torch.nn.functional.conv2d(x.double(), kernel.expand(3, 1, 11, 11), padding=5, groups=3)
    torch.testing.assert_close(blurred, expected, rtol=0, atol=1e-12)
    assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="kind: expected one of"):
        fill_image(x, "protocol", mean, std)
    assert FILL_IMAGES == ("random", "black", "blur")


# ---------------------------------------------------------------- confidence drop and increase
def test_confidence_drop_and_increase_known_answers():
    x = torch.ones(3, 1, 2, 2, dtype=torch.float64)
    inside = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)

    def forward(images):  # 10 + the first pixel − the three others
        flat = images.flatten(1)
        return 10 + flat[:, 0] - flat[:, 1:].sum(1)

    maps = torch.stack(
        [
            torch.tensor([[2.0, 1.0], [0.0, 0.0]]),  # m = [1, .5, 0, 0]: O = 10 + 1 − .5 = 10.5 > Y = 8
            inside.float(),  # m = [1, 0, 0, 0]: O = 10 + 1 = 11
            torch.full((2, 2), 3.0),  # constant: m = 0, O = 10
        ]
    )[:, None].double()
    change = confidence_change(forward, x, maps)
    assert change.original.tolist() == [8.0, 8.0, 8.0]
    assert change.masked.tolist() == [10.5, 11.0, 10.0]
    assert change.drop.tolist() == [0.0, 0.0, 0.0] and change.increase.tolist() == [True, True, True]
    # A score that falls: the sum of the pixels, Y = 4.
    total = confidence_change(lambda images: images.flatten(1).sum(1), x, maps)
    assert total.masked.tolist() == [1.5, 1.0, 0.0]
    assert total.drop.tolist() == [62.5, 75.0, 100.0] and not total.increase.any()
    # A baseline of ones leaves these images unchanged; a non-positive score has no drop.
    assert confidence_change(forward, x, maps, baseline=1.0).masked.tolist() == [8.0, 8.0, 8.0]
    negative = confidence_change(lambda images: -images.flatten(1).sum(1), x, maps)
    assert torch.isnan(negative.drop).all() and negative.increase.all()


def test_confidence_masks_like_m2ib_and_reads_each_target():
    """M2IB (pytorch-grad-cam's CamMultImageConfidenceChange): the score of ``input_tensor * cam``, cam the
    min-max normalised map at the input size; its drop is 100 · max(0, Y − O) without the division."""
    generator = torch.Generator().manual_seed(2)
    regions = torch.rand(4, 8, 8, generator=generator, dtype=torch.float64)
    forward = region_sum(regions)
    x = torch.randn(3, 3, 8, 8, generator=generator, dtype=torch.float64)
    grid = torch.rand(3, 1, 2, 2, generator=generator, dtype=torch.float64)
    targets = torch.tensor([3, 0, 1])
    change = confidence_change(forward, x, grid, targets)
    for i, target in enumerate(targets.tolist()):
        cam = torch.nn.functional.interpolate(grid[i : i + 1], size=(8, 8), mode="bilinear", align_corners=False)[0]
        cam = (cam - cam.min()) / (cam.max() - cam.min())
        before, after = float(forward(x[i : i + 1])[0, target]), float(forward(x[i : i + 1] * cam)[0, target])
        assert float(change.original[i]) == pytest.approx(before, abs=1e-12)
        assert float(change.masked[i]) == pytest.approx(after, abs=1e-12)
        m2ib_drop = 100 * max(0.0, before - after)
        assert 100 * max(0.0, float(change.original[i] - change.masked[i])) == pytest.approx(m2ib_drop, abs=1e-10)
        assert bool(change.increase[i]) == (after > before)


# ---------------------------------------------------------------- ROAD
def road_system(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """ROAD's linear system, literally (its ``setup_sparse_system``), solved densely: one equation per removed
    pixel, ``−S_i u_i + Σ_unknown w u_j = −Σ_known w v_j``, the weights of the neighbours inside the image."""
    neighbours = [((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12)]
    neighbours += [((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6)]
    h, w = removed.shape
    unknown = [(i, j) for i in range(h) for j in range(w) if removed[i, j]]
    number = {pixel: k for k, pixel in enumerate(unknown)}
    matrix = np.zeros((len(unknown), len(unknown)))
    rhs = np.zeros((len(unknown), image.shape[0]))
    for k, (i, j) in enumerate(unknown):
        total = 1.0
        for (di, dj), weight in neighbours:
            a, b = i + di, j + dj
            if not (0 <= a < h and 0 <= b < w):
                total -= weight
            elif removed[a, b]:
                matrix[k, number[(a, b)]] = weight
            else:
                rhs[k] -= weight * image[:, a, b]
        matrix[k, k] = -total
    values = np.linalg.solve(matrix, rhs)
    out = image.copy()
    for k, (i, j) in enumerate(unknown):
        out[:, i, j] = values[k]
    return out


def test_noisy_linear_imputation_solves_roads_system():
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 9, 11, generator=generator, dtype=torch.float64)
    removed = torch.rand(2, 1, 9, 11, generator=generator) < 0.6  # borders and corners included
    found = noisy_linear_imputation(x, removed)
    for i in range(2):
        expected = road_system(x[i].numpy(), removed[i, 0].numpy())
        torch.testing.assert_close(found[i], torch.from_numpy(expected), rtol=0, atol=1e-7)
    assert torch.equal(found[~removed.expand_as(x)], x[~removed.expand_as(x)])  # kept pixels untouched
    # The noise: N(0, std²) per channel, only on the removed pixels, drawn from the generator.
    std = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    noisy = noisy_linear_imputation(x, removed, noise_std=std.tolist(), generator=torch.Generator().manual_seed(9))
    draw = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    torch.testing.assert_close(noisy, torch.where(removed, found + draw * std.reshape(1, 3, 1, 1), x))


def test_noisy_linear_imputation_gives_back_a_linear_image_inside():
    # A plane a·i + b·j + c satisfies every equation whose 8 neighbours lie in the image (opposite offsets
    # have equal weights), so a hole away from the border is filled with the plane itself.
    grid = (torch.arange(16, dtype=torch.float64), torch.arange(12, dtype=torch.float64))
    rows, cols = torch.meshgrid(*grid, indexing="ij")
    plane = torch.stack([0.3 * rows - 0.2 * cols + 1, -0.1 * rows + 0.5 * cols, rows + cols - 4])[None]
    hole = torch.zeros(1, 16, 12, dtype=torch.bool)
    hole[0, 2:13, 3:10] = True
    hole[0, 5, 1] = True
    torch.testing.assert_close(noisy_linear_imputation(plane, hole), plane, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="removed: expected at least one kept pixel"):
        noisy_linear_imputation(plane, torch.ones(1, 16, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="removed: expected a boolean mask"):
        noisy_linear_imputation(plane, hole.float())


def test_road_removes_the_most_or_least_relevant_share_then_scores_the_imputed_image():
    generator = torch.Generator().manual_seed(4)
    regions = torch.rand(2, 10, 10, generator=generator, dtype=torch.float64)
    forward = region_sum(regions)
    x = torch.rand(2, 3, 10, 10, generator=generator, dtype=torch.float64)
    maps = (torch.rand(2, 1, 10, 10, generator=generator, dtype=torch.float64) * 5).floor()  # ties
    shares, targets = [0.1, 0.45, 0.9], [1, 0]
    for order in ("morf", "lerf"):
        found = road_scores(forward, x, maps, targets, order=order, percentages=shares, max_examples_per_batch=4)
        for i, target in enumerate(targets):
            ranked = np.argsort(-maps[i, 0].numpy().reshape(-1), kind="stable")  # most relevant first
            for k, share in enumerate(shares):
                count = int(100 * share)
                chosen = ranked[:count] if order == "morf" else ranked[100 - count :]
                removed = np.zeros(100, dtype=bool)
                removed[chosen] = True
                imputed = road_system(x[i].numpy(), removed.reshape(10, 10))
                expected = float(forward(torch.from_numpy(imputed)[None])[0, target])
                assert float(found[i, k]) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="percentages: expected shares in"):
        road_scores(forward, x, maps, targets, percentages=[1.0])
    with pytest.raises(ValueError, match="order: expected one of"):
        road_scores(forward, x, maps, targets, order="random")


# ---------------------------------------------------------------- captum-iclip eval --task faithfulness
def test_eval_scores_every_registry_method_on_the_bundled_model(tmp_path):
    """``captum-iclip eval --task faithfulness`` on 2 held-out scenes of the bundled model (at 36 px), every
    method of the registry: strict JSON, the table and the chart; and the command's deletion AUC of ``raw``
    equals the public functions' on the same inputs, maps, fill and seed."""
    from captum_iclip import CLIPSimilarity
    from captum_iclip.cli.eval import main
    from captum_iclip.datasets import WorldScenes
    from captum_iclip.evaluation.methods import build_method, method_names
    from captum_iclip.evaluation.run import class_prompts
    from captum_iclip.loading.loader import load
    from captum_iclip.preprocess import to_model_input

    methods = method_names()
    out = tmp_path / "eval"
    common = ["--dataset", "world", "--root", "heldout", "--limit", "2", "--model", "shapes-tiny"]
    status = main(
        [
            *common,
            "--resolution",
            "36",
            "--method",
            ",".join(methods),
            "--task",
            "faithfulness",
            "--faithfulness-samples",
            "2",
            "--faithfulness-metrics",
            "deletion,insertion,confidence",
            "--batch-size",
            "2",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    results = strict_json((out / "results.json").read_text())
    assert list(results["methods"]) == list(methods)
    for name, entry in results["methods"].items():
        figures = entry["faithfulness"]
        assert figures["samples"] == 2 and figures["score"] == "probability", name
        assert figures["metrics"] == ["deletion", "insertion", "confidence"]
        # Not asked for (ROAD runs on every method in tests/evaluation/test_eval.py's default metrics).
        assert figures["infidelity"] is None and figures["road_morf"] is None and figures["road_curves"] is None
        for key in ("deletion_auc", "insertion_auc"):
            assert math.isfinite(figures[key]), (name, key)
        assert 0 <= figures["deletion_auc"] <= 0.5 and 0 <= figures["insertion_auc"] <= 0.5, name
        assert 0 <= figures["confidence_drop"] <= 100 and figures["confidence_increase"] in (0.0, 50.0, 100.0)
        assert figures["deletion_curve"]["fill"] == "random" and figures["insertion_curve"]["fill"] == "black"
        assert (
            len(figures["deletion_curve"]["scores"]) == 11
            and figures["deletion_curve"]["fractions"][-1] == 100 * 6 / 36**2
        )
        assert len(figures["per_image"]) == 2
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[0]["deletion_auc"]) == results["methods"]["raw"]["faithfulness"]["deletion_auc"]
    table = (out / "results.md").read_text()
    assert "| method | deletion AUC ↓ | insertion AUC ↑ | conf. drop % ↓ | conf. increase % ↑ |\n" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same numbers through the public functions (one batch of both images, seeded by the first).
    loaded = load("shapes-tiny")
    dataset = WorldScenes("heldout", limit=2)
    sim = CLIPSimilarity(
        loaded.model, loaded.tokenizer, class_prompts(dataset, loaded.bundle), templates=loaded.templates
    )
    mean = torch.tensor(sim.adapter.image_mean).reshape(3, 1, 1)
    std = torch.tensor(sim.adapter.image_std).reshape(3, 1, 1)
    x = torch.stack([to_model_input(dataset[i][0], (36, 36), mean, std) for i in range(2)])
    targets = torch.tensor([record["target"] for record in results["methods"]["raw"]["faithfulness"]["per_image"]])
    maps = build_method("raw", sim)(x, targets)
    fill = fill_image(
        x, "random", sim.adapter.image_mean, sim.adapter.image_std, generator=torch.Generator().manual_seed(0)
    )
    curve = deletion_curve(lambda images: sim.probabilities(sim(images)), x, maps, targets, fill=fill)
    assert results["methods"]["raw"]["faithfulness"]["deletion_auc"] == pytest.approx(float(curve.auc.mean()), abs=1e-6)


def test_config_refuses_unknown_faithfulness_options():
    from captum_iclip.evaluation.config import EvalConfig

    for field, value in (
        ("faithfulness_metrics", ["deletion", "nope"]),
        ("faithfulness_metrics", ["road", "road"]),
        ("faithfulness_fill", "grey"),
        ("faithfulness_score", "logits"),
    ):
        with pytest.raises(ValueError, match=field):
            EvalConfig("voc", "unused", out=None, **{field: value})
    assert EvalConfig("voc", "unused", out=None, faithfulness_metrics=["road"]).faithfulness_metrics == ("road",)
