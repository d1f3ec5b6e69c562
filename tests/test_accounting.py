"""Params/FLOPs accounting (admm.planning.accounting) checked against real modules and FlopCounterMode."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from admm.formats.projections import FORMATS, max_rank, tt_cores
from admm.formats.reshape import tt_layout
from admm.planning.accounting import (
    dense_flops,
    dense_params,
    factored_flops,
    factored_param_count,
    factored_params,
    rank_for_keep_ratio,
)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops_per_image(fn, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(x)
    return counter.get_total_flops() // x.shape[0]


# (C_out, C_in, k, stride, padding, input H=W)
CONVS = [(16, 8, 3, 1, 1, 8), (32, 16, 3, 2, 1, 8), (64, 32, 1, 1, 0, 6), (24, 12, 3, 1, 0, 7)]


def out_size(h: int, k: int, stride: int, padding: int) -> int:
    return (h + 2 * padding - k) // stride + 1


@pytest.mark.parametrize(("c_out", "c_in", "k", "stride", "padding", "h"), CONVS)
def test_dense_counts_match_conv(c_out, c_in, k, stride, padding, h):
    conv = nn.Conv2d(c_in, c_out, k, stride, padding, bias=False)
    ho = out_size(h, k, stride, padding)
    assert dense_params(conv.weight.shape) == n_params(conv)
    assert dense_flops(conv.weight.shape, (ho, ho)) == flops_per_image(conv, torch.randn(2, c_in, h, h))


def test_dense_counts_match_linear():
    lin = nn.Linear(64, 10, bias=False)
    assert dense_params(lin.weight.shape) == n_params(lin) == 640
    assert dense_flops(lin.weight.shape, (1, 1)) == flops_per_image(lin, torch.randn(3, 64))


@pytest.mark.parametrize(("c_out", "c_in", "k", "stride", "padding", "h"), CONVS)
@pytest.mark.parametrize("r", [1, 5])
def test_svd_counts_match_module(c_out, c_in, k, stride, padding, h, r):
    module = nn.Sequential(  # kxk conv with r filters, then 1x1 r -> C_out
        nn.Conv2d(c_in, r, k, stride, padding, bias=False), nn.Conv2d(r, c_out, 1, bias=False)
    )
    shape, ho = (c_out, c_in, k, k), out_size(h, k, stride, padding)
    assert factored_params(shape, "svd", r) == n_params(module)
    assert factored_flops(shape, "svd", r, (ho, ho)) == flops_per_image(module, torch.randn(2, c_in, h, h))


@pytest.mark.parametrize(("c_out", "c_in", "k", "stride", "padding", "h"), CONVS)
@pytest.mark.parametrize("ranks", [(1, 1), (6, 3)])
def test_tucker2_counts_match_module(c_out, c_in, k, stride, padding, h, ranks):
    r_out, r_in = ranks
    module = nn.Sequential(  # Kim et al. 2016: 1x1 -> kxk (strided) -> 1x1
        nn.Conv2d(c_in, r_in, 1, bias=False),
        nn.Conv2d(r_in, r_out, k, stride, padding, bias=False),
        nn.Conv2d(r_out, c_out, 1, bias=False),
    )
    shape, ho = (c_out, c_in, k, k), out_size(h, k, stride, padding)
    assert factored_params(shape, "tucker2", ranks) == n_params(module)
    flops = flops_per_image(module, torch.randn(2, c_in, h, h))
    assert factored_flops(shape, "tucker2", ranks, (ho, ho), in_hw=(h, h)) == flops
    if stride == 1 and ho == h:  # in_hw defaults to out_hw
        assert factored_flops(shape, "tucker2", ranks, (ho, ho)) == flops


@pytest.mark.parametrize(("c_out", "c_in", "k", "stride", "padding", "h"), CONVS)
def test_cp_counts_match_module(c_out, c_in, k, stride, padding, h):
    big_r = 7
    module = nn.Sequential(  # Lebedev et al. 2015: 1x1 -> depthwise kxk -> 1x1
        nn.Conv2d(c_in, big_r, 1, bias=False),
        nn.Conv2d(big_r, big_r, k, stride, padding, groups=big_r, bias=False),
        nn.Conv2d(big_r, c_out, 1, bias=False),
    )
    shape, ho = (c_out, c_in, k, k), out_size(h, k, stride, padding)
    assert factored_params(shape, "cp", big_r) == n_params(module)
    flops = flops_per_image(module, torch.randn(2, c_in, h, h))
    assert factored_flops(shape, "cp", big_r, (ho, ho), in_hw=(h, h)) == flops


def test_svd_and_tucker2_on_linear():
    svd = nn.Sequential(nn.Linear(64, 4, bias=False), nn.Linear(4, 10, bias=False))
    assert factored_params((10, 64), "svd", 4) == n_params(svd)
    assert factored_flops((10, 64), "svd", 4, (1, 1)) == flops_per_image(svd, torch.randn(3, 64))
    tucker = nn.Sequential(
        nn.Linear(64, 3, bias=False), nn.Linear(3, 5, bias=False), nn.Linear(5, 10, bias=False)
    )
    assert factored_params((10, 64), "tucker2", (5, 3)) == n_params(tucker)
    assert factored_flops((10, 64), "tucker2", (5, 3), (1, 1)) == flops_per_image(tucker, torch.randn(3, 64))


def tt_matrices(cores: list[torch.Tensor], shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-chain ``(b_0, C_in)`` and out-chain ``(C_out, a_p)`` matrices, contracted from the cores."""
    layout = tt_layout(shape)
    p, q = len(layout.out_factors), len(layout.in_factors)
    m_in = cores[-1].reshape(cores[-1].shape[0], -1)  # (b_{q-1}, i_q)
    for core in reversed(cores[len(cores) - q:-1]):  # (b_{j-1}, i_j, b_j) x (b_j, i_{j+1}..i_q)
        m_in = torch.tensordot(core, m_in, dims=([2], [0])).reshape(core.shape[0], -1)
    m_out = cores[0].reshape(-1, cores[0].shape[2])  # (o_1, a_1)
    for core in cores[1:p]:  # (o_1..o_{j-1}, a_{j-1}) x (a_{j-1}, o_j, a_j)
        m_out = torch.tensordot(m_out, core, dims=([1], [0])).reshape(-1, core.shape[2])
    return m_in, m_out


