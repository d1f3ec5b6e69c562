"""Phase execution on a worker: train phases (pretrain, admm, finetune), evaluate, decompose.

A train phase builds a fresh DeepSpeed engine around the current model, runs
its epochs with the phase's components (:mod:`trainer.component`), evaluates
and writes an atomic checkpoint after every epoch. ``PHASES`` maps each phase
kind of the config to its runner.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch.distributed as dist
from torch import nn

from admm.component import AdmmComponent
from trainer import checkpoint as ckpt
from trainer.component import Component, LoopState
from trainer.context import WorkerContext
from trainer.data import set_loader_epoch
from trainer.decompose import decompose_model_phase, measured_flops
from trainer.engine import build_engine, resolve_precision
from trainer.faults import FailureInjector
from trainer.loop import average_batchnorm_stats, evaluate, train_epoch
from trainer.stateful import CheckpointRegistry, ModelState, ZeroOptimizerState, fingerprint

PhaseResult = tuple[nn.Module, dict[str, float]]


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


def save(ctx: WorkerContext, index: int, reg: CheckpointRegistry, state: LoopState, done: bool,
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


def components_for(ctx: WorkerContext, index: int, model: nn.Module) -> list[Component]:
    """The components phase ``index`` runs: ADMM in an admm phase, the failure injector where configured."""
    cfg, kind = ctx.cfg, ctx.cfg.phases[index].kind
    out: list[Component] = []
    if kind == "admm":
        tracker = ctx.phase_trackers[index]
        out.append(AdmmComponent.create(model, cfg.compression, cfg.admm, rank=ctx.rank, world=ctx.world,
                                        grad_accum=cfg.optim.grad_accum, log=_layer_prefixed(tracker.metrics),
                                        artifact=tracker.artifact, out_dir=ctx.run_dir / f"phase{index}",
                                        input_shape=(1, 3, ctx.image_size, ctx.image_size)))
    fail = cfg.debug.fail_at
    if fail is not None and fail.phase == index:
        out.append(FailureInjector(fail, index, ctx.run_dir, ctx.rank))
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


def _layer_prefixed(log: Callable[[dict[str, float], int], None]) -> Callable[[dict[str, float], int], None]:
    """``log`` with per-layer series (keys with a '/', e.g. primal/layer1.0.conv1) moved under ``layers/``,
    so MLflow's default charts show the few global metrics and the per-layer ones sit in their own section."""
    return lambda metrics, step: log({f"layers/{k}" if "/" in k else k: v for k, v in metrics.items()}, step)


def _train_phase(ctx: WorkerContext, index: int, model: nn.Module, resume) -> PhaseResult:
    cfg, phase = ctx.cfg, ctx.cfg.phases[index]
    tracker = ctx.phase_trackers[index]
    precision = resolve_precision(cfg.engine, ctx.device)
    per_epoch = training_steps_per_epoch(ctx, index)
    state = LoopState(phase=phase.kind, epochs=phase.epochs, steps_per_epoch=per_epoch)
    components = components_for(ctx, index, model)
    # prepare() registers gradient hooks: before the engine, so they run before ZeRO's.
    groups = [g for c in components for g in c.prepare(model, cfg.optim.weight_decay)]
    engine = build_engine(model, cfg.optim, cfg.engine, batch_size=cfg.data.batch_size, lr=phase.lr or cfg.optim.lr,
                          total_steps=per_epoch * phase.epochs, steps_per_epoch=per_epoch, world_size=ctx.world,
                          precision=precision, extra_groups=groups)
    reg = registry_for(ctx, engine.module, state, engine, components)
    if resume is not None:
        _check_zero_stage(ctx, resume)
        reg.load(resume, ctx.device, exclude=("model",))  # the worker rebuilt the model from it already
    for c in components:
        c.attach(engine.module, state, optimizer=engine.optimizer)
    out: dict[str, float] = {}
    while state.epoch < phase.epochs:
        set_loader_epoch(ctx.train_loader, state.epoch)
        stats = train_epoch(engine, ctx.train_loader, state, device=ctx.device, precision=precision,
                            label_smoothing=cfg.optim.label_smoothing, hooks=components,
                            log_every=cfg.log_every, log=tracker.metrics)
        average_batchnorm_stats(engine.module)  # every replica = the model saved and evaluated
        out = {**stats, **evaluate(engine.module, ctx.eval_loader, device=ctx.device, precision=precision)}
        tracker.metrics({**out, "epoch": state.epoch}, state.step)
        tracker.best_of("top1", out["top1"], state.step)
        if ctx.rank == 0:
            print(f"[{phase.kind}] epoch {state.epoch}/{phase.epochs} train_loss {out['epoch_train_loss']:.4f} "
                  f"top1 {out['top1']:.2f}% top5 {out['top5']:.2f}% ({out['epoch_time_s']:.1f}s)", flush=True)
        save(ctx, index, reg, state, state.epoch == phase.epochs, engine.module)
        for c in components:
            c.on_checkpoint(state)
    if phase.epochs == 0:
        save(ctx, index, reg, state, True, engine.module)
    for c in components:
        out.update(c.detach())
    return engine.module, out


