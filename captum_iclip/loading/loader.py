"""The one loader of the package (:mod:`captum_iclip.loading`): CLIP models and mask sources by the names users know.

:func:`load` takes a bundled model name (``"shapes-tiny"``), an open_clip
architecture with a pretrained tag or a checkpoint file, or a Hugging Face id or
folder, and returns everything a command needs (:class:`LoadedCLIP`).
:func:`mask_source` turns a ``--dino`` value into a mask provider. Every command
(``explain``, ``eval``, ``audit``, ``train``, ``demo``) loads through these two.

A new model family is one entry in :data:`FAMILIES`: a predicate that recognises
the spec and a function that loads it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from captum_iclip.devices import check_device
from captum_iclip.loading import bundled

BUNDLED_DEFAULT = "shapes-tiny"
HUB_PROBE_TIMEOUT = 2.0
"""Seconds a connection to the Hugging Face hub (or the configured proxy) may take before the loader calls
this machine offline and fails at once, instead of waiting on the libraries' retries."""

# What the advice of an error says, in the caller's terms: Python arguments for the API (str(error)),
# command-line flags for the commands (error.cli_message, which captum_iclip.cli prints).
_PY, _CLI = "python", "cli"


def _say(terms: str, python: str, cli: str) -> str:
    return python if terms == _PY else cli


def _bundled_advice(terms: str) -> str:
    return _say(
        terms,
        "or the bundled offline model: captum_iclip.load()",
        "or the bundled offline model: leave out the model options (or --model shapes-tiny)",
    )


def _tokenizer_hint(terms: str, repo: str) -> str:
    return (
        "Some tokenizers (SigLIP, SigLIP 2) are not bundled with open_clip but read from the Hugging Face hub: fetch "
        f"it once where there is network access (hf download {repo}; it is then read from the Hugging Face cache), "
        + _say(
            terms,
            "or pass a Hugging Face model folder that holds its tokenizer files: captum_iclip.load(hf_model=DIR); "
            "CLIPSimilarity(model, text_features=...) with precomputed text embeddings needs no tokenizer",
            "or use a Hugging Face model folder that holds its tokenizer files: --hf-model DIR",
        )
    )


def _offline_hint(terms: str) -> str:
    """What to do when weights cannot be fetched and no file is known to name."""
    return (
        "Download the weights where there is network access and pass the files: "
        + _say(
            terms,
            'an open_clip checkpoint with captum_iclip.load(NAME, checkpoint="open_clip_pytorch_model.bin"), or a '
            'Hugging Face model folder with captum_iclip.load(hf_model="DIR")',
            "an open_clip checkpoint with --model NAME --checkpoint open_clip_pytorch_model.bin, or a Hugging Face "
            "model folder with --hf-model DIR",
        )
        + "; "
        + _bundled_advice(terms)
        + "."
    )


