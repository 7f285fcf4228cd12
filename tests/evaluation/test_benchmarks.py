"""``captum-iclip eval --benchmark``: the training-free segmentation protocol against a literal
re-implementation of the reference segmentors' inference, on fixtures in the datasets' real formats.

The reference (``_Reference*`` below) is written from reading SCLIP's ``clip_segmentor.py``
(``forward_feature``, ``forward_slide``, ``postprocess_result``, ``get_cls_idx``), its ``pamr.py``
(PAMR's shift kernels as 3 × 3 convolutions with dilation), NACLIP's whole-image path
(``slide_crop=0``) and ClearCLIP's zero padding of windows (``compute_padsize``), and from mmcv's
keep-ratio ``Resize`` (``rescale_size`` and OpenCV's bilinear resize, half-pixel centres, uint8
output). The model part (the tower's dense features with a method's last-block path) is the
method, not the harness; both sides use the adapter's. The model is a random open_clip ViT with
16-px patches at 224 px (so the protocol's 224-px windows are its native grid), small so that
the tests stay fast.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import zlib
from dataclasses import replace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import write_benchmark_dataset

from captum_iclip import ITSMAttribution
from captum_iclip.cli.eval import main
from captum_iclip.datasets import build_dataset
from captum_iclip.evaluation.benchmark_run import comparison_lines
from captum_iclip.evaluation.benchmarks import (
    BENCHMARKS,
    PROTOCOLS,
    benchmark_similarity,
    bilinear_matrix,
    class_queries,
    imagenet_templates,
    pamr,
    predict_labels,
    protocol_input,
    protocol_logits,
    protocol_settings,
    published_rows,
)
from captum_iclip.evaluation.config import EvalConfig
from captum_iclip.evaluation.metrics import SegmentationMetrics
from captum_iclip.evaluation.run import evaluate
from captum_iclip.models.attention import dense_path

MODEL_NAME = "tiny-benchmark-vit"
MODEL_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
PATCH = 16


class WordHashTokenizer:
    """Texts to token ids by a fixed hash of each word: a tokenizer as fast as the tests need.

    open_clip's BPE tokenizer spends ~0.1 ms a text (ftfy, regex), and a benchmark embeds its class
    names with 80 templates each (13 680 texts for COCO-Stuff); the text tower of a random model
    only needs distinct, deterministic inputs. The end-of-text id is the largest (open_clip pools there).
    """

    def __init__(self, context_length: int = 16) -> None:
        self.context_length = context_length

    def __call__(self, texts):
        ids = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            words = [zlib.crc32(word.encode()) % 49000 + 1 for word in text.lower().split()]
            tokens = [49406, *words[: self.context_length - 2], 49407]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("benchmarks")
    config = folder / f"{MODEL_NAME}.json"
    config.write_text(json.dumps(MODEL_CONFIG))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL_NAME).eval()
    with torch.no_grad():  # generic biases and norm scales, so that a forgotten one shows
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    checkpoint = folder / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    return {"folder": folder, "config": config, "checkpoint": checkpoint, "model": model}


@pytest.fixture(scope="module")
def voc21(files) -> dict:
    """VOC21 fixture: a 37 x 53 image (rescaled to 336 x 481, windows flush with the edge, a width that is no
    patch multiple) and a 30 x 40 one (336 x 448), with the SCLIP names' forward function."""
    root = write_benchmark_dataset(files["folder"] / "voc21", "voc21", [(37, 53), (30, 40)])
    sim = benchmark_similarity(files["model"], WordHashTokenizer(), "voc21")
    return {"root": root, "dataset": build_dataset("voc", root), "sim": sim}


