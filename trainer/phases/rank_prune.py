"""The rank_prune phase (Sharma et al. 2025): train layers as U diag(s) V^T and cut their ranks as they train.

Every layer the compression section selects (``include``/``exclude``/``min_channels``)
becomes an :class:`admm.nn.layers_prune.PrunableSVDLayer` at full rank, from the
trained weights (``rank_prune.init: trained``) or random (``random``). Training
adds, as gradients (tensor hooks: they run before DeepSpeed's data-parallel
average, identically on every rank, so the average keeps them), an L1 term on
``s`` and an orthogonality term on ``U`` and ``V``. At the end of every
``rank_prune.interval``-th epoch the weak singular directions are cut
(:func:`admm.nn.layers_prune.plan_prune`; with ``rank_prune.keep_ratio`` on a
linear path to that budget). Shapes change then, so the engine is rebuilt
around the pruned model: the learning-rate schedule continues where it was,
and the SGD momentum carries over (:func:`carry_momentum`; any ZeRO stage,
:mod:`trainer.core.momentum`): every parameter keeps its buffer, a pruned factor
the slices of its kept directions. The
epoch's checkpoint is written after the prune, so its manifest holds the new
ranks and its optimizer state the new shapes: resume (also on another number
of workers, ZeRO 0) continues from there. The last epoch turns every layer into
a plain svd layer, so finetune, evaluate and export follow as after decompose.

Logged: per-layer ranks (``layers/rank/<layer>``), the factored parameters as
they fall (``params_factored``, ``params``), and at the end a plot of ranks by epoch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from admm.formats.projections import max_rank
from admm.nn.layers_prune import FACTOR_DIM, PrunableSVDLayer, penalty_grads, plan_prune, svd_params
from admm.nn.surgery import get_submodule, manifest_of, set_manifest, set_submodule
from admm.planning.layer_info import describe_layers
from admm.planning.planner import select
from trainer.config import RankPruneConfig
from trainer.core.component import Component, ComponentBase
from trainer.core.momentum import read_momentum, write_momentum
from trainer.phases.checkpoint import registry_for
from trainer.phases.training import TrainingPhase, TrainingRun
from trainer.tracking.plots import plot_series
from trainer.worker_config import WorkerConfig


def planned_shapes(model: nn.Module, cfg: WorkerConfig) -> dict[str, tuple[int, ...]]:
    """``{layer: dense weight shape}`` of the layers rank pruning factors (the compression section's selection)."""
    c = cfg.compression
    layers = select(describe_layers(model), c.include, c.exclude, c.min_channels)
    if not layers:
        raise ValueError("compression: no layer matches include/exclude/min_channels; nothing to rank-prune")
    return {info.name: tuple(info.shape) for info in layers}


def check_budget(model: nn.Module, cfg: WorkerConfig) -> None:
    """Raise ``ValueError("rank_prune.keep_ratio: ...")`` when even ``min_rank`` everywhere exceeds the budget
    (``ValueError("compression: ...")`` when the compression section selects no layer)."""
    rp = cfg.rank_prune
    shapes = planned_shapes(model, cfg)  # also fails when no layer is selected
    if rp.keep_ratio <= 0:
        return
    dense = sum(torch.Size(s).numel() for s in shapes.values())
    floor = sum(svd_params(s, min(rp.min_rank, int(max_rank(s, "svd")))) for s in shapes.values())  # type: ignore[arg-type]
    if floor > rp.keep_ratio * dense:
        raise ValueError(f"rank_prune.keep_ratio: {rp.keep_ratio} ({int(rp.keep_ratio * dense):,} of {dense:,} "
                         f"parameters) cannot be reached: rank_prune.min_rank={rp.min_rank} in every layer keeps "
                         f"{floor:,}; allowed: keep_ratio >= {floor / dense:.4f}, or a lower min_rank")


def to_prunable(model: nn.Module, shapes: dict[str, tuple[int, ...]], init: str, seed: int) -> nn.Module:
    """Replace each dense layer of ``shapes`` by a full-rank PrunableSVDLayer (in place); sets the manifest."""
    manifest = manifest_of(model)
    gen = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        dense = get_submodule(model, name)
        full = int(max_rank(shape, "svd"))  # type: ignore[arg-type]
        if init == "trained":
            layer = PrunableSVDLayer.from_dense(dense, full)  # type: ignore[arg-type]
        else:
            layer = PrunableSVDLayer.from_geometry(dense, full)  # type: ignore[arg-type]
            layer.init_random(gen)
            layer.train(dense.training)
        set_submodule(model, name, layer)
        manifest[name] = layer.spec()
    set_manifest(model, manifest)
    return model


def prunable_layers(model: nn.Module) -> dict[str, PrunableSVDLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PrunableSVDLayer)}


