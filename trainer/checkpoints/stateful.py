"""One registry of everything a checkpoint holds, and how each piece is saved and restored.

A phase registers its stateful objects (anything with ``state_dict`` /
``load_state_dict``: model, optimizer, scheduler, loop counters, components)
under a key and a scope:

    shared   rank 0 saves it (identical on every replica); every rank loads it
    rank     every rank saves its own; each rank loads its own (same world size only:
             ZeRO optimizer partitions)
    sharded  every rank saves its own; each rank is handed all saved ranks' states and
             keeps what it now owns (ADMM Z/U: re-sharding onto another world size)

``in_phase`` entries (optimizer, scheduler) matter only to resume inside the
phase and are left out of a phase's final checkpoint. The files are written
by :func:`trainer.checkpoints.files.save_checkpoint` (atomic; tensors and plain
containers only, loaded with ``weights_only=True``).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from admm.nn.surgery import apply_manifest, manifest_of
from trainer.checkpoints import files as ckpt

Scope = Literal["shared", "rank", "sharded"]


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass
class _Entry:
    obj: Any
    scope: Scope
    in_phase: bool
    hint: str


class CheckpointRegistry:
    """The stateful objects of one phase on one rank, saved and loaded together."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self._entries: dict[str, _Entry] = {}

    def register(self, key: str, obj: Stateful, scope: Scope = "shared", *, in_phase: bool = False,
                 hint: str = "") -> None:
        """Add ``obj`` under ``key``; ``hint`` completes the error when a ``rank`` entry cannot be loaded."""
        if key in self._entries:
            raise ValueError(f"checkpoint key {key!r} is registered twice")
        self._entries[key] = _Entry(obj, scope, in_phase, hint)

    def save(self, root: Path, index: int, meta: dict[str, Any], *, phase_done: bool,
             records: dict[str, Any] | None = None) -> Path:
        """Collectively write checkpoint ``index`` (every rank calls this).

        ``records``: per-rank facts written beside the state and never loaded back
        (the node a rank ran on, a fingerprint of its weights).
        """
        shared: dict[str, Any] = {}
        per_rank: dict[str, Any] = dict(records or {})
        for key, e in self._entries.items():
            if e.in_phase and phase_done:
                continue
            if e.scope == "shared":
                if self.rank == 0:  # the other ranks' copies are identical and never written
                    shared[key] = e.obj.state_dict()
            else:
                per_rank[key] = e.obj.state_dict()
        return ckpt.save_checkpoint(root, index, shared=shared, per_rank=per_rank, meta=meta)

    def load(self, path: Path, device: torch.device | str = "cpu", exclude: tuple[str, ...] = ()) -> None:
        """Restore every registered object but ``exclude`` from checkpoint ``path``."""
        meta = ckpt.read_meta(path)
        shared = ckpt.load_shared(path, device)
        saved_world = meta["world_size"]
        mine: dict[str, Any] | None = None
        everyone: list[dict[str, Any]] | None = None
        for key, e in self._entries.items():
            if key in exclude:
                continue
            if e.scope == "shared":
                e.obj.load_state_dict(shared[key])
            elif e.scope == "rank":
                if saved_world != self.world:
                    raise RuntimeError(f"checkpoint {path} holds {key!r} per rank for {saved_world} workers; "
                                       f"this run has {self.world}. {e.hint}".rstrip())
                mine = mine if mine is not None else ckpt.load_rank(path, self.rank, device)
                e.obj.load_state_dict(mine[key])
            else:
                everyone = everyone if everyone is not None else ckpt.load_all_ranks(path, device)
                e.obj.load_state_dict([r[key] for r in everyone])


class ModelState:
    """The model's weights plus its surgery manifest, so a checkpoint rebuilds factored layers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.model.state_dict(), "surgery": manifest_of(self.model)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_model(self.model, state)


def restore_model(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """Rebuild the factored layers ``state["surgery"]`` names (in place), then load ``state["weights"]``."""
    if state.get("surgery"):
        apply_manifest(model, state["surgery"])
    model.load_state_dict(state["weights"])
    return model


def _is_plain(obj: Any) -> bool:
    """Tensors, numbers, strings and containers of them: what torch.load(weights_only=True) accepts."""
    if isinstance(obj, (torch.Tensor, int, float, str, bool, type(None))) and not isinstance(obj, enum.Enum):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_is_plain(x) for x in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and _is_plain(v) for k, v in obj.items())
    return False


class ZeroOptimizerState:
    """A ZeRO 1/2 optimizer's state without its DeepSpeed objects (loss scaler, enums, slice maps).

    Those entries are set by the config and the model, not by training, so on resume they are
    taken from the freshly built optimizer; the tensors (fp32 partitions, momentum) are restored.
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def _split(self) -> tuple[dict[str, Any], dict[str, Any]]:
        sd = self.optimizer.state_dict()
        plain = {k: v for k, v in sd.items() if _is_plain(v)}
        return plain, {k: v for k, v in sd.items() if k not in plain}

    def state_dict(self) -> dict[str, Any]:
        return self._split()[0]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # DeepSpeed takes the list of every rank's state and reads the entry at this rank's data-parallel index
        # (a rigid checkpoint, DeepSpeed's default: only that one). A rank holds only its own, so it goes at its
        # index; the others stay None, so that a DeepSpeed reading them fails loudly instead of restoring wrong.
        group = self.optimizer.dp_process_group
        rank = torch.distributed.get_rank(group=group) if torch.distributed.is_initialized() else 0
        self.optimizer.load_state_dict([None] * rank + [{**state, **self._split()[1]}])


def fingerprint(model: nn.Module) -> torch.Tensor:
    """Per-tensor float64 sums of the model's state: (n_tensors,), equal on all replicas."""
    return torch.stack([t.detach().double().sum().cpu() for t in model.state_dict().values()])
