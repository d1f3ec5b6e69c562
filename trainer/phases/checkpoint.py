"""What every phase checkpoints, and how a phase writes its next checkpoint.

A phase's checkpoint registry holds the model and the loop counters, plus the
engine's optimizer and schedule and each component's state when the phase
trains. Every rank calls :func:`save_phase_checkpoint` (it is a collective).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from trainer.checkpoints import files as ckpt
from trainer.checkpoints.stateful import CheckpointRegistry, ModelState, ZeroOptimizerState, fingerprint
from trainer.context import WorkerContext
from trainer.core.component import Component, LoopState


def registry_for(ctx: WorkerContext, model: nn.Module, state: LoopState, engine: Any = None,
                 components: Sequence[Component] = ()) -> CheckpointRegistry:
    """The checkpoint registry of a phase: model and loop counters, plus the engine's and components' state."""
    reg = CheckpointRegistry(ctx.rank, ctx.world)
    reg.register("model", ModelState(model))
    reg.register("loop", state)
    if engine is not None:
        reg.register("scheduler", engine.lr_scheduler, in_phase=True)
        if ctx.cfg.engine.zero_stage == 0:
            reg.register("optimizer", engine.optimizer, in_phase=True)
        else:
            reg.register("optimizer", ZeroOptimizerState(engine.optimizer), "rank", in_phase=True,
                         hint="ZeRO 1/2 optimizer partitions follow the number of workers: resume with the "
                              "saved cluster.num_workers, or use engine.zero_stage=0 to change it.")
    for c in components:
        reg.register(c.name, c, "sharded")
    return reg


def save_phase_checkpoint(ctx: WorkerContext, index: int, reg: CheckpointRegistry, state: LoopState, done: bool,
                          model: nn.Module) -> None:
    """Write the next checkpoint of phase ``index`` (collective: every rank calls it)."""
    cfg = ctx.cfg
    meta = {"index": ctx.ckpt_index, "phase_index": index, "phase": cfg.phases[index].kind,
            "epoch": state.epoch, "step": state.step, "phase_done": done, "world_size": ctx.world,
            "zero_stage": cfg.engine.zero_stage, "time": time.time(), "model": cfg.model.name,
            "num_classes": ctx.num_classes, "image_size": ctx.image_size, "dataset": cfg.data.dataset,
            "phase_active_s": ctx.phase_active_s()}
    # The fingerprint lets tests and resume check that replicas agree without gathering weights.
    reg.save(ctx.ckpt_root, ctx.ckpt_index, meta, phase_done=done,
             records={"fingerprint": fingerprint(model), "node": ctx.node})
    ctx.ckpt_index += 1


def check_zero_stage(ctx: WorkerContext, path: Path) -> None:
    """Refuse to resume from a checkpoint written with another ZeRO stage (its optimizer state has another shape)."""
    saved = ckpt.read_meta(path)["zero_stage"]
    if saved != ctx.cfg.engine.zero_stage:
        raise RuntimeError(f"checkpoint {path} was written with engine.zero_stage={saved}; "
                           f"resume with the same stage (got {ctx.cfg.engine.zero_stage})")
