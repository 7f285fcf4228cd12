"""CLIP text towers seen through their parts, for the text-side explanations (docs/methods.md §12).

A :class:`TextTower` gives what Grad-ECLIP's and Chefer et al.'s text relevance, Integrated
Gradients on the token embeddings and M2IB's text bottleneck need of a causal CLIP text tower, once
per family: its token embedding layer, the position embeddings, the blocks (as
:class:`~captum_iclip.models.blocks.BlockView`), the attention mask, the end-of-text position it pools
at, the final norm and projection. The
tower's inputs are what the adapter's one tokenization rule gives
(:meth:`~captum_iclip.models.base.VisionAdapter.text_inputs`), so a text is explained as it is embedded.

Families: open_clip's CLIP text tower (its built-in one, or a ``TextTransformer`` of a
``CustomTextCLIP``) with a causal mask, pooled at the end-of-text token, and the text model of
Hugging Face ``CLIPModel``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from captum_iclip._precision import project
from captum_iclip.models.blocks import AttentionTrace, BlockView, HFBlockView, OpenCLIPBlockView, run_text_blocks

#: What the text-side explanations need of a text tower (for error messages).
TEXT_TOWERS = "a causal CLIP text tower pooled at its end-of-text token (open_clip CLIP, transformers.CLIPModel)"


class TextTower:
    """A causal CLIP text tower through its parts (see the module docstring).

    A text's tokens are its start token at position 0, its words, its end-of-text token at
    :meth:`end_positions` and padding after it; the tower's embedding is its final norm at the
    end-of-text position, projected.
    """

    family: str = ""
    #: The layer Captum's ``LayerIntegratedGradients`` attributes to: ids -> (K, L, C) token embeddings.
    token_embedding: nn.Embedding

    def ids(self, inputs: Tensor | dict[str, Tensor]) -> Tensor:
        """The (K, L) token ids of the adapter's text inputs."""
        raise NotImplementedError

    def key_mask(self, inputs: Tensor | dict[str, Tensor]) -> Tensor | None:
        """(K, L) 1 for the tokens a text has, 0 for padding keys the tower masks; ``None`` where it masks none."""
        raise NotImplementedError

    def end_positions(self, ids: Tensor) -> Tensor:
        """(K,) the end-of-text position of each text, where the tower pools (as the library's own pooling)."""
        raise NotImplementedError

    def positions(self, length: int) -> Tensor:
        """(L, C) position embeddings of the first ``length`` positions."""
        raise NotImplementedError

    def block_views(self) -> list[BlockView]:
        raise NotImplementedError

    def causal_mask(self, length: int) -> Tensor:
        """(L, L) the tower's own additive causal mask: 0 on and below the diagonal, -inf above."""
        raise NotImplementedError

    def final_norm(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def project(self, pooled: Tensor) -> Tensor:
        """(K, C) pooled tokens -> (K, D) text embeddings, in at least float32."""
        raise NotImplementedError

    def pad_token(self, tokenizer: Callable) -> int:
        """The id the family's tokenizer pads with (the default baseline token of Integrated Gradients)."""
        raise NotImplementedError

    def attention_mask(self, key_mask: Tensor | None, length: int) -> Tensor:
        """The additive mask (K or 1, 1, L, L) of :func:`~captum_iclip.models.blocks.run_text_blocks`:
        the causal mask, and -inf at the padding keys of ``key_mask``."""
        mask = self.causal_mask(length).to(torch.float32)[None, None]
        if key_mask is None:
            return mask
        padding = torch.zeros(key_mask.shape, dtype=torch.float32, device=key_mask.device)
        padding = padding.masked_fill(key_mask == 0, float("-inf"))
        return mask + padding[:, None, None, :]

    def encode(
        self,
        token_embeddings: Tensor,
        ends: Tensor,
        key_mask: Tensor | None = None,
        trace: AttentionTrace | None = None,
    ) -> Tensor:
        """(K, D) text embeddings (not normalised) from (K, L, C) token embeddings, pooled at ``ends``.

        Every block runs from its parts (:func:`~captum_iclip.models.blocks.run_text_blocks`), which
        equals the library's own text forward; ``trace`` records the last blocks' attention.
        """
        length = token_embeddings.shape[1]
        x = token_embeddings + self.positions(length).to(token_embeddings.dtype)
        x = run_text_blocks(self.block_views(), x, self.attention_mask(key_mask, length), trace)
        x = self.final_norm(x)
        return self.project(x[torch.arange(x.shape[0], device=x.device), ends.to(x.device)])

    def token_strings(self, ids: Tensor, tokenizer: Callable) -> list[str]:
        """The text of each token id, decoded alone by the tokenizer, surrounding spaces stripped."""
        decode = getattr(tokenizer, "decode", None)
        if decode is None:
            raise TypeError(
                f"tokenizer: expected a tokenizer with a decode method (to show each token), got {type(tokenizer)}"
            )
        return [decode([int(token)]).strip() for token in ids.tolist()]


# ----------------------------------------------------------------------------------
# open_clip
# ----------------------------------------------------------------------------------
class OpenCLIPTextTower(TextTower):
    """open_clip's text tower: the built-in one of ``CLIP`` or a ``TextTransformer`` (``CustomTextCLIP``)."""

    family = "open_clip text tower"

    def __init__(self, model: nn.Module) -> None:
        text = getattr(model, "text", model)
        pool = getattr(text, "text_pool_type", None) or getattr(text, "pool_type", None)
        problems = [
            what
            for what, bad in (
                ("no causal attention mask", getattr(text, "attn_mask", None) is None),
                ("an appended class token", getattr(text, "cls_emb", None) is not None),
                ("a padding mask", getattr(text, "use_pad_mask", False)),
                (f"pooling {pool!r} (not at the end-of-text token)", pool not in ("argmax", "eos")),
                ("no text projection", getattr(text, "text_projection", None) is None),
            )
            if bad
        ]
        if problems:
            raise TypeError(f"model: expected {TEXT_TOWERS}, got an open_clip text tower with {', '.join(problems)}")
        self.text = text
        self.pool = pool
        self.eos_id = getattr(text, "text_eos_id", None) or getattr(text, "eos_id", None)
        self.token_embedding = text.token_embedding

    def ids(self, inputs: Tensor) -> Tensor:
        return inputs

    def key_mask(self, inputs: Tensor) -> None:
        return None

    def end_positions(self, ids: Tensor) -> Tensor:
        if self.pool == "argmax":  # the end-of-text token has the largest id
            return ids.argmax(dim=-1)
        return (ids == self.eos_id).int().argmax(dim=-1)

    def positions(self, length: int) -> Tensor:
        return self.text.positional_embedding[:length]

    def block_views(self) -> list[BlockView]:
        transformer = self.text.transformer
        batch_first = getattr(transformer, "batch_first", True)
        return [OpenCLIPBlockView(block, batch_first) for block in transformer.resblocks]

    def causal_mask(self, length: int) -> Tensor:
        return self.text.attn_mask[:length, :length]

    def final_norm(self, tokens: Tensor) -> Tensor:
        return self.text.ln_final(tokens)

    def project(self, pooled: Tensor) -> Tensor:
        projection = self.text.text_projection
        if isinstance(projection, nn.Linear):
            return project(pooled, projection.weight.t(), projection.bias)
        return project(pooled, projection)

    def pad_token(self, tokenizer: Callable) -> int:
        # open_clip's BPE tokenizer pads with 0; its wrapper of a Hugging Face tokenizer with that one's pad.
        inner = getattr(tokenizer, "tokenizer", None)
        pad = getattr(inner, "pad_token_id", None)
        return 0 if pad is None else int(pad)


# ----------------------------------------------------------------------------------
# Hugging Face CLIPModel
# ----------------------------------------------------------------------------------
class HFCLIPTextTower(TextTower):
    """The text model of a Hugging Face ``CLIPModel``."""

    family = "transformers CLIPModel text model"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.text = model.text_model
        self.token_embedding = self.text.embeddings.token_embedding

    def ids(self, inputs: dict[str, Tensor]) -> Tensor:
        return inputs["input_ids"]

    def key_mask(self, inputs: dict[str, Tensor]) -> Tensor | None:
        return inputs.get("attention_mask")

    def end_positions(self, ids: Tensor) -> Tensor:
        eos = self.text.eos_token_id
        if eos == 2:  # configurations before transformers#24773: the end-of-text token has the largest id
            return ids.argmax(dim=-1)
        return (ids == eos).int().argmax(dim=-1)

    def positions(self, length: int) -> Tensor:
        return self.text.embeddings.position_embedding.weight[:length]

    def block_views(self) -> list[BlockView]:
        return [HFBlockView(layer) for layer in self.text.encoder.layers]

    def causal_mask(self, length: int) -> Tensor:
        weight = self.token_embedding.weight
        upper = torch.ones(length, length, dtype=torch.bool, device=weight.device).triu(1)
        return torch.zeros(length, length, device=weight.device).masked_fill(upper, float("-inf"))

    def final_norm(self, tokens: Tensor) -> Tensor:
        return self.text.final_layer_norm(tokens)

    def project(self, pooled: Tensor) -> Tensor:
        linear = self.model.text_projection
        return project(pooled, linear.weight.t(), linear.bias)

    def pad_token(self, tokenizer: Callable) -> int:
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            raise ValueError("tokenizer: expected a pad token (the baseline of Integrated Gradients), got None")
        return int(pad)
