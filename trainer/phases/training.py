"""The one epoch loop every training phase (pretrain, admm, finetune, rank_prune) runs.

A training phase builds a DeepSpeed engine around the current model, then, for
every epoch: trains it (:func:`trainer.core.loop.train_epoch`, with the phase's
components hooked in), gives the phase its epoch's end (:meth:`TrainingPhase.end_epoch`:
where rank pruning cuts ranks and rebuilds the engine), averages BatchNorm
statistics over the ranks, evaluates, logs, prints one progress line and writes
an atomic checkpoint. Phases differ only in their components and in those
methods of :class:`TrainingPhase` (composer's algorithms-on-events, torchtitan's
trainer): a new training phase is a subclass plus an entry in ``trainer.phases.PHASES``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from trainer.context import WorkerContext
from trainer.core.component import Component, LoopState
from trainer.core.distill import phase_loss
from trainer.core.engine import build_engine, resolve_precision
from trainer.core.faults import FailureInjector, HoldGate
from trainer.core.loop import average_batchnorm_stats, evaluate, train_epoch
from trainer.core.lr_curve import phase_curve
from trainer.data.loaders import set_loader_epoch
from trainer.logs import get_logger
from trainer.phases.checkpoint import check_zero_stage, registry_for, save_phase_checkpoint

logger = get_logger(__name__)


def components_for(ctx: WorkerContext, index: int, model: nn.Module) -> list[Component]:
    """The components every training phase runs: the failure injector and the hold gate where configured."""
    cfg = ctx.cfg
    out: list[Component] = []
    fail = cfg.debug.fail_at
    if fail is not None and fail.phase == index:
        out.append(FailureInjector(fail, index, ctx.run_dir, ctx.rank))
    hold = cfg.debug.hold_at
    if hold is not None and hold.phase == index:
        out.append(HoldGate(hold, index, ctx.run_dir, ctx.rank))
    return out


def steps_per_epoch(ctx: WorkerContext, index: int) -> int:
    """Optimizer steps per epoch of training phase ``index`` (its steps_per_epoch cap applied)."""
    per_epoch = len(ctx.train_loader) // ctx.cfg.optim.grad_accum
    cap = ctx.cfg.phases[index].steps_per_epoch
    return min(per_epoch, cap) if cap else per_epoch


def training_steps_per_epoch(ctx: WorkerContext, index: int) -> int:
    """:func:`steps_per_epoch` of a phase about to train; an error when the data gives no full batch."""
    per_epoch = steps_per_epoch(ctx, index)
    if per_epoch < 1:
        raise ValueError(f"phases.{index}: the training set gives no full batch of data.batch_size="
                         f"{ctx.cfg.data.batch_size}; lower the batch size or enlarge data.train_subset")
    return per_epoch


def step_offset(ctx: WorkerContext, index: int) -> int:
    """The run's global step where phase ``index`` starts: the optimizer steps of the training phases before it.

    Logged steps are offset by it, so every phase's curves continue on one axis instead of restarting at 0.
    """
    return sum(steps_per_epoch(ctx, j) * p.epochs for j, p in enumerate(ctx.cfg.phases[:index]) if p.trains)


class TrainingRun:
    """The live state of one training phase: model, engine, checkpoint registry, loop counters, components."""

    def __init__(self, ctx: WorkerContext, index: int, model: nn.Module, components: list[Component]) -> None:
        cfg, phase = ctx.cfg, ctx.cfg.phases[index]
        self.ctx, self.index, self.phase = ctx, index, phase
        self.model, self.components = model, components
        self.tracker = ctx.phase_trackers[index]
        self.precision = resolve_precision(cfg.engine, ctx.device)
        self.steps_per_epoch = training_steps_per_epoch(ctx, index)
        self.state = LoopState(phase=phase.kind, epochs=phase.epochs, steps_per_epoch=self.steps_per_epoch)
        self.engine: Any = None
        self.reg = registry_for(ctx, model, self.state)

    def build(self) -> None:
        """(Re)build the engine around the current model, and the registry that checkpoints it.

        Every component's ``prepare`` runs first, so its gradient hooks run before ZeRO's; a phase
        that changes parameter shapes calls this again after the change.
        """
        cfg = self.ctx.cfg
        groups = [g for c in self.components for g in c.prepare(self.model, cfg.optim.weight_decay)]
        # One curve per phase, or one across the training phases (optim.schedule): where this phase starts on it.
        curve = phase_curve(cfg, self.index, [steps_per_epoch(self.ctx, j) for j in range(len(cfg.phases))])
        self.engine = build_engine(self.model, cfg.optim, cfg.engine, batch_size=cfg.data.batch_size,
                                   lr=curve.peak_lr, total_steps=curve.total_steps,
                                   steps_per_epoch=curve.warmup_steps_per_epoch, start_step=curve.start_step,
                                   world_size=self.ctx.world, precision=self.precision, extra_groups=groups)
        self.model = self.engine.module
        self.reg = registry_for(self.ctx, self.model, self.state, self.engine, self.components)

    @property
    def done(self) -> bool:
        return self.state.epoch == self.phase.epochs


class TrainingPhase:
    """Plain training (pretrain, admm, finetune); subclasses override what their phase does differently."""

    def __init__(self, ctx: WorkerContext, index: int) -> None:
        self.ctx, self.index = ctx, index

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model the phase trains, made from the one it is given (before any engine exists)."""
        return model

    def components(self, model: nn.Module) -> list[Component]:
        """The components hooked into the loop and checkpointed with the phase."""
        return components_for(self.ctx, self.index, model)

    def begin(self, run: TrainingRun) -> None:
        """Called once the engine is built and a resume's state is loaded, before the first epoch."""

    def end_epoch(self, run: TrainingRun) -> dict[str, float]:
        """Called after each epoch's training, before evaluation; returns metrics to log with the epoch's."""
        return {}

    def progress(self, run: TrainingRun, out: dict[str, float]) -> str:
        """The epoch's progress line (rank 0 prints it)."""
        s = run.state
        return (f"[{s.phase}] epoch {s.epoch}/{s.epochs} train_loss {out['epoch_train_loss']:.4f} "
                f"top1 {out['top1']:.2f}% top5 {out['top5']:.2f}% ({out['epoch_time_s']:.1f}s)")

    def finish(self, run: TrainingRun) -> None:
        """Called after the last epoch, before the components detach."""

    def artifact_path(self, name: str) -> Path:
        return self.ctx.run_dir / f"phase{self.index}-{name}"


