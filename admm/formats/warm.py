"""Warm-started projections: Z = Proj(W) that start from the factors of the layer's previous Z-update.

Between two ADMM Z-updates W + U moves little, so the iterative projections
(tucker2: HOOI; cp: ALS) restart from the factor matrices they ended with last
time instead of from HOSVD / the svd init: a subspace iteration that keeps
converging while W moves, at one or two sweeps per update. The factors are the
layer's *warm state*: a flat dict of tensors kept with the layer's Z and U on its
owner rank and saved in its checkpoints, so a resumed run continues the same
iteration (and reproduces the uninterrupted run).

=========  ==========================================  =========================
format     warm state                                  first call (no state)
=========  ==========================================  =========================
tucker2    ``u_out (C_out, r_out)``, ``u_in (C_in, r_in)``  HOSVD + sweeps
cp         ``a (C_out, R)``, ``b (C_in, R)``, ``c (k*k, R)``  svd init + sweeps
others     none (one-shot exact or restarted each call)  --
=========  ==========================================  =========================
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from admm.formats.cp_als import cp_reconstruct
from admm.formats.hooi import tucker2_reconstruct
from admm.formats.projections import (
    CP_N_ITER,
    CP_TOL,
    HOOI_SWEEPS,
    HOOI_TOL,
    RankSpec,
    cp_factors,
    project,
    tucker2_factors,
)
from admm.formats.reshape import from_3way

__all__ = ["WARM_KEYS", "ProjectionOptions", "Warm", "project_warm"]

# Warm state of one layer: tensors only, so it checkpoints with torch.load(weights_only=True).
Warm = dict[str, Tensor]

# The keys each warm-startable format keeps.
WARM_KEYS: dict[str, tuple[str, ...]] = {"tucker2": ("u_out", "u_in"), "cp": ("a", "b", "c")}


@dataclass(frozen=True)
class ProjectionOptions:
    """Iteration counts of the iterative projections (the ``admm`` config's hooi_* / cp_* keys)."""

    hooi_sweeps: int = HOOI_SWEEPS  # HOOI sweeps per tucker2 projection (after HOSVD when cold)
    hooi_tol: float = HOOI_TOL  # stop after a sweep lowering ||W - Z|| by < tol * ||W|| (0: never)
    cp_sweeps: int = CP_N_ITER  # ALS sweeps per cp projection
    cp_tol: float = CP_TOL  # stop after a sweep lowering ||W - Z|| / ||W|| by < tol (0: never)


def _usable(warm: Warm | None, fmt: str) -> bool:
    return bool(warm) and all(k in warm for k in WARM_KEYS[fmt])  # type: ignore[operator]


def project_warm(weight: Tensor, fmt: str, rank: RankSpec, warm: Warm | None = None,
                 options: ProjectionOptions = ProjectionOptions()) -> tuple[Tensor, Warm]:
    """``(Z, new warm state)``: Z = Proj_rank(weight) in ``fmt``, started from ``warm`` where the format has one.

    Z has the weight's shape, dtype and device. For formats without a warm
    state (svd, tt, lowrank_sparse) this is :func:`admm.formats.projections.project`
    and the state is ``{}``. ``warm`` of another shape (a changed rank) raises.
    """
    if fmt not in WARM_KEYS:
        return project(weight, fmt, rank), {}
    with torch.no_grad():
        if fmt == "tucker2":
            init = (warm["u_out"], warm["u_in"]) if _usable(warm, fmt) else None  # type: ignore[index]
            core, u_out, u_in = tucker2_factors(weight, rank, options.hooi_sweeps, options.hooi_tol, init)
            z3, state = tucker2_reconstruct(core, u_out, u_in), {"u_out": u_out, "u_in": u_in}
        else:
            init = (warm["a"], warm["b"], warm["c"]) if _usable(warm, fmt) else None  # type: ignore[index]
            a, b, c = cp_factors(weight, rank, options.cp_sweeps, options.cp_tol, init)  # type: ignore[arg-type]
            z3, state = cp_reconstruct(a, b, c), {"a": a, "b": b, "c": c}
        z = from_3way(z3, weight.shape).to(weight.dtype)
    return z, state
