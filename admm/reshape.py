"""Kernel <-> tensor views, one per format. Pure functions, no data copies beyond permute.

Every weight is seen as a conv kernel ``(C_out, C_in, kh, kw)``; a Linear weight
``(out, in)`` is the kernel of a 1x1 conv, ``(out, in, 1, 1)``. With ``s = kh*kw``:

* matrix view (svd, lowrank_sparse): ``(C_out, C_in*s)`` -- the unfolding whose
  rank is the number of filters of a "kxk conv with r filters -> 1x1" pair.
* 3-way view (tucker2, cp): ``(C_out, C_in, s)``; Tucker-2 (Kim et al. 2016)
  factorises modes 0 and 1 only, CP (Lebedev et al. 2015) all three.
* TT view (tt): ``(s, o_1*i_1, ..., o_d*i_d)`` -- the TT-matrix layout of
  TT-ADMM (Yin et al. 2021) / Novikov et al. 2015: ``C_out = o_1*...*o_d`` and
  ``C_in = i_1*...*i_d`` are factorised into ``d`` small factors and paired
  mode by mode, with the spatial mode put first as in Garipov et al. 2016
  ("Ultimate tensorization"). Spatial-first lets the factored layer run its kxk
  conv once per input channel and then contract channel cores at output
  resolution. The spatial mode is dropped when ``s == 1`` (Linear, 1x1 conv),
  where it would only add a trivial bond of rank 1.

Index convention (row-major, like ``torch.reshape``): output channel
``o = ((o_1 * O_2 + o_2) * O_3 + o_3) ...`` i.e. ``o_1`` varies slowest; the same
for input channels and for ``s = dy * kw + dx``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from torch import Tensor

# Channels are split into at most this many factors. Three matches the
# TT-ADMM example 64 -> 4x4x4 and keeps each TT core small for ResNet widths
# (512 -> 8x8x8, 2048 -> 8x16x16).
TT_MAX_ORDER = 3

__all__ = [
    "TT_MAX_ORDER",
    "TTLayout",
    "factorize",
    "from_3way",
    "from_matrix",
    "from_tt",
    "kernel_shape",
    "to_3way",
    "to_matrix",
    "to_tt",
    "tt_layout",
]


def kernel_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    """Return ``(C_out, C_in, kh, kw)`` for a conv kernel shape or a Linear shape ``(out, in)``."""
    dims = tuple(int(d) for d in shape)
    if len(dims) == 2:
        dims = dims + (1, 1)
    if len(dims) != 4 or any(d < 1 for d in dims):
        raise ValueError(
            f"weight shape {tuple(shape)} is neither a Conv2d kernel (C_out, C_in, kh, kw) "
            "nor a Linear weight (out, in) with positive sizes"
        )
    return dims  # type: ignore[return-value]


def to_matrix(weight: Tensor) -> Tensor:
    """``(C_out, C_in, kh, kw)`` or ``(out, in)`` -> matrix ``(C_out, C_in*kh*kw)``."""
    c_out = kernel_shape(weight.shape)[0]
    return weight.reshape(c_out, -1)


def from_matrix(matrix: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`to_matrix`: matrix ``(C_out, C_in*kh*kw)`` -> tensor of ``shape``."""
    return matrix.reshape(tuple(shape))


def to_3way(weight: Tensor) -> Tensor:
    """``(C_out, C_in, kh, kw)`` or ``(out, in)`` -> 3-way tensor ``(C_out, C_in, kh*kw)``."""
    c_out, c_in, kh, kw = kernel_shape(weight.shape)
    return weight.reshape(c_out, c_in, kh * kw)


