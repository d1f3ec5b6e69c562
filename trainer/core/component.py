"""The contract between the train loop and the algorithms that ride on it.

A phase runs a list of components. The trainer calls every one of them at
fixed points, in this order (composer's algorithm events, torchtitan's
stateful checkpointing):

    prepare(model, weight_decay)   before every engine build (a phase that changes
                                   shapes rebuilds it): register gradient hooks
                                   (they then run before ZeRO's), return extra
                                   optimizer param groups
    attach(model, state, optimizer) the engine exists; switch on
    on_step_end(state)             after each optimizer step
    on_epoch_end(state)            after each epoch, before evaluation
    on_checkpoint(state)           after each epoch's checkpoint is written
    detach() -> metrics            the phase is over; switch off

Checkpoints hold each component's ``state_dict()`` per rank under its
``name``; on resume ``load_state_dict`` receives every saved rank's state in
rank order, so a component whose state is sharded over ranks can re-shard
when the number of workers changed.

``admm.admm_component.AdmmComponent`` implements this structurally (admm imports
nothing of the trainer); trainer-side components subclass :class:`ComponentBase`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import nn


@dataclass
class LoopState:
    """Counters of the running phase (optimizer steps, not micro-batches)."""

    phase: str
    epoch: int = 0  # completed epochs in this phase
    step: int = 0  # optimizer steps done in this phase
    epochs: int = 0
    steps_per_epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


@runtime_checkable
class Component(Protocol):
    """What the loop and the checkpoint registry call on a component (see the module docstring)."""

    name: str

    def prepare(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]: ...

    def attach(self, model: nn.Module, loop_state: LoopState | None = None, optimizer: Any = None) -> None: ...

    def on_step_end(self, loop_state: LoopState) -> None: ...

    def on_epoch_end(self, loop_state: LoopState) -> None: ...

    def on_checkpoint(self, loop_state: LoopState) -> None: ...

    def detach(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, shards: list[dict[str, Any]]) -> None: ...


class ComponentBase:
    """A component that does nothing at every hook point; subclasses override what they need."""

    name = "component"

    def prepare(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        return []

    def attach(self, model: nn.Module, loop_state: LoopState | None = None, optimizer: Any = None) -> None:
        pass

    def on_step_end(self, loop_state: LoopState) -> None:
        pass

    def on_epoch_end(self, loop_state: LoopState) -> None:
        pass

    def on_checkpoint(self, loop_state: LoopState) -> None:
        pass

    def detach(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, shards: list[dict[str, Any]]) -> None:
        pass
