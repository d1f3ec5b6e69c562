"""Low-rank projections Z = Proj_r(W): the Z-update of TT-ADMM (Yin et al., CVPR 2021).

Each ``project_*`` is a pure function ``(weight, rank spec) -> Z`` with Z of the
weight's shape, dtype and device. Conv kernels ``(C_out, C_in, kh, kw)`` and Linear
weights ``(out, in)`` (treated as ``kh = kw = 1``) are seen through the views of
:mod:`admm.formats.reshape`. The arithmetic runs in float32 (float64 stays float64;
bf16/fp16 are upcast, because SVDs in half precision are neither supported on
every device nor accurate) under ``torch.no_grad`` on a detached tensor.

Formats and rank specs (``max_rank`` gives the full spec, at which Z == W):

==============  =================  ==============================================
format          rank spec          constraint set / algorithm
==============  =================  ==============================================
svd             int r              rank(C_out x C_in*k*k) <= r; Eckart-Young
tucker2         (r_out, r_in)      multilinear ranks of modes C_out, C_in (Kim et
                                   al. 2016); HOOI from HOSVD or warm (admm.formats.hooi)
tt              int r (max bond)   TT ranks of the channel-aligned view (o.., k*k,
                or one rank/bond   i..) of the TT-ADMM code <= r, each bond capped
                                   at what it can hold; TT-SVD (Oseledets 2011)
cp              int R              CP rank of (C_out, C_in, k*k) <= R; ALS from the
                                   svd init or warm (admm.formats.cp_als)
lowrank_sparse  (r, k)             W ~ L + S, rank(L) <= r, nnz(S) <= k (Yu et al.
                                   2017); alternating hard projections (GoDec)
==============  =================  ==============================================

Only svd, tucker2 and tt are exact or quasi-optimal projections, idempotent to
round-off; cp and lowrank_sparse are projections onto non-convex sets computed
by a few iterations of a local method, deterministic but, started cold, not
idempotent (cp: see :func:`project_cp`). tucker2 and cp can start from the
factors of the previous call (:mod:`admm.formats.warm`, what the ADMM Z-update does);
warm-started, cp returns its own output to round-off as well.

Rank specs (``RankSpec``, ``max_rank``, ``validate_rank``) live in
:mod:`admm.formats.projections_base`, low-rank + sparse in :mod:`admm.formats.lowrank_sparse`;
both are re-exported here, so ``from admm.formats.projections import ...`` stays the one
import for every projection and rank helper.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from admm.config import FORMATS
from admm.formats.cp_als import cp_als, cp_reconstruct
from admm.formats.hooi import hooi_factors, tucker2_reconstruct
from admm.formats.lowrank_sparse import (
    LOWRANK_SPARSE_N_ITER,
    LOWRANK_SPARSE_TOL,
    lowrank_sparse_parts,
    project_lowrank_sparse,
    top_k,
)
from admm.formats.projections_base import (
    RankSpec,
    check_format,
    computing,
    max_rank,
    svd_truncate,
    tensorly_torch,
    validate_rank,
)
from admm.formats.reshape import (
    from_3way,
    from_matrix,
    from_tt,
    to_3way,
    to_matrix,
    to_tt,
    tt_layout,
)

__all__ = [
    "CP_N_ITER",
    "CP_TOL",
    "FORMATS",
    "HOOI_SWEEPS",
    "HOOI_TOL",
    "LOWRANK_SPARSE_N_ITER",
    "LOWRANK_SPARSE_TOL",
    "PROJECTIONS",
    "RankSpec",
    "lowrank_sparse_parts",
    "max_rank",
    "project",
    "project_cp",
    "project_lowrank_sparse",
    "project_svd",
    "project_tt",
    "project_tucker2",
    "cp_factors",
    "tt_cores",
    "top_k",
    "tucker2_factors",
    "validate_rank",
]

# HOOI sweeps per tucker2 projection (admm.formats.hooi), after HOSVD on a cold call and
# from the previous Z-update's factors in ADMM (admm.formats.warm). Chosen from
# `bench/zupdate.py --hooi --max-layers 4` (ResNet-50 convs of all four stages at
# keep 0.5, CPU, bench/README.md "Tucker-2 by warm-started HOOI"): after a weight
# change of 1e-3 ||W||, one warm sweep is within 1.5e-6 (relative, worst layer)
# of the error of 100 cold sweeps, where HOSVD is 3.3% above it; 2 or 3 sweeps
# gain < 1e-6 more at 1.7x / 2.9x the time. One warm sweep costs 1.13x an HOSVD
# and 1/76 of the 100 cold sweeps.
HOOI_SWEEPS = 1
# Stop HOOI early after a sweep that lowers ||W - Z|| by less than HOOI_TOL * ||W||
# (0: always run HOOI_SWEEPS; a tolerance only pays with many sweeps).
HOOI_TOL = 0.0

# ALS sweeps for CP (admm.formats.cp_als), from the svd init on a cold call and from the
# previous Z-update's factors in ADMM. A sweep costs about 6 C_out C_in k^2 R flops;
# cold, 20 sweeps get most of the error reduction that 100 get at a fifth of the
# cost; warm, the sweeps accumulate across Z-updates. CP_TOL > 0 stops after a
# sweep that lowers the relative error by less than it (0: always run all).
CP_N_ITER = 20
CP_TOL = 0.0


def project_svd(weight: Tensor, rank: int) -> Tensor:
    """Truncated SVD of the ``(C_out, C_in*k*k)`` unfolding to rank ``rank``.

    This is the exact Euclidean projection onto {rank <= r} (Eckart-Young).
    ``torch.linalg.svd`` is used directly: tensorly's truncated SVD is the same
    call plus slicing.
    """
    r = validate_rank(weight.shape, "svd", rank)
    with computing(weight) as w:
        z = from_matrix(svd_truncate(to_matrix(w), r), w.shape)
    return z.to(weight.dtype)


def tucker2_factors(weight: Tensor, rank: Sequence[int], n_iter: int = HOOI_SWEEPS, tol: float = HOOI_TOL,
                    init: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Tucker-2 factors ``(core (r_out, r_in, k*k), U_out (C_out, r_out), U_in (C_in, r_in))`` of ``weight``.

    HOSVD, then ``n_iter`` HOOI sweeps (:func:`admm.formats.hooi.hooi_factors`); with
    ``init`` = the ``(U_out, U_in)`` of an earlier call, the sweeps start from
    those instead (warm start, ``n_iter >= 1``). The factors are orthonormal,
    in the compute dtype (float32/float64), on the weight's device.
    """
    r_out, r_in = validate_rank(weight.shape, "tucker2", rank)  # type: ignore[misc]
    if n_iter < 0 or (init is not None and n_iter < 1):
        raise ValueError(f"tucker2 n_iter must be >= {0 if init is None else 1}, got {n_iter}")
    with computing(weight) as w:
        core, u_out, u_in, _ = hooi_factors(to_3way(w), (r_out, r_in), n_iter, tol, init)
    return core, u_out, u_in


