"""This process's place in the data-parallel group: rank, world size, barrier.

Every worker-side module asks here instead of repeating ``dist.is_available() and
dist.is_initialized()``: without a process group (one in-process worker, tests,
the CLI's evaluate) the answers are rank 0 of 1 and a barrier is a no-op.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def distributed() -> bool:
    """True when a torch.distributed process group is up in this process."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank() -> int:
    return rank_and_world()[0]


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if distributed():
        dist.barrier()


class TorchComm:
    """torch.distributed as the ``admm.comm.Comm`` that ADMM receives (it runs no collectives itself).

    ``device``: where tensors travel for the collective (NCCL only moves CUDA tensors; gloo takes CPU ones).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def all_reduce(self, tensor: torch.Tensor) -> None:
        if not distributed():
            return
        moved = tensor.to(self.device)
        dist.all_reduce(moved)
        tensor.copy_(moved)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not distributed():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