# --------------------------------------------------------------------------- the reference, literally
def _reference_resize(image, short_side: int, mean, std) -> torch.Tensor:
    """mmcv ``Resize(scale=(2048, short_side), keep_ratio=True)`` with OpenCV's bilinear resize, then the
    segmentor's ``SegDataPreProcessor`` (mean and std in 0..255 units)."""
    pixels = np.asarray(image, dtype=np.float64)
    h, w = pixels.shape[:2]
    scale = min(2048 / max(h, w), short_side / min(h, w))
    new_w, new_h = int(w * scale + 0.5), int(h * scale + 0.5)

    def taps(n_in, n_out):
        position = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        low = np.minimum(np.floor(position).astype(int), n_in - 1)
        return low, np.minimum(low + 1, n_in - 1), (position - low)

    low, high, frac = taps(h, new_h)
    pixels = pixels[low] * (1 - frac)[:, None, None] + pixels[high] * frac[:, None, None]
    low, high, frac = taps(w, new_w)
    pixels = pixels[:, low] * (1 - frac)[None, :, None] + pixels[:, high] * frac[None, :, None]
    pixels = np.clip(np.floor(pixels + 0.5), 0, 255)  # uint8 output, rounded
    x = torch.from_numpy(pixels).float().permute(2, 0, 1)
    return (x - 255 * torch.tensor(mean).reshape(3, 1, 1)) / (255 * torch.tensor(std).reshape(3, 1, 1))


