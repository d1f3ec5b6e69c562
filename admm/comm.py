"""What ADMM needs from the data-parallel group, handed in by the caller (admm runs no collectives itself).

The trainer passes an implementation over torch.distributed; one process needs
none (:data:`SINGLE`). Both methods are collectives: every rank calls them, in
the same order.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch


class Comm(Protocol):
    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over every rank, in place."""

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` (a picklable object), returned on every rank."""


class SingleProcess:
    """The group of one: both collectives are the identity."""

    def all_reduce(self, tensor: torch.Tensor) -> None:
        pass

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj


SINGLE = SingleProcess()
