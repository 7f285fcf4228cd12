"""Tests for captum_iclip.training.dino: loss, schedules, EMA, augmentation, smoke training, save/load."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from captum_iclip.masks import DINOMaskProvider
from captum_iclip.models.tiny_dino import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    DINOConfig,
    build_backbone,
    load_tiny_dino,
    save_tiny_dino,
)
from captum_iclip.training.dino import (
    DINOHead,
    DINOLoss,
    cosine_schedule,
    ema_update,
    multi_crop_transform,
    train_dino,
)

TINY = dict(
    image_size=32,
    patch_size=8,
    embed_dim=32,
    depth=2,
    num_heads=2,
    out_dim=64,
    head_hidden_dim=32,
    head_bottleneck_dim=16,
    global_crop_size=32,
    local_crop_size=16,
    num_local_crops=2,
    batch_size=4,
    warmup_steps=1,
    teacher_temp_warmup_steps=2,
)


def random_images(count: int, size: int = 40, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def test_cosine_schedule_warmup_and_end_points():
    values = cosine_schedule(1.0, 0.1, steps=12, warmup_steps=2, warmup_start=0.0)
    assert values.shape == (12,)
    np.testing.assert_allclose(values[:3], [0.0, 0.5, 1.0])
    assert values[-1] == pytest.approx(0.1)
    middle = 2 + 9 / 2  # the cosine runs from step 2 to step 11; half-way it is the mean
    assert np.interp(middle, np.arange(12), values) == pytest.approx(0.55, abs=1e-12)
    assert (np.diff(values[2:]) < 0).all()


def test_dino_loss_known_answer_and_center_update():
    torch.manual_seed(0)
    batch, out_dim, views = 3, 5, 4
    student = torch.randn(views * batch, out_dim)
    teacher = torch.randn(2 * batch, out_dim)
    criterion = DINOLoss(out_dim, student_temp=0.1, center_momentum=0.9)
    criterion.center.fill_(0.25)
    loss = criterion(student, teacher, views, teacher_temp=0.04)

    log_p = torch.log_softmax(student / 0.1, dim=-1).view(views, batch, out_dim)
    q = torch.softmax((teacher - 0.25) / 0.04, dim=-1).view(2, batch, out_dim)
    pairs = [(a, v) for a in range(2) for v in range(views) if v != a]
    expected = sum(-(q[a] * log_p[v]).sum(-1).mean() for a, v in pairs) / len(pairs)
    assert len(pairs) == 6
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(criterion.center, 0.9 * 0.25 + 0.1 * teacher.mean(0, keepdim=True))


def test_dino_head_prototypes_have_unit_norm_and_fixed_magnitude():
    head = DINOHead(8, 12, hidden_dim=16, bottleneck_dim=4)
    weight = head.last_layer.weight
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(12))
    assert not head.last_layer.parametrizations.weight.original0.requires_grad
    assert head(torch.randn(5, 8)).shape == (5, 12)


def test_ema_update_is_the_documented_formula():
    torch.manual_seed(0)
    student = DINOHead(8, 12, hidden_dim=16, bottleneck_dim=4)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for old, new, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s, rtol=1e-6, atol=1e-7)
    ema_update(teacher, student, 1.0)  # momentum 1 freezes the teacher
    ema_update(teacher, student, 0.0)  # momentum 0 copies the student
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)


def test_multi_crop_transform_shapes_and_normalisation():
    config = DINOConfig(**TINY)
    torch.manual_seed(0)
    crops = multi_crop_transform(config)(torch.full((3, 40, 40), 255, dtype=torch.uint8))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert all(c.dtype == torch.float32 for c in crops)


def test_config_validation():
    with pytest.raises(ValueError, match="global_crop_size"):
        DINOConfig(global_crop_size=60, patch_size=8)
    with pytest.raises(ValueError, match="num_heads"):
        DINOConfig(embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="unknown"):
        DINOConfig.from_dict({"depth": 2, "colour": "red"})


def test_train_rejects_bad_sources():
    with pytest.raises(TypeError, match="source"):
        train_dino(42, DINOConfig(**TINY, steps=1), progress=False)
    with pytest.raises(TypeError, match="uint8"):
        train_dino([np.zeros((32, 32, 3), np.float32)], DINOConfig(**TINY, steps=1), progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tiny_dino")
    config = DINOConfig(**TINY, steps=3, momentum_start=0.9)
    backbone, stats = train_dino(random_images(10), config, out_dir=out_dir, progress=False)
    return config, backbone, stats, out_dir


def test_smoke_training_runs_and_teacher_is_an_average(trained):
    config, backbone, stats, _ = trained
    assert stats["steps"] == 3 and len(stats["losses"]) == 3
    assert stats["images_seen"] == 12
    assert all(math.isfinite(v) for v in stats["losses"]) and math.isfinite(stats["final_loss"])
    # the loss is a cross-entropy over out_dim prototypes: bounded by about log(out_dim) at start
    assert 0 < stats["losses"][0] < 2 * math.log(config.out_dim)
    assert stats["wall_time_s"] > 0
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    # after 3 steps the teacher has moved away from its initialisation ...
    torch.manual_seed(config.seed)
    initial = build_backbone(config)
    assert not torch.equal(backbone.blocks[0].attn.qkv.weight, initial.blocks[0].attn.qkv.weight)


def test_teacher_differs_from_student_and_follows_the_ema(monkeypatch):
    """Replays one step by hand: teacher = m * teacher + (1 - m) * student, teacher != student."""
    import captum_iclip.training.dino as dino

    captured = {}
    real_update = dino.ema_update

    def recording_update(teacher, student, momentum):
        before = [p.clone() for p in teacher.parameters()]
        real_update(teacher, student, momentum)
        captured.update(
            before=before,
            after=[p.clone() for p in teacher.parameters()],
            student=[p.clone() for p in student.parameters()],
            momentum=momentum,
        )

    monkeypatch.setattr(dino, "ema_update", recording_update)
    config = DINOConfig(**TINY, steps=1, momentum_start=0.9)
    dino.train_dino(random_images(4), config, progress=False)
    assert captured["momentum"] == pytest.approx(0.9)  # step 0 of the cosine 0.9 -> 1
    differs = False
    for old, new, s in zip(captured["before"], captured["after"], captured["student"]):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s, rtol=1e-6, atol=1e-7)
        differs |= not torch.equal(new, s)
    assert differs


def test_training_is_reproducible_with_a_fixed_seed():
    config = DINOConfig(**TINY, steps=2)
    first, stats_a = train_dino(random_images(6), config, progress=False)
    second, stats_b = train_dino(random_images(6), config, progress=False)
    assert stats_a["losses"] == stats_b["losses"]
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_worker_processes_change_the_speed_not_the_result():
    config = DINOConfig(**TINY, steps=3, drop_path_rate=0.1)
    in_process, stats = train_dino(random_images(6), config, progress=False)
    workers, stats_workers = train_dino(
        random_images(6), DINOConfig(**TINY, steps=3, drop_path_rate=0.1, data_workers=2), progress=False
    )
    assert stats["losses"] == stats_workers["losses"]
    for a, b in zip(in_process.state_dict().values(), workers.state_dict().values()):
        assert torch.equal(a, b)


def test_batches_are_epoch_permutations_and_a_pure_function_of_the_step():
    from captum_iclip.training.dino import _AugmentedBatches

    batches = _AugmentedBatches(random_images(6), DINOConfig(**TINY, steps=6))
    drawn = [batches.indices(step) for step in range(6)]  # 24 positions = 4 epochs of 6 images
    flat = sum(drawn, [])
    assert [sorted(flat[e * 6 : (e + 1) * 6]) for e in range(4)] == [list(range(6))] * 4
    assert flat[:6] != flat[6:12]  # a new order each epoch
    later_first = batches[4]
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    assert all(torch.equal(a, b) for a, b in zip(later_first, batches[4]))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    stream = _AugmentedBatches(lambda i: random_images(1, seed=i)[0], DINOConfig(**TINY, steps=2))
    assert stream.indices(1) == [4, 5, 6, 7]


def test_save_load_round_trip_gives_identical_outputs(trained, tmp_path):
    config, backbone, stats, out_dir = trained
    assert stats["weights_path"] == str(out_dir / WEIGHTS_NAME)
    meta = json.loads((out_dir / CONFIG_NAME).read_text())
    assert DINOConfig.from_dict(meta["config"]) == config
    assert not list(out_dir.glob("*.tmp"))

    loaded = load_tiny_dino(out_dir)
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(loaded(images), backbone(images))
    assert torch.equal(load_tiny_dino(out_dir / WEIGHTS_NAME).pos_embed, backbone.pos_embed)

    save_tiny_dino(loaded, config, tmp_path)
    again = load_tiny_dino(tmp_path)
    for a, b in zip(again.state_dict().values(), backbone.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="tiny DINO"):
        load_tiny_dino(tmp_path / "missing")


def test_loaded_model_plugs_into_the_mask_provider(trained):
    config, _, _, out_dir = trained
    provider = DINOMaskProvider(load_tiny_dino(out_dir), tau=0.6)
    assert provider.dino_size == (config.image_size, config.image_size)
    mask = provider(torch.randn(3, 3, 224, 224), (14, 14))
    assert mask.shape == (3, 196) and mask.any(1).all()


def test_resume_after_a_kill_ends_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch):
    import captum_iclip.training.dino as dino
    from captum_iclip.training.dino import CHECKPOINT_NAME

    # drop_path_rate > 0 makes the student draw from the global torch RNG too
    config = DINOConfig(**TINY, steps=5, checkpoint_every=2, drop_path_rate=0.1, momentum_start=0.9)
    images = random_images(7)  # 7 images, batch 4: the epoch order straddles the checkpoint
    reference, reference_stats = train_dino(images, config, out_dir=tmp_path / "full", progress=False)

    calls = {"count": 0}
    real_update = dino.ema_update

    def killed_at_step_4(teacher, student, momentum):
        calls["count"] += 1
        if calls["count"] == 4:
            raise KeyboardInterrupt
        real_update(teacher, student, momentum)

    monkeypatch.setattr(dino, "ema_update", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_dino(images, config, out_dir=tmp_path / "killed", progress=False)
    monkeypatch.setattr(dino, "ema_update", real_update)
    assert torch.load(tmp_path / "killed" / CHECKPOINT_NAME, weights_only=True)["step"] == 2
    assert not (tmp_path / "killed" / WEIGHTS_NAME).exists()

    resumed, stats = train_dino(images, config, out_dir=tmp_path / "killed", progress=False, resume=True)
    assert stats["losses"] == reference_stats["losses"] and len(stats["losses"]) == 5
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    full = torch.load(tmp_path / "full" / CHECKPOINT_NAME, weights_only=True)
    again = torch.load(tmp_path / "killed" / CHECKPOINT_NAME, weights_only=True)
    assert full["step"] == again["step"] == 5
    assert torch.equal(full["center"], again["center"])
    for key in full["student"]:
        assert torch.equal(full["student"][key], again["student"][key]), key
    for key, value in full["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg_sq"], again["optimizer"]["state"][key]["exp_avg_sq"])


def test_resume_of_a_finished_run_trains_nothing_and_other_settings_are_refused(tmp_path):
    config = DINOConfig(**TINY, steps=2, checkpoint_every=1)
    first, stats = train_dino(random_images(4), config, out_dir=tmp_path, progress=False)
    again, stats_again = train_dino(random_images(4), config, out_dir=tmp_path, progress=False, resume=True)
    assert stats_again["losses"] == stats["losses"]
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    # thread count and checkpoint cadence do not change the trajectory; the lr does
    train_dino(
        random_images(4),
        DINOConfig(**TINY, steps=2, checkpoint_every=5, num_threads=1),
        out_dir=tmp_path,
        progress=False,
        resume=True,
    )
    with pytest.raises(ValueError, match=r"\['lr'\]"):
        train_dino(random_images(4), DINOConfig(**TINY, steps=2, lr=0.5), out_dir=tmp_path, progress=False, resume=True)
    with pytest.raises(ValueError, match="out_dir"):
        train_dino(random_images(4), config, progress=False, resume=True)


def test_num_threads_is_applied_during_training_only(monkeypatch):
    import captum_iclip.training.dino as dino

    seen = []
    real_update = dino.ema_update
    monkeypatch.setattr(dino, "ema_update", lambda *a: (seen.append(torch.get_num_threads()), real_update(*a)))
    before = torch.get_num_threads()
    train_dino(random_images(4), DINOConfig(**TINY, steps=1, num_threads=1), progress=False)
    assert seen == [1] and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads"):
        DINOConfig(num_threads=0)
