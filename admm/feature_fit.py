"""Data-aware decomposition: fit a layer's factors to its outputs on calibration inputs, not to its weights.

For a layer with weight matrix ``W`` ``(C_out, n)``, ``n = C_in*kh*kw`` (the
:func:`admm.formats.reshape.to_matrix` view), and calibration inputs unfolded to the
columns ``X`` ``(n, P)`` (one column per output pixel and image, the order of
``torch.nn.functional.unfold``), the output error of an approximation ``A`` is

    ||(W - A) X||_F^2 = tr((W - A) Sigma (W - A)^T),   Sigma = X X^T  (n, n),

so only the input second-moment matrix ``Sigma`` is needed (accumulated batch
by batch and, on several ranks, summed by an all-reduce: that is the
trainer's job, :mod:`trainer.phases.decompose`). With ``Sigma + delta I = R R^T``
(Cholesky; ``delta`` a tiny relative damping so that never-excited input
directions cost nothing yet stay solvable) the error is ``||(W - A) R||^2``:

* svd (rank r): ``A R = SVD_r(W R)`` is optimal (Eckart-Young in the whitened
  space), so ``A = SVD_r(W R) R^{-1}``.
* lowrank_sparse (r, k), Yu et al. 2017: ``min ||(W - L - S) R||`` over rank(L) <= r,
  nnz(S) <= k, by block descent from the weight-only (GoDec) parts: L by the svd
  step above on ``W - S`` (exact), S by iterative hard thresholding
  ``S <- top_k(S + eta (W - L - S) Sigma)`` with ``eta = 1 / lambda_max(Sigma)``
  (never increases the error: Blumensath & Davies 2009). Each half-step can
  only lower the output error, so the result is never worse, on the calibration
  inputs, than the weight-only fit it starts from.
* tucker2 (r_out, r_in): for a fixed in-channel factor ``U_in`` the chain is
  ``W~ = K (U_in^T (x) I_s)`` with ``rank(K) <= r_out``, a reduced-rank
  regression solved exactly in the whitened space of the projected inputs.
  ``U_in`` is taken from the candidates (HOSVD's, and the leading eigenvectors of
  the output-energy-weighted channel moment) with the lower output error.

Error correction (Zhang et al., TPAMI 2016): deep in a network the layer's
inputs ``X'`` in the partly decomposed model differ from the dense model's
``X``. Fitting ``A X'`` to the dense outputs ``W X`` instead of to ``W X'``
makes each layer undo the error of those before it. With the cross moment
``M = X X'^T`` and ``Sigma' = X' X'^T``,

    ||W X - A X'||^2 = ||(W~ - A) R'||^2 + const,   W~ = W M Sigma'^{-1},

so the same fits apply to the target ``W~`` (:func:`corrected_target`).

All functions are pure (tensors in, tensors out) and run in float64.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from admm.formats.projections import RankSpec, lowrank_sparse_parts, top_k, validate_rank
from admm.formats.reshape import kernel_shape, to_3way
from admm.nn.layers import FactoredLayer, Geometry, LowRankSparseLayer, SVDLayer, Tucker2Layer, assign

__all__ = ["DAMPING", "FEATURE_FIT_FORMATS", "conv_columns", "fit_layer", "fit_lowrank_sparse", "fit_svd",
           "fit_tucker2", "layer_columns", "output_error"]

# The formats with a data-aware fit (the others decompose from the weights only).
FEATURE_FIT_FORMATS: tuple[str, ...] = ("svd", "tucker2", "lowrank_sparse")

# Relative damping of Sigma: delta = DAMPING * trace(Sigma) / n. Small enough not to bias the fit,
# large enough that Cholesky succeeds when some input directions were never excited (zero padding, ReLU).
DAMPING = 1e-6


def conv_columns(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int] | str,
                 dilation: Sequence[int]) -> Tensor:
    """The input patches a conv multiplies its ``(C_out, C_in*kh*kw)`` weight with: ``(C_in*kh*kw, N*L)``.

    ``x`` is ``(N, C_in, H, W)``; ``L`` the number of output pixels. A Linear's
    input ``(N, in)`` is passed with ``kernel_size (1, 1)`` as ``(N, in, 1, 1)``.
    """
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same" (stride 1): torch pads (k - 1) * d // 2 on the left, as F.unfold does symmetrically
            padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation))
    cols = F.unfold(x, tuple(kernel_size), dilation=tuple(dilation), padding=tuple(padding), stride=tuple(stride))
    return cols.transpose(0, 1).reshape(cols.shape[1], -1)


def _whitener(sigma: Tensor) -> Tensor:
    """Lower-triangular ``R`` with ``R R^T = Sigma + delta I`` (float64)."""
    sigma = sigma.double()
    n = sigma.shape[0]
    delta = DAMPING * float(torch.diagonal(sigma).sum()) / n + 1e-30
    eye = torch.eye(n, dtype=sigma.dtype, device=sigma.device)
    for _ in range(6):  # raise the damping until Sigma is numerically positive definite
        r, info = torch.linalg.cholesky_ex(sigma + delta * eye)
        if int(info) == 0:
            return r
        delta *= 100
    raise ValueError("the input second-moment matrix is not positive semi-definite (NaN or Inf inputs?)")


def corrected_target(weight: Tensor, sigma: Tensor, cross: Tensor) -> Tensor:
    """``W~ = W M Sigma^{-1}`` (weight's shape, float64): the kernel that best maps the current inputs to the
    dense outputs. ``cross`` is ``M = X X'^T`` (dense inputs times current inputs), ``sigma`` ``X' X'^T``."""
    w = weight.detach().reshape(weight.shape[0], -1).double()
    r_lower = _whitener(sigma)
    return torch.cholesky_solve((w @ cross.double()).t(), r_lower).t().reshape(weight.shape)


def output_error(weight: Tensor, approx: Tensor, sigma: Tensor) -> float:
    """``||(W - A) X||_F^2 = tr((W - A) Sigma (W - A)^T)`` for kernels ``W``, ``A`` and ``Sigma`` of their inputs."""
    d = (weight - approx).reshape(weight.shape[0], -1).double()
    return float(((d @ sigma.double()) * d).sum())


def _svd_whitened(target: Tensor, r_lower: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(U_r, s_r, B)`` with ``U_r diag(s_r) B = SVD_r(target R) R^{-1}``: the best rank-r output fit."""
    u, s, vh = torch.linalg.svd(target @ r_lower, full_matrices=False)
    # B = V_r^T R^{-1}, i.e. B^T = R^{-T} V_r: one triangular solve.
    b = torch.linalg.solve_triangular(r_lower.t(), vh[:r].t(), upper=True).t()
    return u[:, :r], s[:r], b


def fit_svd(weight: Tensor, sigma: Tensor, rank: int) -> Tensor:
    """The rank-``rank`` kernel ``A`` (matrix view) minimising ``||(W - A) X||`` given ``Sigma = X X^T``.

    Args:
        weight: conv kernel ``(C_out, C_in, kh, kw)`` or Linear ``(out, in)``.
        sigma: ``(C_in*kh*kw, C_in*kh*kw)`` input second moment (see :func:`conv_columns`).
    Returns:
        ``A`` of the weight's shape and dtype, matrix rank <= ``rank``.
    """
    r = validate_rank(weight.shape, "svd", rank)
    w = weight.detach().reshape(weight.shape[0], -1).double()
    u, s, b = _svd_whitened(w, _whitener(sigma), r)  # type: ignore[arg-type]
    return ((u * s) @ b).reshape(weight.shape).to(weight.dtype)


def fit_lowrank_sparse(weight: Tensor, sigma: Tensor, rank: Sequence[int], n_iter: int = 10,
                       iht_steps: int = 5) -> tuple[Tensor, Tensor]:
    """``(L, S)`` with rank(L) <= r, nnz(S) <= k minimising the output error ``||(W - L - S) X||``.

    Starts at the weight-only GoDec parts (:func:`admm.formats.projections.lowrank_sparse_parts`)
    and alternates ``n_iter`` times: L exactly (whitened SVD), S by ``iht_steps``
    hard-thresholded gradient steps. A step that would raise the error is never taken.
    Both parts have the weight's shape and dtype.
    """
    r, k = validate_rank(weight.shape, "lowrank_sparse", rank)  # type: ignore[misc]
    shape = weight.shape
    w = weight.detach().reshape(shape[0], -1).double()
    sig = sigma.double()
    low0, sparse0 = lowrank_sparse_parts(weight.detach().double(), (r, k))
    low, sparse = low0.reshape(w.shape), sparse0.reshape(w.shape)
    r_lower = _whitener(sig)
    eta = 1.0 / max(float(torch.linalg.eigvalsh(sig)[-1]), 1e-30)

    def err(lo: Tensor, sp: Tensor) -> float:
        d = w - lo - sp
        return float(((d @ sig) * d).sum())

    best = err(low, sparse)
    for _ in range(n_iter):
        u, s, b = _svd_whitened(w - sparse, r_lower, r)
        candidate = (u * s) @ b
        if (e := err(candidate, sparse)) <= best:
            low, best = candidate, e
        if k > 0:
            for _ in range(iht_steps):
                step = top_k(sparse + eta * ((w - low - sparse) @ sig), k)
                if (e := err(low, step)) > best:
                    break
                sparse, best = step, e
    return low.reshape(shape).to(weight.dtype), sparse.reshape(shape).to(weight.dtype)


def _tucker_given_in(w: Tensor, sig: Tensor, u_in: Tensor, r_out: int, s: int) -> tuple[Tensor, Tensor, float]:
    """For a fixed ``u_in`` ``(C_in, r_in)``: the best ``(U_out, core)`` and the output error (float64)."""
    eye_s = torch.eye(s, dtype=w.dtype, device=w.device)
    b = torch.kron(u_in.t(), eye_s)  # (r_in*s, C_in*s): the first 1x1 factor acting on patches
    sig_b = b @ sig @ b.t()
    # Unconstrained best K: W Sigma B^T (B Sigma B^T)^-1; with rank(K) <= r_out, the whitened truncated SVD.
    r_b = _whitener(sig_b)
    k_free = torch.cholesky_solve((w @ sig @ b.t()).t(), r_b).t()
    u, sv, bb = _svd_whitened(k_free, r_b, r_out)
    u_out = u
    core = sv[:, None] * bb  # (r_out, r_in*s): U_out^T K
    approx = u_out @ core @ b
    d = w - approx
    return u_out, core, float(((d @ sig) * d).sum())


def fit_tucker2(weight: Tensor, sigma: Tensor, rank: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Tucker-2 factors ``(U_out (C_out, r_out), core (r_out, r_in, kh, kw), U_in (C_in, r_in))`` fitted to outputs.

    The dense kernel is ``W~[o, i] = sum_{b, a} U_out[o, b] core[b, a] U_in[i, a]``
    (per spatial tap). Candidates for ``U_in``: HOSVD's leading left singular
    vectors of the mode-1 unfolding, and the leading eigenvectors of
    ``Sigma_c^{1/2} E Sigma_c^{1/2}`` mapped back (``Sigma_c`` the per-pixel
    channel moment, ``E = sum_s W_s^T W_s`` the output energy each input channel
    direction carries); for each the rest is solved exactly, and the lower error wins.
    """
    r_out, r_in = validate_rank(weight.shape, "tucker2", rank)  # type: ignore[misc]
    c_out, c_in, kh, kw = kernel_shape(weight.shape)
    s = kh * kw
    w3 = to_3way(weight.detach()).double()  # (C_out, C_in, s)
    w = w3.reshape(c_out, -1)
    sig = sigma.double()
    candidates = [torch.linalg.svd(w3.permute(1, 0, 2).reshape(c_in, -1), full_matrices=False)[0][:, :r_in]]
    sig_c = torch.diagonal(sig.reshape(c_in, s, c_in, s), dim1=1, dim2=3).sum(-1)  # (C_in, C_in)
    evals, evecs = torch.linalg.eigh(sig_c)
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.t()
    energy = torch.einsum("ois,ojs->ij", w3, w3)
    top = torch.linalg.eigh(root @ energy @ root)[1][:, -r_in:]
    candidates.append(torch.linalg.qr(root @ top)[0])
    best = None
    for u_in in candidates:
        u_out, core, e = _tucker_given_in(w, sig, u_in, r_out, s)
        if best is None or e < best[3]:
            best = (u_out, core, u_in, e)
    u_out, core, u_in, _ = best  # type: ignore[misc]
    dt = weight.dtype
    return u_out.to(dt), core.reshape(r_out, r_in, kh, kw).to(dt), u_in.to(dt)


def layer_columns(module: nn.Module, x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """The columns ``X`` (``(n, P)``, in ``dtype``) a dense Conv2d/Linear ``module`` multiplies its weight with on ``x``."""
    g = Geometry.of(module)
    if g.kind == "linear":
        return x.reshape(-1, g.in_channels).t().to(dtype)
    return conv_columns(x.to(dtype), g.kernel_size, g.stride, g.padding, g.dilation)


def fit_layer(module: nn.Conv2d | nn.Linear, fmt: str, rank: RankSpec, sigma: Tensor,
              cross: Tensor | None = None) -> FactoredLayer:
    """The factored layer of ``fmt`` at ``rank`` for ``module``, fitted to outputs on inputs with moment ``sigma``.

    ``sigma`` is ``(n, n)``, ``n = C_in*kh*kw`` (:func:`layer_columns` ``X X^T``,
    summed over the calibration sample). With ``cross`` (``X_dense X^T``, same shape) the
    layer is fitted to the dense layer's outputs on the dense model's inputs
    (:func:`corrected_target`). Geometry, bias, device, dtype and
    train/eval mode are the module's, as in :meth:`FactoredLayer.from_dense`.
    """
    weight = module.weight.detach()
    n = weight[0].numel()
    if tuple(sigma.shape) != (n, n):
        raise ValueError(f"input moment of shape {tuple(sigma.shape)} does not fit a weight {tuple(weight.shape)}: "
                         f"expected ({n}, {n})")
    sigma = sigma.to(weight.device)
    weight = weight.double() if cross is None else corrected_target(weight, sigma, cross.to(weight.device))
    if fmt == "svd":
        low = fit_svd(weight, sigma, rank)  # type: ignore[arg-type]
        return SVDLayer.from_dense(module, rank, weight=low.to(module.weight.dtype))
    geometry = Geometry.of(module)
    if fmt == "lowrank_sparse":
        layer: FactoredLayer = LowRankSparseLayer(geometry, rank, device=weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            layer.set_parts(*fit_lowrank_sparse(weight, sigma, rank))  # type: ignore[arg-type, attr-defined]
    elif fmt == "tucker2":
        layer = Tucker2Layer(geometry, rank, device=weight.device, dtype=module.weight.dtype)
        u_out, core, u_in = fit_tucker2(weight, sigma, rank)  # type: ignore[arg-type]
        assign(layer.factors[0], u_in.t())
        assign(layer.factors[1], core)
        assign(layer.factors[2], u_out)
    else:
        raise ValueError(f"no data-aware fit for format {fmt!r}; it exists for {', '.join(FEATURE_FIT_FORMATS)}")
    if module.bias is not None:
        with torch.no_grad():
            layer.bias.copy_(module.bias)
    layer.train(module.training)
    return layer
