"""M2IB: a per-image information bottleneck on a ViT block's output, fitted to keep the prompt's score.

:class:`Bottleneck` is the bottleneck of both towers: this image side, and the text side of
:func:`~captum_iclip.attr.text.explain_text` (``method="m2ib"``, docs/methods.md §7 and §12).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from captum._utils.typing import TargetType
from captum.log import log_usage
from torch import Tensor

from captum_iclip._precision import full_precision, upcast
from captum_iclip.attr._utils import Normalize, resolve_layer
from captum_iclip.attr.base import CLIPMapAttribution
from captum_iclip.models.base import BLOCK_LOOP_TOWERS, ViTAdapter
from captum_iclip.models.blocks import BlockView

#: The reference's defaults (its ``eval.py`` and demo): beta, Adam steps, learning rate, noisy copies per step.
M2IB_BETA = 0.1
M2IB_STEPS = 10
M2IB_LR = 1.0
M2IB_SAMPLES = 10
#: The bottleneck's initial logit: every token and channel starts almost fully kept (sigmoid(5) = 0.993).
M2IB_INITIAL_ALPHA = 5.0


def default_layer(num_blocks: int) -> int:
    """The block whose output takes the bottleneck by default: three quarters of the depth (the
    reference's layer 9 of the 12 blocks of ViT-B/32; 4 of 6 blocks, 18 of 24)."""
    return 3 * num_blocks // 4


def _check_number(name: str, value: object, *, positive: bool) -> float:
    number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < 0 or (positive and value == 0):
        raise ValueError(f"{name}: expected a finite number {'>' if positive else '>='} 0, got {value!r}")
    return float(value)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Bottleneck:
    """The settings of one M2IB fit, checked (``ValueError`` naming the argument): see
    :meth:`M2IBAttribution.attribute`; :meth:`fit` fits it on either tower's tokens.

    Raises:
        ValueError: a ``beta``, ``steps``, ``lr``, ``samples`` or ``seed`` out of its range.
    """

    beta: float
    steps: int
    lr: float
    samples: int
    seed: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", _check_number("beta", self.beta, positive=False))
        object.__setattr__(self, "lr", _check_number("lr", self.lr, positive=True))
        object.__setattr__(self, "steps", _check_count("steps", self.steps))
        object.__setattr__(self, "samples", _check_count("samples", self.samples))
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed: expected an int, got {self.seed!r}")

    def fit(
        self,
        tokens: Tensor,
        embed: Callable[[Tensor], Tensor],
        target: Tensor,
        lengths: Sequence[int] | None = None,
    ) -> Tensor:
        """The bottleneck fitted on the (N, L, C) ``tokens`` leaving one block of a tower (docs/methods.md §7).

        Both towers share it: the image side on a ViT block's patch and class tokens, the text side
        (docs/methods.md §12) on a text block's tokens, each sequence then only its first ``lengths[n]``
        tokens (its start token to its end-of-text token; the padding after them gets no noise and no
        information, as the reference, which runs each text unpadded).

        Args:
            tokens: (N, L, C) the block's output, one sequence per fit.
            embed: the rest of the tower, (N * samples, L, C) noisy tokens in float32 (copies of a sequence
                adjacent) -> (N * samples, D) embeddings, not normalised; it casts to its model's dtype.
            target: (N, D) unit embeddings of the other modality, one per sequence.
            lengths: the tokens each sequence has; ``None``: all L.

        Returns:
            (N, L, C) the information D of each token and channel at the last step's forward pass, in nats
            (0 past a sequence's length).

        Examples::

            >>> bottleneck = Bottleneck(0.1, 2, 1.0, 3, 0)
            >>> bottleneck.fit(torch.randn(1, 4, 8), lambda t: t.mean(1), torch.ones(1, 8) / 8**0.5).shape
            torch.Size([1, 4, 8])
        """
        n, length, channels = tokens.shape
        device = tokens.device
        lengths = [length] * n if lengths is None else [int(size) for size in lengths]
        valid = torch.arange(length, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
        counts = torch.tensor(lengths, device=device) * channels
        z = upcast(tokens)
        alpha = torch.full_like(z, M2IB_INITIAL_ALPHA).requires_grad_(True)
        optimizer = torch.optim.Adam([alpha], lr=self.lr)
        generators = [torch.Generator().manual_seed(int(self.seed)) for _ in range(n)]
        information = None
        for _ in range(self.steps):
            # Each sequence's noise from its own generator, of its own length: the same numbers alone or
            # in a batch, padded or not.
            noise = torch.stack(
                [
                    F.pad(torch.randn(self.samples, size, channels, generator=g), (0, 0, 0, length - size))
                    for g, size in zip(generators, lengths)
                ]
            )
            with torch.enable_grad():
                with full_precision(device):  # the gates and the information in >= float32
                    gate = torch.sigmoid(alpha)[:, None]
                    mean, variance = z[:, None] * gate, (1 - gate) ** 2
                    # KL(N(mean, variance) || N(0, 1)) of each token and channel (the same for every copy).
                    kl = -0.5 * (1 + torch.log(variance) - mean**2 - variance)
                    kl = kl * valid[:, None, :, None]
                    x = mean + variance.sqrt() * noise.to(device)
                # The rest of the tower (in the model's dtype and the caller's autocast), as its own forward.
                feature = embed(x.reshape(n * self.samples, length, channels))
                with full_precision(device):  # the score in >= float32
                    features = F.normalize(upcast(feature), dim=-1).reshape(n, self.samples, -1)
                    fit = (features * upcast(target)[:, None].to(features.dtype)).sum(-1)
                    # Each sequence's own loss, summed: each sequence's gates get their own gradient. The
                    # information's mean runs over the sequence's own tokens and channels.
                    compression = kl.sum(dim=(1, 2, 3)) / counts.to(kl.dtype)
                    loss = (self.beta * compression - fit.mean(1)).sum()
                (alpha.grad,) = torch.autograd.grad(loss, alpha)
            optimizer.step()
            information = kl.detach()
        # The information of the last step's forward pass, as the reference reads it.
        return information[:, 0]

    def information(self, adapter: ViTAdapter, tokens: Tensor, rest: Sequence[BlockView], text: Tensor) -> Tensor:
        """The image side (:meth:`fit`) on the (N, L, C) ``tokens`` leaving the chosen block of ``adapter``'s
        tower, ``rest`` the blocks after it, for (N, D) unit prompt embeddings ``text``: the (N, h*w)
        information of the patch tokens, in nats."""
        dtype = adapter.parameter.dtype

        def embed(x: Tensor) -> Tensor:
            x = x.to(dtype)
            for view in rest:
                x = view.forward(x)
            return adapter.pool(x).embedding

        information = self.fit(tokens, embed, text)
        # Summed over the channels; the class (and register) tokens left out.
        return torch.nansum(information, dim=-1)[:, adapter.num_prefix_tokens :]


class M2IBAttribution(CLIPMapAttribution):
    r"""M2IB (Wang et al., NeurIPS 2023, "Visual Explanations of Image-Text Representations via
    Multi-Modal Information Bottleneck Attribution").

    A bottleneck replaces the tokens z (L × C) leaving one block of the image tower by
    :math:`t = \lambda \odot z + (1 - \lambda) \odot \epsilon`, :math:`\epsilon \sim \mathcal{N}(0, 1)`, with
    :math:`\lambda = \sigma(\alpha)` one gate per token and channel of the image. Starting from
    :math:`\alpha = 5`, ``steps`` Adam steps (learning rate ``lr``), each on ``samples`` noisy copies,
    minimise :math:`\beta\,\mathrm{mean}_{l,c} D_{l,c} - \mathrm{mean}\cos(\mathrm{img}(t), t_k)`, where
    :math:`D_{l,c} = \mathrm{KL}(\mathcal{N}(\lambda z, (1-\lambda)^2) \,\|\, \mathcal{N}(0, 1))` is the information
    the token keeps and img the rest of the tower up to the image embedding. The map of a patch is its
    information :math:`\sum_c D_{l,c}` (nats) at the last step (docs/methods.md §7). The class token's
    is left out. ViT towers run by the shared block loop only.

    The cost is ``steps`` forward and backward passes of ``samples`` copies of each image through the
    blocks after the bottleneck (the blocks before it run once), per prompt; the defaults are the
    reference's (10 steps of 10 copies). The noise comes from a generator seeded with ``seed`` for each
    image, drawn on the CPU, so an image's noise depends neither on the other images of the batch nor on
    the device's random numbers, and a map is reproducible run to run on the CPU.

    Built on :class:`~captum_iclip.attr.base.CLIPMapAttribution` (Captum's target semantics,
    min-max normalisation, bilinear upsampling); it reads the recognition projection, the one
    its paper defines the method on. The model's parameters get no gradients.

    Args:
        forward_func: a :class:`~captum_iclip.CLIPSimilarity`; ``target=k`` is prompt k.

    Examples::

        >>> import open_clip, torch
        >>> from captum_iclip import CLIPSimilarity, M2IBAttribution
        >>> model = open_clip.create_model("ViT-B-16").eval()
        >>> sim = CLIPSimilarity(model, open_clip.get_tokenizer("ViT-B-16"), ["a cat", "a dog"])
        >>> M2IBAttribution(sim).attribute(torch.randn(2, 3, 224, 224), target=[0, 1]).shape
        torch.Size([2, 1, 224, 224])
    """

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        *,
        layer_index: int | None = None,
        beta: float = M2IB_BETA,
        steps: int = M2IB_STEPS,
        lr: float = M2IB_LR,
        samples: int = M2IB_SAMPLES,
        seed: int = 0,
        normalize: Normalize = True,
        interpolate: bool = True,
    ) -> Tensor | tuple[Tensor]:
        r"""
        Args:
            inputs: preprocessed images (N, 3, H, W), H and W divisible by the
                patch size; or a 1-tuple of such a tensor.
            target: the prompt(s) to explain, with Captum's semantics: an int, a
                list or 1-d tensor of N ints, or ``None`` for every prompt (one
                optimisation per prompt).
            layer_index: the block whose output takes the bottleneck (Python indexing); ``None``:
                :func:`default_layer`, the reference's 9 for 12 blocks.
            beta: the weight of the information term (the reference's 0.1).
            steps: Adam steps (the reference's 10).
            lr: Adam's learning rate (the reference's 1).
            samples: noisy copies of each image per step (the reference's batch of 10).
            seed: the seed of each image's noise generator.
            normalize: ``True`` min-max normalises each (image, prompt) map to [0, 1] on the
                patch grid, ``"reference"`` after upsampling (docs/methods.md §1);
                ``False`` keeps the information per patch, in nats.
            interpolate: upsample bilinearly to (H, W); ``False`` returns the patch grid.

        Returns:
            *Tensor* or *tuple[Tensor]*: (N, 1, H, W) for one target per example,
            (N, K, H, W) for ``target=None``; a tuple if ``inputs`` was a tuple.

        Raises:
            ValueError: a ``layer_index`` outside the tower's blocks, or a ``beta``, ``steps``, ``lr``,
                ``samples`` or ``seed`` out of its range.
            TypeError / NotImplementedError: a tower without transformer blocks (ResNets, convolutional
                timm trunks) or with blocks the loop cannot compute from their parts, naming the method.
        """
        bottleneck = Bottleneck(beta, steps, lr, samples, seed)
        prepared = self.prepare(inputs, target, "recognition")
        sim = self.similarity
        num_blocks = len(sim.adapter.block_views("M2IBAttribution"))  # a clear error for towers without blocks
        if not isinstance(sim.adapter, ViTAdapter):
            raise TypeError(f"model: M2IBAttribution expected {BLOCK_LOOP_TOWERS}, got a {sim.adapter.family} tower")
        layer = resolve_layer(
            default_layer(num_blocks) if layer_index is None else layer_index, num_blocks, "layer_index"
        )

        images, index = prepared.images, prepared.index
        with sim.evaluating():
            with torch.no_grad():
                tokens, grid = sim.adapter.embed(images)
                # The views at this grid (EVA's rotary embeddings depend on it).
                views = sim.adapter.block_views("M2IBAttribution", grid=grid)
                for view in views[: layer + 1]:
                    tokens = view.forward(tokens)
            prompts = range(sim.num_prompts) if index is None else [index]
            rest = views[layer + 1 :]
            maps = [
                bottleneck.information(sim.adapter, tokens, rest, self.prompt_features(prompt, len(images)))
                for prompt in prompts
            ]
        with torch.no_grad():
            scores = torch.stack(maps, dim=1)
            return self.output(scores, prepared, normalize=normalize, interpolate=interpolate, upsample="bilinear")

    def prompt_features(self, prompt: int | Tensor, num_images: int) -> Tensor:
        """(N, D) unit text embeddings: prompt ``prompt`` for every image, or one prompt per image."""
        text = self.similarity.text_features
        if isinstance(prompt, Tensor):
            return text[prompt.to(text.device)]
        return text[prompt].expand(num_images, -1)
