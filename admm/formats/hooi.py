"""Tucker-2 by HOOI on the ``(C_out, C_in, s)`` view, warm-startable: the Z-update of tucker2.

Tucker-2 (Kim et al. 2016) keeps modes 0 (C_out) and 1 (C_in) at ranks
``(r_out, r_in)`` and leaves the spatial mode ``s = kh*kw`` whole:
    Z = G x_0 U_out x_1 U_in,   G = W x_0 U_out^T x_1 U_in^T,
with orthonormal factor matrices ``U_out (C_out, r_out)``, ``U_in (C_in, r_in)``.
For fixed factors that G is optimal, so ``||W - Z||^2 = ||W||^2 - ||G||^2`` and
the best Tucker-2 approximation maximises ``||G||``.

* HOSVD (``sweeps = 0``, no ``init``): each U is the leading left singular
  subspace of its mode's unfolding; quasi-optimal (error <= sqrt(2) x best).
* HOOI (De Lathauwer et al. 2000): a sweep sets U_out to the leading subspace of
  ``(W x_1 U_in^T)_(0)`` ``(C_out, r_in*s)``, then U_in to that of
  ``(W x_0 U_out^T)_(1)`` ``(C_in, r_out*s)``. Each half-sweep is an exact block
  maximisation of ||G||, so the error never increases. This is what tensorly's
  ``partial_tucker`` does for ``n_iter_max`` sweeps (TT-ADMM's Tucker-2 code calls it).
* Warm start (``init = (U_out, U_in)`` of the previous Z-update): between two
  Z-updates W moves little, so the previous subspaces are nearly right and a
  sweep or two from them reach what 100 sweeps from HOSVD reach. Across Z-updates
  this is a subspace iteration that keeps converging while W moves.

The leading subspace comes from ``eigh`` of the smaller Gram matrix of the
unfolding (``n x n`` with ``n`` its row count) when ``n`` <= its column count, else from a thin SVD:
both cost ``n^2 m``, eigh of the Gram has the smaller constant. Squaring the
unfolding loses accuracy only in directions with singular values near
``sqrt(eps) * sigma_1``, which carry a negligible part of ||W||.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hooi_factors", "leading_subspace", "tucker2_reconstruct"]


def leading_subspace(mat: Tensor, r: int) -> Tensor:
    """Orthonormal basis ``(n, r)`` of the leading ``r``-dim left singular subspace of ``mat`` ``(n, m)``."""
    n, m = mat.shape
    if n <= m or r > m:
        # eigh returns ascending eigenvalues; the last r columns span the leading subspace. (r > m: the
        # unfolding has rank < r, e.g. a 1x1 kernel with r_out > r_in; eigh of the Gram still gives r
        # orthonormal columns, the extra ones in its null space, where they change nothing.)
        _, vecs = torch.linalg.eigh(mat @ mat.T)
        return vecs[:, n - r:].flip(1)
    u, _, _ = torch.linalg.svd(mat, full_matrices=False)
    return u[:, :r]


def _update_out(w3: Tensor, u_in: Tensor, r_out: int) -> Tensor:
    """U_out of (W x_1 U_in^T): its mode-0 unfolding is (C_out, r_in*s)."""
    y = torch.einsum("ois,ip->ops", w3, u_in)
    return leading_subspace(y.reshape(w3.shape[0], -1), r_out)


def _update_in(w3: Tensor, u_out: Tensor, r_in: int) -> Tensor:
    """U_in of (W x_0 U_out^T): its mode-1 unfolding is (C_in, r_out*s)."""
    y = torch.einsum("ois,or->irs", w3, u_out)
    return leading_subspace(y.reshape(w3.shape[1], -1), r_in)


def _core(w3: Tensor, u_out: Tensor, u_in: Tensor) -> Tensor:
    """G = W x_0 U_out^T x_1 U_in^T, shape ``(r_out, r_in, s)``."""
    return torch.einsum("ois,or,ip->rps", w3, u_out, u_in)


def tucker2_reconstruct(core: Tensor, u_out: Tensor, u_in: Tensor) -> Tensor:
    """G x_0 U_out x_1 U_in: ``(r_out, r_in, s)`` -> ``(C_out, C_in, s)``."""
    return torch.einsum("rps,or,ip->ois", core, u_out, u_in)


def hooi_factors(w3: Tensor, rank: tuple[int, int], sweeps: int, tol: float = 0.0,
                 init: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, int]:
    """Tucker-2 factors of ``w3`` ``(C_out, C_in, s)``: returns ``(core, U_out, U_in, sweeps_run)``.

    ``init``: ``(U_out, U_in)`` to start from (only U_in is read: the first
    half-sweep recomputes U_out from it); None starts from HOSVD. ``sweeps``: at
    most this many HOOI sweeps after the start (0 with no ``init`` is HOSVD).
    ``tol`` > 0 stops early after a sweep that lowers ``||W - Z||`` by less than
    ``tol * ||W||`` (one host sync per sweep, negligible beside the eigh calls).
    A warm start with ``sweeps = 0`` would return the previous subspaces
    unchanged, so it is refused.
    """
    r_out, r_in = rank
    if init is None:
        u_in = leading_subspace(w3.transpose(0, 1).reshape(w3.shape[1], -1), r_in)
        u_out = leading_subspace(w3.reshape(w3.shape[0], -1), r_out)
    else:
        if sweeps < 1:
            raise ValueError("a warm-started HOOI needs sweeps >= 1")
        u_out, u_in = (t.to(w3.dtype) for t in init)
        if u_out.shape != (w3.shape[0], r_out) or u_in.shape != (w3.shape[1], r_in):
            raise ValueError(f"HOOI init factors {tuple(u_out.shape)}, {tuple(u_in.shape)} do not fit "
                             f"a {tuple(w3.shape)} tensor at ranks {rank}")
    w_sq = w3.square().sum()
    err_prev = None
    done = 0
    for _ in range(sweeps):
        u_out = _update_out(w3, u_in, r_out)
        u_in = _update_in(w3, u_out, r_in)
        done += 1
        if tol > 0:
            err = (w_sq - _core(w3, u_out, u_in).square().sum()).clamp_min(0).sqrt()
            if err_prev is not None and bool(err_prev - err <= tol * w_sq.sqrt()):
                break
            err_prev = err
    return _core(w3, u_out, u_in), u_out, u_in, done
