"""The method registry: every explanation method that ``demo``, ``eval``, ``audit`` and the benchmarks compare.

Each entry (:class:`MethodInfo`) holds the method's name, its title in tables and
figures, its colour in plots, its kind, and a builder. A built method maps a batch
of images (a tensor, or Captum's 1-tuple of one) and one prompt index per image to
maps (N, 1, H, W), returned in the same form; higher means "more of this prompt
here". They all explain the same :class:`~captum_iclip.CLIPSimilarity`:

* ``raw``: ITSM on the recognition projection (Li et al. 2022; docs/methods.md §1);
* ``surgery``: ITSM with CLIP Surgery, recognition projection (Li et al. 2023; docs/methods.md §2);
* ``iclip``: ITSM on the interpretability projection of a ``DualProjectionCLIP`` (docs/methods.md §4);
* ``mmp``: masked-max-pooling attribution (docs/methods.md §3), DINO masks when a provider is given;
* ``gradcam``: Captum ``LayerGradCam`` on the patch grid, upsampled;
* ``ig``: Captum ``IntegratedGradients`` (black baseline in pixel space), summed over channels;
* ``occlusion``: Captum ``Occlusion`` with patch-sized windows, summed over channels;
* ``gem``, ``legrad``, ``chefer``, ``gradeclip``: :class:`~captum_iclip.GEMAttribution`,
  :class:`~captum_iclip.LeGradAttribution`, :class:`~captum_iclip.CheferRelevancy`,
  :class:`~captum_iclip.GradECLIPAttribution`;
* ``maskclip``, ``clearclip``, ``sclip``, ``naclip``: ITSM with that variant (recognition projection);
* ``proxyclip``: :class:`~captum_iclip.ProxyCLIPAttribution` with the DINO model of the mask source as its
  proxy (the bundled model's, or ``--dino``'s); it applies only where there is one;
* ``m2ib``: :class:`~captum_iclip.M2IBAttribution` at the reference's defaults (10 Adam steps of 10 noisy
  copies per image, through the blocks after the bottleneck: about 100 forward and backward passes of
  those blocks per image, against 16 of the whole tower for ``ig``).

"raw" always means the first: ITSM without surgery (variant ``"plain"``), on the recognition projection.
The methods of :data:`VIT_METHODS` need a ViT tower (any of them: the shared block loop runs every one; not the
ResNets or the convolutional timm trunks).
Captum's perturbation methods on segments (:class:`~captum_iclip.SegmentAttribution`) are not registered:
on the patch grid they are ``occlusion``, elsewhere they need segments per image (docs/methods.md §11).

Adding a method is one :func:`register_method` call (in this module, or in the
module that defines the method).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from captum_iclip._precision import full_precision, upcast
from captum_iclip.attr.chefer import CheferRelevancy
from captum_iclip.attr.gem import GEMAttribution
from captum_iclip.attr.gradeclip import GradECLIPAttribution
from captum_iclip.attr.itsm import ITSMAttribution
from captum_iclip.attr.legrad import LeGradAttribution
from captum_iclip.attr.m2ib import M2IBAttribution
from captum_iclip.attr.mmp import MaskedMaxPoolingAttribution
from captum_iclip.attr.proxyclip import ProxyCLIPAttribution
from captum_iclip.models.attention import PATH_VARIANTS
from captum_iclip.models.base import BLOCK_LOOP_TOWERS, CLASS_TOKEN_TOWERS, ViTAdapter
from captum_iclip.similarity import CLIPSimilarity

Method = Callable[[Tensor, Tensor], Tensor]
KINDS = ("itsm", "attention", "pooling", "gradient", "perturbation")
"""``itsm``: similarity maps of every prompt from one pass (also scored as open-vocabulary
segmentation); ``attention``: similarity maps read through a changed attention path (GEM);
``pooling``: an exact decomposition of a pooled score; ``gradient``: gradients of the score
(Captum's own methods, LeGrad, Chefer relevancy, Grad-ECLIP); ``perturbation``: Captum's own methods on
the same forward function."""


@dataclass(frozen=True)
class BuildOptions:
    """What a builder may read besides the forward function."""

    mask_provider: Any = None  # foreground masks of mmp (None: every patch)
    ig_steps: int = 16  # integration steps of ig
    baseline: Tensor | None = None  # (3,) or (1, 3, H, W) baseline of ig; default the normalised black image
    ig_batch: int | None = None  # images per forward pass of ig (Captum's internal_batch_size); None: all steps at once
    upsample: bool = True  # False: patch-grid maps (MethodInfo.patch_grid methods only), not upsampled to the input
    proxy: Any = None  # the proxy vision model of proxyclip (a DINO mask provider or backbone; None: none)


@dataclass(frozen=True)
class MethodInfo:
    """One registered explanation method.

    Attributes:
        name: the name used on the command line and in result files.
        title: the name shown in tables and figures.
        colour: a matplotlib colour for plots of this method.
        kind: one of :data:`KINDS`.
        build: ``build(sim, options) -> fn(images, targets) -> (N, 1, H, W)``.
        itsm: for ``kind="itsm"``, the ``(variant, projection)`` of
            :class:`~captum_iclip.ITSMAttribution` that gives every prompt's map at once.
        needs_interpretability: applies only to models with an interpretability
            projection (a ``DualProjectionCLIP``).
        needs_vit: applies only to the ViT towers, whose blocks the shared block loop computes from
            their parts (the methods that change or read their attention: not the ResNets or the
            convolutional timm trunks, docs/methods.md §8).
        needs_surgery: applies only to towers CLIP Surgery is defined on (not the
            convolutional timm trunks, docs/methods.md §8).
        every_prompt: the built method also takes ``target=None`` and then returns
            every prompt's maps (N, K, H, W) from one pass (Captum's semantics of the
            map methods); the others take one prompt per image only.
        patch_grid: the method's maps are computed on the patch grid and upsampled, and its
            builder honours ``BuildOptions.upsample=False`` (the maps before upsampling).
        needs_proxy: applies only with a proxy vision model (``BuildOptions.proxy``: by default the
            DINO model of the mask source).
        needs_class_token: applies only to ViT towers whose embedding is their class token (Grad-ECLIP).
    """

    name: str
    title: str
    colour: str
    kind: str
    build: Callable[[CLIPSimilarity, BuildOptions], Method]
    itsm: tuple[str, str] | None = None
    needs_interpretability: bool = False
    needs_vit: bool = False
    needs_surgery: bool = False
    every_prompt: bool = False
    patch_grid: bool = False
    needs_proxy: bool = False
    needs_class_token: bool = False

    def applies_to(self, sim: CLIPSimilarity, proxy: Any = None) -> bool:
        """Whether the method can explain ``sim`` (with ``proxy`` as its proxy vision model, if it needs one)."""
        if self.needs_vit and not (isinstance(sim.adapter, ViTAdapter) and sim.adapter.blocks_in_parts):
            return False
        if self.needs_proxy and proxy is None:
            return False
        if self.needs_class_token and not sim.adapter.pools_class_token:
            return False
        if self.needs_surgery and not sim.adapter.has_surgery:
            return False
        return not self.needs_interpretability or sim.adapter.interpretability_head is not None

    @property
    def requirement(self) -> str:
        """What the method needs of the model, for error messages ("it needs …")."""
        if self.needs_interpretability:
            return "a DualProjectionCLIP model (an interpretability projection)"
        if self.needs_surgery:
            return "a tower CLIP Surgery is defined on (a ViT, EVA or ResNet attention pool)"
        if self.needs_class_token:
            return CLASS_TOKEN_TOWERS
        if self.needs_proxy:
            return f"a proxy vision model (a DINO mask source: the bundled model's, or --dino) and {BLOCK_LOOP_TOWERS}"
        return BLOCK_LOOP_TOWERS if self.needs_vit else "any model"


REGISTRY: dict[str, MethodInfo] = {}


def register_method(info: MethodInfo) -> MethodInfo:
    """Add a method to :data:`REGISTRY` (and so to ``demo``, ``eval``, ``audit``); returns it."""
    if info.kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {info.kind!r}")
    if info.kind == "itsm" and info.itsm is None:
        raise ValueError(f"itsm: expected (variant, projection) for the itsm method {info.name!r}, got None")
    if info.name in REGISTRY:
        raise ValueError(f"name: expected a new method name, got {info.name!r} (already registered)")
    REGISTRY[info.name] = info
    return info


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(REGISTRY)


def method_info(name: str) -> MethodInfo:
    """The registry entry of ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"method: expected one of {method_names()}, got {name!r}")
    return REGISTRY[name]