def tt_forward(x: torch.Tensor, cores: list[torch.Tensor], shape, stride=1, padding=0,
               matrices: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Reference TT layer in the order admm.planning.accounting documents, written with einsum in NCHW:
    in-channel cores i_q..i_1, the spatial core as a kxk conv, out-channel cores o_p..o_1; a chain
    runs as its one contracted matrix (``matrices``, contracted beforehand as TTLayer caches them for
    inference) where ``tt_chain_costs`` says that costs fewer MACs per pixel."""
    from admm.planning.accounting import tt_chain_costs

    layout = tt_layout(shape)
    p, q = len(layout.out_factors), len(layout.in_factors)
    ins = layout.in_factors
    b, c_in = x.shape[:2]
    cost_in, cost_out = tt_chain_costs(shape, tuple(c.shape[2] for c in cores[:-1]))
    m_in, m_out = matrices if matrices is not None else tt_matrices(cores, shape)
    if x.ndim == 2:  # Linear: one pixel
        x = x.reshape(b, c_in, 1, 1)
    if not layout.has_spatial:  # 1x1 conv (padding 0): subsample first
        x = x[:, :, ::stride, ::stride]
    h, w = x.shape[2:]
    if cost_in.merge:
        state = torch.einsum("bchw,rc->brhw", x, m_in)
    else:
        state = x.reshape(b, c_in, 1, h * w)  # (B, i_1..i_j, b_j, HW) with b_q = 1
        for j in range(q - 1, -1, -1):
            core = cores[len(cores) - q + j]  # (b_{j-1}, i_j, b_j)
            state = state.reshape(b, math.prod(ins[:j]), ins[j], core.shape[2], h * w)
            state = torch.einsum("bpiry,sir->bpsy", state, core)
        state = state.reshape(b, -1, h, w)  # (B, b_0, H, W)
    if layout.has_spatial:
        mid = cores[p]  # (a_p, s, b_0)
        kernel = mid.permute(0, 2, 1).reshape(mid.shape[0], mid.shape[2], layout.kh, layout.kw)
        state = F.conv2d(state, kernel, stride=stride, padding=padding)
    ho, wo = state.shape[2:]
    if cost_out.merge:
        return torch.einsum("brhw,cr->bchw", state, m_out)
    state = state.reshape(b, -1, 1, ho * wo)  # (B, a_j, o_{j+1}..o_p, HW)
    for j in range(p - 1, -1, -1):
        core = cores[j]  # (a_{j-1}, o_j, a_j)
        state = torch.einsum("baqy,soa->bsoqy", state, core).reshape(b, core.shape[0], -1, ho * wo)
    return state.reshape(b, layout.c_out, ho, wo)


@pytest.mark.parametrize(
    ("shape", "stride", "padding", "h"),
    [((16, 8, 3, 3), 1, 1, 6), ((32, 16, 3, 3), 2, 1, 8), ((64, 32, 1, 1), 1, 0, 5), ((24, 12, 3, 3), 1, 0, 7)],
)
def test_tt_layer_contract(shape, stride, padding, h):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, shape[1], h, h)
    full = max_rank(shape, "tt")
    # At full rank the documented TT layer reproduces the dense conv.
    y = tt_forward(x, tt_cores(w, full), shape, stride, padding)
    torch.testing.assert_close(y, F.conv2d(x, w, stride=stride, padding=padding), atol=1e-4, rtol=1e-4)
    # Params are the core sizes; FLOPs are those of that layer (in-channel chain at input resolution).
    layout = tt_layout(shape)
    # (No bond of 1 in the per-bond spec: einsum runs a contraction over a size-1 index as a
    # broadcast multiply, which FlopCounterMode does not count; TTLayer's matmuls are counted.)
    per_bond = tuple(min(c, max(2, c // 2)) for c in layout.bond_caps)
    for r in (2, full // 2, full, per_bond):
        cores = tt_cores(w, r)
        assert factored_params(shape, "tt", r) == sum(c.numel() for c in cores)
        ho = out_size(h, shape[2], stride, padding)
        mats = tt_matrices(cores, shape)
        flops = flops_per_image(lambda t, cores=cores, mats=mats: tt_forward(t, cores, shape, stride, padding, mats), x)
        assert factored_flops(shape, "tt", r, (ho, ho), in_hw=(h, h)) == flops


def test_tt_on_linear():
    w = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 64)
    cores = tt_cores(w, max_rank(w.shape, "tt"))
    torch.testing.assert_close(tt_forward(x, cores, w.shape).reshape(3, 10), x @ w.t(), atol=1e-4, rtol=1e-4)
    assert factored_params(w.shape, "tt", 3) == sum(c.numel() for c in tt_cores(w, 3))
    cores = tt_cores(w, 3)
    mats = tt_matrices(cores, w.shape)
    flops = flops_per_image(lambda t: tt_forward(t, cores, w.shape, matrices=mats), x)
    assert factored_flops(w.shape, "tt", 3, (1, 1)) == flops


def test_lowrank_sparse_counts_values_and_indices_separately():
    shape, r, k = (16, 8, 3, 3), 3, 40
    assert factored_param_count(shape, "lowrank_sparse", (r, k)) == (factored_params(shape, "svd", r) + k, k)
    assert factored_param_count(shape, "svd", r).extra == 0
    svd = factored_flops(shape, "svd", r, (4, 4))
    assert factored_flops(shape, "lowrank_sparse", (r, k), (4, 4)) == svd + 2 * k * 16


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (32, 16, 3, 3), (64, 32, 1, 1), (10, 64)])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("keep", [0.25, 0.5, 1.0])
def test_rank_for_keep_ratio_is_largest_that_fits(fmt, shape, keep):
    try:
        spec = rank_for_keep_ratio(shape, fmt, keep)
    except ValueError:
        rank1 = 1 if fmt in ("svd", "tt", "cp") else ((1, 1) if fmt == "tucker2" else (1, 0))
        assert factored_params(shape, fmt, rank1) > keep * dense_params(shape)
        return
    budget = keep * dense_params(shape)
    assert factored_params(shape, fmt, spec) <= budget
    full = max_rank(shape, fmt)
    if fmt in ("svd", "tt", "cp") and spec < full:
        assert factored_params(shape, fmt, spec + 1) > budget
    if fmt == "tucker2":
        r_out, r_in = spec
        assert abs(r_out / full[0] - r_in / full[1]) <= 1 / min(full) + 1e-9
        if r_out < full[0] and r_in < full[1]:
            assert factored_params(shape, fmt, (r_out + 1, r_in + 1)) > budget
    if fmt == "lowrank_sparse":
        r, k = spec
        # The sparse part uses what the low-rank part leaves of the budget.
        assert r == full[0] or factored_params(shape, fmt, (r, k + 1)) > budget


def test_rank_for_keep_ratio_edges():
    assert rank_for_keep_ratio((16, 8, 3, 3), "svd", 10.0) == 16  # capped at full rank
    assert rank_for_keep_ratio((16, 8, 3, 3), "tucker2", 0.5) == (9, 4)
    assert rank_for_keep_ratio((64, 32, 1, 1), "tucker2", 0.5) == (9, 9)  # 1x1: both ranks cap at 32
    with pytest.raises(ValueError, match=r"svd at rank 1 needs 88 params"):
        rank_for_keep_ratio((16, 8, 3, 3), "svd", 0.05)
    with pytest.raises(ValueError, match="keep"):
        rank_for_keep_ratio((16, 8, 3, 3), "svd", 0.0)


def test_accounting_validates_rank():
    with pytest.raises(ValueError, match="r_in"):
        factored_params((16, 8, 3, 3), "tucker2", (4, 9))
    with pytest.raises(ValueError, match="out_hw"):
        factored_flops((16, 8, 3, 3), "svd", 2, (0, 4))
