"""The phase registry: each phase kind of the config and the runner that executes it on a worker.

Training phases (pretrain, admm, finetune, rank_prune) share one epoch loop
(:mod:`trainer.phases.training`) and differ only in their :class:`TrainingPhase`;
evaluate and decompose run once and write one checkpoint. A new phase kind is a
runner here plus its name in ``trainer.config.PHASE_KINDS``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

from trainer.context import WorkerContext
from trainer.core.component import LoopState
from trainer.core.engine import resolve_precision
from trainer.core.loop import evaluate
from trainer.logs import get_logger
from trainer.phases.admm import AdmmPhase
from trainer.phases.checkpoint import registry_for, save_phase_checkpoint
from trainer.phases.decompose import decompose_model_phase, measured_flops
from trainer.phases.rank_prune import RankPrunePhase
from trainer.phases.training import TrainingPhase, run_training_phase
from trainer.ranks import barrier

logger = get_logger(__name__)

PhaseResult = tuple[nn.Module, dict[str, float]]
PhaseRunner = Callable[[WorkerContext, int, nn.Module, "Path | None"], PhaseResult]


def _training(kind: type[TrainingPhase]) -> PhaseRunner:
    return lambda ctx, index, model, resume: run_training_phase(kind(ctx, index), model, resume)


def _evaluate_phase(ctx: WorkerContext, index: int, model: nn.Module, resume: Path | None) -> PhaseResult:
    precision = resolve_precision(ctx.cfg.engine, ctx.device)
    out = evaluate(model, ctx.eval_loader, device=ctx.device, precision=precision)
    out["params"] = float(sum(p.numel() for p in model.parameters()))
    # Per image, counted by torch (the decompose phase counts the same way): compare's cost axis for every run.
    out["flops"] = float(measured_flops(model, (1, 3, ctx.image_size, ctx.image_size)))
    for t in (ctx.phase_trackers[index], ctx.parent):
        t.metrics(out, 0)
    logger.info(f"[evaluate] top1 {out['top1']:.2f}% top5 {out['top5']:.2f}% loss {out['eval_loss']:.4f} "
             f"on {int(out['eval_images'])} images, {int(out['params']):,} parameters")
    state = LoopState(phase="evaluate")
    save_phase_checkpoint(ctx, index, registry_for(ctx, model, state), state, True, model)
    return model, out


def _decompose_phase(ctx: WorkerContext, index: int, model: nn.Module, resume: Path | None) -> PhaseResult:
    model, out = decompose_model_phase(ctx, index, model)
    state = LoopState(phase="decompose")
    save_phase_checkpoint(ctx, index, registry_for(ctx, model, state), state, True, model)
    return model, out


# Phase kind -> runner(ctx, index, model, resume checkpoint or None), keyed by trainer.config.PhaseKind.
PHASES: dict[str, PhaseRunner] = {
    "pretrain": _training(TrainingPhase),
    "admm": _training(AdmmPhase),
    "decompose": _decompose_phase,
    "finetune": _training(TrainingPhase),
    "evaluate": _evaluate_phase,
    "rank_prune": _training(RankPrunePhase),
}


def run_phase(ctx: WorkerContext, index: int, model: nn.Module, resume: Path | None) -> PhaseResult:
    """Run phase ``index``; ``resume`` is a checkpoint path inside this phase, or None."""
    kind = ctx.cfg.phases[index].kind
    logger.info(f"== phase {index + 1}/{len(ctx.cfg.phases)}: {kind} ==")
    model, out = PHASES[kind](ctx, index, model, resume)
    barrier()
    if ctx.report is not None:
        ctx.report({"phase": index, **{k: float(v) for k, v in out.items() if isinstance(v, (int, float))}})
    return model, out
