"""Rank planning and owner assignment (pure: shapes in, plans out).

``plan_ranks`` turns a target into per-layer ranks: explicit ranks by layer
name where given, else one per-layer keep fraction, found by bisection, so
that the whole model (excluded layers stay dense) keeps ``keep_ratio`` of its
parameters. ``assign_owners`` gives every planned layer one owner rank by a
greedy longest-processing-time-first balance of projection cost.
"""
from __future__ import annotations

import fnmatch
import heapq
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from admm.accounting import dense_flops, dense_params, factored_flops, factored_params, rank_for_keep_ratio
from admm.projections import RankSpec, max_rank, validate_rank
from admm.reshape import kernel_shape


@dataclass(frozen=True)
class LayerInfo:
    """A candidate layer: weight ``shape`` (C_out, C_in, kh, kw) or (out, in); conv output size ``out_hw``."""

    name: str
    shape: tuple[int, ...]
    out_hw: tuple[int, int] = (1, 1)
    in_hw: tuple[int, int] | None = None


@dataclass(frozen=True)
class LayerPlan:
    name: str
    shape: tuple[int, ...]
    fmt: str
    rank: RankSpec
    params_before: int
    params_after: int
    flops_before: int  # per image, 2 x MACs
    flops_after: int
    owner: int = 0


@dataclass
class RankPlan:
    layers: list[LayerPlan]
    dense_params_total: int  # the whole model, planned or not (weights of conv/linear layers)
    dense_flops_total: int
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def params_after_total(self) -> int:
        return self.dense_params_total - sum(p.params_before - p.params_after for p in self.layers)

    @property
    def flops_after_total(self) -> int:
        return self.dense_flops_total - sum(p.flops_before - p.flops_after for p in self.layers)

    @property
    def compression(self) -> float:
        """Dense params / planned params over all conv/linear weights."""
        return self.dense_params_total / max(1, self.params_after_total)

    def by_name(self) -> dict[str, LayerPlan]:
        return {p.name: p for p in self.layers}

    def table(self) -> str:
        """Human-readable plan: one row per layer, then totals."""
        rows = [("layer", "shape", "format", "ranks", "owner", "params", "->", "FLOPs", "->")]
        for p in self.layers:
            rows.append((p.name, "x".join(map(str, p.shape)), p.fmt, str(p.rank), str(p.owner),
                         f"{p.params_before:,}", f"{p.params_after:,}", _si(p.flops_before), _si(p.flops_after)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append(f"model (conv+linear weights): params {self.dense_params_total:,} -> {self.params_after_total:,}"
                     f" ({self.compression:.2f}x), FLOPs/image {_si(self.dense_flops_total)} -> "
                     f"{_si(self.flops_after_total)} ({self.dense_flops_total / max(1, self.flops_after_total):.2f}x)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"layers": [{**p.__dict__, "rank": list(p.rank) if isinstance(p.rank, tuple) else p.rank}
                           for p in self.layers],
                "dense_params": self.dense_params_total, "params_after": self.params_after_total,
                "dense_flops": self.dense_flops_total, "flops_after": self.flops_after_total,
                "compression": self.compression}


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


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


def _plan_layer(layer: LayerInfo, fmt: str, rank: RankSpec) -> LayerPlan:
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


def plan_ranks(all_layers: Sequence[LayerInfo], planned: Sequence[LayerInfo], fmt: str, keep_ratio: float,
               ranks: Mapping[str, int | Sequence[int]] | None = None, sparse_fraction: float = 0.1,
               rank_multiple: int = 1) -> RankPlan:
    """Per-layer ranks so the model keeps ``keep_ratio`` of its conv/linear parameters.

    With ``rank_multiple > 1`` the budgeted ranks pass through :func:`round_rank`
    inside the bisection, so the rounded plan still keeps at most ``keep_ratio``.

    Args:
        all_layers: every conv/linear layer of the model (for the totals).
        planned: the subset to factor (see :func:`select`).
        ranks: explicit ranks by layer name; these layers are fixed, the rest share the budget.
    Raises:
        ValueError: an explicit rank is invalid, names an unplanned layer, or the target cannot be met
            even at rank 1 everywhere.
    """
    ranks = dict(ranks or {})
    names = {layer.name for layer in planned}
    unknown = sorted(set(ranks) - names)
    if unknown:
        raise ValueError(f"compression.ranks names layers that are not planned: {unknown}; planned: {sorted(names)}")
    dense_total = sum(dense_params(layer.shape) for layer in all_layers)
    flops_total = sum(dense_flops(layer.shape, layer.out_hw) for layer in all_layers)
    fixed = {n: validate_rank(next(layer.shape for layer in planned if layer.name == n), fmt,
                              tuple(r) if isinstance(r, (list, tuple)) else r) for n, r in ranks.items()}
    free = [layer for layer in planned if layer.name not in fixed]
    budget = keep_ratio * dense_total

    def rank_of(layer: LayerInfo, keep: float) -> RankSpec:
        if layer.name in fixed:
            return fixed[layer.name]
        return round_rank(layer.shape, fmt, _uniform_keep(layer, fmt, keep, sparse_fraction), rank_multiple)

    def total(keep: float) -> tuple[int, list[LayerPlan]]:
        plans = [_plan_layer(layer, fmt, rank_of(layer, keep)) for layer in planned]
        return dense_total - sum(p.params_before - p.params_after for p in plans), plans

    lo_total, lo_plans = total(1e-9)  # rank 1 (or the fixed ranks) everywhere
    if lo_total > budget:
        raise ValueError(f"compression.keep_ratio={keep_ratio} is impossible: even rank 1 in every planned layer "
                         f"keeps {lo_total:,} of {dense_total:,} parameters ({lo_total / dense_total:.3f}); "
                         "raise keep_ratio, plan more layers (include/exclude) or lower the fixed ranks")
    best = lo_plans
    lo, hi = 0.0, 1.0
    if free:
        for _ in range(40):  # bisection on the shared per-layer keep fraction
            mid = (lo + hi) / 2
            t, plans = total(mid)
            if t <= budget:
                lo, best = mid, plans
            else:
                hi = mid
        t, plans = total(1.0)
        if t <= budget:
            best = plans
    return RankPlan(layers=best, dense_params_total=dense_total, dense_flops_total=flops_total)


def projection_cost(shape: Sequence[int], fmt: str) -> float:
    """Relative cost of one projection: an SVD of the unfolding, ~ m n min(m, n) flops."""
    c_out, c_in, kh, kw = kernel_shape(shape)
    m, n = c_out, c_in * kh * kw
    if fmt == "tucker2":  # two unfoldings (modes C_out and C_in)
        n2 = c_out * kh * kw
        return m * n * min(m, n) + c_in * n2 * min(c_in, n2)
    return float(m * n * min(m, n))


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Greedy longest-first: each layer, largest cost first, goes to the least-loaded rank.

    Deterministic (ties broken by rank index), so every rank computes the same map.
    Returns the owner rank of each layer, in input order.
    """
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    heap = [(0.0, r) for r in range(world)]
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owners


def with_owners(plan: RankPlan, world: int) -> RankPlan:
    """A copy of ``plan`` whose layers carry owners for ``world`` ranks."""
    owners = assign_owners([projection_cost(p.shape, p.fmt) for p in plan.layers], world)
    layers = [LayerPlan(**{**p.__dict__, "owner": o}) for p, o in zip(plan.layers, owners)]
    return RankPlan(layers=layers, dense_params_total=plan.dense_params_total,
                    dense_flops_total=plan.dense_flops_total, extra=dict(plan.extra))
