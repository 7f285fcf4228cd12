"""Dual projections (ICLIP, arXiv 2209.07046; docs/methods.md §4).

One projection for recognition, one for interpretability.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from captum_iclip._io import PathLike, atomic_torch_save, load_torch_file
from captum_iclip.models.base import VisionAdapter
from captum_iclip.models.registry import family_adapter

# The formats of the two files ICLIP training writes: the whole model and the interpretability head alone.
MODEL_FORMAT = "captum-iclip/dual-projection/1"
HEAD_FORMAT = "captum-iclip/interpretability-head/1"


class DualProjectionCLIP(nn.Module):
    r"""A CLIP model whose vision tower ends in two projections.

    * ``W_rec``, the model's own projection, applied to the global token: the
      recognition embedding. :meth:`encode_image` is the wrapped model's own
      ``encode_image`` (bit-identical), so zero-shot scores do not change.
    * ``W_int``, new, initialised as a copy of ``W_rec`` and applied to every
      patch token: the interpretability features read by ``ITSMAttribution``
      and ``MaskedMaxPoolingAttribution``. For ViTs it is a copy of ``proj``
      (open_clip) or ``visual_projection`` (Hugging Face); for ResNets a copy of
      the attention pool's value and output projections applied per position;
      for the timm and SigLIP towers a copy of their pooling head applied per
      position (docs/methods.md §8).

    The text tower is shared. Wrap it in a :class:`~captum_iclip.CLIPSimilarity`
    to get scores from the recognition projection and maps from the
    interpretability one.

    Args:
        model: any model :func:`~captum_iclip.get_adapter` supports: an open_clip CLIP
            model (ViT, ModifiedResNet or timm tower) or a Hugging Face ``CLIPModel``,
            ``SiglipModel`` or ``Siglip2Model``.
        interpretability_head: an existing head to use instead of a fresh copy.

    Examples::

        >>> import open_clip, torch
        >>> from captum_iclip import DualProjectionCLIP
        >>> clip = open_clip.create_model("ViT-B-32").eval()
        >>> dual = DualProjectionCLIP(clip)
        >>> x = torch.randn(1, 3, 224, 224)
        >>> torch.equal(dual.encode_image(x), clip.encode_image(x))
        True
        >>> dual.encode_dense(x).shape        # interpretability features of every token
        torch.Size([1, 50, 512])
    """

    def __init__(self, model: nn.Module, interpretability_head: nn.Module | None = None) -> None:
        super().__init__()
        base = family_adapter(model)
        self.clip = model
        self.interpretability_head = interpretability_head or base.make_interpretability_head()
        self.interpretability_head.to(device=base.parameter.device, dtype=base.parameter.dtype)

    @property
    def adapter(self) -> VisionAdapter:
        """The dense adapter of the wrapped model with this head attached, built once.

        It is rebuilt only when the head or the wrapped model is replaced, so a
        training step that reads it does not build a new adapter each time.
        """
        cached = self.__dict__.get("_adapter")
        if (
            cached is None
            or cached.interpretability_head is not self.interpretability_head
            or cached.model is not self.clip
        ):
            cached = family_adapter(self.clip, self.interpretability_head)
            # Stored outside nn.Module's registries: the adapter is a view, not a submodule or state.
            self.__dict__["_adapter"] = cached
        return cached

    @property
    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """The recognition embedding: the wrapped model's own image encoder, unchanged."""
        if hasattr(self.clip, "encode_image"):
            return self.clip.encode_image(images, normalize=normalize)
        # Hugging Face: the model's own get_image_features on the inputs its processor would give
        # (flattened patches, a patch mask and the grid for SigLIP 2's NaFlex tower).
        out = self.adapter.own_image_features(images)
        return nn.functional.normalize(out, dim=-1) if normalize else out

    def encode_text(self, text: Any, normalize: bool = False) -> Tensor:
        """The shared text tower on ``text``, the inputs of ``adapter.text_inputs(prompts, tokenizer)``
        (open_clip: token ids; Hugging Face: a dict of them)."""
        out = self.adapter.text_features(text)
        return nn.functional.normalize(out, dim=-1) if normalize else out

    def encode_dense(self, images: Tensor, projection: str = "interpretability", surgery_depth: int = 0) -> Tensor:
        """Features of every token (N, 1 + h*w, D): the global token from the recognition
        projection, the patches from ``projection`` (``"interpretability"`` or ``"recognition"``)."""
        return self.adapter.dense_features(images, surgery_depth=surgery_depth, projection=projection)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's own forward (e.g. open_clip's ``model(image, text)``)."""
        return self.clip(*args, **kwargs)

    # --- persistence ----------------------------------------------------------------
    def interpretability_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu() for k, v in self.interpretability_head.state_dict().items()}

    def save_interpretability(self, path: PathLike, **metadata: Any) -> None:
        """Save the added parameters alone (a small file), atomically."""
        atomic_torch_save(
            {
                "format": HEAD_FORMAT,
                "family": self.adapter.family,
                "state_dict": self.interpretability_state_dict(),
                "metadata": metadata,
            },
            path,
        )

    def load_interpretability(self, path: PathLike) -> DualProjectionCLIP:
        """Load a head saved by :meth:`save_interpretability` (checks family and shapes)."""
        return self._load_payload(load_torch_file(path, "path"), path, "path", (HEAD_FORMAT,))

    def save(self, path: PathLike, **metadata: Any) -> None:
        """Save the whole wrapped model (CLIP weights and interpretability head), atomically."""
        atomic_torch_save(
            {
                "format": MODEL_FORMAT,
                "family": self.adapter.family,
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
                "metadata": metadata,
            },
            path,
        )

    def load(self, path: PathLike) -> DualProjectionCLIP:
        """Load weights saved by :meth:`save` into this (same-architecture) wrapper."""
        return self._load_payload(load_torch_file(path, "path"), path, "path", (MODEL_FORMAT,))

    def load_training_output(self, path: PathLike, argument: str = "path") -> DualProjectionCLIP:
        """Load either file ICLIP training writes: the whole model (``final.pt``, :meth:`save`;
        needed when ``last-k`` or ``full`` mode trained CLIP weights too) or the head alone
        (``interpretability_head.pt``, :meth:`save_interpretability`). Errors name ``argument``."""
        return self._load_payload(load_torch_file(path, argument), path, argument, (MODEL_FORMAT, HEAD_FORMAT))

    def _load_payload(
        self, payload: Any, path: PathLike, argument: str, formats: tuple[str, ...]
    ) -> DualProjectionCLIP:
        """Load a file's payload of one of ``formats``: the whole model or the head (its family checked)."""
        kind = payload.get("format") if isinstance(payload, dict) else None
        if kind not in formats:
            expected = {MODEL_FORMAT: "a dual-projection model", HEAD_FORMAT: "an interpretability head"}
            wanted = " or ".join(expected[f] for f in formats)
            raise ValueError(f"{argument}: expected {wanted} saved by captum-iclip, got {path}")
        if kind == MODEL_FORMAT:
            self.load_state_dict(payload["state_dict"])
            return self
        if payload["family"] != self.adapter.family:
            raise ValueError(
                f"{argument}: expected a head trained for {self.adapter.family}, got one trained for "
                f"{payload['family']}"
            )
        self.interpretability_head.load_state_dict(payload["state_dict"])
        return self
