"""The one check of a ``device`` argument: a torch device that this machine has."""

from __future__ import annotations

import torch


def check_device(device: str | torch.device, argument: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` that this machine has, else a ``ValueError`` naming ``argument``.

    Examples::

        >>> check_device("cpu")
        device(type='cpu')
    """
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{argument}: expected a torch device such as 'cpu' or 'cuda:0', got {device!r}") from error
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{argument}: expected a device this machine has (torch sees no CUDA GPU; use --device cpu), "
                f"got {device!r}"
            )
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise ValueError(
                f"{argument}: expected one of the {torch.cuda.device_count()} CUDA device(s) of this machine, "
                f"got {device!r}"
            )
    elif target.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{argument}: expected a device this machine has (no MPS; use --device cpu), got {device!r}")
    elif target.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{argument}: expected 'cpu', 'cuda' or 'mps', got {device!r}")
    return target
