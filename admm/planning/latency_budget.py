"""Ranks for a latency budget (pure: measured layer latencies in, a plan out).

``compression.budget=latency`` keeps ``compression.latency.target`` x the dense model's
latency per batch. The trainer times (and caches) every planned layer dense and at each
candidate rank of :func:`latency_candidates`, plus the whole dense model, and hands the
numbers in as :class:`LatencyCosts`; nothing here measures or reads files.

The whole model's latency is predicted additively: the measured dense model less,
for every planned layer, its measured dense time minus its measured factored time.
The layers between (BatchNorm, activations, pooling, unplanned convs) keep their
cost, which is what a per-layer swap leaves unchanged.

Allocations (``compression.allocation``):

* ``error``: the convex-hull greedy of :func:`admm.planning.allocate.allocate` on each layer's
  (latency, relative squared projection error) ladder: it cuts where the latency
  saved per unit of error added is largest and ends within one candidate step of
  the target. The ladder is sorted by measured time, so a candidate that measured
  slower than a larger one is simply off the hull.
* ``uniform``: one keep fraction of parameters shared by every free layer, each layer
  at the largest candidate within it; the largest fraction whose predicted latency fits.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from torch import Tensor

from admm.config import LatencyTarget
from admm.formats.projections import RankSpec, validate_rank
from admm.planning.accounting import dense_flops, dense_params, factored_params
from admm.planning.allocate import Ladder, allocate, rank_ladder, relative_errors
from admm.planning.planner import ONE_BY_ONE_NOTE, layer_format, plan_layer, round_rank, within_limits
from admm.planning.rank_plan import LayerInfo, LayerPlan, RankPlan

__all__ = ["LatencyCosts", "latency_candidates", "plan_latency"]


def latency_candidates(shape: Sequence[int], fmt: str, points: int, *, rank_multiple: int = 1,
                       sparse_fraction: float = 0.1) -> list[RankSpec]:
    """The ranks of a layer worth timing: at most ``points`` of its rank ladder, evenly spaced, fewest params first.

    The ladder is :func:`admm.planning.allocate.rank_ladder` rounded to ``rank_multiple`` (and then only its
    aligned ranks and its smallest); its cheapest and its largest options are always kept, so the
    grid spans every rank the layer can take.
    """
    ladder = [round_rank(shape, fmt, r, rank_multiple) for r in rank_ladder(shape, fmt, sparse_share=sparse_fraction)]
    ladder = sorted(dict.fromkeys(ladder), key=lambda r: factored_params(shape, fmt, r))
    if rank_multiple > 1:  # the aligned ranks are the point of rank_multiple: time those (and the smallest rank)
        ladder = ladder[:1] + [r for r in ladder[1:] if _rank_fields(r)[0] % rank_multiple == 0]
    if len(ladder) <= points:
        return ladder
    picks = sorted({round(i * (len(ladder) - 1) / (points - 1)) for i in range(points)})
    return [ladder[i] for i in picks]


@dataclass(frozen=True)
class LatencyCosts:
    """Measured milliseconds per batch: the dense model, and every planned layer dense and per candidate rank.

    ``factored_ms[layer][rank]``: the layer's factored module at ``rank``, timed on the input it sees
    in the model at the target's batch. ``batch`` and ``runtime`` say how all of it was timed.
    """

    dense_model_ms: float
    dense_ms: Mapping[str, float]
    factored_ms: Mapping[str, Mapping[RankSpec, float]]
    batch: int
    runtime: str
    device: str = ""

    def cost(self, layer: LayerInfo, fmt: str, rank: RankSpec | None) -> float:
        """ms of ``layer`` dense (``rank`` None) or factored at ``rank``; a rank never timed is an error."""
        if rank is None:
            return self.dense_ms[layer.name]
        try:
            return self.factored_ms[layer.name][rank]
        except KeyError:
            raise ValueError(f"layer {layer.name}: no measured latency for {fmt} rank {rank}; measured: "
                             f"{sorted(self.factored_ms.get(layer.name, {}), key=str)}") from None


def _rank_fields(rank: RankSpec) -> tuple[int, ...]:
    return rank if isinstance(rank, tuple) else (rank,)


def plan_latency(all_layers: Sequence[LayerInfo], planned: Sequence[LayerInfo], fmt: str, latency: LatencyTarget,
                 costs: LatencyCosts, *, ranks: Mapping[str, int | Sequence[int]] | None = None,
                 allocation: str = "uniform", weights: Mapping[str, Tensor] | None = None,
                 min_rank_ratio: float = 0.0, max_keep: float = 1.0) -> RankPlan:
    """Per-layer ranks whose predicted latency is at most ``latency.target`` x ``costs.dense_model_ms``.

    Args:
        all_layers: every conv/linear layer of the model (for the param and FLOP totals).
        planned: the layers to factor; every one needs its dense time and its candidates' times in ``costs``.
        ranks: explicit ranks (fixed; their timed latency counts against the target).
        allocation: ``"error"`` (needs ``weights``: every planned layer's weight) or ``"uniform"``.
        min_rank_ratio, max_keep: error allocation: each layer's ranks >= this fraction of full rank and
            its time <= ``max_keep`` x its dense time.
    Returns:
        The plan; every layer carries ``latency_before``/``latency_after`` (ms), the plan ``dense_latency_ms``.
    Raises:
        ValueError: the target cannot be met even at the fastest measured ranks, or a rank is invalid/untimed.
    """
    fmts = {layer.name: layer_format(layer.shape, fmt) for layer in planned}
    names = set(fmts)
    unknown = sorted(set(ranks or {}) - names)
    if unknown:
        raise ValueError(f"compression.ranks names layers that are not planned: {unknown}; planned: {sorted(names)}")
    if allocation == "error" and (weights is None or not names <= set(weights)):
        raise ValueError("the error allocation needs the weights of every planned layer")
    fixed: dict[str, RankSpec] = {}
    for layer in planned:
        if layer.name in (ranks or {}):
            r = ranks[layer.name]  # type: ignore[index]
            try:
                fixed[layer.name] = validate_rank(layer.shape, fmts[layer.name],
                                                  tuple(r) if isinstance(r, (list, tuple)) else r)
            except ValueError as e:
                raise ValueError(f"compression.ranks.{layer.name}: {e}") from None
    free = [layer for layer in planned if layer.name not in fixed]
    target_ms = latency.target * costs.dense_model_ms
    rest = costs.dense_model_ms - sum(costs.cost(layer, fmts[layer.name], None) for layer in planned)
    rest += sum(costs.cost(layer, fmts[layer.name], fixed[layer.name]) for layer in planned if layer.name in fixed)
    notes = [f"budget latency: target {latency.target} of the dense model's {costs.dense_model_ms:.2f} ms per batch "
             f"of {costs.batch} ({costs.runtime}{', ' + costs.device if costs.device else ''}) = {target_ms:.2f} ms; "
             "predicted = dense model - sum over planned layers of (dense layer - factored layer), each timed alone"]
    if any(f != fmt for f in fmts.values()):
        notes.append(ONE_BY_ONE_NOTE)
    if allocation == "error":
        chosen = _by_error(free, fmts, costs, weights, target_ms - rest, min_rank_ratio, max_keep,  # type: ignore[arg-type]
                           latency.target)
    else:
        chosen = _uniform(free, fmts, costs, target_ms - rest, latency.target)
    chosen.update(fixed)
    layers: list[LayerPlan] = []
    for layer in planned:
        f, r = fmts[layer.name], chosen[layer.name]
        p = dataclasses.replace(plan_layer(layer, f, r), latency_before=costs.cost(layer, f, None),
                                latency_after=costs.cost(layer, f, r))
        if weights is not None and layer.name in weights:
            p = dataclasses.replace(p, error=math.sqrt(relative_errors(weights[layer.name], f, [r])[0]))
        layers.append(p)
    return RankPlan(layers=layers, dense_params_total=sum(dense_params(layer.shape) for layer in all_layers),
                    dense_flops_total=sum(dense_flops(layer.shape, layer.out_hw) for layer in all_layers),
                    allocation=allocation, notes=notes, budget="latency", dense_latency_ms=costs.dense_model_ms)


def _impossible(target: float, need: float, budget: float, which: str) -> ValueError:
    return ValueError(f"compression.latency.target={target} is impossible: the {which} measured ranks of the free "
                      f"layers take {need:.2f} ms where {budget:.2f} ms are left for them; raise the target, plan "
                      "more layers (include/exclude) or lower the fixed ranks")


def _by_error(free: Sequence[LayerInfo], fmts: Mapping[str, str], costs: LatencyCosts, weights: Mapping[str, Tensor],
              budget_ms: float, min_rank_ratio: float, max_keep: float, target: float) -> dict[str, RankSpec]:
    """Greedy on each layer's (measured ms, relative squared error) ladder: see the module docstring."""
    ladders = []
    for layer in free:
        f = fmts[layer.name]
        # max_keep 1 (the default) means no cap: a factored layer may time slower than its dense one
        specs = [r for r in costs.factored_ms[layer.name]
                 if within_limits(layer, f, r, min_rank_ratio, max_keep if max_keep < 1 else math.inf, cost=costs.cost)]
        if not specs:
            raise ValueError(f"compression.min_rank_ratio={min_rank_ratio} and compression.max_keep={max_keep} leave "
                             f"no measured {f} rank for layer {layer.name}; lower min_rank_ratio or raise max_keep")
        specs.sort(key=lambda r: (costs.cost(layer, f, r), _rank_fields(r)))
        ladders.append(Ladder(ranks=tuple(specs), costs=tuple(costs.cost(layer, f, r) for r in specs),  # type: ignore[arg-type]
                              errors=tuple(relative_errors(weights[layer.name], f, specs))))
    try:
        choice = allocate(ladders, budget_ms)
    except ValueError:
        raise _impossible(target, sum(lad.costs[0] for lad in ladders), budget_ms, "fastest") from None
    return {layer.name: lad.ranks[c] for layer, lad, c in zip(free, ladders, choice)}


def _uniform(free: Sequence[LayerInfo], fmts: Mapping[str, str], costs: LatencyCosts, budget_ms: float,
             target: float) -> dict[str, RankSpec]:
    """The largest shared parameter keep fraction (each layer at its largest candidate within it) that fits."""
    def ranks_at(keep: float) -> dict[str, RankSpec]:
        out = {}
        for layer in free:
            f = fmts[layer.name]
            options = sorted(costs.factored_ms[layer.name], key=lambda r: factored_params(layer.shape, f, r))
            within = [r for r in options if factored_params(layer.shape, f, r) <= keep * dense_params(layer.shape)]
            out[layer.name] = within[-1] if within else options[0]
        return out

    def spent(choice: Mapping[str, RankSpec]) -> float:
        return sum(costs.cost(layer, fmts[layer.name], choice[layer.name]) for layer in free)

    best = ranks_at(0.0)
    if spent(best) > budget_ms:
        raise _impossible(target, spent(best), budget_ms, "smallest")
    lo, hi = 0.0, 1.0
    for _ in range(30):  # measured times need not grow with the fraction: bisection finds one fitting fraction
        mid = (lo + hi) / 2
        choice = ranks_at(mid)
        if spent(choice) <= budget_ms:
            lo, best = mid, choice
        else:
            hi = mid
    return best
