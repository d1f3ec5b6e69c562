"""Phase execution on a worker: train phases (pretrain, admm, finetune), evaluate, decompose.

A train phase builds a fresh DeepSpeed engine around the current model,
runs its epochs with the phase's components as hooks, evaluates and writes
an atomic checkpoint after every epoch. ADMM and decomposition live in
``admm``; this module only asks it for components and for surgery.
"""
from __future__ import annotations

import enum
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer import checkpoint as ckpt
from trainer.data import set_loader_epoch
from trainer.engine import build_engine, resolve_precision
from trainer.loop import LoopState, evaluate, train_epoch
from trainer.worker import WorkerContext


def restore_model(model: nn.Module, shared: dict[str, Any], cfg) -> nn.Module:
    """Rebuild the model a checkpoint describes (factored layers first, from its manifest), then load weights."""
    manifest = shared.get("surgery")
    if manifest:
        from admm.surgery import apply_manifest

        model = apply_manifest(model, manifest)
    model.load_state_dict(shared["model"])
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


def zero_state(optimizer) -> tuple[dict[str, Any], list[str]]:
    """A ZeRO optimizer's state_dict without its DeepSpeed objects (loss scaler, enums, slice maps).

    Those entries are set by the config and the model, not by training, so on resume they are
    taken from the freshly built optimizer; the tensors (fp32 partitions, momentum) are restored.
    """
    sd = optimizer.state_dict()
    plain = {k: v for k, v in sd.items() if _is_plain(v)}
    return plain, sorted(set(sd) - set(plain))


def fingerprint(model: nn.Module) -> torch.Tensor:
    """Per-tensor float64 sums of the model's state: (n_tensors,), equal on all replicas."""
    return torch.stack([t.detach().double().sum().cpu() for t in model.state_dict().values()])


def maybe_inject_failure(ctx: WorkerContext, index: int, epoch: int) -> None:
    """Fault injection for tests of recovery: ``TDC_FAIL_AT=<phase>:<epoch>`` fails once, after that checkpoint."""
    spec = os.environ.get("TDC_FAIL_AT")
    marker = ctx.run_dir / f"injected-failure-{index}-{epoch}"
    if spec != f"{index}:{epoch}" or marker.exists():
        return
    dist.barrier()
    if ctx.rank == 0:
        marker.touch()
    dist.barrier()
    raise RuntimeError(f"injected failure after phase {index} epoch {epoch} (TDC_FAIL_AT={spec})")


def _components(ctx: WorkerContext, index: int, model: nn.Module) -> list[Any]:
    phase = ctx.cfg.phases[index]
    if phase.kind == "admm":
        from admm.component import AdmmComponent

        return [AdmmComponent.create(model, ctx.cfg, rank=ctx.rank, world=ctx.world,
                                     tracker=ctx.phase_trackers[index], out_dir=ctx.run_dir / f"phase{index}")]
    return []


def _surgery_manifest(model: nn.Module) -> dict | None:
    return getattr(model, "tdc_manifest", None)


def _save(ctx: WorkerContext, index: int, engine, components: list[Any], state: LoopState, done: bool,
          model: nn.Module) -> None:
    stage = ctx.cfg.engine.zero_stage
    shared: dict[str, Any] = {"model": model.state_dict(), "surgery": _surgery_manifest(model)}
    per_rank: dict[str, Any] = {"components": [c.state_dict() for c in components],
                                # Lets tests and resume check that replicas agree without gathering weights.
                                "fingerprint": fingerprint(model), "node": ctx.node}
    if engine is not None and not done:  # optimizer state matters only to resume inside the phase
        shared["scheduler"] = engine.lr_scheduler.state_dict()
        if stage == 0:
            shared["optimizer"] = engine.optimizer.state_dict()
        else:
            per_rank["optimizer"] = zero_state(engine.optimizer)[0]
    meta = {"index": ctx.ckpt_index, "phase_index": index, "phase": ctx.cfg.phases[index].kind,
            "epoch": state.epoch, "step": state.step, "phase_done": done, "world_size": ctx.world,
            "zero_stage": stage, "time": time.time(), "model": ctx.cfg.model.name,
            "num_classes": ctx.num_classes, "image_size": ctx.image_size, "dataset": ctx.cfg.data.dataset}
    ckpt.save_checkpoint(ctx.ckpt_root, ctx.ckpt_index, shared=shared, per_rank=per_rank, meta=meta)
    ctx.ckpt_index += 1


def _restore_optim(ctx: WorkerContext, path, engine, components: list[Any], state: LoopState) -> None:
    meta = ckpt.read_meta(path)
    shared = ckpt.load_shared(path, ctx.device)
    state.epoch, state.step = meta["epoch"], meta["step"]
    engine.lr_scheduler.load_state_dict(shared["scheduler"])
    if meta["zero_stage"] != ctx.cfg.engine.zero_stage:
        raise RuntimeError(f"checkpoint {path} was written with engine.zero_stage={meta['zero_stage']}; "
                           f"resume with the same stage (got {ctx.cfg.engine.zero_stage})")
    if meta["zero_stage"] == 0:
        engine.optimizer.load_state_dict(shared["optimizer"])
    elif meta["world_size"] != ctx.world:
        raise RuntimeError(f"checkpoint {path} holds ZeRO-{meta['zero_stage']} optimizer partitions of "
                           f"{meta['world_size']} workers; resume with cluster.num_workers={meta['world_size']}, "
                           "or use engine.zero_stage=0 to change the number of workers")
    else:
        sd = ckpt.load_rank(path, ctx.rank, ctx.device)["optimizer"]
        fresh = engine.optimizer.state_dict()
        sd.update({k: fresh[k] for k in zero_state(engine.optimizer)[1]})
        engine.optimizer.load_state_dict([sd])
    shards = [r["components"] for r in ckpt.load_all_ranks(path, ctx.device)]
    for i, comp in enumerate(components):
        comp.load_shards([s[i] for s in shards], meta["world_size"])


