"""ICLIP training: objective, modes, data formats, torchrun, exact resume (CPU, tiny models)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from PIL import Image

from captum_iclip.cli.train import main
from captum_iclip.models.dual import DualProjectionCLIP
from captum_iclip.pooling import MaskedMaxPooling
from captum_iclip.training.iclip import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]
TEXT_CFG = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)
VIT_CFG = dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8)
# A child process gets the repository on its path, no GPU and one thread, like the tests here.
CHILD_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    "CUDA_VISIBLE_DEVICES": "",
    "OMP_NUM_THREADS": "1",
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread on a shared machine; the resume test
    also compares runs bit for bit, which needs the same thread count in and out of process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit() -> open_clip.model.CLIP:
    torch.manual_seed(0)
    return open_clip.model.CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(**VIT_CFG), text_cfg=CLIPTextCfg(**TEXT_CFG))


def tiny_resnet() -> open_clip.model.CLIP:
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=(1, 1, 1, 1), width=4, head_width=32, image_size=64)
    return open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=CLIPTextCfg(**TEXT_CFG))


def tokenizer():
    # The model's context length (16) must match the tokenizer's, or encode_text's
    # positional embedding would not fit the token ids.
    return open_clip.get_tokenizer("ViT-B-32", context_length=TEXT_CFG["context_length"])


def write_model_config(folder: Path) -> Path:
    path = folder / "tiny-iclip-test.json"
    path.write_text(json.dumps({"embed_dim": 32, "vision_cfg": VIT_CFG, "text_cfg": TEXT_CFG}))
    return path


def random_png(rng: np.random.Generator, size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_csv(folder: Path, num_good: int, bad: bool = True) -> Path:
    """A tab-separated CSV (relative paths) of random PNGs; with ``bad``, a garbage PNG and a missing file."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    rows = []
    for index in range(num_good):
        (folder / "images" / f"{index}.png").write_bytes(random_png(rng))
        rows.append(f"images/{index}.png\ta picture number {index}")
    if bad:
        (folder / "images" / "corrupt.png").write_bytes(b"\x89PNG but not really an image")
        rows += ["images/corrupt.png\ta corrupt picture", "images/missing.png\ta missing picture"]
    path = folder / "train.csv"
    path.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    return path


