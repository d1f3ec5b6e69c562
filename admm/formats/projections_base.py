"""What every projection shares: rank specs, their validation, and the compute context.

A rank spec (``RankSpec``) is an int for svd/tt/cp, a pair for tucker2
``(r_out, r_in)`` and lowrank_sparse ``(r, k)``; tt also takes one rank per bond.
``max_rank`` gives the full spec of a format for a weight shape (projecting at it
returns W); ``validate_rank`` checks a spec and names the field, shape and
allowed range. ``computing`` is the dtype / no_grad context every projection runs its
arithmetic in; ``tensorly_torch`` is tensorly's pytorch backend, for tt's two functions, the only
callers of tensorly. The projections themselves: :mod:`admm.formats.projections` (svd, tucker2,
tt, cp, and the dispatch by format) and :mod:`admm.formats.lowrank_sparse`.
"""

from __future__ import annotations

from contextlib import contextmanager
from numbers import Integral
from typing import Any, Iterator, Sequence, Union

import torch
from torch import Tensor

from admm.config import FORMATS
from admm.formats.reshape import kernel_shape, tt_layout

__all__ = ["FORMATS", "RankSpec", "max_rank", "validate_rank"]

# An int for svd/tt/cp, a pair for tucker2 (r_out, r_in) and lowrank_sparse (r, k); tt also takes
# one rank per bond (a tuple of TTLayout.n_bonds ints).
RankSpec = Union[int, tuple[int, ...]]

_FIELDS: dict[str, tuple[str, ...]] = {
    "svd": ("r",),
    "tucker2": ("r_out", "r_in"),
    "tt": ("r",),
    "cp": ("R",),
    "lowrank_sparse": ("r", "k"),
}


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def _ranges(shape: Sequence[int], fmt: str) -> tuple[tuple[int, int], ...]:
    """Inclusive ``(low, high)`` range of each field of the rank spec of ``fmt``."""
    c_out, c_in, kh, kw = kernel_shape(shape)
    s = kh * kw
    matrix_rank = min(c_out, c_in * s)
    if fmt == "svd":
        return ((1, matrix_rank),)
    if fmt == "tucker2":
        return ((1, matrix_rank), (1, min(c_in, c_out * s)))
    if fmt == "tt":
        return ((1, max(tt_layout(shape).bond_caps, default=1)),)
    if fmt == "cp":
        # Every I x J x K tensor has CP rank <= min(IJ, IK, JK) (sum of its slices).
        return ((1, min(c_out * c_in, c_out * s, c_in * s)),)
    check_format(fmt)
    return ((1, matrix_rank), (0, c_out * c_in * s))


def max_rank(shape: Sequence[int], fmt: str) -> RankSpec:
    """Full rank spec of ``fmt`` for a weight of ``shape``: projecting at it returns W.

    For lowrank_sparse it is ``(min(C_out, C_in*k*k), 0)``: a full-rank L needs no S.
    """
    check_format(fmt)
    highs = tuple(hi for _, hi in _ranges(shape, fmt))
    if fmt == "lowrank_sparse":
        return (highs[0], 0)
    return highs[0] if len(highs) == 1 else highs  # type: ignore[return-value]


def validate_rank(shape: Sequence[int], fmt: str, rank: object) -> RankSpec:
    """Check a rank spec against ``fmt`` and a weight ``shape``; return it normalised.

    Ints for svd/tt/cp, pairs ``(a, b)`` (tuple or list) for tucker2/lowrank_sparse.
    Raises ValueError naming the format, the field, the shape and the allowed range.
    """
    check_format(fmt)
    if fmt == "tt" and isinstance(rank, (tuple, list)):
        return _validate_tt_bonds(shape, rank)
    fields, ranges = _FIELDS[fmt], _ranges(shape, fmt)
    values = rank if isinstance(rank, (tuple, list)) else (rank,)
    if (len(fields) == 1 and isinstance(rank, (tuple, list))) or len(values) != len(fields):
        want = "an int" if len(fields) == 1 else f"a pair ({', '.join(fields)})"
        raise ValueError(f"{fmt} rank for weight shape {tuple(shape)} must be {want}, got {rank!r}")
    out = []
    for field, (lo, hi), value in zip(fields, ranges, values):
        if isinstance(value, bool) or not isinstance(value, Integral) or not lo <= value <= hi:
            raise ValueError(
                f"{fmt} rank field {field}={value!r} is invalid for weight shape "
                f"{tuple(shape)}: allowed integers {lo}..{hi}"
            )
        out.append(int(value))
    return out[0] if len(out) == 1 else (out[0], out[1])


def _validate_tt_bonds(shape: Sequence[int], rank: Sequence[object]) -> tuple[int, ...]:
    """A per-bond tt rank: ``n_bonds`` ints, bond ``j`` in ``1..cap_j``; returned as the ranks TT-SVD carries."""
    layout = tt_layout(shape)
    caps = layout.bond_caps
    allowed = f"{len(caps)} ints for modes {layout.modes}, bond j in 1..cap_j with caps {caps}"
    if len(rank) != len(caps):
        raise ValueError(f"tt rank for weight shape {tuple(shape)} must be an int or {allowed}, got {rank!r}")
    for j, (value, cap) in enumerate(zip(rank, caps)):
        if isinstance(value, bool) or not isinstance(value, Integral) or not 1 <= value <= cap:
            raise ValueError(f"tt rank field r[{j}]={value!r} is invalid for weight shape {tuple(shape)}: "
                             f"allowed {allowed}")
    return layout.ranks([int(v) for v in rank])[1:-1]


@contextmanager
def computing(weight: Tensor) -> Iterator[Tensor]:
    """Yield ``weight`` detached in the compute dtype, inside no_grad.

    float32/float64 inputs are not copied (callers never write into them);
    bf16/fp16 are upcast to float32.
    """
    if not weight.is_floating_point():
        raise TypeError(f"projections need a floating-point weight, got {weight.dtype}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        yield weight.detach().to(dtype)


@contextmanager
def tensorly_torch() -> Iterator[Any]:
    """Yield the ``tensorly`` module with its pytorch backend set, for this thread only (restored after, so
    other tensorly users are unaffected).

    Imported here, not at the top: tensorly (and the scipy it loads) costs ~0.5-1.3 s of start-up, and only
    tt calls it; every other process (drivers, CLI commands, the other formats' workers) never pays it.
    """
    import tensorly as tl

    with tl.backend_context("pytorch", local_threadsafe=True):
        yield tl


def svd_truncate(matrix: Tensor, r: int) -> Tensor:
    """Best rank-``r`` approximation of ``matrix`` in Frobenius norm (Eckart-Young)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]