def _train_phase(ctx: WorkerContext, index: int, model: nn.Module, resume) -> tuple[nn.Module, dict]:
    cfg, phase = ctx.cfg, ctx.cfg.phases[index]
    tracker = ctx.phase_trackers[index]
    precision = resolve_precision(cfg, ctx.device)
    per_epoch = len(ctx.train_loader) // cfg.optim.grad_accum
    if phase.steps_per_epoch:
        per_epoch = min(per_epoch, phase.steps_per_epoch)
    if per_epoch < 1:
        raise ValueError(f"phases.{index}: the training set gives no full batch of data.batch_size="
                         f"{cfg.data.batch_size}; lower the batch size or enlarge data.train_subset")
    state = LoopState(phase=phase.kind, epochs=phase.epochs, steps_per_epoch=per_epoch)
    components = _components(ctx, index, model)
    # prepare() registers the ADMM gradient hooks: before the engine, so they run before ZeRO's.
    penalized = [p for c in components for p in c.prepare(model)]
    engine = build_engine(model, cfg, lr=phase.lr or cfg.optim.lr, total_steps=per_epoch * phase.epochs,
                          steps_per_epoch=per_epoch, world_size=ctx.world, precision=precision, penalized=penalized)
    if resume is not None:
        _restore_optim(ctx, resume, engine, components, state)
    for c in components:
        c.attach(engine.module, state, optimizer=engine.optimizer)
    out: dict[str, float] = {}
    while state.epoch < phase.epochs:
        set_loader_epoch(ctx.train_loader, state.epoch)
        stats = train_epoch(engine, ctx.train_loader, state, device=ctx.device, precision=precision,
                            label_smoothing=cfg.optim.label_smoothing, hooks=components,
                            log_every=cfg.log_every, log=tracker.metrics)
        out = {**stats, **evaluate(engine.module, ctx.eval_loader, device=ctx.device, precision=precision)}
        tracker.metrics({**out, "epoch": state.epoch}, state.step)
        tracker.best_of("top1", out["top1"], state.step)
        if ctx.rank == 0:
            print(f"[{phase.kind}] epoch {state.epoch}/{phase.epochs} train_loss {out['epoch_train_loss']:.4f} "
                  f"top1 {out['top1']:.2f}% top5 {out['top5']:.2f}% ({out['epoch_time_s']:.1f}s)", flush=True)
        _save(ctx, index, engine, components, state, state.epoch == phase.epochs, engine.module)
        maybe_inject_failure(ctx, index, state.epoch)
    if phase.epochs == 0:
        _save(ctx, index, None, components, state, True, engine.module)
    for c in components:
        out.update(c.detach())
    return engine.module, out


def _evaluate_phase(ctx: WorkerContext, index: int, model: nn.Module) -> tuple[nn.Module, dict]:
    precision = resolve_precision(ctx.cfg, ctx.device)
    out = evaluate(model, ctx.eval_loader, device=ctx.device, precision=precision)
    out["params"] = float(sum(p.numel() for p in model.parameters()))
    for t in (ctx.phase_trackers[index], ctx.parent):
        t.metrics(out, 0)
    if ctx.rank == 0:
        print(f"[evaluate] top1 {out['top1']:.2f}% top5 {out['top5']:.2f}% loss {out['eval_loss']:.4f} "
              f"on {int(out['eval_images'])} images, {int(out['params']):,} parameters", flush=True)
    _save(ctx, index, None, [], LoopState(phase="evaluate"), True, model)
    return model, out


def run_phase(ctx: WorkerContext, index: int, model: nn.Module, resume) -> tuple[nn.Module, dict]:
    """Run phase ``index``; ``resume`` is a checkpoint path inside this phase, or None."""
    kind = ctx.cfg.phases[index].kind
    if ctx.rank == 0:
        print(f"== phase {index + 1}/{len(ctx.cfg.phases)}: {kind} ==", flush=True)
    if kind in ("pretrain", "admm", "finetune"):
        model, out = _train_phase(ctx, index, model, resume)
    elif kind == "evaluate":
        model, out = _evaluate_phase(ctx, index, model)
    elif kind == "decompose":
        from admm.decompose import decompose_phase

        model, out = decompose_phase(ctx, index, model)
        _save(ctx, index, None, [], LoopState(phase=kind), True, model)
    else:  # the schema's Literal makes this unreachable
        raise ValueError(f"unknown phase kind {kind!r}")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if ctx.report is not None:
        ctx.report({"phase": index, **{k: float(v) for k, v in out.items() if isinstance(v, (int, float))}})
    return model, out