def project_tucker2(weight: Tensor, rank: Sequence[int], n_iter: int = HOOI_SWEEPS,
                    tol: float = HOOI_TOL) -> Tensor:
    """Tucker-2 (Kim et al. 2016) of the ``(C_out, C_in, k*k)`` view with ranks ``(r_out, r_in)``.

    Truncated HOSVD, then ``n_iter`` (default ``HOOI_SWEEPS``) HOOI sweeps, each
    of which can only lower the error; ``n_iter = 0`` is the one-shot HOSVD
    (quasi-optimal: error <= sqrt(2) x best). Written with torch
    (:mod:`admm.formats.hooi`) rather than tensorly's ``partial_tucker``: the same
    iterates (tests/test_hooi.py: 1e-8 in float64), and a warm sweep took 1/4
    of partial_tucker's time with the same init on ResNet-50 layers (bench/README.md).
    Exact on tensors that already have Tucker-2 ranks ``(r_out, r_in)``, so
    idempotent to round-off. The ADMM Z-update warm-starts it (:mod:`admm.formats.warm`).
    """
    core, u_out, u_in = tucker2_factors(weight, rank, n_iter, tol)
    with torch.no_grad():
        z = from_3way(tucker2_reconstruct(core, u_out, u_in), weight.shape)
    return z.to(weight.dtype)


def tt_cores(weight: Tensor, rank: RankSpec) -> list[Tensor]:
    """TT-SVD (Oseledets 2011) cores of the channel-aligned TT view (see :mod:`admm.formats.reshape`).

    ``rank``: an int (each bond ``min(rank, cap)``) or one rank per bond. Returns
    cores ``G_j`` of shapes ``tt_layout(weight.shape).core_shapes(rank)``, i.e.
    ``(r_{j-1}, n_j, r_j)`` with ``n = (o_1..o_p, k*k, i_1..i_q)`` (no ``k*k`` for
    1x1 / Linear). Cores are in the compute dtype (float32/64).
    """
    r = validate_rank(weight.shape, "tt", rank)
    layout = tt_layout(weight.shape)
    with computing(weight) as w, tensorly_torch() as tl:
        return list(tl.decomposition.tensor_train(to_tt(w, layout), rank=list(layout.ranks(r))).factors)


def project_tt(weight: Tensor, rank: RankSpec) -> Tensor:
    """Project onto TT ranks ``<= rank`` (int: per bond ``min(rank, cap)``; or per bond) by TT-SVD.

    TT-SVD is quasi-optimal (error <= sqrt(N-1) x best, Oseledets 2011) and is
    exact on tensors that already have those TT ranks, so it is idempotent to round-off.
    """
    cores = tt_cores(weight, rank)
    layout = tt_layout(weight.shape)
    with torch.no_grad(), tensorly_torch() as tl:
        full = tl.tt_to_tensor(cores).reshape(layout.modes)
        z = from_tt(full, layout, weight.shape)
    return z.to(weight.dtype)


