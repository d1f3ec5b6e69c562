"""Owner assignment: every planned layer gets one owner rank, balancing the projection cost over the ranks.

A greedy longest-processing-time-first balance: the most expensive layer goes
to the least loaded rank, and so on.
"""
from __future__ import annotations

import dataclasses
import heapq
from typing import Sequence

from admm.formats.projections import RankSpec
from admm.formats.reshape import kernel_shape
from admm.planning.rank_plan import LayerPlan, RankPlan

# Weight of a matmul flop against the m n min(m, n) unit of a dense factorisation (SVD, eigh): fitted on the
# measured Z-update times of ResNet-50's planned layers (bench/zupdate.py --json, CPU; bench/README.md).
_MATMUL_WEIGHT = 0.1


def projection_cost(shape: Sequence[int], fmt: str, rank: RankSpec | None = None) -> float:
    """Relative cost of one Z-update of a layer, for balancing owners (units: m n min(m, n) of one dense SVD).

    svd, tt, cp, lowrank_sparse: an SVD of the ``(C_out, C_in k^2)`` unfolding, ``m n min(m, n)``.
    tucker2 at ``rank`` ``(r_out, r_in)``: what a warm HOOI sweep (admm/formats/hooi.py, every Z-update after the
    first) does: ``eigh`` of the two Gram matrices, ``C_out^3 + C_in^3``, plus its matmuls (mode products,
    Gram matrices, core, reconstruction) at ``_MATMUL_WEIGHT`` per flop. Costing tucker2 as two full SVDs
    instead made its 3x3 layers look 4-5x dearer than they are beside the svd-planned 1x1 layers: on
    ResNet-50 the largest of 4 shards took 1.9x the balanced time (bench/README.md).
    """
    c_out, c_in, kh, kw = kernel_shape(shape)
    s = kh * kw
    m, n = c_out, c_in * s
    if fmt == "tucker2":
        r_out, r_in = rank if isinstance(rank, tuple) else (c_out, c_in)
        matmul = 3 * c_out * c_in * s * (r_out + r_in) + c_out * c_out * r_in * s + c_in * c_in * r_out * s
        return float(c_out ** 3 + c_in ** 3 + _MATMUL_WEIGHT * matmul)
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
    owners = assign_owners([projection_cost(p.shape, p.fmt, p.rank) for p in plan.layers], world)
    layers = [LayerPlan(**{**p.__dict__, "owner": o}) for p, o in zip(plan.layers, owners)]
    return dataclasses.replace(plan, layers=layers, notes=list(plan.notes))
