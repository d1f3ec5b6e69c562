"""Rank planning (pure: shapes, and for the error allocation weights, in; plans out).

``plan_ranks`` turns a target into per-layer ranks so that the whole model
(excluded layers stay dense) keeps ``keep_ratio`` of its parameters, or of its
FLOPs per image (``budget="flops"``, :data:`BUDGET_COSTS`): explicit
ranks by layer name where given; the other layers either share one per-layer
keep fraction, found by bisection (``allocation="uniform"``), or get ranks
allocated from the budget to minimise the summed relative projection error of
their current weights (``allocation="error"``, :mod:`admm.planning.allocate`).
The plan itself is :mod:`admm.planning.rank_plan`; its owners, :mod:`admm.planning.owners`.

Each layer carries its own format (``LayerPlan.fmt``): a 1x1 conv or Linear
planned as tucker2 is planned as svd (:func:`layer_format`).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from torch import Tensor

from admm.config import ALLOCATIONS, BUDGETS
from admm.formats.projections import RankSpec, max_rank, validate_rank
from admm.formats.reshape import kernel_shape
from admm.planning.accounting import dense_flops, dense_params, factored_flops, factored_params, rank_for_keep_ratio
from admm.planning.allocate import Ladder, allocate, rank_ladder, relative_errors
from admm.planning.rank_plan import LayerInfo, LayerPlan, RankPlan

ONE_BY_ONE_NOTE = ("1x1 convs and Linear layers planned as tucker2 are planned as svd: for them Tucker-2 is the "
                   "same projection plus an r x r core, i.e. more parameters for the same Z")


def select(layers: Sequence[LayerInfo], include: Sequence[str], exclude: Sequence[str],
           min_channels: int) -> list[LayerInfo]:
    """Layers whose name matches an include and no exclude pattern and whose channels are >= min_channels."""
    out = []
    for layer in layers:
        c_out, c_in, _, _ = kernel_shape(layer.shape)
        if not any(fnmatch.fnmatchcase(layer.name, pat) for pat in include):
            continue
        if any(fnmatch.fnmatchcase(layer.name, pat) for pat in exclude):
            continue
        if min(c_out, c_in) >= min_channels:
            out.append(layer)
    return out


def _params_cost(layer: LayerInfo, fmt: str, rank: RankSpec | None) -> int:
    return dense_params(layer.shape) if rank is None else factored_params(layer.shape, fmt, rank)


def _flops_cost(layer: LayerInfo, fmt: str, rank: RankSpec | None) -> int:
    if rank is None:
        return dense_flops(layer.shape, layer.out_hw)
    return factored_flops(layer.shape, fmt, rank, layer.out_hw, in_hw=layer.in_hw)


# What one layer spends of each budget (admm.config.BUDGETS): cost(layer, fmt, rank), rank None = the dense layer.
# FLOPs need the layers' spatial sizes (LayerInfo.out_hw / in_hw from describe_layers with an input shape).
BUDGET_COSTS: dict[str, Callable[[LayerInfo, str, RankSpec | None], int]] = {
    "params": _params_cost, "flops": _flops_cost}


def plan_layer(layer: LayerInfo, fmt: str, rank: RankSpec) -> LayerPlan:
    """One layer's plan at ``rank``: its params and FLOPs per image before and after."""
    return LayerPlan(name=layer.name, shape=layer.shape, fmt=fmt, rank=rank,
                     params_before=dense_params(layer.shape), params_after=factored_params(layer.shape, fmt, rank),
                     flops_before=dense_flops(layer.shape, layer.out_hw),
                     flops_after=factored_flops(layer.shape, fmt, rank, layer.out_hw, in_hw=layer.in_hw))


def _uniform_keep(layer: LayerInfo, fmt: str, keep: float, sparse_fraction: float) -> RankSpec:
    try:
        return rank_for_keep_ratio(layer.shape, fmt, keep, sparse_share=sparse_fraction)
    except ValueError:  # even rank 1 exceeds this layer's share: rank 1 is the floor
        return _smallest(fmt)


def _smallest(fmt: str) -> RankSpec:
    return (1, 1) if fmt == "tucker2" else (1, 0) if fmt == "lowrank_sparse" else 1