OFFLINE_HINT = _offline_hint(_CLI)  # the former constant, in the commands' terms
TOKENIZER_HINT = _tokenizer_hint(_CLI, "{repo}")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched or found.

    ``str(error)`` gives the advice in Python arguments (``checkpoint="FILE"``); ``error.cli_message`` the same
    in command-line flags (``--checkpoint FILE``), which the commands print.
    """

    def __init__(self, message: str, cli_message: str | None = None):
        super().__init__(message)
        self.cli_message = cli_message or message


def _unavailable(error_class: type, render: Callable[[str], str]) -> Exception:
    """``error_class`` with the message ``render`` writes in Python terms and, as ``cli_message``, in flags."""
    error = error_class(render(_PY))
    error.cli_message = render(_CLI)
    return error


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """Why the Hugging Face hub cannot be reached from this machine, or ``None`` when it answers.

    ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set is an answer at once; otherwise one TCP
    connection to the hub's endpoint (or to the configured HTTPS proxy) gets ``timeout`` seconds. The
    libraries' own retries take a minute or two to give up offline.
    """
    import socket
    import threading
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        endpoint = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    failure: list[BaseException] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as error:
            failure.append(error)

    thread = threading.Thread(target=probe, name="captum-iclip-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return f"no answer from {host}:{port} within {timeout:g} s"
    if failure:
        return f"{host}:{port} cannot be reached: {type(failure[0]).__name__}: {failure[0]}"
    return None


class _HubOffline:
    """Within it, huggingface_hub (and so transformers, timm, open_clip) reads only its local cache:
    what is cached loads, what is not fails at once instead of after the retries."""

    def __enter__(self):
        import os

        from huggingface_hub import constants

        self._saved = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"
        return self

    def __exit__(self, *exc) -> None:
        import os

        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE, previous = self._saved
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _offline_context(offline: str | None):
    import contextlib

    return _HubOffline() if offline else contextlib.nullcontext()


def check_model_options(
    model_name: str | None, pretrained: str | None, checkpoint: str | None, hf_model: str | None
) -> None:
    """Refuse model options that contradict each other or would be ignored (a ``ValueError`` naming one).

    ``pretrained`` and ``checkpoint`` need an open_clip ``model_name`` (without one the bundled model
    would run, and the weights the user asked for would be ignored); a bundled model has its own
    weights; ``hf_model`` loads its own model and weights.
    """
    values = {"model_name": model_name, "pretrained": pretrained, "checkpoint": checkpoint}
    given = next((name for name in ("pretrained", "checkpoint") if values[name] is not None), None)
    if hf_model is not None:
        extra = "model_name" if model_name is not None else given
        if extra is not None:
            raise ValueError(
                f"{extra}: expected None with hf_model (--hf-model loads its own weights), got {values[extra]!r}"
            )
        return
    if given is None:
        return
    if model_name is None:
        raise ValueError(
            f"{given}: expected it together with model_name (--model NAME, the open_clip architecture the "
            f"weights are for; without --model the bundled model shapes-tiny is used), got {values[given]!r} alone"
        )
    if model_name in bundled.available():
        raise ValueError(
            f"{given}: expected it together with an open_clip architecture as --model (the bundled model has "
            f"its own weights), got the bundled model {model_name!r}"
        )


@dataclass
class LoadedCLIP:
    """A CLIP model with what is needed to use it.

    Attributes:
        model: the model to explain, in eval mode (a bundled model's ``DualProjectionCLIP``).
        preprocess: PIL image -> (3, S, S) tensor.
        tokenizer: the model's tokenizer.
        name: a readable name (``"shapes-tiny"``, ``"ViT-B-16/openai"``, a Hugging Face id).
        image_size: the side ``S`` that ``preprocess`` produces.
        mask_provider: the default mask source of masked max pooling (the bundled
            model's DINO), or ``None`` (every patch).
        bundle: the :class:`~captum_iclip.loading.bundled.ZooBundle` of a bundled model (its
            class names and training prompts), else ``None``.
        templates: the prompt templates to ensemble over with this model
            (``CLIPSimilarity(templates=...)``): a bundled model's, chosen with it;
            ``None`` (the prompt alone) for the others.
    """

    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    name: str
    image_size: int
    mask_provider: nn.Module | None = None
    bundle: Any = None
    templates: list[str] | None = None


@dataclass(frozen=True)
class ModelSpec:
    """What :func:`load` was asked for, as the loaders of :data:`FAMILIES` read it."""

    name: str | None
    pretrained: str | None
    checkpoint: str | None
    hf_model: str | None
    device: str
    image_size: int | None
    from_scratch: bool
    random_weights: bool = False


def load(
    spec: str | None = None,
    pretrained: str | None = None,
    *,
    checkpoint: str | None = None,
    hf_model: str | None = None,
    model_config: str | None = None,
    device: str = "cpu",
    image_size: int | None = None,
    from_scratch: bool = False,
    random_weights: bool = False,
    iclip: str | None = None,
) -> LoadedCLIP:
    """Load a CLIP model for attribution.

    Args:
        spec: a bundled model name (``"shapes-tiny"``, the default when nothing is
            given), an open_clip architecture name (``"ViT-B-16"``, ``"RN50"``,
            ``"ViT-B-16-SigLIP"``, ``"EVA02-B-16"``, ``"convnext_base"``, ...), or
            a Hugging Face id or local folder (same as ``hf_model``).
        pretrained: an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``),
            fetched and cached as open_clip does.
        checkpoint: a local open_clip checkpoint file for ``spec``.
        hf_model: a Hugging Face id or local folder with a ``CLIPModel``, ``SiglipModel``
            or ``Siglip2Model`` (chosen by the folder's ``config.json``).
        model_config: an open_clip model-config JSON to register first; its file
            stem is the architecture name (``spec`` may be omitted).
        device: where to put the model.
        image_size: resolution of the preprocessing (default: the model's own).
        from_scratch: an open_clip architecture with random weights (training).
        random_weights: explain an open_clip architecture with its random
            initialisation when neither ``pretrained`` nor ``checkpoint`` is given. Off
            by default: a random model explains nothing, so asking for one must be explicit.
        iclip: what ICLIP training (``captum-iclip train``, ``python -m captum_iclip.zoo.train``)
            wrote for this model: ``final.pt`` (the whole model, as ``last-k`` and ``full``
            modes need) or ``interpretability_head.pt`` (the head alone). The model is then a
            :class:`~captum_iclip.DualProjectionCLIP` with those weights.

    Returns:
        A :class:`LoadedCLIP` with the model in eval mode.

    Raises:
        WeightsUnavailableError: the weights cannot be fetched (offline) or found,
            with a message saying what to download and how to pass it.
        ValueError: options that contradict each other or would be ignored (``pretrained`` or
            ``checkpoint`` without an open_clip name, or with a bundled model or ``hf_model``), an
            open_clip name without weights and without ``random_weights``, an unknown or empty name, an
            ``image_size`` that is not a positive int, a device this machine does not have, a Hugging Face
            folder without a ``config.json``, of a model type other than :data:`HF_MODEL_TYPES`, or whose
            weights miss some of the model's.

    Examples::

        >>> import captum_iclip
        >>> loaded = captum_iclip.load("shapes-tiny")                    # bundled, offline
        >>> loaded = captum_iclip.load("ViT-B-16", "openai")             # doctest: +SKIP
        >>> loaded = captum_iclip.load("openai/clip-vit-base-patch16")   # doctest: +SKIP
    """
    check_device(device)
    for argument, value in (("spec", spec), ("hf_model", hf_model)):
        if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value).strip()):
            raise ValueError(
                f"{argument}: expected a bundled name, an open_clip name or a Hugging Face id or folder, got {value!r}"
            )
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0):
        raise ValueError(f"image_size: expected a positive int (pixels) or None (the model's own), got {image_size!r}")
    spec, hf_model = (None if value is None else str(value) for value in (spec, hf_model))
    name = _register_model_config(model_config, spec)
    if hf_model is None and name is not None and _is_hf_spec(name):
        name, hf_model = None, name
    check_model_options(name, pretrained, checkpoint, hf_model)
    request = ModelSpec(name, pretrained, checkpoint, hf_model, device, image_size, from_scratch, random_weights)
    for _, recognises, loader in FAMILIES:
        if recognises(request):
            return _with_iclip(loader(request), iclip)
    raise ValueError(f"spec: expected a bundled name, an open_clip name or a Hugging Face id, got {name!r}")


def _with_iclip(loaded: LoadedCLIP, path: str | None) -> LoadedCLIP:
    """``loaded`` with the weights of an ICLIP training output (``None``: as it is)."""
    if path is None:
        return loaded
    from captum_iclip.models.dual import DualProjectionCLIP

    if not Path(path).is_file():
        raise ValueError(f"iclip: expected a final.pt or interpretability_head.pt file, got {path!r} (no such file)")
    dual = loaded.model if isinstance(loaded.model, DualProjectionCLIP) else DualProjectionCLIP(loaded.model)
    parameter = next(loaded.model.parameters())
    try:
        dual.load_training_output(path, "iclip")
    except RuntimeError as error:  # load_state_dict: missing keys or other shapes
        raise ValueError(
            f"iclip: expected weights trained for {loaded.name}, got {path!r}, which does not fit it: "
            f"{str(error).splitlines()[0]}"
        ) from None
    loaded.model = dual.to(parameter.device).eval()
    return loaded


def mask_source(
    spec: str | nn.Module | None,
    *,
    checkpoint: str | None = None,
    tau: float = 0.6,
    input_mean: tuple[float, ...] | None = None,
    input_std: tuple[float, ...] | None = None,
    device: str = "cpu",
    cache: str | None = None,
) -> nn.Module | None:
    """The foreground mask provider of a ``--dino`` value.

    Args:
        spec: a timm DINO name (``"vit_small_patch16_224.dino"``, pretrained weights
            through timm unless ``checkpoint`` is given), a Hugging Face id or folder
            (``"facebook/dino-vits16"``), a tiny DINO saved by
            :func:`captum_iclip.models.tiny_dino.save_tiny_dino` (file or folder), a built
            DINO module, or ``None`` (no provider: every patch is foreground).
        checkpoint: a state-dict file for a timm name.
        tau: the attention mass kept (see :class:`~captum_iclip.masks.DINOMaskProvider`).
        input_mean, input_std: the CLIP model's input normalisation.
        device: where to put the DINO model.
        cache: a folder caching the masks on disk (:class:`~captum_iclip.masks.CachedMaskProvider`).

    Returns:
        A :class:`~captum_iclip.masks.MaskProvider`, or ``None`` for ``spec=None``.

    Raises:
        ValueError: ``checkpoint`` with a spec that is not a timm name, or a bad ``tau``.
    """
    if spec is None:
        return None
    import timm

    from captum_iclip.masks import CachedMaskProvider, DINOMaskProvider
    from captum_iclip.models.tiny_dino import CONFIG_NAME, load_tiny_dino

    options: dict[str, Any] = {}
    source: str | nn.Module = spec
    if isinstance(spec, str):
        path = Path(spec)
        if path.is_file() or (path.is_dir() and (path / CONFIG_NAME).is_file()):
            source = load_tiny_dino(path)
        elif timm.is_model(spec) and not path.exists():
            options = {"checkpoint": checkpoint} if checkpoint else {"pretrained": True}
            if not checkpoint:
                _check_timm_weights_reachable(spec)
    if checkpoint and not options:
        raise ValueError(f"dino_checkpoint: expected a timm model name in --dino, got {spec!r}")
    if input_mean is not None:
        options["input_mean"] = input_mean
    if input_std is not None:
        options["input_std"] = input_std
    provider = DINOMaskProvider(source, tau=tau, **options).to(device)
    return provider if cache is None else CachedMaskProvider(provider, cache)


def _check_timm_weights_reachable(name: str) -> None:
    """Offline, and timm's weights for ``name`` not cached: a :class:`WeightsUnavailableError` at once."""
    import timm

    try:
        repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    except (AttributeError, RuntimeError, ValueError):
        return
    if not repo:
        return
    offline = hub_unreachable()
    if not offline or _cached(repo, "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        return
    raise _unavailable(
        WeightsUnavailableError,
        lambda terms: (
            f"{_say(terms, 'spec', 'dino')}: expected timm weights of {name!r} this machine can fetch, got "
            f"none: this machine is offline ({offline}) and https://huggingface.co/{repo} is not in the local cache. "
            "Download the original DINO weights where there is network access (e.g. "
            "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth "
            "for a ViT-S/16) and pass the file: "
            + _say(
                terms,
                f'captum_iclip.mask_source("{name}", checkpoint="dino_deitsmall16_pretrain.pth")',
                f"--dino {name} --dino-checkpoint dino_deitsmall16_pretrain.pth",
            )
            + "."
        ),
    )


# --------------------------------------------------------------------------- families
def _register_model_config(model_config: str | None, spec: str | None) -> str | None:
    """Register an open_clip model-config JSON; its file stem names the architecture."""
    if model_config is None:
        return spec
    import open_clip

    path = Path(model_config)
    if not path.is_file():
        raise ValueError(f"model_config: expected an open_clip model-config JSON file, got {model_config!r}")
    open_clip.add_model_config(path)
    if spec is not None and spec != path.stem:
        raise ValueError(
            f"model: expected the name registered by model_config ({path.stem!r}, its file stem) or none, got {spec!r}"
        )
    return path.stem


def _is_hf_spec(name: str) -> bool:
    """A local folder or an ``owner/name`` hub id that is neither bundled nor an open_clip name."""
    if name.startswith(HF_HUB_PREFIX):  # open_clip's own hub syntax
        return False
    return Path(name).is_dir() or ("/" in name and not Path(name).exists())


def _is_bundled(request: ModelSpec) -> bool:
    if request.hf_model is not None or request.from_scratch:
        return False
    if request.name is None and BUNDLED_DEFAULT not in bundled.available():
        raise WeightsUnavailableError(
            f"model: expected an installed model, got the bundled model {BUNDLED_DEFAULT}, which is not installed (no "
            f"weights in {bundled.WEIGHTS_DIR}; train it with python -m captum_iclip.zoo.train); choose a model with "
            "--model/--pretrained, --checkpoint or --hf-model"
        )
    return (request.name or BUNDLED_DEFAULT) in bundled.available()


def _load_bundled(request: ModelSpec) -> LoadedCLIP:
    bundle = bundled.load(request.name or BUNDLED_DEFAULT, device=request.device)
    return LoadedCLIP(
        bundle.dual,
        bundle.preprocess,
        bundle.tokenizer,
        bundle.name,
        bundle.image_size,
        bundle.mask_provider,
        bundle,
        bundle.templates,
    )


def _did_you_mean(value: str | None, choices) -> str:
    """``"; did you mean 'X'?"`` for the closest of ``choices`` to ``value``, else nothing."""
    import difflib

    if not value:
        return ""
    by_lower = {str(choice).lower(): str(choice) for choice in choices}
    close = difflib.get_close_matches(value.lower(), list(by_lower), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(by_lower[c]) for c in close)}?" if close else ""


def _cached(repo: str, *filenames: str) -> bool:
    """Whether one of ``filenames`` of the hub repository ``repo`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, filename), str) for filename in filenames)


def _open_clip_weights_file(name: str, tag: str) -> tuple[str, bool]:
    """The download address of open_clip's ``tag`` weights for ``name``, and whether they are cached here."""
    import os

    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # "org/name/" -> ("org/name", ""): open_clip's default file
        filename = filename or "open_clip_pytorch_model.bin"
        names = (filename, filename.replace(".bin", ".safetensors"), "open_clip_model.safetensors")
        return f"https://huggingface.co/{repo}/resolve/main/{filename}", _cached(repo, *names)
    url = cfg.get("url", "")
    return url, bool(url) and os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))


def _offline_weights_error(name: str, tag: str, url: str, offline: str) -> WeightsUnavailableError:
    file = url.rsplit("/", 1)[-1] or "open_clip_pytorch_model.bin"

    def render(terms: str) -> str:
        return (
            f"pretrained: expected weights of open_clip {name!r} this machine can fetch, got {tag!r}: this machine "
            f"is offline ({offline}) and they are not in the local cache. Download {url or 'the checkpoint'} where "
            "there is network access and pass the file: "
            + _say(
                terms,
                f'captum_iclip.load("{name}", checkpoint="{file}"); to try the code without weights, '
                f'captum_iclip.load("{name}", random_weights=True)',
                f"--model {name} --checkpoint {file}; to try the command without weights, --model {name} "
                "--random-weights",
            )
            + "; "
            + _bundled_advice(terms)
            + "."
        )

    return _unavailable(WeightsUnavailableError, render)


def _check_open_clip_request(request: ModelSpec) -> None:
    """A known architecture (did you mean), one source of weights, a known tag, an existing checkpoint."""
    import open_clip

    name, pretrained, checkpoint = request.name, request.pretrained, request.checkpoint
    if name is not None and name.startswith(HF_HUB_PREFIX):
        return _load_open_clip_hub(request)
    if name is None or name not in open_clip.list_models():
        raise ValueError(
            f"model_name: expected an open_clip architecture (see open_clip.list_models()) or a bundled "
            f"model {bundled.available()}, got {name!r}"
            + _did_you_mean(name, [*bundled.available(), *open_clip.list_models()])
        )
    if pretrained is not None and checkpoint is not None:
        raise ValueError(f"checkpoint: expected None with pretrained (one source of weights), got {checkpoint!r}")
    if pretrained is None and checkpoint is None and not (request.random_weights or request.from_scratch):
        raise _unavailable(
            ValueError,
            lambda terms: (
                "model_name: expected "
                + _say(terms, "with pretrained or checkpoint", "with --pretrained or --checkpoint")
                + f", got {name!r} without weights; pass "
                + _say(
                    terms,
                    'pretrained="TAG" (one of open_clip.list_pretrained_tags_by_model(NAME)) or checkpoint="FILE", '
                    "or random_weights=True (from_scratch=True for training) to use a randomly initialised model "
                    "on purpose",
                    "--pretrained TAG or --checkpoint FILE, or --random-weights (--from-scratch for training) to use "
                    "a randomly initialised model on purpose",
                )
            ),
        )
    tags = [] if name.startswith("hf-hub:") else open_clip.list_pretrained_tags_by_model(name)
    if pretrained is not None and tags and pretrained not in tags and not Path(pretrained).is_file():
        raise ValueError(
            f"pretrained: expected one of open_clip's tags for {name!r} ({', '.join(tags)}), got {pretrained!r}"
            + _did_you_mean(pretrained, tags)
        )
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise WeightsUnavailableError(f"checkpoint: expected a file, got {checkpoint!r} (no file there)")


def _load_open_clip(request: ModelSpec) -> LoadedCLIP:
    import open_clip

    name, pretrained, checkpoint = request.name, request.pretrained, request.checkpoint
    _check_open_clip_request(request)
    weights = None if request.from_scratch else checkpoint or pretrained
    extra = {"force_image_size": request.image_size} if request.image_size else {}
    hf_tokenizer = (open_clip.get_model_config(name) or {}).get("text_cfg", {}).get("hf_tokenizer_name")
    downloads = weights is not None and weights == pretrained and not Path(pretrained).is_file()
    # Offline, fail in seconds (a 2-s probe, then the local cache only) instead of after the hubs' retries.
    offline = hub_unreachable() if downloads or hf_tokenizer or name.startswith("hf-hub:") else None
    if offline and hf_tokenizer and not _cached(hf_tokenizer, "tokenizer_config.json", "tokenizer.json"):
        raise _unavailable(
            WeightsUnavailableError,
            lambda terms: (
                f"model_name: expected a tokenizer available offline, got none for open_clip {name!r}: "
                f"this machine is offline ({offline}) and {hf_tokenizer} is not in the local cache.\n"
                + _tokenizer_hint(terms, hf_tokenizer)
            ),
        )
    if offline and downloads and not name.startswith("hf-hub:"):
        url, cached = _open_clip_weights_file(name, pretrained)
        if not cached:
            raise _offline_weights_error(name, pretrained, url, offline)
    # The tokenizer first: it is small, and a missing one should not cost a weights download.
    try:
        with _offline_context(offline):
            tokenizer = open_clip.get_tokenizer(name)
    except (OSError, ImportError, ValueError) as error:
        repo = hf_tokenizer or name
        raise _unavailable(
            WeightsUnavailableError,
            lambda terms, error=error: (
                f"model_name: expected a tokenizer available offline, got none for open_clip "
                f"{name!r}: {error}\n{_tokenizer_hint(terms, repo)}"
            ),
        ) from error
    try:
        with _offline_context(offline):
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=weights, device=request.device, **extra
            )
    except Exception as error:  # open_clip raises RuntimeError, UnpicklingError, KeyError, ... for a bad file
        if checkpoint is not None:
            reason = " ".join(str(error).split()) or type(error).__name__
            raise ValueError(
                f"checkpoint: expected weights of open_clip {name!r}, got {checkpoint}, which cannot be loaded "
                f"(corrupt, truncated or for another architecture): {type(error).__name__}: {reason[:300]}"
            ) from error
        if not isinstance(error, (OSError, RuntimeError, ValueError)):
            raise
        raise _unavailable(
            WeightsUnavailableError,
            lambda terms, error=error: (
                f"pretrained: expected weights of open_clip {name!r} this machine can "
                f"fetch, got {weights!r}: {error}\n{_offline_hint(terms)}"
            ),
        ) from error
    size = model.visual.image_size
    size = request.image_size or (size if isinstance(size, int) else size[0])
    return LoadedCLIP(model.eval(), preprocess, tokenizer, f"{name}/{weights}", int(size))