def carry_momentum(old: dict[str, torch.Tensor], kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The momentum buffers after a prune: ``old`` (parameter name -> buffer) with the factors of every layer
    in ``kept`` (layer name -> kept direction indices, int64) sliced like :meth:`PrunableSVDLayer.keep` slices
    the factors themselves; every other buffer unchanged."""
    out = dict(old)
    for layer, index in kept.items():
        for factor, dim in FACTOR_DIM.items():
            name = f"{layer}.{factor}"
            if name in out:
                out[name] = out[name].index_select(dim, index.to(out[name].device))
    return out


def to_svd(model: nn.Module) -> nn.Module:
    """Turn every PrunableSVDLayer into the equivalent plain svd layer (in place); updates the manifest."""
    manifest = manifest_of(model)
    for name, layer in prunable_layers(model).items():
        plain = layer.to_svd()
        set_submodule(model, name, plain)
        manifest[name] = plain.spec()
    set_manifest(model, manifest)
    return model


class RankPruner(ComponentBase):
    """Adds the penalty gradients, prunes, and keeps the rank history (its checkpoint state)."""

    name = "rank_prune"

    def __init__(self, cfg: RankPruneConfig, shapes: dict[str, tuple[int, ...]], epochs: int, grad_accum: int) -> None:
        self.cfg, self.shapes, self.grad_accum = cfg, shapes, grad_accum
        self.events = epochs // cfg.interval  # prune events of the phase
        self.dense_params = sum(torch.Size(s).numel() for s in shapes.values())
        self.history: list[dict[str, Any]] = []  # one entry per epoch: {"epoch", "ranks", "params_factored"}
        self._handles: list[Any] = []

    def prepare(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Hook the penalties onto the factors; their param group takes no weight decay (called at every
        engine build: a prune replaces the factors).

        The L1 term on s is the factors' shrinkage and the orthogonality term holds U and V, so weight
        decay would only fight them.
        """
        self.hook_gradients(model)
        return [{"params": [p for m in prunable_layers(model).values() for p in (m.u, m.s, m.v)],
                 "weight_decay": 0.0}]

    def hook_gradients(self, model: nn.Module) -> None:
        """(Re-)register the penalty hooks on the current parameters of every prunable layer."""
        self.unhook()
        if self.cfg.l1 == 0 and self.cfg.orth == 0:
            return
        for layer in prunable_layers(model).values():
            for key in ("u", "s", "v"):
                self._handles.append(getattr(layer, key).register_hook(self._hook(layer, key)))

    def unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, layer: PrunableSVDLayer, key: str):
        # Called once per micro-batch: 1/grad_accum of the penalty each time.
        def add(grad: torch.Tensor) -> torch.Tensor:
            extra = penalty_grads(layer, self.cfg.l1, self.cfg.orth, which=(key,))[key]
            return grad + extra.to(grad.dtype) / self.grad_accum
        return add

    def ranks(self, model: nn.Module) -> dict[str, int]:
        return {n: int(m.rank) for n, m in prunable_layers(model).items()}  # type: ignore[arg-type]

    def factored_params(self, ranks: dict[str, int]) -> int:
        return sum(svd_params(self.shapes[n], r) for n, r in ranks.items())

    def is_prune_epoch(self, epoch: int) -> bool:
        return epoch % self.cfg.interval == 0

    def prune(self, model: nn.Module, epoch: int) -> dict[str, torch.Tensor]:
        """Prune after ``epoch`` (1-based) when it is a prune epoch.

        Returns ``{layer: kept direction indices}`` of the layers whose rank changed (empty: nothing pruned).
        """
        if not self.is_prune_epoch(epoch):
            return {}
        layers = prunable_layers(model)
        allowed = None
        if self.cfg.keep_ratio > 0:
            budget = self.cfg.keep_ratio * self.dense_params
            now = self.factored_params(self.ranks(model))
            left = self.events - epoch // self.cfg.interval  # events after this one
            allowed = budget + max(0.0, now - budget) * left / (left + 1)
        keep = plan_prune({n: m.s for n, m in layers.items()}, self.shapes, threshold=self.cfg.threshold,
                          min_rank=self.cfg.min_rank, allowed=allowed)
        changed = {}
        for name, index in keep.items():
            if index.numel() < layers[name].s.numel():
                layers[name].keep(index)
                changed[name] = index
        if changed:
            set_manifest(model, {**manifest_of(model), **{n: m.spec() for n, m in layers.items()}})
        return changed

    def record(self, model: nn.Module, epoch: int) -> dict[str, float]:
        ranks = self.ranks(model)
        params = self.factored_params(ranks)
        self.history.append({"epoch": epoch, "ranks": ranks, "params_factored": params})
        return {**{f"layers/rank/{n}": float(r) for n, r in ranks.items()}, "params_factored": float(params),
                "factored_keep_ratio": params / self.dense_params}

    def state_dict(self) -> dict[str, Any]:
        return {"history": json.dumps(self.history)}

    def load_state_dict(self, shards: list[dict[str, Any]]) -> None:
        self.history = json.loads(shards[0]["history"])  # identical on every rank

    def plot(self, path: Path) -> Path | None:
        """Each layer's rank by epoch (PNG); None before the first epoch is recorded."""
        if not self.history:
            return None
        series = {n: [h["ranks"].get(n, float("nan")) for h in self.history] for n in self.history[0]["ranks"]}
        return plot_series(path, series, x=[h["epoch"] for h in self.history], xlabel="epoch", ylabel="rank",
                           title="rank_prune: rank per layer")


