"""What the driver sends a worker (:class:`WorkerJob`) and what a worker builds from it (:class:`WorkerContext`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from trainer.init_weights import InitSource
from trainer.tracking.tracker import Tracker
from trainer.worker_config import WorkerConfig


@dataclass
class WorkerJob:
    """One run as every worker receives it: the typed config and where results go."""

    config: WorkerConfig
    run_dir: str
    tracking_uri: str | None = None  # None: no MLflow
    parent_run_id: str | None = None
    phase_run_ids: list[str | None] = field(default_factory=list)  # one per phase
    use_gpu: Literal["auto", "yes", "no"] = "auto"  # cluster.use_gpu: "auto" takes CUDA where a worker has it
    init: InitSource | None = None  # model.init as the driver resolved and checked it (file + sha256)
    # phases.N.distill.teacher -> the teacher's weights as the driver resolved and pinned them
    teachers: dict[str, InitSource] = field(default_factory=dict)


@dataclass
class WorkerContext:
    """Everything a phase needs that outlives one phase."""

    cfg: WorkerConfig
    rank: int
    world: int
    device: torch.device
    run_dir: Path
    train_loader: Any
    eval_loader: Any
    num_classes: int
    image_size: int
    parent: Tracker
    phase_trackers: list[Tracker]
    ckpt_index: int = 0
    # Called with each phase's scalar results on every rank (Ray Train's report, a collective), or None.
    report: Callable[[dict[str, float]], None] | None = None
    node: str = "local"  # the node this worker runs on (recorded in checkpoints)
    teachers: dict[str, InitSource] = field(default_factory=dict)  # WorkerJob.teachers
    # The current phase's running time: time.time() when this attempt of it began, and the seconds its
    # earlier attempts ran up to the checkpoint it resumed from (checkpoints record the sum).
    phase_clock: float = 0.0
    phase_active_before: float = 0.0

    def phase_active_s(self) -> float:
        """Seconds the current phase has run, over all its attempts (what its checkpoints record)."""
        return self.phase_active_before + time.time() - self.phase_clock

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"
