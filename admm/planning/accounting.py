"""Parameter and FLOP counts of a dense layer and of the factored module each format implies.

Units and conventions:

* Params: number of weight entries; biases are excluded everywhere (a factored
  layer keeps the dense layer's bias, so it cancels in every comparison).
* FLOPs: per image, ``2 x multiply-accumulates`` -- the convention of
  ``torch.utils.flop_counter.FlopCounterMode``. Element-wise work (bias, BN,
  reshapes) is not counted.
* ``out_hw = (H_out, W_out)`` is the dense conv's output size, ``(1, 1)`` for
  Linear. ``in_hw`` (default: ``out_hw``, i.e. stride 1 with "same" padding)
  matters only for modules whose first factor is a 1x1 conv at input resolution
  (tucker2, cp, and tt's in-channel chain for kxk kernels).

The factored modules (what ``admm.nn.layers`` must build so these counts hold),
for a kernel ``(C_out, C_in, kh, kw)``, ``s = kh*kw``:

* svd (r): kxk conv ``C_in -> r`` (the dense conv's stride/padding) then 1x1 ``r -> C_out``.
* tucker2 (r_out, r_in), Kim et al. 2016: 1x1 ``C_in -> r_in``, kxk ``r_in -> r_out``,
  1x1 ``r_out -> C_out``.
* tt (r), the TT-ADMM code's channel-aligned layout: cores of
  :meth:`admm.formats.reshape.TTLayout.core_shapes` over modes ``(o_1..o_p, s, i_1..i_q)``,
  bonds ``(1, a_1..a_p, b_0..b_{q-1}, 1)`` (``a_p`` left of ``s``, ``b_0`` right of it).
  In-channel cores ``i_q .. i_1``, each a matmul over channels at input resolution:
  core ``i_j`` maps ``(i_1..i_j, b_j) -> (i_1..i_{j-1}, b_{j-1})`` per pixel; then the
  spatial core as a kxk conv ``b_0 -> a_p`` (the dense conv's stride/padding); then
  out-channel cores ``o_p .. o_1`` at output resolution, core ``o_j`` mapping
  ``(o_{j+1}..o_p, a_j) -> (o_j..o_p, a_{j-1})``. For 1x1 kernels and Linear there is
  no spatial core and everything runs at output resolution (the input is subsampled first).
  Either chain runs instead as its one contracted matrix (``C_in -> b_0`` or ``a_p -> C_out``)
  when that costs fewer MACs per pixel (:func:`tt_chain_costs`): with one int rank the inner
  bonds sit at their caps and the chain of skinny matmuls costs more than the one matrix. The
  matrices are contracted from the cores at every forward (``build`` MACs per forward, not per
  image, and not counted here).
* cp (R), Lebedev et al. 2015: 1x1 ``C_in -> R``, depthwise kxk on ``R`` channels,
  1x1 ``R -> C_out``; params ``R*(C_out + C_in + s)``.
* lowrank_sparse (r, k), Yu et al. 2017: the svd pair plus a sparse kernel with
  ``k`` non-zeros. Its ``k`` values are params; its ``k`` integer indices are
  storage, reported separately as ``ParamCount.extra`` and never in ``params``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple, Sequence, TypeVar

from admm.formats.projections import RankSpec, max_rank, validate_rank
from admm.formats.reshape import kernel_shape, tt_layout

__all__ = [
    "ParamCount",
    "dense_flops",
    "dense_params",
    "factored_flops",
    "factored_param_count",
    "factored_params",
    "per_forward_flops",
    "rank_for_keep_ratio",
    "tt_chain_costs",
]

T = TypeVar("T")


class ParamCount(NamedTuple):
    """Weights of a factored layer: ``params`` (float entries) and ``extra`` (int indices)."""

    params: int
    extra: int


def _hw(hw: Sequence[int], name: str) -> int:
    h, w = (int(v) for v in hw)
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be two positive ints, got {tuple(hw)}")
    return h * w


def dense_params(shape: Sequence[int]) -> int:
    """``C_out * C_in * kh * kw`` (``out * in`` for a Linear weight), bias excluded."""
    return math.prod(kernel_shape(shape))


def factored_param_count(shape: Sequence[int], fmt: str, rank: RankSpec) -> ParamCount:
    """Parameter count of the factored module of ``fmt`` at ``rank`` (see module docstring)."""
    c_out, c_in, kh, kw = kernel_shape(shape)
    s = kh * kw
    spec = validate_rank(shape, fmt, rank)
    if fmt == "svd":
        return ParamCount(spec * (c_in * s + c_out), 0)  # type: ignore[operator]
    if fmt == "tucker2":
        r_out, r_in = spec  # type: ignore[misc]
        return ParamCount(c_in * r_in + r_in * r_out * s + r_out * c_out, 0)
    if fmt == "tt":
        cores = tt_layout(shape).core_shapes(spec)  # type: ignore[arg-type]
        return ParamCount(sum(math.prod(c) for c in cores), 0)
    if fmt == "cp":
        return ParamCount(spec * (c_out + c_in + s), 0)  # type: ignore[operator]
    r, k = spec  # type: ignore[misc]
    return ParamCount(r * (c_in * s + c_out) + k, k)


def factored_params(shape: Sequence[int], fmt: str, rank: RankSpec) -> int:
    """Float parameters of the factored module (lowrank_sparse: without its int indices)."""
    return factored_param_count(shape, fmt, rank).params


def dense_flops(shape: Sequence[int], out_hw: Sequence[int]) -> int:
    """FLOPs (2 x MACs) per image of the dense conv/Linear: ``2*C_out*C_in*kh*kw*H_out*W_out``."""
    return 2 * dense_params(shape) * _hw(out_hw, "out_hw")


class ChainCost(NamedTuple):
    """MACs of one TT channel chain: per pixel as ``chain`` (a matmul per core) or ``merged`` (one matrix,
    contracted from the cores for ``build`` MACs per contraction)."""

    chain: int
    merged: int
    build: int

    @property
    def merge(self) -> bool:
        """Whether the one matrix costs fewer MACs per pixel (how TTLayer runs this chain)."""
        return self.merged < self.chain

    def macs(self, pixels: int) -> int:
        """MACs for ``pixels`` pixels, the way TTLayer runs the chain (the build not counted)."""
        return (self.merged if self.merge else self.chain) * pixels


def tt_chain_costs(shape: Sequence[int], rank: RankSpec) -> tuple[ChainCost, ChainCost]:
    """(in-channel chain, out-channel chain) costs of the TT module of ``shape`` at ``rank``."""
    layout = tt_layout(shape)
    r = layout.ranks(rank)  # type: ignore[arg-type]
    p, q = len(layout.out_factors), len(layout.in_factors)
    outs, ins = layout.out_factors, layout.in_factors
    a = r[: p + 1]  # (1, a_1..a_p): bonds left of the middle
    b = r[len(r) - q - 1:]  # (b_0..b_{q-1}, 1): bonds right of the middle
    # TTLayer.in_matrix / out_matrix contract the cores from the chain's outer end inwards.
    cin = ChainCost(chain=sum(math.prod(ins[: j + 1]) * b[j + 1] * b[j] for j in range(q)),
                    merged=layout.c_in * b[0],
                    build=sum(b[k] * ins[k] * b[k + 1] * math.prod(ins[k + 1:]) for k in range(q - 1)))
    cout = ChainCost(chain=sum(math.prod(outs[j:]) * a[j + 1] * a[j] for j in range(p)),
                     merged=layout.c_out * a[p],
                     build=sum(math.prod(outs[:j]) * a[j] * outs[j] * a[j + 1] for j in range(1, p)))
    return cin, cout


def _tt_macs(shape: Sequence[int], rank: RankSpec, n_out: int, n_in: int) -> int:
    """MACs per image (batch 1) of the TT module (in-channel chain, spatial conv, out-channel chain)."""
    layout = tt_layout(shape)
    r = layout.ranks(rank)  # type: ignore[arg-type]
    spatial = layout.has_spatial
    cin, cout = tt_chain_costs(shape, rank)
    middle = r[len(layout.out_factors)] * r[len(layout.out_factors) + 1] * layout.spatial if spatial else 0
    return cin.macs(n_in if spatial else n_out) + middle * n_out + cout.macs(n_out)


def factored_flops(
    shape: Sequence[int],
    fmt: str,
    rank: RankSpec,
    out_hw: Sequence[int],
    in_hw: Sequence[int] | None = None,
) -> int:
    """FLOPs (2 x MACs) per image of the factored module of ``fmt`` at ``rank``.

    ``in_hw`` is the input spatial size (default ``out_hw``); only tucker2, cp and tt
    (kxk kernels) run channel contractions before the strided kxk conv and so depend on it.
    """
    c_out, c_in, kh, kw = kernel_shape(shape)
    s = kh * kw
    spec = validate_rank(shape, fmt, rank)
    n_out = _hw(out_hw, "out_hw")
    n_in = n_out if in_hw is None else _hw(in_hw, "in_hw")
    if fmt == "svd":
        macs = spec * (c_in * s + c_out) * n_out  # type: ignore[operator]
    elif fmt == "tucker2":
        r_out, r_in = spec  # type: ignore[misc]
        macs = c_in * r_in * n_in + (r_in * r_out * s + r_out * c_out) * n_out
    elif fmt == "tt":
        macs = _tt_macs(shape, spec, n_out, n_in)
    elif fmt == "cp":
        macs = c_in * spec * n_in + spec * (s + c_out) * n_out  # type: ignore[operator]
    else:
        r, k = spec  # type: ignore[misc]
        # Each stored non-zero of the sparse kernel is one MAC per output pixel.
        macs = (r * (c_in * s + c_out) + k) * n_out
    return 2 * macs


def per_forward_flops(shape: Sequence[int], fmt: str, rank: RankSpec) -> int:
    """FLOPs the factored module spends once per forward pass, whatever the batch (not in :func:`factored_flops`).

    Only tt has any: contracting the matrices of its merged chains from the cores (:func:`tt_chain_costs`).
    A forward of a batch of ``n`` images costs ``n * factored_flops(...) + per_forward_flops(...)``.
    """
    if fmt != "tt":
        return 0
    return 2 * sum(c.build for c in tt_chain_costs(shape, validate_rank(shape, fmt, rank)) if c.merge)


def _largest(candidates: Iterable[T], fits: Callable[[T], bool]) -> T | None:
    """Last candidate before the first that does not fit (candidates grow in size)."""
    best = None
    for cand in candidates:
        if not fits(cand):
            break
        best = cand
    return best


def rank_for_keep_ratio(
    shape: Sequence[int], fmt: str, keep: float, *, sparse_share: float = 0.1
) -> RankSpec:
    """Largest rank spec whose ``factored_params <= keep * dense_params``.

    * svd, tt, cp: the largest int (tt: one max bond rank, each bond ``min(r, cap)``; per-bond
      tt ranks are given explicitly, never planned here).
    * tucker2: ``r_out / R_out ~= r_in / R_in`` with ``(R_out, R_in) = max_rank``,
      which is ``(C_out, C_in)`` for every kxk conv with ``k*k >= C_out/C_in`` and
      ``C_in/C_out`` (all ResNet 3x3 convs). For 1x1 convs and Linear the mode
      ranks are capped at ``min(C_out, C_in)``, and splitting by channel counts
      would waste the wider side. The wider side steps by 1, the other follows
      rounded (at least 1).
    * lowrank_sparse: r is the largest rank whose low-rank part fits in
      ``(1 - sparse_share)`` of the budget (or 1 if only the whole budget holds
      it), and k takes the rest of the budget; k = 0 once L is full rank.

    Raises ValueError when even rank 1 does not fit, or for a non-positive ``keep``.
    """
    if not (keep > 0 and math.isfinite(keep)):
        raise ValueError(f"keep must be a positive finite ratio, got {keep!r}")
    if not 0.0 <= sparse_share < 1.0:
        raise ValueError(f"sparse_share must be in [0, 1), got {sparse_share!r}")
    budget = keep * dense_params(shape)
    full = max_rank(shape, fmt)

    def within(limit: float) -> Callable[[RankSpec], bool]:
        return lambda spec: factored_params(shape, fmt, spec) <= limit

    best: RankSpec | None
    if fmt in ("svd", "tt", "cp"):
        smallest: RankSpec = 1
        best = _largest(range(1, full + 1), within(budget))  # type: ignore[operator]
    elif fmt == "tucker2":
        smallest, (hi_out, hi_in) = (1, 1), full  # type: ignore[misc]
        if hi_out >= hi_in:
            pairs = [(r, max(1, round(r * hi_in / hi_out))) for r in range(1, hi_out + 1)]
        else:
            pairs = [(max(1, round(r * hi_out / hi_in)), r) for r in range(1, hi_in + 1)]
        best = _largest(pairs, within(budget))
    else:
        smallest, hi_r = (1, 0), full[0]  # type: ignore[index]
        lows = [(r, 0) for r in range(1, hi_r + 1)]
        low = _largest(lows, within((1.0 - sparse_share) * budget))
        if low is None and within(budget)((1, 0)):
            low = (1, 0)
        best = None
        if low is not None:
            r = low[0]
            room = 0 if r == hi_r else int(budget - factored_params(shape, fmt, low))
            best = (r, min(room, dense_params(shape)))
    if best is None:
        raise ValueError(
            f"{fmt} at rank {smallest} needs {factored_params(shape, fmt, smallest)} params for "
            f"weight shape {tuple(shape)}, more than keep={keep} x {dense_params(shape)} = {budget:.0f}"
        )
    return best