def method_title(name: str) -> str:
    """The title of a registered method, or the name itself for a method given as a function."""
    return REGISTRY[name].title if name in REGISTRY else name


def method_colour(name: str) -> str:
    """The plot colour of a registered method; black for a method given as a function (no registered
    method is black)."""
    return REGISTRY[name].colour if name in REGISTRY else "black"


def build_method(
    name: str,
    sim: CLIPSimilarity,
    *,
    mask_provider: Any = None,
    ig_steps: int = 16,
    baseline: Tensor | None = None,
    ig_batch: int | None = None,
    upsample: bool = True,
    proxy: Any = None,
) -> Method:
    """Return ``fn(images, target) -> (N, 1, H, W)`` for method ``name`` (Captum's explanation-function form).

    Args:
        name: a name of :data:`REGISTRY`.
        sim: the forward function.
        mask_provider: foreground masks for ``mmp`` (``None``: all patches).
        ig_steps: integration steps of ``ig``.
        baseline: (3,) or (1, 3, H, W) baseline of ``ig`` in the model's input
            space; default the normalised black image.
        ig_batch: images per forward pass of ``ig`` (Captum's ``internal_batch_size``);
            ``None`` runs every step of every image at once.
        upsample: ``False`` returns the maps on the patch grid, before upsampling (only
            for methods with :attr:`MethodInfo.patch_grid`).
        proxy: the proxy vision model of ``proxyclip``; ``None``: the DINO model of ``mask_provider``
            (:func:`method_proxy`).

    Raises:
        ValueError: an unknown name, a method that does not apply to ``sim``, or
            ``upsample=False`` for a method whose maps are not on the patch grid.
    """
    info = method_info(name)
    proxy = method_proxy(mask_provider, proxy)
    if not info.applies_to(sim, proxy):
        raise ValueError(
            f"method: expected a method that applies to this model, got {name!r} (it needs {info.requirement})"
        )
    if not upsample and not info.patch_grid:
        raise ValueError(
            f"upsample: expected True for {name!r} (its maps are not computed on the patch grid), got False"
        )
    method = info.build(sim, BuildOptions(mask_provider, ig_steps, baseline, ig_batch, upsample, proxy))

    def run(images, target):
        # Captum's metrics (sensitivity_max) call explanation functions with 1-tuples and target=.
        if isinstance(images, tuple):
            return (method(images[0], target),)
        return method(images, target)

    return run