def from_3way(tensor: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`to_3way`: ``(C_out, C_in, kh*kw)`` -> tensor of ``shape``."""
    return tensor.reshape(tuple(shape))


@lru_cache(maxsize=None)
def factorize(n: int, d: int) -> tuple[int, ...]:
    """Split ``n`` into ``d`` factors (ascending, product ``n``) that are as balanced as possible.

    Balanced means: the largest factor is minimal, then the second largest, ...
    (so ``32, 3 -> (2, 4, 4)``, ``64, 3 -> (4, 4, 4)``, ``10, 3 -> (1, 2, 5)``).
    Factors of 1 appear only when ``n`` has fewer than ``d`` prime factors.
    """
    if n < 1 or d < 1:
        raise ValueError(f"factorize needs n >= 1 and d >= 1, got n={n}, d={d}")
    best: tuple[int, ...] | None = None

    def search(rest: int, left: int, smallest: int, acc: tuple[int, ...]) -> None:
        nonlocal best
        if left == 1:
            if rest >= smallest:
                cand = acc + (rest,)
                if best is None or sorted(cand, reverse=True) < sorted(best, reverse=True):
                    best = cand
            return
        f = smallest
        while f**left <= rest:  # ascending factors: the others are all >= f
            if rest % f == 0:
                search(rest // f, left - 1, f, acc + (f,))
            f += 1

    search(n, d, 1, ())
    assert best is not None  # (1, ..., 1, n) always qualifies
    return best


def _prime_factor_count(n: int) -> int:
    """Number of prime factors of ``n`` counted with multiplicity (0 for n == 1)."""
    count, p = 0, 2
    while p * p <= n:
        while n % p == 0:
            n //= p
            count += 1
        p += 1
    return count + (1 if n > 1 else 0)


@dataclass(frozen=True)
class TTLayout:
    """How a kernel is laid out as a TT tensor (see the module docstring).

    Attributes:
        c_out, c_in: channel counts; ``kh, kw``: spatial kernel size.
        out_factors, in_factors: ``(o_1..o_d)`` and ``(i_1..i_d)``, ascending,
            products ``c_out`` and ``c_in``; paired index by index.
    """

    c_out: int
    c_in: int
    kh: int
    kw: int
    out_factors: tuple[int, ...]
    in_factors: tuple[int, ...]

    @property
    def spatial(self) -> int:
        """Size of the spatial mode, ``kh*kw``."""
        return self.kh * self.kw

    @property
    def has_spatial(self) -> bool:
        """Whether the TT tensor has the leading spatial mode (``kh*kw > 1``)."""
        return self.spatial > 1

    @property
    def modes(self) -> tuple[int, ...]:
        """Mode sizes of the TT tensor: ``(kh*kw,)`` if present, then ``o_j*i_j``."""
        paired = tuple(o * i for o, i in zip(self.out_factors, self.in_factors))
        return ((self.spatial,) if self.has_spatial else ()) + paired

    @property
    def bond_caps(self) -> tuple[int, ...]:
        """Largest useful rank of each internal bond: ``min(prod(modes[:j]), prod(modes[j:]))``."""
        m = self.modes
        return tuple(min(math.prod(m[:j]), math.prod(m[j:])) for j in range(1, len(m)))

    def ranks(self, rank: int) -> tuple[int, ...]:
        """TT ranks ``(1, r_1, ..., r_{N-1}, 1)`` for a max-rank spec: each bond is ``min(rank, cap)``.

        These are exactly the ranks TT-SVD (Oseledets 2011) produces with that cap.
        """
        return (1,) + tuple(min(rank, c) for c in self.bond_caps) + (1,)

    def core_shapes(self, rank: int) -> tuple[tuple[int, int, int], ...]:
        """Shapes ``(r_{j-1}, n_j, r_j)`` of the TT cores for a max-rank spec."""
        r = self.ranks(rank)
        return tuple((r[j], n, r[j + 1]) for j, n in enumerate(self.modes))


def tt_layout(shape: Sequence[int]) -> TTLayout:
    """Default TT layout of a kernel shape: the one projections, accounting and layers share.

    The order ``d = min(TT_MAX_ORDER, max(Omega(C_out), Omega(C_in)))`` (Omega = prime
    factors with multiplicity, at least 1) so that no pair is ``1*1``; each channel
    count is then split by :func:`factorize` into ``d`` balanced ascending factors.
    """
    c_out, c_in, kh, kw = kernel_shape(shape)
    d = max(1, min(TT_MAX_ORDER, max(_prime_factor_count(c_out), _prime_factor_count(c_in))))
    return TTLayout(c_out, c_in, kh, kw, factorize(c_out, d), factorize(c_in, d))


def _tt_permutation(d: int) -> list[int]:
    """Axes of ``(o_1..o_d, i_1..i_d, s)`` in TT order ``(s, o_1, i_1, ..., o_d, i_d)``."""
    return [2 * d] + [axis for j in range(d) for axis in (j, d + j)]


def to_tt(weight: Tensor, layout: TTLayout) -> Tensor:
    """Kernel ``(C_out, C_in, kh, kw)`` or ``(out, in)`` -> TT tensor of shape ``layout.modes``."""
    d = len(layout.out_factors)
    t = weight.reshape(*layout.out_factors, *layout.in_factors, layout.spatial)
    return t.permute(_tt_permutation(d)).reshape(layout.modes)


def from_tt(tensor: Tensor, layout: TTLayout, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`to_tt`: TT tensor of shape ``layout.modes`` -> tensor of ``shape``."""
    d = len(layout.out_factors)
    interleaved = [layout.spatial] + [
        f for pair in zip(layout.out_factors, layout.in_factors) for f in pair
    ]
    perm = _tt_permutation(d)
    inverse = [perm.index(axis) for axis in range(len(perm))]
    return tensor.reshape(interleaved).permute(inverse).reshape(tuple(shape))

