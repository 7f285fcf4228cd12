"""ITSM next to Captum's own tooling (docs/methods.md §6), on one shared ``CLIPSimilarity``.

Captum's methods and ours explain the same number: ``target=k`` is prompt k of the
(N, K) output. The gradient methods are checked against hand-written gradients of
``sim(x)[:, k]``, Occlusion against a whole-image window, and the metrics against
their definitions on a deterministic perturbation.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, NoiseTunnel, Occlusion, visualization
from captum.metrics import infidelity, sensitivity_max
from conftest import PROMPTS, make_images
from PIL import Image

from captum_iclip import CLIPSimilarity, ITSMAttribution

TARGET = 1


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return make_images(1, 3, 224, 224, seed=20)


@pytest.fixture(scope="module")
def scores(sim_b32, image) -> torch.Tensor:
    with torch.no_grad():
        return sim_b32(image)


# --- visualisation and smoothing -----------------------------------------------------------
def test_visualize_image_attr_draws_a_blended_heat_map(sim_b32, image, tmp_path):
    attribution = ITSMAttribution(sim_b32).attribute(image, target=TARGET)
    picture = (image[0] - image[0].min()) / (image[0].max() - image[0].min())
    figure, _ = visualization.visualize_image_attr(
        attribution[0].permute(1, 2, 0).numpy(),
        picture.permute(1, 2, 0).numpy(),
        method="blended_heat_map",
        sign="positive",
        use_pyplot=False,
        show_colorbar=True,
        title="ITSM",
    )
    path = tmp_path / "itsm.png"
    figure.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as png:
        png.verify()
        assert png.format == "PNG" and min(png.size) > 100


def test_noise_tunnel_smooths_itsm(sim_b32, image):
    torch.manual_seed(0)
    smoothed = NoiseTunnel(ITSMAttribution(sim_b32)).attribute(
        image, nt_type="smoothgrad", nt_samples=2, stdevs=0.1, target=TARGET
    )
    assert smoothed.shape == (1, 1, 224, 224)
    assert smoothed.min() >= 0 and smoothed.max() <= 1


# --- captum.metrics ---------------------------------------------------------------------
def drop_top_left_quadrant(inputs: torch.Tensor):
    """Deterministic perturbation for infidelity: I = the top-left quadrant of the input.

    Returns (I, inputs - I), Captum's (perturbation, perturbed input) convention, so
    the perturbed image is the input with that quadrant set to zero.
    """
    mask = torch.zeros_like(inputs)
    mask[..., :112, :112] = 1
    perturbation = inputs * mask
    return perturbation, inputs - perturbation


def test_infidelity_of_itsm_matches_its_definition(sim_b32, image, scores):
    attribution = ITSMAttribution(sim_b32).attribute(image, target=TARGET, normalize=False)
    attribution = attribution.expand_as(image)  # one value per pixel, shared by the channels
    value = infidelity(sim_b32, drop_top_left_quadrant, image, attribution, target=TARGET, n_perturb_samples=2)
    assert value.shape == (1,)

    perturbation, perturbed = drop_top_left_quadrant(image)
    with torch.no_grad():
        drop = scores[:, TARGET] - sim_b32(perturbed)[:, TARGET]
    expected = ((perturbation * attribution).sum() - drop) ** 2
    torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-7)


def test_sensitivity_max_runs_on_itsm(sim_b32, image):
    torch.manual_seed(0)
    itsm = ITSMAttribution(sim_b32)
    value = sensitivity_max(itsm.attribute, image, target=TARGET, n_perturb_samples=2, perturb_radius=0.02)
    assert value.shape == (1,)
    assert torch.isfinite(value).all() and value.item() > 0


# --- Captum's methods on the same forward function ---------------------------------------
def score_gradient(sim: CLIPSimilarity, inputs: torch.Tensor, target: int) -> torch.Tensor:
    inputs = inputs.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(sim(inputs)[:, target].sum(), inputs)
    return gradient


def test_integrated_gradients_explains_the_same_score(sim_b32, image):
    """With the right Riemann rule and 2 steps IG is (x - 0) * mean of the gradients at x/2 and x."""
    attribution = IntegratedGradients(sim_b32).attribute(
        image, target=TARGET, n_steps=2, method="riemann_right", internal_batch_size=2
    )
    gradients = score_gradient(sim_b32, torch.cat([image / 2, image]), TARGET)
    expected = image * gradients.mean(dim=0, keepdim=True)
    assert attribution.shape == image.shape
    torch.testing.assert_close(attribution, expected, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("name, grid", [("vit_b32", 7), ("rn50", 7)])
def test_layer_gradcam_on_the_grid_tap(name, grid, request, sim_b32):
    if name == "vit_b32":
        sim = sim_b32
    else:  # random prompt embeddings spare the text tower
        sim = CLIPSimilarity(request.getfixturevalue(name), text_features=torch.randn(len(PROMPTS), 1024))
    image = make_images(1, 3, 224, 224, seed=21)
    layer = sim.gradcam_layer()
    cam = LayerGradCam(sim, layer).attribute(image, target=TARGET)
    assert cam.shape == (1, 1, grid, grid)

    # Grad-CAM by hand (Captum's default keeps negative values: no ReLU):
    # channel weights = spatial mean of d score / d activation.
    captured = {}
    handle = layer.register_forward_hook(lambda module, args, output: captured.setdefault("map", output))
    try:
        score = sim(image.clone().requires_grad_(True))[:, TARGET].sum()
    finally:
        handle.remove()
    activation = captured["map"]
    (gradient,) = torch.autograd.grad(score, activation)
    expected = (gradient.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1, keepdim=True)
    torch.testing.assert_close(cam, expected.detach(), rtol=1e-4, atol=1e-7)

    upsampled = LayerAttribution.interpolate(cam, (224, 224), interpolate_mode="bilinear")
    assert upsampled.shape == (1, 1, 224, 224)


def test_occlusion_of_the_whole_image_is_the_score_drop(sim_b32, image, scores):
    attribution = Occlusion(sim_b32).attribute(
        image, target=TARGET, sliding_window_shapes=(3, 224, 224), strides=(3, 224, 224), baselines=0.0
    )
    with torch.no_grad():
        drop = scores[0, TARGET] - sim_b32(torch.zeros_like(image))[0, TARGET]
    torch.testing.assert_close(attribution, torch.full_like(image, drop.item()), rtol=1e-5, atol=1e-6)


# --- outputs and prompt ensembling --------------------------------------------------------------
# The score plumbing does not depend on the tower's size: the tiny ViT keeps these cheap.
@torch.no_grad()
def test_cosine_logits_and_probs_outputs(tiny_vit):
    images = make_images(2, 3, 8, 8, seed=22)
    text = torch.randn(4, 8, generator=torch.Generator().manual_seed(22))
    cosine, logits, probs = (
        CLIPSimilarity(tiny_vit, text_features=text, output=kind)(images) for kind in ("cosine", "logits", "probs")
    )
    expected = F.normalize(tiny_vit.encode_image(images), dim=-1) @ F.normalize(text, dim=-1).t()
    torch.testing.assert_close(cosine, expected, rtol=1e-5, atol=1e-6)
    scale = tiny_vit.logit_scale.exp()
    assert scale > 1  # so that logits and cosines differ
    torch.testing.assert_close(logits, scale * expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs, (scale * expected).softmax(dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(2))


@torch.no_grad()
def test_prompt_ensembling_is_the_mean_of_normalised_embeddings(tiny_vit, tiny_tokenizer):
    # A format string, a callable, and a prefix without "{}" (the prompt is appended).
    templates = ["a photo of a {}.", lambda name: f"a drawing of a {name}", "art:"]
    sim = CLIPSimilarity(tiny_vit, tiny_tokenizer, ["cat", "dog"], templates=templates)
    texts = [f"{kind} {name}" for name in ("cat", "dog") for kind in ("a photo of a", "a drawing of a", "art:")]
    texts = [t + "." if t.startswith("a photo") else t for t in texts]
    embeddings = F.normalize(tiny_vit.encode_text(tiny_tokenizer(texts)), dim=-1).reshape(2, 3, -1)
    expected = F.normalize(embeddings.mean(dim=1), dim=-1)
    torch.testing.assert_close(sim.text_features, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)