def run_training_phase(phase: TrainingPhase, model: nn.Module, resume: Path | None) -> tuple[nn.Module,
                                                                                            dict[str, float]]:
    """Run ``phase`` to its end from ``model``; ``resume`` is a checkpoint inside this phase, or None."""
    ctx, index = phase.ctx, phase.index
    cfg = ctx.cfg
    model = phase.prepare_model(model)
    run = TrainingRun(ctx, index, model, phase.components(model))
    run.build()
    loss_fn = phase_loss(ctx, index, run.precision)  # a distillation teacher, rebuilt here on resume too
    if resume is not None:
        check_zero_stage(ctx, resume)
        run.reg.load(resume, ctx.device, exclude=("model",))  # the worker rebuilt the model from it already
    for c in run.components:
        c.attach(run.model, run.state, optimizer=run.engine.optimizer)
    phase.begin(run)
    out: dict[str, float] = {}
    state, tracker = run.state, run.tracker
    while state.epoch < run.phase.epochs:
        set_loader_epoch(ctx.train_loader, state.epoch)
        stats = train_epoch(run.engine, ctx.train_loader, state, device=ctx.device, precision=run.precision,
                            label_smoothing=cfg.optim.label_smoothing, hooks=run.components,
                            log_every=cfg.log_every, log=tracker.metrics, loss_fn=loss_fn)
        extra = phase.end_epoch(run)
        average_batchnorm_stats(run.model)  # every replica = the model saved and evaluated
        out = {**stats, **evaluate(run.model, ctx.eval_loader, device=ctx.device, precision=run.precision),
               **extra}
        tracker.metrics({**out, "epoch": state.epoch}, state.step)
        tracker.best_of("top1", out["top1"], state.step)
        logger.info(phase.progress(run, out))
        save_phase_checkpoint(ctx, index, run.reg, state, run.done, run.model)
        for c in run.components:
            c.on_checkpoint(state)
    if run.phase.epochs == 0:
        save_phase_checkpoint(ctx, index, run.reg, state, True, run.model)
    phase.finish(run)
    for c in run.components:
        out.update(c.detach())
    return run.model, out
