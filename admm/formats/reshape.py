"""Kernel <-> tensor views, one per format. Pure functions, no data copies beyond permute.

Every weight is seen as a conv kernel ``(C_out, C_in, kh, kw)``; a Linear weight
``(out, in)`` is the kernel of a 1x1 conv, ``(out, in, 1, 1)``. With ``s = kh*kw``:

* matrix view (svd, lowrank_sparse): ``(C_out, C_in*s)`` -- the unfolding whose
  rank is the number of filters of a "kxk conv with r filters -> 1x1" pair.
* 3-way view (tucker2, cp): ``(C_out, C_in, s)``; Tucker-2 (Kim et al. 2016)
  factorises modes 0 and 1 only, CP (Lebedev et al. 2015) all three.
* TT view (tt): ``(o_1, ..., o_p, s, i_1, ..., i_q)`` -- the channel-aligned
  layout of the TT-ADMM code (Yin et al., CVPR 2021): ``C_out = o_1*...*o_p`` and
  ``C_in = i_1*...*i_q`` are split into small factors, the kernel is read as
  ``(C_out, s, C_in)`` and its modes are ordered out-channel factors, the spatial
  mode, in-channel factors. The bonds then line up with channel unfoldings: the
  bond left of ``s`` has the rank of the ``C_out x (s*C_in)`` unfolding, the one
  right of it that of ``(C_out*s) x C_in``, so the factored layer is a chain of
  channel contractions, one kxk conv between the two middle bonds, and more
  channel contractions (:mod:`admm.nn.layers_tt`). The TT-SVD itself is Oseledets
  2011. The spatial mode is dropped when ``s == 1`` (Linear, 1x1 conv), where it
  would only add a bond that copies its neighbour. Not the TT-matrix layout
  (``o_j*i_j`` modes with ``s`` first, Novikov et al. 2015 / Garipov et al.
  2016): it fits channel-structured weights worse at equal parameters, and its
  conv costs more FLOPs than the dense one.

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
        out_factors: ``(o_1..o_p)``, product ``c_out``, ascending (small factors at the train's ends
            keep the end cores small).
        in_factors: ``(i_1..i_q)``, product ``c_in``, descending (the mirror image).
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
        """Whether the TT tensor has the middle spatial mode (``kh*kw > 1``)."""
        return self.spatial > 1

    @property
    def modes(self) -> tuple[int, ...]:
        """Mode sizes of the TT tensor: ``(o_1..o_p, kh*kw, i_1..i_q)``, without ``kh*kw`` when it is 1."""
        return self.out_factors + ((self.spatial,) if self.has_spatial else ()) + self.in_factors

    @property
    def n_bonds(self) -> int:
        """Number of internal bonds, ``len(modes) - 1``: the length of a per-bond rank spec."""
        return len(self.modes) - 1

    @property
    def bond_caps(self) -> tuple[int, ...]:
        """Largest useful rank of each internal bond: ``min(prod(modes[:j]), prod(modes[j:]))``."""
        m = self.modes
        return tuple(min(math.prod(m[:j]), math.prod(m[j:])) for j in range(1, len(m)))

    def ranks(self, rank: int | Sequence[int]) -> tuple[int, ...]:
        """TT ranks ``(1, r_1, ..., r_{N-1}, 1)`` for a rank spec.

        ``rank`` is an int (every bond ``min(rank, cap)``) or one rank per bond
        (``n_bonds`` of them). Each bond is then lowered to what its neighbours can
        carry, ``r_j <= r_{j-1} n_j`` and ``r_j <= n_{j+1} r_{j+1}`` (a no-op for an
        int spec): these are exactly the ranks TT-SVD (Oseledets 2011) produces.
        """
        caps = self.bond_caps
        wanted = [rank] * len(caps) if isinstance(rank, int) else [int(r) for r in rank]
        if len(wanted) != len(caps):
            raise ValueError(f"tt rank needs {len(caps)} bond ranks for modes {self.modes}, got {rank!r}")
        r = [1] + [min(w, c) for w, c in zip(wanted, caps)] + [1]
        m = self.modes
        for j in range(1, len(r) - 1):
            r[j] = min(r[j], r[j - 1] * m[j - 1])
        for j in range(len(r) - 2, 0, -1):
            r[j] = min(r[j], m[j] * r[j + 1])
        return tuple(r)

    def core_shapes(self, rank: int | Sequence[int]) -> tuple[tuple[int, int, int], ...]:
        """Shapes ``(r_{j-1}, n_j, r_j)`` of the TT cores for a rank spec (see :meth:`ranks`)."""
        r = self.ranks(rank)
        return tuple((r[j], n, r[j + 1]) for j, n in enumerate(self.modes))


def tt_layout(shape: Sequence[int]) -> TTLayout:
    """Default TT layout of a kernel shape: the one projections, accounting and layers share.

    Each channel count ``c`` is split by :func:`factorize` into
    ``min(TT_MAX_ORDER, Omega(c))`` balanced factors (Omega = prime factors with
    multiplicity, at least 1, so no factor is 1 unless ``c`` is): ``256 -> (4, 8, 8)``
    for the out side, ``(8, 8, 4)`` for the in side.
    """
    c_out, c_in, kh, kw = kernel_shape(shape)

    def split(c: int) -> tuple[int, ...]:
        return factorize(c, max(1, min(TT_MAX_ORDER, _prime_factor_count(c))))

    return TTLayout(c_out, c_in, kh, kw, split(c_out), tuple(reversed(split(c_in))))


def to_tt(weight: Tensor, layout: TTLayout) -> Tensor:
    """Kernel ``(C_out, C_in, kh, kw)`` or ``(out, in)`` -> TT tensor of shape ``layout.modes``.

    Entry ``W[o, i, dy, dx]`` lands at ``[o_1..o_p, dy*kw + dx, i_1..i_q]`` (row-major digits).
    """
    t = weight.reshape(layout.c_out, layout.c_in, layout.spatial).transpose(1, 2)
    return t.reshape(layout.modes)


def from_tt(tensor: Tensor, layout: TTLayout, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`to_tt`: TT tensor of shape ``layout.modes`` -> tensor of ``shape``."""
    t = tensor.reshape(layout.c_out, layout.spatial, layout.c_in).transpose(1, 2)
    return t.reshape(tuple(shape))
