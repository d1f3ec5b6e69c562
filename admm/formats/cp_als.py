"""CP of rank R on the ``(C_out, C_in, s)`` view by ALS, warm-startable: the Z-update of cp.

Z = sum_r a_r (x) b_r (x) c_r with factors ``A (C_out, R)``, ``B (C_in, R)``,
``C (s, R)`` (Lebedev et al. 2015 for convs). One ALS sweep solves the three
linear least-squares problems exactly, one factor at a time:
    A = W_(0) (C kr B) (C^T C * B^T B)^-1   (kr: Khatri-Rao, *: Hadamard)
and likewise for B and C, so ||W - Z|| never increases. The products with W
are computed as einsums (MTTKRP) without forming the Khatri-Rao matrix, and
the error as ``||W||^2 - 2 <W, Z> + ||Z||^2`` from R x R Gram matrices, so a
sweep costs about ``6 C_out C_in s R`` flops plus three R x R solves.

Start: the previous Z-update's factors (warm), else the "svd" init of tensorly's
``parafac``: the leading left singular vectors of each mode's unfolding, with
the columns beyond a mode's size drawn from a generator seeded 0, so every call
is deterministic. The best rank-R approximation need not exist (border rank);
ALS finds a local one.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cp_als", "cp_reconstruct"]

# Ridge on the R x R normal equations, relative to their mean diagonal: keeps the
# solve defined when R exceeds a mode's size (the Gram matrices are then singular
# in some directions), and perturbs the solution at the 1e-10 level only.
_RIDGE = 1e-10


def cp_reconstruct(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """sum_r a_r (x) b_r (x) c_r: ``(O, R), (I, R), (S, R)`` -> ``(O, I, S)``."""
    return torch.einsum("or,ir,sr->ois", a, b, c)


def _svd_init(w3: Tensor, rank: int) -> list[Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for mode in range(3):
        unfold = w3.movedim(mode, 0).reshape(w3.shape[mode], -1)
        u, _, _ = torch.linalg.svd(unfold, full_matrices=False)
        k = min(rank, u.shape[1])
        extra = torch.randn(w3.shape[mode], rank - k, generator=g, dtype=w3.dtype).to(w3.device)
        out.append(torch.cat([u[:, :k], extra], dim=1))
    return out


def _solve(gram: Tensor, rhs: Tensor) -> Tensor:
    """X with X gram = rhs (gram symmetric positive semi-definite, R x R)."""
    ridge = _RIDGE * gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, rhs.T).T


def cp_als(w3: Tensor, rank: int, sweeps: int, tol: float = 0.0,
           init: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, int]:
    """Rank-``rank`` CP factors ``(A, B, C, sweeps_run)`` of ``w3`` ``(O, I, S)`` by ALS.

    ``init``: factors to start from (warm), else the svd init. At most ``sweeps``
    sweeps; ``tol`` > 0 stops after a sweep that lowers ``||W - Z|| / ||W||`` by
    less than ``tol`` (one host sync per sweep).
    """
    if sweeps < 1:
        raise ValueError(f"cp ALS needs sweeps >= 1, got {sweeps}")
    if init is None:
        a, b, c = _svd_init(w3, rank)
    else:
        a, b, c = (t.to(w3.dtype) for t in init)
        if (a.shape, b.shape, c.shape) != ((w3.shape[0], rank), (w3.shape[1], rank), (w3.shape[2], rank)):
            raise ValueError(f"cp init factors {[tuple(t.shape) for t in init]} do not fit a "
                             f"{tuple(w3.shape)} tensor at rank {rank}")
    w_norm = w3.norm()
    err_prev = None
    done = 0
    for _ in range(sweeps):
        a = _solve((b.T @ b) * (c.T @ c), torch.einsum("ois,ir,sr->or", w3, b, c))
        b = _solve((a.T @ a) * (c.T @ c), torch.einsum("ois,or,sr->ir", w3, a, c))
        mttkrp = torch.einsum("ois,or,ir->sr", w3, a, b)
        c = _solve((a.T @ a) * (b.T @ b), mttkrp)
        done += 1
        if tol > 0:
            z_sq = ((a.T @ a) * (b.T @ b) * (c.T @ c)).sum()
            err = (w_norm.square() - 2 * (c * mttkrp).sum() + z_sq).clamp_min(0).sqrt() / w_norm
            if err_prev is not None and bool(err_prev - err < tol):
                break
            err_prev = err
    return a, b, c, done
