"""The ADMM phase as a trainer component: owner-sharded Z/U updates and a nearly free penalty.

Owner sharding: every planned layer has one owner rank (``admm.planning.owners.with_owners``).
Only the owner keeps Z and U and runs the projection. The penalty gradient
rho (W - Z + U) is added by a gradient hook on the owner's weight, scaled by
the world size, *before* DeepSpeed's data-parallel average; the other ranks
add nothing, so after the average every replica holds
    grad L + rho (W - Z + U)
and no Z or U ever crosses the network. With one rank this is plain ADMM.

The penalty gradient has two halves. rho W is the same on every rank, so it
rides on the optimizer's weight decay: the planned weights sit in one param
group (``ADMM_GROUP``) whose weight decay this component keeps at
``base + rho``. The optimizer reads W and the gradient for weight decay anyway,
so that half costs nothing. The owner's hook adds the other half, ``c V`` with
V = U - Z cached at the Z-update: one in-place element-wise op per owned layer
in the backward pass. Without such a group (``attach`` with no optimizer) the
hook adds ``c W + c V``. Either way it replaces a Python sum of per-layer
norms in the loss graph. One difference from the all-in-the-hook form: with
``optim.grad_clip > 0`` the rho W half is not part of the clipped gradient
(it is applied after clipping, like weight decay).

The hooks are post-accumulate-grad hooks that add into ``weight.grad`` in place:
an out-of-place add allocates a fresh gradient-sized tensor per layer, which on
CPU cost ResNet-50 about 2% more per step (bench/README.md). DeepSpeed's ZeRO
1/2 copy each gradient into their reduce bucket from hooks of the same kind,
and such hooks run in the order they were registered, so ours come first:
``prepare`` registers them before the engine is built, ``attach`` switches them
on. (With DeepSpeed's default 5e8-element bucket the reduction waits for the end
of backward anyway; a smaller bucket or overlap_comm would not wait.)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
from torch import nn

from admm.comm import SINGLE, Comm
from admm.config import AdmmConfig, CompressionConfig
from admm.formats.warm import ProjectionOptions
from admm.planning.model_plan import plan_for_model
from admm.planning.rank_plan import RankPlan
from admm.state import AdmmState, LayerState, UpdateStats

# Marks the optimizer param group of the ADMM-penalized weights (a plain key: DeepSpeed keeps it).
ADMM_GROUP = "tdc_admm"


class AdmmComponent:
    """The ADMM phase's trainer component (the contract of ``trainer.core.component.Component``).

    Hook points: ``prepare`` (before the engine), ``attach``, ``on_step_end``,
    ``on_epoch_end``, ``on_checkpoint``, ``detach``; state: ``state_dict`` (this
    rank's Z, U, rho, counters) and ``load_state_dict`` (every saved rank's state).
    """

    name = "admm"  # the key of this component's state in checkpoints

    def __init__(self, plan: RankPlan, admm_cfg: AdmmConfig, *, rank: int, world: int, grad_accum: int,
                 log: Callable[[dict[str, float], int], None], comm: Comm = SINGLE,
                 say: Callable[[str], None] | None = None, decomp_error: bool = True) -> None:
        self.plan, self.cfg = plan, admm_cfg
        self.rank, self.world, self.grad_accum = rank, world, grad_accum
        self.owned = [p for p in plan.layers if p.owner == rank]
        self.state = AdmmState(rho=admm_cfg.rho, options=ProjectionOptions(
            hooi_sweeps=admm_cfg.hooi_sweeps, hooi_tol=admm_cfg.hooi_tol,
            cp_sweeps=admm_cfg.cp_sweeps, cp_tol=admm_cfg.cp_tol))
        # log: rank 0's metrics (a tracker); say: rank 0's progress lines (None: silent); comm: the group.
        self.log, self.say, self.comm = log, say, comm
        self.decomp_error = decomp_error
        self.history: list[dict[str, float]] = []  # rank 0: per-layer primal residuals per update
        self._handles: list[Any] = []  # the gradient hooks, from prepare() until detach()
        self._active = False  # the hooks add the penalty only between attach() and detach()
        self._decay_groups: list[dict[str, Any]] = []  # optimizer groups carrying rho W as weight decay
        self._weights: dict[str, nn.Parameter] = {}
        self._last: dict[str, float] = {}

    @classmethod
    def create(cls, model: nn.Module, compression: CompressionConfig, admm_cfg: AdmmConfig, *, rank: int,
               world: int, grad_accum: int, log: Callable[[dict[str, float], int], None],
               input_shape: tuple[int, ...] | None = None, fixed: RankPlan | None = None, comm: Comm = SINGLE,
               say: Callable[[str], None] | None = None) -> "AdmmComponent":
        """Plan ``model``'s ranks and owners for ``world`` ranks (or take ``fixed``'s) and build the component
        of ``rank``.

        ``input_shape`` (1, C, H, W): the model's input, for the plan's FLOPs (needed by ``budget=flops``).
        """
        plan = plan_for_model(model, compression, world, input_shape=input_shape, fixed=fixed, comm=comm)
        return cls(plan, admm_cfg, rank=rank, world=world, grad_accum=grad_accum, log=log, comm=comm, say=say)

    # -- attach / detach ---------------------------------------------------------------
    def penalized_params(self, model: nn.Module) -> list[nn.Parameter]:
        """The weights of every planned layer (owned or not), whose weight decay carries rho W."""
        modules = dict(model.named_modules())
        return [modules[p.name].weight for p in self.plan.layers]

    def prepare(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Register the (inactive) gradient hooks on the owned weights; return the ADMM param group.

        Call it before the DeepSpeed engine is built, so the hooks run before ZeRO's own
        gradient hooks, and give the engine the returned groups (``extra_groups``): one group
        of every planned weight (owned or not), marked ``ADMM_GROUP``, with ``weight_decay``
        as its base; ``attach`` raises it by rho.
        """
        if self._handles:
            raise RuntimeError("AdmmComponent.prepare was called twice")
        modules = dict(model.named_modules())
        for p in self.owned:
            weight = modules[p.name].weight
            self._weights[p.name] = weight
            self._handles.append(weight.register_post_accumulate_grad_hook(self._make_hook(p.name)))
        return [{"params": self.penalized_params(model), "weight_decay": weight_decay,
                 "base_weight_decay": weight_decay, ADMM_GROUP: True}]

    def attach(self, model: nn.Module, loop_state=None, optimizer=None) -> None:
        """Initialise missing Z/U of the owned layers and switch the penalty on (``prepare`` first).

        ``model``: the unwrapped model ``prepare`` saw. ``optimizer``: the engine's optimizer,
        built with the groups ``prepare`` returned; its ADMM group then carries rho W as weight
        decay. Without it the hooks add rho W too.
        """
        if not self._handles and self.owned:
            raise RuntimeError("AdmmComponent.attach needs prepare(model) first, before the engine is built")
        modules = dict(model.named_modules())
        if any(modules[p.name].weight is not self._weights[p.name] for p in self.owned):
            raise ValueError("AdmmComponent.attach: model is not the one prepare() saw")
        self._decay_groups = [g for g in optimizer.param_groups if g.get(ADMM_GROUP)] if optimizer else []
        if optimizer is not None and len(self._decay_groups) != 1:
            raise ValueError("the optimizer has no ADMM param group: build the engine with "
                             "extra_groups=component.prepare(model, weight_decay)")
        self._sync_decay()
        for p in self.owned:
            if p.name not in self.state.layers:
                self.state.init_layer(p.name, self._weights[p.name], p.fmt, p.rank)
        self._active = True
        if self.state.updates == 0 and not self.history:
            # The curve's starting point: Z = Proj(W), so the residual is the error of decomposing now.
            stats = {}
            for p in self.owned:
                s = self.state.layers[p.name]
                w = self._weights[p.name].detach().float()
                r = float((w - s.z).square().sum())
                stats[p.name] = UpdateStats(w_sq=float(w.square().sum()), primal_sq=r, dual_sq=0.0, decomp_sq=r)
            self._publish(stats, loop_state.step if loop_state is not None else 0, label="start")

    def _make_hook(self, name: str) -> Callable[[nn.Parameter], None]:
        def hook(weight: nn.Parameter) -> None:
            if not self._active:
                return
            # DeepSpeed divides each micro-batch loss by grad_accum and averages over ranks;
            # scale so the summed, averaged result carries exactly rho (W - Z + U).
            c = self.state.rho * self.world / self.grad_accum
            if not self._decay_groups:  # otherwise rho W is the optimizer's weight decay
                weight.grad.add_(weight.detach(), alpha=c)
            weight.grad.add_(self.state.layers[name].v, alpha=c)

        return hook

    def _sync_decay(self, rho: float | None = None) -> None:
        """Weight decay of the ADMM group = its base + rho (``rho=0``: back to the base)."""
        rho = self.state.rho if rho is None else rho
        for g in self._decay_groups:
            g["weight_decay"] = g["base_weight_decay"] + rho

    def detach(self, keep_hooks: bool = False) -> dict[str, float]:
        """Switch the penalty off, remove the hooks; return the last global metrics.

        ``keep_hooks``: leave the (inactive) hooks registered, so that a later ``attach``
        switches the penalty back on without ``prepare`` (benchmarks toggle ADMM this way).
        """
        self._active = False
        if not keep_hooks:
            for h in self._handles:
                h.remove()
            self._handles.clear()
        self._sync_decay(0.0)
        self._decay_groups = []
        return dict(self._last)

    # -- loop hooks --------------------------------------------------------------------
    def on_step_end(self, loop_state) -> None:
        if self.cfg.unit == "step" and loop_state.step % self.cfg.interval == 0:
            self.z_update(loop_state.step)

    def on_epoch_end(self, loop_state) -> None:
        if self.cfg.unit == "epoch" and loop_state.epoch % self.cfg.interval == 0:
            self.z_update(loop_state.step)

    def on_checkpoint(self, loop_state) -> None:
        """Nothing to do: the state goes into the checkpoint through ``state_dict``."""

    def z_update(self, step: int) -> dict[str, float]:
        """Owners project their layers; scalar residuals (not tensors) are gathered to rank 0 and logged."""
        every = self.cfg.decomp_every
        decomp = self.decomp_error and every > 0 and (self.state.updates + 1) % every == 0
        stats = {n: self.state.update_layer(n, self._weights[n], decomp) for n in (p.name for p in self.owned)}
        self.state.updates += 1
        metrics = self._publish(stats, step, label=f"Z-update {self.state.updates}")
        self.state.set_rho(min(self.state.rho * self.cfg.rho_growth, self.cfg.rho_max))
        self._sync_decay()
        return metrics

    def _publish(self, stats: dict[str, UpdateStats], step: int, label: str) -> dict[str, float]:
        """Sum every owner's scalar residuals over the ranks (one all-reduce); rank 0 logs and says them."""
        if self.world > 1:
            stats = self._all_owners(stats)
        metrics = self._metrics(stats)
        self._last = {k: v for k, v in metrics.items() if "/" not in k}
        if self.rank == 0:
            self.history.append({k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("primal/")})
            self.log(metrics, step)
            if self.say is not None:
                decomp = f" decomp_err {metrics['admm_decomp_err']:.4f}" if "admm_decomp_err" in metrics else ""
                self.say(f"[admm] {label}: primal ||W-Z||/||W|| {metrics['admm_primal']:.4f} "
                         f"dual {metrics['admm_dual']:.3g}{decomp} rho {metrics['rho']:.3g}")
        return metrics

    def _all_owners(self, stats: dict[str, UpdateStats]) -> dict[str, UpdateStats]:
        """Every planned layer's stats, from this rank's owned ones: each rank fills its owned rows of one
        table and the rows of the others stay 0, so the sum over ranks is exact. Ordered by owner rank, then
        plan order, so sums over layers add in the same order on every rank."""
        layers = sorted(self.plan.layers, key=lambda p: p.owner)
        table = torch.zeros(len(layers), 4, dtype=torch.float64)
        for i, p in enumerate(layers):
            if p.name in stats:
                table[i] = torch.tensor(dataclasses.astuple(stats[p.name]), dtype=torch.float64)
        self.comm.all_reduce(table)
        return {p.name: UpdateStats(*row) for p, row in zip(layers, table.tolist())}

    def _metrics(self, stats: dict[str, UpdateStats]) -> dict[str, float]:
        rho = self.state.rho
        out: dict[str, float] = {"rho": rho}
        for name, s in stats.items():
            w = math.sqrt(max(s.w_sq, 1e-30))
            out[f"primal/{name}"] = math.sqrt(s.primal_sq) / w
            out[f"dual/{name}"] = rho * math.sqrt(s.dual_sq)
            if s.decomp_sq >= 0:
                out[f"decomp_err/{name}"] = math.sqrt(s.decomp_sq) / w
        w_all = math.sqrt(max(sum(s.w_sq for s in stats.values()), 1e-30))
        out["admm_primal"] = math.sqrt(sum(s.primal_sq for s in stats.values())) / w_all
        out["admm_dual"] = rho * math.sqrt(sum(s.dual_sq for s in stats.values()))
        if all(s.decomp_sq >= 0 for s in stats.values()):
            out["admm_decomp_err"] = math.sqrt(sum(s.decomp_sq for s in stats.values())) / w_all
        return out

    # -- checkpoint ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**self.state.state_dict(), "owners": {p.name: p.owner for p in self.plan.layers},
                "history": self.history}

    def load_state_dict(self, shards: list[dict[str, Any]]) -> None:
        """Take this rank's layers from every saved rank's state (any old world size: re-sharding).

        A layer's warm factors (tucker2/cp) travel with its Z and U to its new owner; a
        checkpoint from before they were saved restarts the projection cold (HOSVD / svd init).
        """
        merged = {n: d for s in shards for n, d in s["layers"].items()}
        self.state.rho, self.state.updates = shards[0]["rho"], shards[0]["updates"]
        self.history = shards[0].get("history", [])
        for p in self.owned:
            if p.name in merged:
                d = merged[p.name]
                self.state.layers[p.name] = LayerState(p.fmt, p.rank, d["z"], d["u"], dict(d.get("warm", {})))
