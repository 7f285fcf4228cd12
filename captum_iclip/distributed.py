"""torchrun's process group, as evaluation and training use it: this process's place, joining, gathering.

Outside torchrun (``WORLD_SIZE`` unset or 1) every helper describes a single process and needs no group.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist


def launched_world_size() -> int:
    """The number of processes torchrun launched (``WORLD_SIZE``; 1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``): the GPU it takes."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes in its group; (0, 1) without a group."""
    if in_process_group():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join_process_group(cuda: bool) -> bool:
    """Join torchrun's process group (nccl on GPUs, gloo on CPUs) when it launched several processes and none
    is joined yet; whether this call joined it (then the caller destroys it)."""
    if launched_world_size() <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` without a group)."""
    if not in_process_group():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