class _Reference:
    """SCLIP's ``CLIPForSegmentation`` inference (with NACLIP's whole-image and ClearCLIP's padded variants)."""

    def __init__(self, sim, variant: str, query_idx, logit_scale, prob_thd, area_thd, slide_crop, slide_stride, pad_to):
        self.sim, self.path = sim, (None if variant == "plain" else dense_path(variant))
        self.query_features = sim.text_features.float()
        self.query_idx = torch.tensor(query_idx)
        self.logit_scale, self.prob_thd, self.area_thd = logit_scale, prob_thd, area_thd
        self.slide_crop, self.slide_stride, self.pad_to = slide_crop, slide_stride, pad_to

    def forward_feature(self, img):
        # encode_image(return_all=True): the stride-16 patch embedding ignores the last (side mod 16) pixels.
        seen = img[..., : img.shape[-2] // PATCH * PATCH, : img.shape[-1] // PATCH * PATCH]
        with torch.no_grad():
            features = self.sim.adapter.dense_features(seen, path=self.path).float()
        features = features / features.norm(dim=-1, keepdim=True)
        logits = features[:, 1:] @ self.query_features.T
        w, h = img.shape[-2] // PATCH, img.shape[-1] // PATCH
        logits = logits.permute(0, 2, 1).reshape(-1, logits.shape[-1], w, h)
        return F.interpolate(logits, size=img.shape[-2:], mode="bilinear")

    def compute_padsize(self, H, W):
        left, right, t, b = 0, 0, 0, 0
        if W % self.pad_to:
            lr = self.pad_to - W % self.pad_to
            left, right = lr // 2, lr - lr // 2
        if H % self.pad_to:
            tb = self.pad_to - H % self.pad_to
            t, b = tb // 2, tb - tb // 2
        return left, right, t, b

    def forward_slide(self, img, ori_shape):
        stride, crop = self.slide_stride, self.slide_crop
        _, _, h_img, w_img = img.shape
        h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
        w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
        preds = img.new_zeros((1, len(self.query_features), h_img, w_img))
        count_mat = img.new_zeros((1, 1, h_img, w_img))
        for h_idx in range(h_grids):
            for w_idx in range(w_grids):
                y1, x1 = h_idx * stride, w_idx * stride
                y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                crop_img = img[:, :, y1:y2, x1:x2]
                H, W = crop_img.shape[2:]
                pad = self.compute_padsize(H, W) if self.pad_to else (0, 0, 0, 0)
                if any(pad):
                    crop_img = F.pad(crop_img, pad)
                crop_seg_logit = self.forward_feature(crop_img)
                if any(pad):
                    crop_seg_logit = crop_seg_logit[:, :, pad[2] : pad[2] + H, pad[0] : pad[0] + W]
                preds += F.pad(crop_seg_logit, (x1, preds.shape[3] - x2, y1, preds.shape[2] - y2))
                count_mat[:, :, y1:y2, x1:x2] += 1
        assert (count_mat == 0).sum() == 0
        return F.interpolate(preds / count_mat, size=ori_shape, mode="bilinear")

    def logits(self, img, ori_shape):
        if self.slide_crop:
            return self.forward_slide(img, ori_shape)
        # NACLIP with slide_crop=0: forward_feature at the input's size, then resized to the label.
        return F.interpolate(self.forward_feature(img), size=ori_shape, mode="bilinear", align_corners=False)

    def postprocess_result(self, seg_logits):
        seg_logits = (seg_logits[0] * self.logit_scale).softmax(0)
        num_cls, num_queries = int(max(self.query_idx)) + 1, len(self.query_idx)
        if num_cls != num_queries:
            cls_index = F.one_hot(self.query_idx).T.view(num_cls, num_queries, 1, 1)
            seg_logits = (seg_logits.unsqueeze(0) * cls_index).max(1)[0]
        if self.area_thd is not None:
            predictions = F.one_hot(seg_logits.argmax(0), num_cls).to(seg_logits.dtype)
            area_pred = predictions[:, :, 1:].sum((0, 1), keepdim=True)
            area_pred = (area_pred > self.area_thd * area_pred.sum()).to(seg_logits.dtype)
            seg_logits[1:] *= area_pred.transpose(0, -1)
        seg_pred = seg_logits.argmax(0, keepdim=True)
        seg_pred[seg_logits.max(0, keepdim=True)[0] < self.prob_thd] = 0
        return seg_pred[0]


def _reference_pamr(x, mask, num_iter, dilations=(8, 16)):
    """pamr.py's PAMR: LocalAffinityAbs, LocalAffinityCopy and LocalStDev as dilated 3 x 3 convolutions."""
    positions = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
    difference = torch.zeros(8, 1, 3, 3)
    copy = torch.zeros(8, 1, 3, 3)
    for i, (r, c) in enumerate(positions):
        difference[i, 0, 1, 1], difference[i, 0, r, c], copy[i, 0, r, c] = 1, -1, 1
    every = torch.zeros(9, 1, 3, 3)
    for i in range(9):
        every[i, 0, i // 3, i % 3] = 1

    def local(x, kernel):
        B, K, H, W = x.shape
        x = x.reshape(B * K, 1, H, W)
        out = torch.cat([F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations], 1)
        return out.view(B, K, -1, H, W)

    mask = F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=True)
    x_std = local(x, every).std(2, keepdim=True)
    x = (-local(x, difference).abs() / (1e-8 + 0.1 * x_std)).mean(1, keepdim=True)
    x = F.softmax(x, 2)
    for _ in range(num_iter):
        mask = (local(mask, copy) * x).sum(2)
    return mask


def _reference_labels(sim, image, label_shape, variant, settings, pamr_steps=0):
    _, query_idx = class_queries(settings.benchmark, settings.protocol)
    reference = _Reference(
        sim,
        variant,
        query_idx,
        settings.logit_scale,
        settings.probability_threshold,
        settings.area_threshold,
        settings.window or 0,
        settings.stride,
        settings.pad_multiple,
    )
    # The resized input: ours, which the resize test holds to mmcv's and OpenCV's (ties aside).
    img = protocol_input(image, settings, sim.adapter.image_mean, sim.adapter.image_std)[None]
    logits = reference.logits(img, label_shape)
    refined = logits
    if pamr_steps:
        refined = _reference_pamr(F.interpolate(img, size=label_shape, mode="bilinear"), logits, pamr_steps)
    return logits[0], refined[0], reference.postprocess_result(refined)


def _ours(sim, images, label_shapes, variant, settings, pamr_steps=0):
    itsm = ITSMAttribution(sim)

    def dense(crops):
        return itsm.attribute(crops, target=None, variant=variant, normalize=False, interpolate=False)

    inputs = [protocol_input(image, settings, sim.adapter.image_mean, sim.adapter.image_std) for image in images]
    _, query_class = class_queries(settings.benchmark, settings.protocol)
    num_classes = max(query_class) + 1
    results = []
    for x, logits, shape in zip(inputs, protocol_logits(dense, inputs, label_shapes, settings, PATCH), label_shapes):
        refined = logits
        if pamr_steps:  # on the normalised input resized to the label, as the segmentors do
            image = F.interpolate(x[None], size=shape, mode="bilinear", align_corners=False)
            refined = pamr(image, logits[None], pamr_steps)[0]
        results.append((logits, refined, predict_labels(refined, query_class, num_classes, settings)))
    return results


# --------------------------------------------------------------------------- parity
def test_resize_equals_mmcv_keep_ratio_rescale_and_opencv_bilinear(voc21):
    """Sizes exactly; values up to the rounding of exact halves (a sum of two taps with weight 1/2), which
    float noise sends either way: at most 1 grey level, at a few pixels."""
    settings = protocol_settings("voc21")
    sim = voc21["sim"]
    grey_level = 1 / (255 * min(sim.adapter.image_std))
    for image, _, _ in voc21["dataset"]:
        ours = protocol_input(image, settings, sim.adapter.image_mean, sim.adapter.image_std)
        reference = _reference_resize(image, 336, sim.adapter.image_mean, sim.adapter.image_std)
        assert ours.shape == reference.shape and min(ours.shape[-2:]) == 336
        difference = (ours - reference).abs()
        assert difference.max() <= grey_level + 1e-5 and (difference > 1e-5).float().mean() < 0.01
    assert ours.shape[-2:] == (336, 448)  # 30 x 40
    matrix = bilinear_matrix(14, 224).float()
    grid = torch.randn(3, 14, 14)
    expected = F.interpolate(grid[None], size=(224, 224), mode="bilinear", align_corners=False)[0]
    assert (matrix @ grid @ matrix.T - expected).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def voc21_reference(voc21) -> dict:
    """The reference's pre-PAMR logits, logits after 2 PAMR steps and labels, per (variant, image)."""
    settings = protocol_settings("voc21")
    return {
        (variant, index): _reference_labels(voc21["sim"], image, label.shape, variant, settings, pamr_steps=2)
        for variant in ("plain", "sclip")
        for index, (image, label, _) in enumerate(voc21["dataset"])
    }


@pytest.mark.parametrize("variant", ["plain", "sclip"])
def test_sclip_protocol_equals_the_reference_segmentor(voc21, voc21_reference, variant):
    """Windows, synonyms (26 background names, 7 for person, 5 for the tv), logit scale 65, probability
    threshold 0.1, area threshold 0.1 and 2 PAMR steps, on two images batched together (their windows
    share passes of the tower)."""
    settings = protocol_settings("voc21")
    images, labels = zip(*[(image, label) for image, label, _ in voc21["dataset"]])
    ours = _ours(voc21["sim"], images, [label.shape for label in labels], variant, settings, pamr_steps=2)
    for index, (logits, refined, predicted) in enumerate(ours):
        reference_logits, reference_refined, reference_labels = voc21_reference[(variant, index)]
        assert logits.shape[-2:] == reference_logits.shape[-2:] == labels[index].shape
        assert (logits - reference_logits).abs().max() <= 1e-5
        assert (refined - reference_refined).abs().max() <= 1e-5
        assert torch.equal(predicted, reference_labels)
    _, query_class = class_queries("voc21")
    unthresholded = predict_labels(ours[0][1], query_class, 21, protocol_settings("voc20"))  # no thresholds
    assert not torch.equal(unthresholded, ours[0][2])  # the thresholds decided some pixels


def test_naclip_whole_image_and_clearclip_padded_windows_equal_their_reference(files, voc21):
    naclip = protocol_settings("voc21", "naclip")
    assert naclip.window is None
    image, label, _ = voc21["dataset"][0]  # 336 x 481 at the protocol's size: 1 column beyond the last patch
    ((logits, _, predicted),) = _ours(voc21["sim"], [image], [label.shape], "naclip", naclip)
    reference_logits, _, reference_labels = _reference_labels(voc21["sim"], image, label.shape, "naclip", naclip)
    assert (logits - reference_logits).abs().max() <= 1e-5 and torch.equal(predicted, reference_labels)
    # ClearCLIP: 448-px windows every 224 px; a 20 x 200 image rescales to 205 x 2048, so its windows are
    # 205 px high, zero-padded to 208 (1 row above, 2 below) and cut back.
    clearclip = protocol_settings("voc21", "clearclip")
    root = write_benchmark_dataset(files["folder"] / "clearclip", "voc21", [(20, 200)])
    image, label, _ = build_dataset("voc", root)[0]
    sim = benchmark_similarity(files["model"], WordHashTokenizer(), "voc21", "clearclip")
    assert sim.num_prompts == 21  # ClearCLIP's names: one per class
    ((logits, _, predicted),) = _ours(sim, [image], [label.shape], "clearclip", clearclip)
    reference_logits, _, reference_labels = _reference_labels(sim, image, label.shape, "clearclip", clearclip)
    assert (logits - reference_logits).abs().max() <= 1e-5 and torch.equal(predicted, reference_labels)


def test_pamr_equals_the_reference():
    """10 steps, dilations 8 and 16 (SCLIP's and NACLIP's), on a batch of 2; the pipeline's 2 steps are in
    the SCLIP-protocol test."""
    generator = torch.Generator().manual_seed(0)
    image, logits = torch.randn(2, 3, 40, 50, generator=generator), torch.randn(2, 5, 40, 50, generator=generator)
    refined = pamr(image, logits, steps=10)
    assert (refined - _reference_pamr(image, logits, 10)).abs().max() <= 1e-5
    assert (refined - logits).abs().max() > 0.1 and torch.equal(pamr(image, logits, 0), logits)
    with pytest.raises(ValueError, match="steps: expected a non-negative int"):
        pamr(image, logits, steps=-1)


def test_class_names_are_embedded_with_the_80_templates_as_the_reference_does(files, voc21):
    queries, query_class = class_queries("voc21")
    assert len(queries) == 56 and query_class.count(0) == 26 and query_class.count(15) == 7
    assert queries[query_class.index(20)] == "television monitor" and len(imagenet_templates()) == 80
    tokenizer, model = WordHashTokenizer(), files["model"]
    for index in (0, 40, 55):  # get_cls_idx's names; per name the 80 prompts, normalised, averaged, renormalised
        with torch.no_grad():
            feature = model.encode_text(tokenizer([template(queries[index]) for template in imagenet_templates()]))
        feature = feature / feature.norm(dim=-1, keepdim=True)
        feature = feature.mean(dim=0)
        feature = feature / feature.norm()
        assert (voc21["sim"].text_features[index] - feature).abs().max() <= 1e-6


# --------------------------------------------------------------------------- the command
def _cli(files, benchmark, root, out, *extra):
    return [
        "--benchmark",
        benchmark,
        "--root",
        str(root),
        "--model-config",
        str(files["config"]),
        "--model",
        MODEL_NAME,
        "--checkpoint",
        str(files["checkpoint"]),
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def test_the_command_equals_the_reference_on_the_whole_dataset(files, voc21, voc21_reference, tmp_path, monkeypatch):
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda *args, **kwargs: WordHashTokenizer())
    args = _cli(files, "voc21", voc21["root"], tmp_path, "--method", "raw,sclip", "--batch-size", "2", "--pamr", "2")
    assert main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for name, variant in (("raw", "plain"), ("sclip", "sclip")):
        metric = SegmentationMetrics(21)
        for index, (_, label, _) in enumerate(voc21["dataset"]):
            metric.update(voc21_reference[(variant, index)][2], label)
        assert results["methods"][name]["segmentation"]["miou"] == pytest.approx(metric.compute()["miou"], abs=1e-12)
    assert results["benchmark"]["settings"]["logit_scale"] == 65.0 and results["benchmark"]["pamr"] == 2
    table = (tmp_path / "results.md").read_text()
    assert "Published mIoU beside ours" in table and "sclip protocol: short side 336 px" in table


def test_every_benchmark_runs_through_the_one_command(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda *args, **kwargs: WordHashTokenizer())
    for benchmark in BENCHMARKS:
        root = write_benchmark_dataset(tmp_path / benchmark, benchmark, [(12, 16)], seed=1)
        assert main(_cli(files, benchmark, root, tmp_path / f"out-{benchmark}", "--method", "naclip")) == 0, benchmark
        results = json.loads((tmp_path / f"out-{benchmark}" / "results.json").read_text())
        segmentation = results["methods"]["naclip"]["segmentation"]
        dataset = build_dataset(BENCHMARKS[benchmark].dataset, root)
        assert results["dataset"]["name"] == BENCHMARKS[benchmark].dataset
        assert segmentation["pixels"] == int((dataset[0][1] != 255).sum()) > 0
        assert 0 <= segmentation["miou"] <= 100
        assert len(results["prompts"]) == len(class_queries(benchmark)[0])
    assert "Published mIoU beside ours" in capsys.readouterr().out


def _rank_main(rank: int, port: int, args: list[str], status) -> None:
    """One rank of a 2-process gloo group, with the environment torchrun gives it. Forked from the test
    (torchrun's fresh interpreters spend ~15 s each importing torch and open_clip on a loaded 2-core
    machine); the command joins the group exactly as under torchrun."""
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    status[rank] = main(args)


def test_two_gloo_processes_equal_one_process(files, tmp_path, monkeypatch):
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda *args, **kwargs: WordHashTokenizer())
    root = write_benchmark_dataset(tmp_path / "voc20", "voc20", [(12, 16), (16, 12), (10, 10)], seed=2)
    variants = ["raw", "surgery", "maskclip", "clearclip", "sclip", "naclip"]  # every ITSM variant of a ViT
    args = ["--method", ",".join(variants), "--batch-size", "1"]
    assert main(_cli(files, "voc20", root, tmp_path / "one", *args)) == 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("fork")
    status = context.Array("i", [-1, -1])
    ranks = [
        context.Process(
            target=_rank_main, args=(rank, port, _cli(files, "voc20", root, tmp_path / "two", *args), status)
        )
        for rank in range(2)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
    hung = [process for process in ranks if process.is_alive()]
    for process in hung:
        process.kill()
    assert not hung and list(status) == [0, 0]
    one, two = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two"))
    assert one["world_size"] == 1 and two["world_size"] == 2
    for name in variants:
        assert two["methods"][name]["segmentation"] == one["methods"][name]["segmentation"]
        assert one["methods"][name]["segmentation"]["pixels"] > 0


# --------------------------------------------------------------------------- settings, names, figures
def test_protocol_settings_are_the_repositories_configurations():
    sclip = {b: protocol_settings(b) for b in BENCHMARKS}
    assert (sclip["voc21"].logit_scale, sclip["voc21"].probability_threshold, sclip["voc21"].area_threshold) == (
        65,
        0.1,
        0.1,
    )
    assert (sclip["context60"].logit_scale, sclip["coco-object"].probability_threshold) == (50, 0.1)
    assert [sclip[b].short_side for b in ("coco-stuff", "cityscapes", "ade20k")] == [448, 560, 336]
    assert all((s.window, s.stride, s.pad_multiple) == (224, 112, None) for s in sclip.values())
    assert (
        protocol_settings("coco-stuff", "naclip").short_side == 336
        and protocol_settings("voc20", "naclip").window is None
    )
    clear = protocol_settings("cityscapes", "clearclip")
    assert (clear.short_side, clear.window, clear.stride, clear.logit_scale) == (448, 224, 224, 50)
    proxy = protocol_settings("voc21", "proxyclip")
    assert (proxy.window, proxy.stride, proxy.probability_threshold, proxy.pad_multiple) == (336, 112, 0.2, 56)
    for protocol in PROTOCOLS:
        for benchmark in BENCHMARKS:
            queries, query_class = class_queries(benchmark, protocol)
            dataset_classes = max(query_class) + 1
            assert sorted(set(query_class)) == list(range(dataset_classes)) and len(queries) >= dataset_classes
            if protocol_settings(benchmark, protocol).probability_threshold:
                assert benchmark in ("voc21", "context60", "coco-object")  # class 0 is their background
    with pytest.raises(ValueError, match="protocol: expected one of"):
        protocol_settings("voc21", "mmseg")
    with pytest.raises(ValueError, match="benchmark: expected one of"):
        class_queries("voc")


def test_predict_labels_known_answer():
    # Classes 0, 1, 2; class 1 has two names. 13 pixels in a row: 11 where class 1's first name wins,
    # 1 where its second name wins, 1 where class 2 wins.
    logits = torch.zeros(4, 1, 13)
    logits[1, 0, :11], logits[2, 0, 11], logits[3, 0, 12] = 0.5, 0.5, 0.5
    plain = protocol_settings("voc20")  # logit scale 40, no thresholds
    assert predict_labels(logits, [0, 1, 1, 2], 3, plain).tolist() == [[1] * 12 + [2]]
    # voc21: class 2 holds 1 of the 13 foreground pixels (under 10 %): its probabilities go, and what is
    # left there (classes 0 and 1 tie at a tiny probability) is under the 0.1 threshold: class 0.
    assert predict_labels(logits, [0, 1, 1, 2], 3, protocol_settings("voc21")).tolist() == [[1] * 12 + [0]]
    # Without a winner the probability threshold alone sends a pixel to class 0.
    flat = torch.zeros(4, 1, 2)
    flat[1, 0, 1] = 0.5
    assert predict_labels(flat, [0, 1, 1, 2], 3, replace(plain, probability_threshold=0.3)).tolist() == [[0, 1]]


def test_published_rows_are_shown_beside_ours():
    rows = published_rows("sclip", "ViT-B-16/openai", "voc21")
    assert [row["miou"] for row in rows] == [59.1, 59.63] and published_rows("sclip", "RN50/openai", "voc21") == []
    naclip = {row["pamr"]: row["miou"] for row in published_rows("naclip", "ViT-B-16/openai", "voc21")}
    assert naclip == {0: 58.9, 10: 64.07}
    assert published_rows("clearclip", "ViT-B-16/openai", "voc21")[0]["miou"] == 51.8
    results = {
        "model": "ViT-B-16/openai",
        "benchmark": {"name": "voc21", "protocol": "sclip", "pamr": 0},
        "methods": {"sclip": {"segmentation": {"miou": 58.0}}, "surgery": {"segmentation": {"miou": 20.0}}},
        "published": rows,
    }
    lines = comparison_lines(results)
    assert "| sclip | 58.00 | 59.10 | sclip, 0 |" in "\n".join(lines)
    assert any(line.startswith("| surgery | 20.00 | – |") for line in lines)


def test_bad_benchmark_input_is_reported(files, voc21, tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError, match="dataset: expected 'voc'"):
        EvalConfig("coco", "x", methods=["raw"], tasks=["segmentation"], benchmark="voc21")
    with pytest.raises(ValueError, match="tasks: expected"):
        EvalConfig("voc", "x", methods=["raw"], benchmark="voc21")
    with pytest.raises(ValueError, match="pamr: expected a non-negative int"):
        EvalConfig("voc", "x", methods=["raw"], tasks=["segmentation"], benchmark="voc21", pamr=-1)
    with pytest.raises(ValueError, match="benchmark: expected a benchmark name"):
        EvalConfig("voc", "x", methods=["raw"], protocol="naclip")
    with pytest.raises(ValueError, match="resolution: expected None with a benchmark"):
        EvalConfig("voc", "x", methods=["raw"], tasks=["segmentation"], benchmark="voc21", resolution=448)
    with pytest.raises(ValueError, match="background_threshold: expected None with a benchmark"):
        EvalConfig("voc", "x", methods=["raw"], tasks=["segmentation"], benchmark="voc21", background_threshold=0.2)
    config = EvalConfig("voc", "x", methods=["mmp"], tasks=["segmentation"], benchmark="voc21", out=None)
    with pytest.raises(ValueError, match="methods: expected ITSM methods"):
        evaluate(config, voc21["sim"], dataset=voc21["dataset"])
    with pytest.raises(ValueError, match="sim: expected one prompt per class name"):
        evaluate(config, benchmark_similarity(files["model"], WordHashTokenizer(), "voc20"), dataset=voc21["dataset"])
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda *args, **kwargs: WordHashTokenizer())
    assert main(_cli(files, "voc21", voc21["root"], tmp_path, "--dataset", "coco")) == 2
    assert "--dataset: expected 'voc'" in capsys.readouterr().err
