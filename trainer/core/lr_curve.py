"""Which stretch of which learning-rate curve a training phase runs (``optim.schedule``).

``per_phase``: each training phase has its own warmup + cosine from its lr (``phases.N.lr`` or
``optim.lr``) down to ``optim.min_lr_ratio`` of it at the phase's end; a finetune after ADMM starts
again from its peak.

``one_curve``: the training phases share one warmup + cosine. It peaks at the first training phase's
lr, spans the optimizer steps of all training phases, and reaches the floor at the end of the last
one; a phase starts at the step where the training phases before it stopped (``start_step``), so the
fine-tuning phase continues the ADMM phase's cosine where it left off. Non-training phases
(decompose, evaluate) take no steps and leave the curve where it was.

The engine's LambdaLR counts steps inside the phase; its checkpointed ``last_epoch`` plus the same
``start_step`` on resume give the same rates as an uninterrupted run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from trainer.worker_config import WorkerConfig


@dataclass(frozen=True)
class LrCurve:
    """The curve phase ``index`` runs on, and where on it the phase starts."""

    peak_lr: float  # the curve's lr after warmup
    start_step: int  # curve steps taken before this phase (0 for per_phase)
    total_steps: int  # optimizer steps of the whole curve (warmup included)
    warmup_steps_per_epoch: int  # steps per epoch that optim.warmup_epochs is counted in


def phase_curve(cfg: WorkerConfig, index: int, steps_per_epoch: Sequence[int]) -> LrCurve:
    """The learning-rate curve of training phase ``index``.

    Args:
        steps_per_epoch: optimizer steps per epoch of every phase (any value for non-training phases).
    """
    phase = cfg.phases[index]
    if cfg.optim.schedule == "per_phase":
        n = steps_per_epoch[index]
        return LrCurve(peak_lr=phase.lr or cfg.optim.lr, start_step=0, total_steps=n * phase.epochs,
                       warmup_steps_per_epoch=n)
    training = [i for i, p in enumerate(cfg.phases) if p.trains]
    first = training[0]
    steps = {i: steps_per_epoch[i] * cfg.phases[i].epochs for i in training}
    return LrCurve(peak_lr=cfg.phases[first].lr or cfg.optim.lr,
                   start_step=sum(steps[i] for i in training if i < index),
                   total_steps=sum(steps.values()), warmup_steps_per_epoch=steps_per_epoch[first])