def cp_factors(weight: Tensor, rank: int, n_iter: int = CP_N_ITER, tol: float = CP_TOL,
               init: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """CP factors ``(A (C_out, R), B (C_in, R), C (k*k, R))`` of ``weight`` by ALS (:mod:`admm.formats.cp_als`).

    ``n_iter`` ALS sweeps (stopping early by ``tol``) from the svd init, or from
    ``init`` = the factors of an earlier call (warm start). At ``R = max_rank``
    the exact slice decomposition is returned instead (every tensor is feasible there).
    Factors in the compute dtype, on the weight's device.
    """
    r = validate_rank(weight.shape, "cp", rank)
    if n_iter < 1:
        raise ValueError(f"cp n_iter must be >= 1, got {n_iter}")
    with computing(weight) as w:
        w3 = to_3way(w)
        if r == max_rank(weight.shape, "cp"):
            return _exact_cp(w3, r)
        a, b, c, _ = cp_als(w3, r, n_iter, tol, init)
    return a, b, c


def _exact_cp(w3: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """An exact CP decomposition of ``w3`` ``(O, I, S)`` with ``rank = min(O*I, O*S, I*S)`` terms.

    Any 3-way tensor is the sum of its slices along one mode, each slice a sum of
    rank-1 terms with unit vectors in the two other modes: e.g. with ``I*S``
    terms, term ``(i, s)`` is ``W[:, i, s] (x) e_i (x) e_s``.
    """
    o, i, s = w3.shape
    eye = lambda n: torch.eye(n, dtype=w3.dtype, device=w3.device)  # noqa: E731
    if rank == i * s:
        return w3.reshape(o, i * s).clone(), eye(i).repeat_interleave(s, 1), eye(s).repeat(1, i)
    if rank == o * s:
        return eye(o).repeat_interleave(s, 1), w3.permute(1, 0, 2).reshape(i, o * s), eye(s).repeat(1, o)
    return eye(o).repeat_interleave(i, 1), eye(i).repeat(1, o), w3.reshape(o * i, s).t().clone()


def project_cp(weight: Tensor, rank: int, n_iter: int = CP_N_ITER, tol: float = CP_TOL) -> Tensor:
    """CP/PARAFAC of rank ``R`` of the ``(C_out, C_in, k*k)`` view (Lebedev et al. 2015).

    ALS (:mod:`admm.formats.cp_als`, the iteration of tensorly's ``parafac`` written in
    torch) from the svd init for ``n_iter`` sweeps (default ``CP_N_ITER`` = 20).
    The best rank-R CP approximation may not exist (border rank), so this is a
    local, approximate projection. Started cold it is NOT idempotent at the
    ranks compression uses: ||Proj(Proj(W)) - Proj(W)|| / ||Proj(W)|| on Gaussian
    kernels at the planner's keep-0.5 ranks (`bench/zupdate.py --cp-idempotence`)
    was 0.35 / 0.35 (32x32x9 R=63 / 64x64x9 R=134) after 20 sweeps, 0.34 / 0.37
    after 100 (0.36 / 0.37 after 500 in a one-off run), and 0.41 for 512x512x9
    R=1142 after 5 sweeps (6 s a sweep on one CPU core): ALS from the svd init
    does not find the exact rank-R decomposition that Proj(W) has, and more
    sweeps do not fix that at any affordable cost. Warm-started from the factors
    of Proj(W) -- what the ADMM Z-update does (:mod:`admm.formats.warm`) -- one sweep
    returns Proj(W) to 2e-6..4e-5 (float32). At ``R = max_rank`` W is
    returned unchanged.
    """
    with torch.no_grad():
        a, b, c = cp_factors(weight, rank, n_iter, tol)
        z = from_3way(cp_reconstruct(a, b, c), weight.shape)
    return z.to(weight.dtype)


def project(weight: Tensor, fmt: str, rank: RankSpec) -> Tensor:
    """Z = Proj_rank(weight) in format ``fmt`` (one of ``FORMATS``); same shape, dtype, device."""
    check_format(fmt)
    return PROJECTIONS[fmt](weight, rank)


# Format -> projection, keyed by the one list of formats (admm.config.FORMATS; a test checks they agree).
PROJECTIONS: dict[str, Callable[[Tensor, RankSpec], Tensor]] = {
    "svd": project_svd,  # type: ignore[dict-item]
    "tucker2": project_tucker2,  # type: ignore[dict-item]
    "tt": project_tt,  # type: ignore[dict-item]
    "cp": project_cp,  # type: ignore[dict-item]
    "lowrank_sparse": project_lowrank_sparse,  # type: ignore[dict-item]
}

