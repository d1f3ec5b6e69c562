"""Non-uniform ranks from one global budget: error curves of trained weights and a greedy allocation.

The uniform plan (``planner.plan_ranks``) keeps the same fraction of every
layer. Layers differ: a layer whose spectrum decays fast loses little at a low
rank, one with a flat spectrum loses a lot. ``allocate`` spends one parameter
budget where it buys the largest drop of

    sum over layers of ||W_l - Proj_{r_l}(W_l)||^2 / ||W_l||^2

(the relative squared projection error of each layer's current weights, every
layer counting equally). Each layer offers a *ladder* of rank specs, cheapest
first, with their parameter costs and errors:

* svd: all ranks 1..full; errors exact from one SVD (Eckart-Young: the tail
  of the squared singular values).
* tucker2: the ladder of ``accounting.rank_for_keep_ratio`` (the wider mode
  steps by one, the other follows in proportion); errors of the truncated HOSVD
  exactly, from one eigendecomposition per mode: with the full mode bases
  U_o, U_i the core G = W x_0 U_o^T x_1 U_i^T is an orthogonal rotation of W,
  and the HOSVD at (a, b) keeps exactly the energy of G[:a, :b, :]. HOOI's
  error is at most this, so for HOOI it is an upper bound.
* other formats: a few points of ``rank_for_keep_ratio`` (a geometric grid of
  keep fractions), each error from one projection.

The allocation is the convex-hull greedy of rate allocation (Shoham & Gersho,
1988): every layer starts at its cheapest option; repeatedly the layer whose
next point on the lower convex hull of its (cost, error) curve gives the largest
error drop per added parameter moves there, while it fits the budget. The hull
makes each move look past a flat stretch of a layer's curve (one more rank may
buy little where two buy much), and on the hull the greedy solves the
Lagrangian relaxation exactly. What is left of the budget then goes, one option
at a time, to the best drop per parameter among the options that still fit,
so the plan ends within one ladder step of the budget. Ties go to the earlier
layer and the cheaper option: the result depends only on the ladders.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from admm.formats.projections import RankSpec, max_rank, project
from admm.formats.reshape import kernel_shape, to_3way, to_matrix
from admm.planning.accounting import factored_params, rank_for_keep_ratio

__all__ = ["Ladder", "allocate", "projection_errors", "rank_ladder", "relative_errors"]

# Keep fractions probed for formats without a closed-form error curve (one projection each).
PROBE_KEEPS = (0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0)


@dataclass(frozen=True)
class Ladder:
    """One layer's rank options, cheapest first.

    ``costs``: what each option spends of the budget (parameters); ``errors``:
    its relative squared projection error ||W - Proj(W)||^2 / ||W||^2 (in [0, 1]).
    """

    ranks: tuple[RankSpec, ...]
    costs: tuple[int, ...]
    errors: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.ranks or not (len(self.ranks) == len(self.costs) == len(self.errors)):
            raise ValueError("a ladder needs at least one option and as many costs and errors as ranks")
        if any(b < a for a, b in zip(self.costs, self.costs[1:])):
            raise ValueError(f"ladder costs must not decrease: {self.costs}")


def rank_ladder(shape: Sequence[int], fmt: str, *, sparse_share: float = 0.1) -> list[RankSpec]:
    """Candidate rank specs of ``fmt`` for a weight of ``shape``, cheapest first, without duplicates.

    svd: every rank; tucker2: the proportional pairs of ``rank_for_keep_ratio``; others:
    ``rank_for_keep_ratio`` at ``PROBE_KEEPS`` (and rank spec of keep 1.0 last).
    """
    if fmt == "svd":
        return list(range(1, int(max_rank(shape, "svd")) + 1))  # type: ignore[arg-type]
    if fmt == "tucker2":
        hi_out, hi_in = max_rank(shape, "tucker2")  # type: ignore[misc]
        if hi_out >= hi_in:
            pairs = [(r, max(1, round(r * hi_in / hi_out))) for r in range(1, hi_out + 1)]
        else:
            pairs = [(max(1, round(r * hi_out / hi_in)), r) for r in range(1, hi_in + 1)]
        return list(dict.fromkeys(pairs))
    out: list[RankSpec] = []
    for keep in PROBE_KEEPS:
        try:
            spec = rank_for_keep_ratio(shape, fmt, keep, sparse_share=sparse_share)
        except ValueError:  # even the smallest rank exceeds this keep fraction
            continue
        if spec not in out:
            out.append(spec)
    return sorted(out, key=lambda s: factored_params(shape, fmt, s))


def _energy(weight: Tensor) -> Tensor:
    return weight.detach().to(torch.float64).square().sum()


def svd_errors(weight: Tensor, ranks: Sequence[int]) -> list[float]:
    """Relative squared error of the best rank-r approximation of the (C_out, C_in*k*k) unfolding, per r."""
    with torch.no_grad():
        m = to_matrix(weight.detach().to(torch.float64))
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        # Squared singular values = eigenvalues of the smaller Gram matrix (float64: the tail stays accurate);
        # several times faster than an SVD on a CPU.
        s2 = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
        total = float(s2.sum())
        kept = torch.cumsum(s2, 0)
    if total <= 0:
        return [0.0 for _ in ranks]
    return [max(0.0, 1.0 - float(kept[min(r, len(kept)) - 1]) / total) for r in ranks]


def _mode_basis(unfolding: Tensor) -> Tensor:
    """Left singular vectors of ``unfolding`` (rows x cols), largest first, as a (rows, rows) matrix."""
    evals, evecs = torch.linalg.eigh(unfolding @ unfolding.T)
    return evecs.flip(-1)  # eigh sorts ascending


def tucker2_errors(weight: Tensor, ranks: Sequence[tuple[int, int]]) -> list[float]:
    """Relative squared error of the truncated HOSVD at each ``(r_out, r_in)`` (exact, see module docstring)."""
    with torch.no_grad():
        t = to_3way(weight.detach().to(torch.float64))  # (C_out, C_in, s)
        c_out, c_in, _ = t.shape
        u_o = _mode_basis(t.reshape(c_out, -1))
        u_i = _mode_basis(t.permute(1, 0, 2).reshape(c_in, -1))
        core = torch.einsum("ois,oa,ib->abs", t, u_o, u_i)
        kept = core.square().sum(-1).cumsum(0).cumsum(1)  # kept[a-1, b-1] = energy of core[:a, :b]
        total = float(_energy(t))
    if total <= 0:
        return [0.0 for _ in ranks]
    return [max(0.0, 1.0 - float(kept[min(a, c_out) - 1, min(b, c_in) - 1]) / total) for a, b in ranks]


def projection_errors(weight: Tensor, fmt: str, ranks: Sequence[RankSpec]) -> list[float]:
    """Relative squared error ||W - project(W, fmt, r)||^2 / ||W||^2 for each r (one projection each)."""
    total = float(_energy(weight))
    if total <= 0:
        return [0.0 for _ in ranks]
    w = weight.detach().to(torch.float64)
    return [float((w - project(w, fmt, r).to(torch.float64)).square().sum()) / total for r in ranks]


def relative_errors(weight: Tensor, fmt: str, ranks: Sequence[RankSpec]) -> list[float]:
    """Relative squared projection error of ``weight`` at each rank spec: closed form for svd and tucker2."""
    if fmt == "svd":
        return svd_errors(weight, ranks)  # type: ignore[arg-type]
    if fmt == "tucker2" and math.prod(kernel_shape(weight.shape)[2:]) > 1:
        return tucker2_errors(weight, ranks)  # type: ignore[arg-type]
    return projection_errors(weight, fmt, ranks)


def _lower_hull(costs: Sequence[int], errors: Sequence[float]) -> list[int]:
    """Indices of the lower convex hull of the points (cost, error), from the first point, error falling."""
    hull: list[int] = [0]
    for j in range(1, len(costs)):
        if errors[j] >= errors[hull[-1]] or costs[j] == costs[hull[-1]]:
            continue  # costs more (or as much) and buys nothing over the hull's last point
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies above the segment a -> j: drop it (cross product of (b - a) and (j - a)); a point on the
            # segment stays, so a straight stretch is climbed one option at a time
            if (costs[b] - costs[a]) * (errors[j] - errors[a]) - (errors[b] - errors[a]) * (costs[j] - costs[a]) < 0:
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def allocate(ladders: Sequence[Ladder], budget: float) -> list[int]:
    """Choose one option per ladder so that the costs sum to at most ``budget``, at small total error.

    Returns the chosen index into each ladder. At the end no ladder can move to any
    dearer option within what is left of the budget (so the total is within one ladder
    step of ``budget``, unless every ladder is at its top).

    Raises:
        ValueError: even the cheapest options together cost more than ``budget``.
    """
    choice = [0] * len(ladders)
    spent = sum(lad.costs[0] for lad in ladders)
    if spent > budget:
        raise ValueError(f"the smallest ranks of the {len(ladders)} layers need {spent:,} parameters, "
                         f"more than the budget of {budget:,.0f}")
    hulls = [_lower_hull(lad.costs, lad.errors) for lad in ladders]  # option indices; hulls[i][0] == choice[i]

    def ratio(i: int) -> float:
        lad, a, b = ladders[i], hulls[i][0], hulls[i][1]
        return (lad.errors[a] - lad.errors[b]) / (lad.costs[b] - lad.costs[a])

    heap = [(-ratio(i), i) for i in range(len(ladders)) if len(hulls[i]) > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        lad, nxt = ladders[i], hulls[i][1]
        extra = lad.costs[nxt] - lad.costs[choice[i]]
        if spent + extra <= budget:
            spent += extra
            choice[i] = nxt
            hulls[i] = hulls[i][1:]
        else:
            # The next hull point no longer fits: the hull of the options that still do, from here.
            cur, room = choice[i], budget - spent
            last = next((j for j in range(len(lad.costs) - 1, cur, -1) if lad.costs[j] - lad.costs[cur] <= room), cur)
            hulls[i] = [cur + k for k in _lower_hull(lad.costs[cur:last + 1], lad.errors[cur:last + 1])]
        if len(hulls[i]) > 1:
            heapq.heappush(heap, (-ratio(i), i))
    while True:  # fill what is left with options the hulls skip (no error drop): one rank step at most remains
        best: tuple[float, int, int, int] | None = None  # (-ratio, extra cost, layer, option)
        for i, lad in enumerate(ladders):
            c0, e0 = lad.costs[choice[i]], lad.errors[choice[i]]
            for j in range(choice[i] + 1, len(lad.ranks)):
                extra = lad.costs[j] - c0
                if spent + extra > budget:
                    break  # costs do not decrease along a ladder
                if extra <= 0 or lad.errors[j] > e0:
                    continue
                key = (-(e0 - lad.errors[j]) / extra, extra, i, j)
                if best is None or key < best:
                    best = key
        if best is None:
            return choice
        _, extra, i, j = best
        spent += extra
        choice[i] = j