def _load_open_clip_hub(request: ModelSpec) -> LoadedCLIP:
    """An open_clip model named ``hf-hub:OWNER/NAME``: its config and weights come from that hub repository."""
    import open_clip

    name = request.name
    repo = name[len(HF_HUB_PREFIX) :].strip()
    if not repo:
        raise ValueError(f"model_name: expected {HF_HUB_PREFIX}OWNER/NAME (an open_clip hub repository), got {name!r}")
    for argument in ("pretrained", "checkpoint"):
        value = getattr(request, argument)
        if value is not None:
            raise ValueError(
                f"{argument}: expected None with an {HF_HUB_PREFIX} model (the repository holds its weights), "
                f"got {value!r}"
            )
    if request.from_scratch:
        raise ValueError(
            f"from_scratch: expected an open_clip architecture name (a random initialisation), got the hub model "
            f"{name!r}, which names its weights"
        )
    extra = {"force_image_size": request.image_size} if request.image_size else {}
    try:
        tokenizer = open_clip.get_tokenizer(name)
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=request.device, **extra)
    except Exception as error:  # huggingface_hub and open_clip raise OSError, RuntimeError, ValueError, ...
        reason = " ".join(str(error).split()) or type(error).__name__
        raise WeightsUnavailableError(
            f"model_name: expected an open_clip hub model this machine can fetch, got {name!r}: "
            f"{type(error).__name__}: {reason[:300]}\n{OFFLINE_HINT}"
        ) from error
    size = model.visual.image_size
    size = request.image_size or (size if isinstance(size, int) else size[0])
    return LoadedCLIP(model.eval(), preprocess, tokenizer, name, int(size))


