"""Seeded fuzzing of ``attribute()``: every odd input gets a clear error or the correct map, never a silently
wrong one.

ITSM (raw, surgery) and masked max pooling on a tiny random dual-projection ViT, with random image batches
(dtype, rank, channels, size, batch, non-finite values, tuples), targets (ints, floats, booleans, lists,
tensors, NumPy values, strings) and MMP masks (boolean, 0/1, fractional, NaN, wrong grids and counts). An
oracle that knows which forms are valid decides: a valid case must return exactly the reference map (computed
once on the canonical input, by another path); an invalid one must raise ``ValueError`` or ``TypeError`` whose
message names an argument that was invalid. Seeds are fixed, so a failure reproduces.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import Part, make_images

from captum_iclip import CLIPSimilarity, DualProjectionCLIP, ITSMAttribution, MaskedMaxPoolingAttribution

Tensor = torch.Tensor


PROMPTS = ["a cat", "a dog", "a car"]


N, SIZE, GRID = 2, 8, 2  # tiny_vit: 8-px images, 4-px patches


ATTRIBUTE_CASES = 300


def image_part(rng: random.Random, base: Tensor) -> tuple[str, Part]:
    kinds = {
        "batch": lambda: Part(base, True, slice(None)),
        "first image": lambda: Part(base[:1], True, slice(0, 1)),
        "tuple": lambda: Part((base,), True, slice(None)),
        "pair of tensors": lambda: Part((base, base), False),
        "float64": lambda: Part(base.double(), False),
        "float16": lambda: Part(base.half(), False),
        "uint8": lambda: Part((base * 40 + 128).clamp(0, 255).to(torch.uint8), False),
        "int64": lambda: Part(base.long(), False),
        "rank 3": lambda: Part(base[0], False),
        "rank 5": lambda: Part(base[None], False),
        "1 channel": lambda: Part(base[:, :1], False),
        "4 channels": lambda: Part(torch.cat([base, base[:, :1]], 1), False),
        "size 6x8": lambda: Part(base[..., :6, :], False),
        "empty batch": lambda: Part(base[:0], False),
        "NaN pixel": lambda: Part(
            base.clone().index_put_((torch.tensor(0), torch.tensor(1)), torch.tensor(float("nan"))), False
        ),
        "inf pixel": lambda: Part(torch.where(base > 2, torch.inf, base), bool((base <= 2).all()), slice(None)),
        "numpy": lambda: Part(base.numpy(), False),
        "list": lambda: Part(base.tolist(), False),
    }
    # Valid forms half of the time, so that both outcomes are exercised.
    name = rng.choice(["batch", "first image", "tuple"]) if rng.random() < 0.5 else rng.choice(list(kinds))
    return name, kinds[name]()


def target_part(rng: random.Random, batch: int) -> tuple[str, Part]:
    index = [rng.randrange(3) for _ in range(batch)]
    kinds = {
        "None": lambda: Part(None, True, None),
        "int": lambda: Part(index[0], True, [index[0]] * batch),
        "numpy int": lambda: Part(np.int64(index[0]), True, [index[0]] * batch),
        "0-d tensor": lambda: Part(torch.tensor(index[0]), True, [index[0]] * batch),
        "list": lambda: Part(list(index), True, index),
        "1-d tensor": lambda: Part(torch.tensor(index), True, index),
        "numpy array": lambda: Part(np.array(index), True, index),
        "int out of range": lambda: Part(3, False),
        "negative int": lambda: Part(-1, False),
        "list too long": lambda: Part(index + [0], False),
        "list out of range": lambda: Part([5] * batch, False),
        "float": lambda: Part(index[0] + 0.5, False),
        "whole float": lambda: Part(float(index[0]), False),
        "float tensor": lambda: Part(torch.tensor(index, dtype=torch.float32), False),
        "bool": lambda: Part(True, False),
        "string": lambda: Part("0", False),
        "tuple": lambda: Part((0, 1), False),
        "list of floats": lambda: Part([float(i) for i in index], False),
    }
    name = rng.choice(list(kinds)[:7]) if rng.random() < 0.5 else rng.choice(list(kinds))
    return name, kinds[name]()


def mask_part(rng: random.Random, batch: int) -> tuple[str, Part]:
    bits = torch.tensor([[rng.random() < 0.5 for _ in range(GRID * GRID)] for _ in range(batch)])
    grid = bits.reshape(batch, GRID, GRID)
    everything = torch.ones(batch, GRID * GRID, dtype=torch.bool)
    kinds = {
        "None": lambda: Part(None, True, everything),
        "bool grid": lambda: Part(grid, True, bits | ~bits.any(1, keepdim=True)),
        "0/1 floats": lambda: Part(grid.float(), True, bits | ~bits.any(1, keepdim=True)),
        "0/1 ints": lambda: Part(grid.long(), True, bits | ~bits.any(1, keepdim=True)),
        "flat bool": lambda: Part(bits, True, bits | ~bits.any(1, keepdim=True)),
        "one for all": lambda: Part(grid[:1], True, (bits[:1] | ~bits[:1].any(1, keepdim=True)).expand(batch, -1)),
        "all false": lambda: Part(torch.zeros_like(grid), True, everything),
        "fractions": lambda: Part(grid.float() * 0.5, bool(not bits.any()), everything),
        "NaN": lambda: Part(torch.full((batch, GRID, GRID), float("nan")), False),
        "wrong grid": lambda: Part(torch.ones(batch, GRID + 1, GRID + 1, dtype=torch.bool), False),
        "wrong count": lambda: Part(torch.ones(batch, GRID * GRID + 1, dtype=torch.bool), False),
        "wrong batch": lambda: Part(torch.ones(batch + 1, GRID, GRID, dtype=torch.bool), False),
        "rank 4": lambda: Part(grid[:, None], False),
        "numbers 2": lambda: Part(grid.long() * 2, bool(not bits.any()), everything),
    }
    name = rng.choice(list(kinds)[:7]) if rng.random() < 0.5 else rng.choice(list(kinds))
    return name, kinds[name]()


@pytest.fixture(scope="module")
def fuzz_sim(tiny_vit, tiny_tokenizer) -> CLIPSimilarity:
    return CLIPSimilarity(DualProjectionCLIP(tiny_vit), tiny_tokenizer, PROMPTS)


def test_attribute_gives_a_clear_error_or_the_correct_map(fuzz_sim):
    base = make_images(N, 3, SIZE, SIZE, seed=11)
    itsm, mmp = ITSMAttribution(fuzz_sim), MaskedMaxPoolingAttribution(fuzz_sim)
    methods = {
        "raw": lambda x, t, m: itsm.attribute(x, target=t),
        "surgery": lambda x, t, m: itsm.attribute(x, target=t, variant="surgery"),
        "mmp": lambda x, t, m: mmp.attribute(x, target=t, mask=m),
    }
    # References, by another path: every prompt at once on the canonical batch; for MMP, a provider per mask.
    reference = {name: methods[name](base, None, None) for name in ("raw", "surgery")}

    def expected(method: str, rows: slice, index: list[int] | None, mask: Tensor) -> Tensor:
        if method == "mmp":
            maps = MaskedMaxPoolingAttribution(fuzz_sim, mask_provider=mask).attribute(base[rows], target=None)
        else:
            maps = reference[method][rows]
        if index is None:
            return maps
        return maps[torch.arange(maps.shape[0]), torch.tensor(index)][:, None]

    rng = random.Random(2024)
    outcomes = {"map": 0, "error": 0}
    for case in range(ATTRIBUTE_CASES):
        method = rng.choice(list(methods))
        image_name, images = image_part(rng, base)
        batch = N if not images.valid or images.meaning == slice(None) else 1
        target_name, target = target_part(rng, batch)
        mask_name, mask = mask_part(rng, batch) if method == "mmp" else ("None", Part(None, True, None))
        parts = {"inputs": images, "target": target, "mask": mask}
        label = f"case {case}: {method}, inputs={image_name}, target={target_name}, mask={mask_name}"
        try:
            out = methods[method](images.value, target.value, mask.value)
        except (ValueError, TypeError) as error:
            invalid = [name for name, part in parts.items() if not part.valid]
            assert invalid, f"{label}: valid input refused: {error!r}"
            assert any(name in str(error) for name in invalid), f"{label}: the message names none of {invalid}: {error}"
            outcomes["error"] += 1
            continue
        assert all(part.valid for part in parts.values()), f"{label}: invalid input accepted"
        maps = out[0] if isinstance(images.value, tuple) else out
        assert isinstance(out, tuple) == isinstance(images.value, tuple), label
        want = expected(method, images.meaning, target.meaning, mask.meaning)
        assert maps.shape == want.shape and torch.isfinite(maps).all(), label
        torch.testing.assert_close(maps, want, msg=lambda m, label=label: f"{label}: {m}")
        outcomes["map"] += 1
    assert min(outcomes.values()) > ATTRIBUTE_CASES // 5, outcomes  # both outcomes well exercised