def _check_zero_stage(ctx: WorkerContext, path) -> None:
    saved = ckpt.read_meta(path)["zero_stage"]
    if saved != ctx.cfg.engine.zero_stage:
        raise RuntimeError(f"checkpoint {path} was written with engine.zero_stage={saved}; "
                           f"resume with the same stage (got {ctx.cfg.engine.zero_stage})")


def _evaluate_phase(ctx: WorkerContext, index: int, model: nn.Module, resume) -> PhaseResult:
    precision = resolve_precision(ctx.cfg.engine, ctx.device)
    out = evaluate(model, ctx.eval_loader, device=ctx.device, precision=precision)
    out["params"] = float(sum(p.numel() for p in model.parameters()))
    # Per image, counted by torch (the decompose phase counts the same way): compare's cost axis for every run.
    out["flops"] = float(measured_flops(model, (1, 3, ctx.image_size, ctx.image_size)))
    for t in (ctx.phase_trackers[index], ctx.parent):
        t.metrics(out, 0)
    if ctx.rank == 0:
        print(f"[evaluate] top1 {out['top1']:.2f}% top5 {out['top5']:.2f}% loss {out['eval_loss']:.4f} "
              f"on {int(out['eval_images'])} images, {int(out['params']):,} parameters", flush=True)
    state = LoopState(phase="evaluate")
    save(ctx, index, registry_for(ctx, model, state), state, True, model)
    return model, out


def _rank_prune_phase(ctx: WorkerContext, index: int, model: nn.Module, resume) -> PhaseResult:
    from trainer.rank_prune import run_rank_prune  # it uses this module's helpers (registry_for, save)

    return run_rank_prune(ctx, index, model, resume)


def _decompose_phase(ctx: WorkerContext, index: int, model: nn.Module, resume) -> PhaseResult:
    model, out = decompose_model_phase(ctx, index, model)
    state = LoopState(phase="decompose")
    save(ctx, index, registry_for(ctx, model, state), state, True, model)
    return model, out


# Phase kind -> runner(ctx, index, model, resume checkpoint or None), keyed by trainer.config.PhaseKind.
PHASES: dict[str, Callable[[WorkerContext, int, nn.Module, Any], PhaseResult]] = {
    "pretrain": _train_phase,
    "admm": _train_phase,
    "decompose": _decompose_phase,
    "finetune": _train_phase,
    "evaluate": _evaluate_phase,
    "rank_prune": _rank_prune_phase,
}


def run_phase(ctx: WorkerContext, index: int, model: nn.Module, resume) -> PhaseResult:
    """Run phase ``index``; ``resume`` is a checkpoint path inside this phase, or None."""
    kind = ctx.cfg.phases[index].kind
    if ctx.rank == 0:
        print(f"== phase {index + 1}/{len(ctx.cfg.phases)}: {kind} ==", flush=True)
    model, out = PHASES[kind](ctx, index, model, resume)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if ctx.report is not None:
        ctx.report({"phase": index, **{k: float(v) for k, v in out.items() if isinstance(v, (int, float))}})
    return model, out