def round_rank(shape: Sequence[int], fmt: str, rank: RankSpec, multiple: int) -> RankSpec:
    """``rank`` with every field >= ``multiple`` moved to the nearest multiple of it, capped at full rank.

    Fields below ``multiple`` stay as they are (they cannot be aligned without
    doubling them). lowrank_sparse rounds r only; k counts kernel entries.
    """
    if multiple <= 1:
        return rank
    full = max_rank(shape, fmt)
    values = list(rank) if isinstance(rank, tuple) else [rank]
    caps = list(full) if isinstance(full, tuple) else [full]
    n = 1 if fmt == "lowrank_sparse" else len(values)
    for i in range(n):
        if values[i] >= multiple:
            values[i] = min(caps[i], multiple * ((values[i] + multiple // 2) // multiple))  # half up
    return values[0] if len(values) == 1 else (values[0], values[1])


def layer_format(shape: Sequence[int], fmt: str) -> str:
    """The format a layer of ``shape`` is planned in: ``fmt``, except svd for a 1x1 conv / Linear under tucker2.

    For a 1x1 kernel the Tucker-2 modes C_out and C_in are the two sides of the weight matrix, so the
    HOSVD is the rank-r SVD with an extra r x r core: the same Z at more parameters (the peer TT-ADMM
    code plans such layers as svd too).
    """
    _, _, kh, kw = kernel_shape(shape)
    return "svd" if fmt == "tucker2" and kh * kw == 1 else fmt


def within_limits(layer: LayerInfo, fmt: str, rank: RankSpec, min_rank_ratio: float, max_keep: float,
                  budget: str = "params", cost: Callable[[LayerInfo, str, RankSpec | None], float] | None = None) -> bool:
    """Every rank field >= ``min_rank_ratio`` x its full rank (at least 1) and cost <= ``max_keep`` x dense cost.

    ``cost`` (layer, fmt, rank or None = dense) replaces ``budget``'s cost (a latency budget's measured table).
    """
    shape = layer.shape
    full = max_rank(shape, fmt)
    values = rank if isinstance(rank, tuple) else (rank,)
    caps = full if isinstance(full, tuple) else (full,)
    n = 1 if fmt == "lowrank_sparse" else len(values)  # lowrank_sparse: k counts kernel entries, not a rank
    if any(v < max(1, math.ceil(min_rank_ratio * c - 1e-9)) for v, c in zip(values[:n], caps[:n])):
        return False
    cost = cost or BUDGET_COSTS[budget]
    return cost(layer, fmt, rank) <= max_keep * cost(layer, fmt, None)


def error_ladder(layer: LayerInfo, fmt: str, weight: Tensor, *, rank_multiple: int = 1, sparse_fraction: float = 0.1,
                 min_rank_ratio: float = 0.0, max_keep: float = 1.0, budget: str = "params") -> Ladder:
    """The rank options of one layer for :func:`admm.planning.allocate.allocate`: rounded to ``rank_multiple``,
    within the per-layer limits, cheapest first, with their costs in ``budget``'s unit (parameters, or
    FLOPs per image) and relative squared errors.

    Raises ValueError (naming the keys) when the limits leave no rank for this layer.
    """
    specs = [round_rank(layer.shape, fmt, r, rank_multiple)
             for r in rank_ladder(layer.shape, fmt, sparse_share=sparse_fraction)]
    specs = [r for r in dict.fromkeys(specs) if within_limits(layer, fmt, r, min_rank_ratio, max_keep, budget)]
    if not specs:
        raise ValueError(f"compression.min_rank_ratio={min_rank_ratio} and compression.max_keep={max_keep} leave "
                         f"no {fmt} rank for layer {layer.name} {tuple(layer.shape)}; lower min_rank_ratio or "
                         "raise max_keep")
    cost = BUDGET_COSTS[budget]
    specs.sort(key=lambda r: (cost(layer, fmt, r), r if isinstance(r, tuple) else (r,)))
    errors = relative_errors(weight, fmt, specs)
    return Ladder(ranks=tuple(specs), costs=tuple(cost(layer, fmt, r) for r in specs), errors=tuple(errors))


def with_errors(plan: RankPlan, weights: Mapping[str, Tensor]) -> RankPlan:
    """A copy of ``plan`` whose layers carry ``error`` = ||W - Proj(W)|| / ||W|| of ``weights[name]``."""
    layers = [LayerPlan(**{**p.__dict__, "error": math.sqrt(relative_errors(weights[p.name], p.fmt, [p.rank])[0])})
              for p in plan.layers]
    return dataclasses.replace(plan, layers=layers, notes=list(plan.notes))


def plan_ranks(all_layers: Sequence[LayerInfo], planned: Sequence[LayerInfo], fmt: str, keep_ratio: float,
               ranks: Mapping[str, int | Sequence[int]] | None = None, sparse_fraction: float = 0.1,
               rank_multiple: int = 1, allocation: str = "uniform", weights: Mapping[str, Tensor] | None = None,
               min_rank_ratio: float = 0.0, max_keep: float = 1.0, budget: str = "params") -> RankPlan:
    """Per-layer ranks so the model keeps ``keep_ratio`` of its conv/linear parameters (or FLOPs).

    Every layer is planned in :func:`layer_format` of ``fmt``. With ``rank_multiple > 1``
    the budgeted ranks pass through :func:`round_rank` before the budget is checked, so
    the rounded plan still keeps at most ``keep_ratio``.

    Args:
        all_layers: every conv/linear layer of the model (for the totals).
        planned: the subset to factor (see :func:`select`).
        ranks: explicit ranks by layer name; these layers are fixed, the rest share the budget.
        allocation: ``"uniform"``: the free layers keep one shared fraction of their parameters
            (bisection); ``"error"``: ranks minimise the summed relative squared projection error
            of ``weights`` (:mod:`admm.planning.allocate`), each layer's ranks within ``min_rank_ratio`` of
            its full ranks and ``max_keep`` of its dense parameters. The plan then ends within
            one rank step of the budget, and its layers carry their ``error``.
        weights: the current weight of every planned layer by name (needed for ``"error"``).
        budget: what ``keep_ratio`` (and ``max_keep``) is a fraction of: ``"params"``, or ``"flops"``
            per image at the layers' ``out_hw``/``in_hw`` (describe them with an input shape).
            ``"uniform"`` then still keeps one fraction of every free layer's parameters, the
            largest whose total FLOPs fit.
    Raises:
        ValueError: an explicit rank is invalid, names an unplanned layer, or the target cannot be met
            even at rank 1 everywhere (or at the ranks ``min_rank_ratio`` demands).
    """
    ranks = dict(ranks or {})
    names = {layer.name for layer in planned}
    unknown = sorted(set(ranks) - names)
    if unknown:
        raise ValueError(f"compression.ranks names layers that are not planned: {unknown}; planned: {sorted(names)}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"compression.allocation: must be one of {ALLOCATIONS}, got {allocation!r}")
    if allocation == "error" and (weights is None or not names <= set(weights)):
        raise ValueError("the error allocation needs the weights of every planned layer")
    if budget == "latency":
        raise ValueError("compression.budget=latency is planned from measured layer latencies "
                         "(admm.planning.latency_budget.plan_latency), not by plan_ranks")
    if budget not in BUDGET_COSTS:
        raise ValueError(f"compression.budget: must be one of {BUDGETS}, got {budget!r}")
    dense_total = sum(dense_params(layer.shape) for layer in all_layers)
    flops_total = sum(dense_flops(layer.shape, layer.out_hw) for layer in all_layers)
    fmts = {layer.name: layer_format(layer.shape, fmt) for layer in planned}
    task = _Budget(planned=list(planned), fmts=fmts, fixed=_fixed_ranks(ranks, planned, fmts, fmt),
                   keep_ratio=keep_ratio, budget=budget,
                   dense_total=dense_total, flops_total=flops_total,
                   notes=[ONE_BY_ONE_NOTE] if any(f != fmt for f in fmts.values()) else [])
    if allocation == "error":
        return _allocate_by_error(task, weights, rank_multiple=rank_multiple,  # type: ignore[arg-type]
                                  sparse_fraction=sparse_fraction, min_rank_ratio=min_rank_ratio, max_keep=max_keep)
    plan = _allocate_uniform(task, rank_multiple=rank_multiple, sparse_fraction=sparse_fraction)
    return with_errors(plan, weights) if weights is not None else plan


def _fixed_ranks(ranks: Mapping[str, int | Sequence[int]], planned: Sequence[LayerInfo], fmts: Mapping[str, str],
                 fmt: str) -> dict[str, RankSpec]:
    """``compression.ranks`` checked against each layer's shape in the format it is planned in."""
    fixed = {}
    for n, r in ranks.items():
        shape = next(layer.shape for layer in planned if layer.name == n)
        try:
            fixed[n] = validate_rank(shape, fmts[n], tuple(r) if isinstance(r, (list, tuple)) else r)
        except ValueError as e:
            hint = " (a 1x1 layer under tucker2 is planned as svd: give one int)" if fmts[n] != fmt else ""
            raise ValueError(f"compression.ranks.{n}: {e}{hint}") from None
    return fixed


@dataclass
class _Budget:
    """What both allocations of :func:`plan_ranks` share: the layers, their formats, the fixed ranks, the target."""

    planned: list[LayerInfo]
    fmts: dict[str, str]  # layer -> the format it is planned in (layer_format)
    fixed: dict[str, RankSpec]  # layer -> the rank compression.ranks gives it
    keep_ratio: float
    budget: str  # "params" or "flops"
    dense_total: int
    flops_total: int
    notes: list[str]

    @property
    def free(self) -> list[LayerInfo]:
        return [layer for layer in self.planned if layer.name not in self.fixed]

    @property
    def cost_total(self) -> int:
        return self.flops_total if self.budget == "flops" else self.dense_total

    @property
    def target(self) -> float:
        return self.keep_ratio * self.cost_total

    @property
    def unit(self) -> str:
        return "FLOPs per image" if self.budget == "flops" else "parameters"


def _allocate_by_error(task: _Budget, weights: Mapping[str, Tensor], *, rank_multiple: int, sparse_fraction: float,
                       min_rank_ratio: float, max_keep: float) -> RankPlan:
    """Ranks that minimise the summed relative squared projection error within the budget (admm.planning.allocate)."""
    cost, fmts, fixed, free = BUDGET_COSTS[task.budget], task.fmts, task.fixed, task.free
    # The free layers' budget: what is left after dense layers and the fixed layers.
    rest = task.cost_total - sum(cost(layer, fmts[layer.name], None) for layer in free)
    rest -= sum(cost(layer, fmts[n], None) - cost(layer, fmts[n], fixed[n])
                for layer in task.planned for n in [layer.name] if n in fixed)
    ladders = [error_ladder(layer, fmts[layer.name], weights[layer.name], rank_multiple=rank_multiple,
                            sparse_fraction=sparse_fraction, min_rank_ratio=min_rank_ratio, max_keep=max_keep,
                            budget=task.budget)
               for layer in free]
    try:
        choice = allocate(ladders, task.target - rest)
    except ValueError as e:
        msg = str(e).replace("parameters", task.unit)
        raise ValueError(f"compression.keep_ratio={task.keep_ratio} is impossible (compression.budget={task.budget}): "
                         f"{msg} (min_rank_ratio {min_rank_ratio}); raise keep_ratio, lower min_rank_ratio or the "
                         "fixed ranks") from None
    chosen = {layer.name: (lad.ranks[c], math.sqrt(lad.errors[c])) for layer, lad, c in zip(free, ladders, choice)}
    for n, r in fixed.items():
        chosen[n] = (r, math.sqrt(relative_errors(weights[n], fmts[n], [r])[0]))  # type: ignore[index]
    return RankPlan(layers=[dataclasses.replace(plan_layer(layer, fmts[layer.name], chosen[layer.name][0]),
                                                error=chosen[layer.name][1]) for layer in task.planned],
                    dense_params_total=task.dense_total, dense_flops_total=task.flops_total, allocation="error",
                    notes=task.notes, budget=task.budget)


def _allocate_uniform(task: _Budget, *, rank_multiple: int, sparse_fraction: float) -> RankPlan:
    """Every free layer keeps one shared fraction of its parameters: the largest whose total fits (bisection)."""
    fmts, fixed = task.fmts, task.fixed

    def rank_of(layer: LayerInfo, keep: float) -> RankSpec:
        if layer.name in fixed:
            return fixed[layer.name]
        f = fmts[layer.name]
        return round_rank(layer.shape, f, _uniform_keep(layer, f, keep, sparse_fraction), rank_multiple)

    def total(keep: float) -> tuple[int, list[LayerPlan]]:
        plans = [plan_layer(layer, fmts[layer.name], rank_of(layer, keep)) for layer in task.planned]
        if task.budget == "flops":
            return task.flops_total - sum(p.flops_before - p.flops_after for p in plans), plans
        return task.dense_total - sum(p.params_before - p.params_after for p in plans), plans

    lo_total, lo_plans = total(1e-9)  # rank 1 (or the fixed ranks) everywhere
    if lo_total > task.target:
        raise ValueError(f"compression.keep_ratio={task.keep_ratio} is impossible (compression.budget={task.budget}): "
                         f"even rank 1 in every planned layer keeps {lo_total:,} of {task.cost_total:,} {task.unit} "
                         f"({lo_total / task.cost_total:.3f}); raise keep_ratio, plan more layers (include/exclude) "
                         "or lower the fixed ranks")
    best = lo_plans
    lo, hi = 0.0, 1.0
    if task.free:
        for _ in range(40):  # bisection on the shared per-layer keep fraction
            mid = (lo + hi) / 2
            t, plans = total(mid)
            if t <= task.target:
                lo, best = mid, plans
            else:
                hi = mid
        t, plans = total(1.0)
        if t <= task.target:
            best = plans
    return RankPlan(layers=best, dense_params_total=task.dense_total, dense_flops_total=task.flops_total,
                    notes=task.notes, budget=task.budget)