def write_shards(folder: Path, num_shards: int, per_shard: int) -> str:
    """webdataset shards of KEY.png + KEY.txt; shard 0 holds a corrupt PNG, shard 1 a caption without image."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for shard in range(num_shards):
        with tarfile.open(folder / f"shard-{shard:06d}.tar", "w") as archive:
            for index in range(per_shard):
                key = f"s{shard}_{index}"
                members = {f"{key}.txt": f"sample {key}".encode()}
                if not (shard == 1 and index == 0):
                    corrupt = shard == 0 and index == 1
                    members[f"{key}.png"] = b"garbage bytes" if corrupt else random_png(rng)
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return str(folder / f"shard-{{000000..{num_shards - 1:06d}}}.tar")


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[tuple[torch.Tensor, str]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def random_dataset(n: int, size: int) -> ListDataset:
    generator = torch.Generator().manual_seed(3)
    return ListDataset([(torch.randn(3, size, size, generator=generator), f"caption {i}") for i in range(n)])


def image_size_tensor(image: Image.Image) -> torch.Tensor:
    """A picklable stand-in transform (data-loader workers may be spawned)."""
    return torch.tensor(image.size)


def torchrun(args: list[str], timeout: float = 150) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "captum_iclip.train",
        *args,
    ]
    result = subprocess.run(command, env=CHILD_ENV, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# ----------------------------------------------------------------------------------
def test_mmp_gradient_reaches_only_the_winning_tokens():
    generator = torch.Generator().manual_seed(0)
    patches = torch.randn(2, 6, 5, generator=generator, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)  # row 1: empty -> all patches
    weights = torch.randn(5, generator=generator)
    pooled = MaskedMaxPooling()(patches, mask)
    (pooled * weights).sum().backward()

    expected = torch.zeros(2, 6, 5)
    values = patches.detach().numpy()
    for n, allowed in enumerate([[0, 2, 3], list(range(6))]):
        for d in range(5):
            winner = allowed[int(np.argmax(values[n, allowed, d]))]
            assert pooled[n, d] == values[n, winner, d]
            expected[n, winner, d] = weights[d]
    assert torch.equal(patches.grad, expected)
    assert int((patches.grad != 0).sum()) == 10  # one winner per (image, channel)


def test_objective_matches_a_direct_computation(tmp_path):
    """The first logged loss (before any update) equals the ICLIP loss computed by hand."""
    clip = tiny_vit()
    data = random_dataset(4, 32)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, [0, 5, 6, 9, 10]] = True
    mask[1] = False  # an empty mask falls back to all patches
    images = torch.stack([image for image, _ in data.items])
    tokens = tokenizer()([caption for _, caption in data.items])

    with torch.no_grad():
        dual = DualProjectionCLIP(clip).eval()
        dense = dual.encode_dense(images)
        fallback = mask.clone()
        fallback[1] = True
        pooled = dense[:, 1:].masked_fill(~fallback[..., None], float("-inf")).amax(dim=1)
        text = F.normalize(clip.encode_text(tokens), dim=-1)
        scale = clip.logit_scale.exp()

        def infonce(image_features):
            logits = scale * F.normalize(image_features, dim=-1) @ text.T
            labels = torch.arange(4)
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

        expected = infonce(pooled) + 0.5 * infonce(clip.encode_image(images))

    config = TrainConfig(
        mode="full",
        rec_weight=0.5,
        batch_size=4,
        epochs=1,
        workers=0,
        output_dir=str(tmp_path),
        log_every=1,
        save_every=0,
        lr=1e-3,
    )
    stats = train(
        config, model=dual, mask_provider=lambda x, grid: mask[: x.shape[0]], dataset=data, tokenizer=tokenizer()
    )
    first = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert stats["empty_mask_fallbacks"] == 1 and stats["steps"] == 1 and stats["samples"] == 4


@pytest.mark.parametrize("build, size", [(tiny_vit, 32), (tiny_resnet, 64)], ids=["vit", "resnet"])
def test_projection_mode_keeps_recognition_bit_identical(tmp_path, build, size):
    clip = build()
    dual = DualProjectionCLIP(clip)
    probe = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(5))
    before_embedding = clip.eval().encode_image(probe)
    before_state = {k: v.clone() for k, v in clip.state_dict().items()}  # BatchNorm running stats included
    before_head = {k: v.clone() for k, v in dual.interpretability_head.state_dict().items()}

    config = TrainConfig(
        mode="projection", batch_size=4, epochs=3, workers=0, output_dir=str(tmp_path), save_every=0, lr=1e-2
    )
    stats = train(config, model=dual, dataset=random_dataset(8, size), tokenizer=tokenizer())

    assert stats["steps"] == 6 and stats["lambda_rec"] == 0.0
    assert torch.equal(clip.encode_image(probe), before_embedding)
    assert all(torch.equal(v, before_state[k]) for k, v in clip.state_dict().items())
    assert not clip.training
    assert any(not torch.equal(v, before_head[k]) for k, v in dual.interpretability_head.state_dict().items())
    # The small file holds the trained head.
    saved = torch.load(tmp_path / "interpretability_head.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, dual.interpretability_head.state_dict()[k]) for k, v in saved.items())


def test_csv_skips_corrupt_and_missing_images_and_tiny_dino_masks_are_cached(tmp_path):
    from captum_iclip.training.dino import DINOConfig, build_backbone, save_tiny_dino

    csv_path = write_csv(tmp_path / "data", num_good=8)  # 10 rows: 8 good, 1 corrupt, 1 missing
    dino_config = DINOConfig(image_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    save_tiny_dino(build_backbone(dino_config), dino_config, tmp_path / "dino")
    config = TrainConfig(
        train_data=str(csv_path),
        model_config=str(write_model_config(tmp_path)),
        from_scratch=True,
        dino=str(tmp_path / "dino"),
        mask_cache=str(tmp_path / "masks"),
        batch_size=5,
        epochs=2,
        workers=0,
        output_dir=str(tmp_path / "run"),
        save_every=0,
    )
    stats = train(config)

    # 2 steps per epoch cover all 10 rows, so each epoch meets both bad rows.
    assert stats["skipped_images"] == 4 and stats["samples"] == 16 and stats["steps"] == 4
    assert len(list((tmp_path / "masks").rglob("*.pt"))) == 8  # one cached mask per distinct image
    written = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert written["skipped_images"] == 4
    dual = DualProjectionCLIP(open_clip.create_model("tiny-iclip-test")).load(tmp_path / "run" / "final.pt")
    assert dual.encode_dense(torch.zeros(1, 3, 32, 32)).shape == (1, 17, 32)


@pytest.mark.slow
def test_torchrun_two_processes_csv(tmp_path):
    csv_path = write_csv(tmp_path / "data", num_good=10)  # 12 rows: 6 per rank, 2 batches of 3
    out = tmp_path / "run"
    torchrun(
        [
            "--train-data",
            str(csv_path),
            "--csv-img-key",
            "filepath",
            "--csv-caption-key",
            "title",
            "--model-config",
            str(write_model_config(tmp_path)),
            "--from-scratch",
            "--mode",
            "last-k",
            "--batch-size",
            "3",
            "--epochs",
            "1",
            "--workers",
            "0",
            "--output-dir",
            str(out),
            "--log-every",
            "1",
        ]
    )
    stats = json.loads((out / "stats.json").read_text())
    assert stats["world_size"] == 2 and stats["steps"] == 2
    assert stats["skipped_images"] == 2
    assert stats["samples"] + stats["equalisation_cut"] + stats["skipped_images"] == 12
    assert len((out / "log.jsonl").read_text().splitlines()) == 2  # rank 0 logs alone
    assert (out / "interpretability_head.pt").is_file() and (out / "final.pt").is_file()


@pytest.mark.slow
def test_torchrun_two_processes_webdataset(tmp_path):
    shards = write_shards(tmp_path / "shards", num_shards=4, per_shard=3)  # 12 samples: 2 shards per rank
    out = tmp_path / "run"
    torchrun(
        [
            "--train-data",
            shards,
            "--dataset-type",
            "webdataset",
            "--model-config",
            str(write_model_config(tmp_path)),
            "--from-scratch",
            "--mode",
            "projection",
            "--batch-size",
            "3",
            "--epochs",
            "2",
            "--workers",
            "0",
            "--output-dir",
            str(out),
            "--save-every",
            "1",
        ]
    )
    stats = json.loads((out / "stats.json").read_text())
    # 12 samples / (3 x 2 ranks) = 2 steps per epoch; each epoch reads every shard once.
    assert stats["steps"] == 4 and stats["steps_per_epoch"] == 2
    assert stats["skipped_images"] == 4  # the corrupt PNG and the caption without image, twice
    assert stats["samples"] + stats["equalisation_cut"] + stats["skipped_images"] == 24
    checkpoint = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert checkpoint["step"] == 4 and len(checkpoint["rng"]) == 2


@pytest.mark.slow
def test_killed_run_resumes_bit_identically(tmp_path):
    csv_path = write_csv(tmp_path / "data", num_good=6, bad=False)
    model_config = str(write_model_config(tmp_path))
    options = [
        "--train-data",
        str(csv_path),
        "--model-config",
        model_config,
        "--from-scratch",
        "--mode",
        "full",
        "--batch-size",
        "2",
        "--epochs",
        "10",
        "--workers",
        "0",
        "--save-every",
        "3",
        "--lr",
        "1e-3",
        "--warmup",
        "2",
    ]  # 30 steps over 10 epochs

    reference = tmp_path / "reference"
    assert main([*options, "--output-dir", str(reference)]) == 0

    interrupted = tmp_path / "interrupted"
    checkpoint = interrupted / "checkpoints" / "latest.pt"
    process = subprocess.Popen(
        [sys.executable, "-m", "captum_iclip.train", *options, "--output-dir", str(interrupted)],
        env=CHILD_ENV,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert not (interrupted / "final.pt").exists(), "the run ended before it could be killed"
    killed_at = torch.load(checkpoint, weights_only=True)["step"]
    assert 3 <= killed_at < 30

    assert main([*options, "--output-dir", str(interrupted), "--resume"]) == 0
    expected, resumed = state_dict_of(reference / "final.pt"), state_dict_of(interrupted / "final.pt")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    first = json.loads((reference / "stats.json").read_text())
    second = json.loads((interrupted / "stats.json").read_text())
    assert first["final_loss"] == second["final_loss"] and first["samples"] == second["samples"] == 60


def test_last_k_and_clip_objective_train_only_what_they_name(tmp_path):
    data = random_dataset(4, 32)
    clip = tiny_vit()
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    config = TrainConfig(
        mode="last-k",
        unlock_blocks=1,
        batch_size=4,
        epochs=2,
        workers=0,
        output_dir=str(tmp_path / "last-k"),
        save_every=0,
        lr=1e-2,
    )
    train(config, model=clip, dataset=data, tokenizer=tokenizer())
    changed = {k for k, v in clip.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if k.startswith(("visual.transformer.resblocks.1.", "visual.ln_post."))}

    clip = tiny_vit()
    dual = DualProjectionCLIP(clip)
    config = TrainConfig(
        mode="full",
        objective="clip",
        batch_size=4,
        epochs=2,
        workers=0,
        output_dir=str(tmp_path / "clip"),
        save_every=0,
        lr=1e-2,
    )
    train(config, model=dual, dataset=data, tokenizer=tokenizer())
    assert not torch.equal(clip.visual.proj, before["visual.proj"])
    assert not torch.equal(clip.token_embedding.weight, before["token_embedding.weight"])
    # The untrained head starts again from the trained recognition projection.
    assert torch.equal(dual.interpretability_head.weight, clip.visual.proj)


def test_data_order_resumes_mid_stream(tmp_path):
    from torch.utils.data import DataLoader

    from captum_iclip.training.data import ResumableDistributedSampler, WebDatasetBatches

    shards = write_shards(tmp_path / "shards", num_shards=4, per_shard=3)

    def captions(start: int, count: int, workers: int) -> list[list[str]]:
        stream = WebDatasetBatches(
            shards, image_size_tensor, batch_size=2, seed=7, start_batch=start, num_workers=workers
        )
        loader = DataLoader(stream, batch_size=None, num_workers=workers)
        return [batch.captions for batch, _ in zip(loader, range(count))]

    for workers in (0, 2):
        full = captions(0, 14, workers)  # 14 batches of 2 > 12 samples: crosses an epoch boundary
        for start in (4, 5):  # resumed loaders start on either worker
            assert captions(start, 14 - start, workers) == full[start:]
    assert sum(len(c) for c in captions(0, 6, 0)) == 10  # 2 of the 12 samples (one epoch) are unreadable

    sampler = ResumableDistributedSampler(list(range(11)), num_replicas=2, rank=1, seed=3, drop_last=True)
    sampler.set_epoch(4)
    order = list(sampler)
    sampler.set_epoch(4, start=3)
    assert list(sampler) == order[3:] and len(sampler) == 2


def test_trainer_checkpoints_before_its_first_step_and_resumes_from_it(tmp_path):
    from captum_iclip.training.iclip import ICLIPTrainer, _setup_distributed

    config = TrainConfig(mode="projection", batch_size=4, epochs=1, workers=0, output_dir=str(tmp_path), save_every=0)
    ctx = _setup_distributed(config.device)
    trainer = ICLIPTrainer(config, ctx, tiny_vit(), dataset=random_dataset(8, 32), tokenizer=tokenizer())
    trainer.save()  # the state before any step: a checkpoint a resumed run starts from
    saved = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=False)
    assert saved["step"] == 0 and saved["elapsed_s"] >= 0.0 and saved["counters"][0]["samples"] == 0

    resumed = ICLIPTrainer(
        TrainConfig(**{**config.__dict__, "resume": "latest"}),
        ctx,
        tiny_vit(),
        dataset=random_dataset(8, 32),
        tokenizer=tokenizer(),
    )
    resumed.resume()
    assert resumed.step_index == 0 and resumed.run()["steps"] == 2