def available_methods(sim: CLIPSimilarity, *, mask_provider: Any = None, proxy: Any = None) -> dict[str, bool]:
    """Which registered methods apply to ``sim`` (``iclip`` needs a dual-projection model, ``proxyclip`` a proxy:
    ``proxy``, or the DINO model of ``mask_provider``)."""
    proxy = method_proxy(mask_provider, proxy)
    return {name: info.applies_to(sim, proxy) for name, info in REGISTRY.items()}


def method_proxy(mask_provider: Any = None, proxy: Any = None) -> Any:
    """The proxy vision model of ``proxyclip``: ``proxy`` when given, else the DINO provider behind
    ``mask_provider`` (:func:`~captum_iclip.masks.dino_provider`), else ``None``."""
    if proxy is not None or mask_provider is None:
        return proxy
    from captum_iclip.masks import dino_provider  # imports timm: only when there is a mask source

    return dino_provider(mask_provider)


def requirement(name: str) -> str:
    """What method ``name`` needs of the model, for error messages."""
    return method_info(name).requirement


# --------------------------------------------------------------------------- builders
def _itsm_builder(variant: str, projection: str) -> Callable[[CLIPSimilarity, BuildOptions], Method]:
    def build(sim: CLIPSimilarity, options: BuildOptions) -> Method:
        itsm = ITSMAttribution(sim)
        return lambda x, t: itsm.attribute(
            x, target=t, variant=variant, projection=projection, interpolate=options.upsample
        )

    return build


def _attribution_builder(cls: type) -> Callable[[CLIPSimilarity, BuildOptions], Method]:
    def build(sim: CLIPSimilarity, options: BuildOptions) -> Method:
        method = cls(sim)
        return lambda x, t: method.attribute(x, target=t, interpolate=options.upsample)

    return build


def _build_mmp(sim: CLIPSimilarity, options: BuildOptions) -> Method:
    mmp = MaskedMaxPoolingAttribution(sim, mask_provider=options.mask_provider)
    return lambda x, t: mmp.attribute(x, target=t, interpolate=options.upsample)


def _build_proxyclip(sim: CLIPSimilarity, options: BuildOptions) -> Method:
    proxyclip = ProxyCLIPAttribution(sim, options.proxy)
    return lambda x, t: proxyclip.attribute(x, target=t, interpolate=options.upsample)


def _build_gradcam(sim: CLIPSimilarity, options: BuildOptions) -> Method:
    from captum.attr import LayerAttribution, LayerGradCam

    gradcam = LayerGradCam(sim, sim.gradcam_layer())

    def run(x: Tensor, t: Tensor) -> Tensor:
        maps = gradcam.attribute(x, target=t, relu_attributions=True)
        with full_precision(x.device):  # upsampled in >= float32 (half-precision rules, docs/methods.md)
            maps = upcast(maps)
            if not options.upsample:
                return maps
            return LayerAttribution.interpolate(maps, tuple(x.shape[-2:]), interpolate_mode="bilinear")

    return run