class RankPrunePhase(TrainingPhase):
    """Trains the planned layers as U diag(s) V^T and cuts their ranks at the end of every prune epoch."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        cfg = self.ctx.cfg
        if prunable_layers(model):  # a resume rebuilt them from the checkpoint's manifest
            shapes = {n: m.geometry.weight_shape for n, m in prunable_layers(model).items()}
        else:
            shapes = planned_shapes(model, cfg)
            model = to_prunable(model, shapes, cfg.rank_prune.init, cfg.seed)
        phase = cfg.phases[self.index]
        self.pruner = RankPruner(cfg.rank_prune, shapes, phase.epochs, cfg.optim.grad_accum)
        return model

    def components(self, model: nn.Module) -> list[Component]:
        return [*super().components(model), self.pruner]

    def begin(self, run: TrainingRun) -> None:
        if not self.pruner.history:  # a fresh start: the full ranks are the curve's first point
            run.tracker.metrics(self.pruner.record(run.model, 0), run.state.step)

    def end_epoch(self, run: TrainingRun) -> dict[str, float]:
        pruner, state, done = self.pruner, run.state, run.done
        # Read before the prune replaces the factors (ZeRO 1/2: a collective, so on every rank alike).
        momentum = read_momentum(run.engine) if pruner.is_prune_epoch(state.epoch) and not done else {}
        kept = pruner.prune(run.model, state.epoch)
        if kept and not done:
            # New shapes: a new engine and optimizer, the momentum and the schedule where they were.
            sched = run.engine.lr_scheduler.state_dict()
            run.build()
            write_momentum(run.engine, carry_momentum(momentum, kept))
            run.engine.lr_scheduler.load_state_dict(sched)
            for group, lr in zip(run.engine.optimizer.param_groups, run.engine.lr_scheduler.get_last_lr()):
                group["lr"] = lr
        pruned = pruner.record(run.model, state.epoch)
        if done:  # the phase ends with a plain svd model: finetune, evaluate and export follow as after decompose
            pruner.unhook()
            run.model = to_svd(run.model)
            run.reg = registry_for(self.ctx, run.model, state, None, run.components)
        return {"params": float(sum(p.numel() for p in run.model.parameters())), **pruned}

    def progress(self, run: TrainingRun, out: dict[str, float]) -> str:
        s, ranks = run.state, self.pruner.history[-1]["ranks"]
        return (f"[rank_prune] epoch {s.epoch}/{s.epochs} train_loss {out['epoch_train_loss']:.4f} top1 "
                f"{out['top1']:.2f}% factored params {int(out['params_factored']):,} "
                f"({out['factored_keep_ratio']:.3f} of dense), ranks {sorted(ranks.values())}")

    def finish(self, run: TrainingRun) -> None:
        if self.ctx.rank == 0:
            path = self.pruner.plot(self.artifact_path("ranks.png"))
            if path is not None:
                run.tracker.artifact(path)