def _hf_local_only(model_id: str) -> bool:
    """Whether to read ``model_id`` from disk only: a local folder (which must hold a config.json), or a hub
    id while the hub is unreachable (the local cache then, failing at once if it lacks the model)."""
    local = Path(model_id).is_dir()
    if local and not (Path(model_id) / "config.json").is_file():
        raise ValueError(
            f"hf_model: expected a Hugging Face model folder (the files save_pretrained writes, config.json first), "
            f"got {model_id!r}, which has no config.json"
        )
    offline = None if local else hub_unreachable()
    if offline and not _cached(model_id, "config.json"):
        folder = model_id.rstrip("/").rsplit("/", 1)[-1]
        raise _unavailable(
            WeightsUnavailableError,
            lambda terms: (
                f"hf_model: expected a Hugging Face model this machine can load, got {model_id!r}: this "
                f"machine is offline ({offline}) and the model is not in the local cache. Download its folder where "
                f"there is network access (hf download {model_id} --local-dir {folder}) and pass it: "
                + _say(terms, f'captum_iclip.load(hf_model="{folder}")', f"--hf-model {folder}")
                + "; "
                + _bundled_advice(terms)
                + "."
            ),
        )
    return local or bool(offline)


def _hf_model_type(model_id: str, local: bool) -> str:
    """The ``model_type`` of ``model_id``'s config, refused unless it is one of :data:`HF_MODEL_TYPES`."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(model_id, local_files_only=local).model_type
    except OSError as error:
        raise WeightsUnavailableError(
            f"hf_model: expected a Hugging Face model this machine can load, got {model_id!r}: {error}\n{OFFLINE_HINT}"
        ) from error
    except ValueError as error:  # a config.json without a model_type, or one this transformers does not know
        raise ValueError(
            f"hf_model: expected a Hugging Face model whose config.json names a model_type of "
            f"{sorted(HF_MODEL_TYPES)}, got {model_id!r}: {' '.join(str(error).split())[:300]}"
        ) from error
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"hf_model: expected a Hugging Face model of type {', '.join(HF_MODEL_TYPES)} "
            f"({', '.join(HF_MODEL_TYPES.values())}), got {model_id!r} of model_type {model_type!r}"
        )
    return model_type


def _load_hf(request: ModelSpec) -> LoadedCLIP:
    """A Hugging Face ``CLIPModel``, ``SiglipModel`` or ``Siglip2Model`` (by the config's ``model_type``).

    Any other ``model_type`` is refused, and so are weights that miss some of the model's (which
    transformers would fill with a random initialisation, leaving only a log line).
    """
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    model_id = request.hf_model
    local = _hf_local_only(model_id)
    model_type = _hf_model_type(model_id, local)
    model_class = getattr(transformers, HF_MODEL_TYPES[model_type])
    try:
        model, info = model_class.from_pretrained(model_id, local_files_only=local, output_loading_info=True)
        processor = AutoImageProcessor.from_pretrained(model_id, local_files_only=local)
    except OSError as error:
        raise _unavailable(
            WeightsUnavailableError,
            lambda terms, error=error: (
                f"hf_model: expected a Hugging Face model this machine can load, got "
                f"{model_id!r}: {error}\n{_offline_hint(terms)}"
            ),
        ) from error
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(
            f"hf_model: expected the weights of every parameter of its {model_class.__name__}, got {model_id!r}, "
            f"whose weights miss {len(missing)} ({shown}): they would be random"
        )
    model = model.to(request.device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=local)
    except (OSError, ImportError, ValueError) as error:
        raise _unavailable(
            WeightsUnavailableError,
            lambda terms, error=error: (
                f"hf_model: expected a tokenizer available offline, got none for Hugging "
                f"Face model {model_id!r}: {error}\n{_tokenizer_hint(terms, model_id)}"
            ),
        ) from error
    if model_type == "siglip2":
        preprocess, size = _siglip2_preprocess(processor, model, request.image_size)
        return LoadedCLIP(model, preprocess, tokenizer, model_id, size)
    size = request.image_size or model.config.vision_config.image_size

    def preprocess(image) -> torch.Tensor:
        if model_type == "siglip":  # SigLIP resizes to a square without cropping
            out = processor(images=image, return_tensors="pt", size={"height": size, "width": size})
        else:
            out = processor(
                images=image,
                return_tensors="pt",
                size={"shortest_edge": size},
                crop_size={"height": size, "width": size},
            )
        return out["pixel_values"][0]

    return LoadedCLIP(model, preprocess, tokenizer, model_id, int(size))


def _siglip2_preprocess(processor, model: nn.Module, image_size: int | None) -> tuple[Callable, int]:
    """SigLIP 2 (NaFlex) images as (3, S, S) tensors, with ``S``: resized (the processor's resampling) to a
    square whose patch grid is the model's position grid, rescaled and normalised as the processor does."""
    from torchvision.transforms import functional as TF

    from captum_iclip._io import read_image

    vision = model.config.vision_config
    size = image_size or int(round(vision.num_patches**0.5)) * vision.patch_size

    def preprocess(image) -> torch.Tensor:
        image = TF.resize(read_image(image), [size, size], interpolation=TF.InterpolationMode.BILINEAR)
        pixels = TF.to_tensor(image) * (255 * processor.rescale_factor)
        return TF.normalize(pixels, processor.image_mean, processor.image_std)

    return preprocess, int(size)


HF_MODEL_TYPES = {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model"}
"""The ``model_type`` values of the ``huggingface`` family, each with the transformers class it loads."""

HF_HUB_PREFIX = "hf-hub:"
"""open_clip's prefix of a model named by its Hugging Face hub repository (``hf-hub:OWNER/NAME``)."""

FAMILIES: list[tuple[str, Callable[[ModelSpec], bool], Callable[[ModelSpec], LoadedCLIP]]] = [
    ("huggingface", lambda request: request.hf_model is not None, _load_hf),
    ("bundled", _is_bundled, _load_bundled),
    ("open_clip", lambda request: True, _load_open_clip),
]
"""``(family, recognises(request), load(request))`` tried in order; the first that
recognises the request loads it. New families go before ``open_clip`` (the fallback).
``huggingface`` covers ``CLIPModel``, ``SiglipModel`` and ``Siglip2Model`` folders; open_clip's
timm towers (SigLIP, EVA02, ConvNeXt, FastViT) load through ``open_clip``."""

load_clip = load
"""The former name of :func:`load` (same arguments: ``load_clip(model_name, pretrained, ...)``)."""