def _build_ig(sim: CLIPSimilarity, options: BuildOptions) -> Method:
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(sim)

    def run(x: Tensor, t: Tensor) -> Tensor:
        base = _black(sim) if options.baseline is None else options.baseline
        base = base.to(x).expand_as(x) if base.dim() == 4 else base.to(x).reshape(1, 3, 1, 1).expand_as(x)
        maps = ig.attribute(x, baselines=base, target=t, n_steps=options.ig_steps, internal_batch_size=options.ig_batch)
        with full_precision(x.device):
            return upcast(maps).sum(dim=1, keepdim=True)

    return run


def _build_occlusion(sim: CLIPSimilarity, options: BuildOptions) -> Method:
    from captum.attr import Occlusion

    occlusion = Occlusion(sim)
    ph, pw = sim.adapter.patch_size

    def run(x: Tensor, t: Tensor) -> Tensor:
        with torch.no_grad():
            maps = occlusion.attribute(x, target=t, sliding_window_shapes=(3, ph, pw), strides=(3, ph, pw))
        with full_precision(x.device):
            return upcast(maps).sum(dim=1, keepdim=True)

    return run


def _black(sim: CLIPSimilarity) -> Tensor:
    """A black image in the model's normalised input space, as (3,)."""
    mean = torch.as_tensor(sim.adapter.image_mean)
    std = torch.as_tensor(sim.adapter.image_std)
    return -mean / std


_PATH_COLOURS = {"maskclip": "gold", "clearclip": "teal", "sclip": "navy", "naclip": "magenta"}
_PATH_TITLES = {
    "maskclip": "MaskCLIP ITSM",
    "clearclip": "ClearCLIP ITSM",
    "sclip": "SCLIP ITSM",
    "naclip": "NACLIP ITSM",
}

for _info in (
    MethodInfo(
        "raw",
        "raw ITSM",
        "tab:blue",
        "itsm",
        _itsm_builder("plain", "recognition"),
        itsm=("plain", "recognition"),
        every_prompt=True,
        patch_grid=True,
    ),
    MethodInfo(
        "surgery",
        "surgery ITSM",
        "tab:orange",
        "itsm",
        _itsm_builder("surgery", "recognition"),
        itsm=("surgery", "recognition"),
        needs_surgery=True,
        every_prompt=True,
        patch_grid=True,
    ),
    MethodInfo(
        "iclip",
        "ICLIP ITSM",
        "tab:green",
        "itsm",
        _itsm_builder("plain", "interpretability"),
        itsm=("plain", "interpretability"),
        needs_interpretability=True,
        every_prompt=True,
        patch_grid=True,
    ),
    MethodInfo("mmp", "masked max pooling", "tab:red", "pooling", _build_mmp, every_prompt=True, patch_grid=True),
    MethodInfo("gradcam", "LayerGradCam", "tab:purple", "gradient", _build_gradcam, patch_grid=True),
    MethodInfo("ig", "IntegratedGradients", "tab:brown", "gradient", _build_ig),
    MethodInfo("occlusion", "Occlusion", "tab:gray", "perturbation", _build_occlusion),
    *(
        MethodInfo(
            name, title, colour, kind, _attribution_builder(cls), needs_vit=True, every_prompt=True, patch_grid=True
        )
        for name, title, colour, kind, cls in (
            ("gem", "GEM", "tab:pink", "attention", GEMAttribution),
            ("legrad", "LeGrad", "tab:olive", "gradient", LeGradAttribution),
            ("chefer", "Chefer relevancy", "tab:cyan", "gradient", CheferRelevancy),
        )
    ),
    MethodInfo(
        "gradeclip",
        "Grad-ECLIP",
        "darkorange",
        "gradient",
        _attribution_builder(GradECLIPAttribution),
        needs_vit=True,
        needs_class_token=True,
        every_prompt=True,
        patch_grid=True,
    ),
    *(
        MethodInfo(
            variant,
            _PATH_TITLES[variant],
            _PATH_COLOURS[variant],
            "itsm",
            _itsm_builder(variant, "recognition"),
            itsm=(variant, "recognition"),
            needs_vit=True,
            every_prompt=True,
            patch_grid=True,
        )
        for variant in PATH_VARIANTS
    ),
    MethodInfo(
        "proxyclip",
        "ProxyCLIP",
        "limegreen",
        "attention",
        _build_proxyclip,
        needs_vit=True,
        needs_proxy=True,
        every_prompt=True,
    ),
    MethodInfo(
        "m2ib", "M2IB", "sienna", "gradient", _attribution_builder(M2IBAttribution), needs_vit=True, patch_grid=True
    ),
):
    register_method(_info)

METHODS = method_names()
"""The built-in method names (use :func:`method_names` to include methods registered later)."""
VIT_METHODS = tuple(name for name, info in REGISTRY.items() if info.needs_vit)
"""The built-in methods that need a ViT tower."""
