"""TT in the channel-aligned layout of the TT-ADMM code: projection, factored conv, FLOPs, manifests.

The spatial-first TT-matrix layout the project used before lives on here only as a small
reference (:func:`old_layout_tt`), to show the channel-aligned one fits channel-structured
weights better at the same parameter count.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import tensorly as tl
import torch
import torch.nn.functional as F
from tensorly.decomposition import tensor_train
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from admm.formats.projections import max_rank, project, project_svd, project_tt, tt_cores
from admm.formats.reshape import factorize, to_tt, tt_layout
from admm.nn.layers import SVDLayer, TTLayer, Tucker2Layer, factorize_module
from admm.nn.realize import alternatives
from admm.nn.surgery import apply_manifest, decompose_model, manifest_of, module_from_spec
from admm.planning.accounting import (
    dense_flops,
    dense_params,
    factored_flops,
    factored_params,
    per_forward_flops,
    rank_for_keep_ratio,
)
from admm.planning.planner import plan_ranks
from admm.planning.rank_plan import LayerInfo


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()))


def channel_structured(c_out: int, c_in: int, k: int = 3, decay: float = 0.85, seed: int = 0) -> torch.Tensor:
    """A kernel whose out- and in-channel unfoldings have geometrically decaying spectra.

    ``W[o, i, s] = sum_ab U[o, a] decay^a C[a, b, s] decay^b V[i, b]`` with orthonormal U, V and
    a Gaussian C: the structure trained convs show (a few dominant channel directions).
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(c_out, c_out, generator=g))[0]
    v = torch.linalg.qr(torch.randn(c_in, c_in, generator=g))[0]
    core = torch.randn(c_out, c_in, k * k, generator=g)
    scale_o = decay ** torch.arange(c_out, dtype=torch.float32)
    scale_i = decay ** torch.arange(c_in, dtype=torch.float32)
    w = torch.einsum("oa,a,abs,b,ib->ois", u, scale_o, core, scale_i, v)
    return w.reshape(c_out, c_in, k, k)


def _omega(n: int) -> int:
    count, p = 0, 2
    while p * p <= n:
        while n % p == 0:
            n, count = n // p, count + 1
        p += 1
    return count + (n > 1)


def _old_modes(shape) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    c_out, c_in, kh, kw = shape
    d = max(1, min(3, max(_omega(c_out), _omega(c_in))))
    outs, ins = factorize(c_out, d), factorize(c_in, d)
    return outs, ins, (kh * kw,) + tuple(o * i for o, i in zip(outs, ins))


def _old_ranks(modes: tuple[int, ...], rank: int) -> list[int]:
    return [1] + [min(rank, math.prod(modes[:j]), math.prod(modes[j:])) for j in range(1, len(modes))] + [1]


def old_layout_params(shape, rank: int) -> int:
    """Parameters of :func:`old_layout_tt` at ``rank`` (its core sizes), without running the SVDs."""
    modes = _old_modes(shape)[2]
    r = _old_ranks(modes, rank)
    return sum(r[j] * n * r[j + 1] for j, n in enumerate(modes))


def old_layout_tt(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, int]:
    """Reference of the removed layout: TT-SVD of ``(s, o_1*i_1, ..., o_d*i_d)`` (spatial first, TT-matrix
    pairs, Novikov et al. 2015 / Garipov et al. 2016). Returns (approximation of ``w``, parameter count)."""
    outs, ins, modes = _old_modes(w.shape)
    d = len(outs)
    s = modes[0]
    perm = [2 * d] + [axis for j in range(d) for axis in (j, d + j)]
    t = w.double().reshape(*outs, *ins, s).permute(perm).reshape(modes)
    ranks = _old_ranks(modes, rank)
    with tl.backend_context("pytorch"):
        cores = tensor_train(t, rank=ranks).factors
        full = tl.tt_to_tensor(cores)
    interleaved = [s] + [f for pair in zip(outs, ins) for f in pair]
    inverse = [perm.index(axis) for axis in range(len(perm))]
    approx = full.reshape(interleaved).permute(inverse).reshape(w.shape).to(w.dtype)
    return approx, sum(c.numel() for c in cores)


def largest_within(params_of, budget: float, hi: int) -> int:
    """Largest int rank r in 1..hi with params_of(r) <= budget."""
    return max(r for r in range(1, hi + 1) if params_of(r) <= budget)


# ---------------------------------------------------------------- projection


@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (64, 32, 1, 1), (20, 36)])
@pytest.mark.parametrize("spec", ["int", "bonds"])
def test_project_tt_is_idempotent(shape, spec):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    caps = tt_layout(shape).bond_caps
    rank = 3 if spec == "int" else tuple(max(1, c // 2) for c in caps)
    z = project_tt(w, rank)
    assert rel(z, w) > 0.05  # a real truncation
    assert rel(project_tt(z, rank), z) < 1e-5
    assert [tuple(c.shape) for c in tt_cores(z, rank)] == list(tt_layout(shape).core_shapes(rank))


def test_bonds_line_up_with_channel_unfoldings():
    """Truncating only the bond left of the spatial mode is the truncated SVD of C_out x (C_in k k);
    only the bond right of it, the best rank-r approximation of the (C_out k k) x C_in unfolding."""
    w = torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    layout = tt_layout(w.shape)
    p = len(layout.out_factors)
    caps = list(layout.bond_caps)
    left = caps.copy()
    left[p - 1] = 5
    torch.testing.assert_close(project_tt(w, left), project_svd(w, 5))
    right = caps.copy()
    right[p] = 5
    m = w.permute(0, 2, 3, 1).reshape(-1, 16)  # (C_out*k*k, C_in)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    best = ((u[:, :5] * s[:5]) @ vh[:5]).reshape(32, 3, 3, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(project_tt(w, right), best)


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_channel_aligned_beats_old_layout_on_channel_structured_weights(keep):
    w = channel_structured(64, 64)
    budget = keep * dense_params(w.shape)
    r_new = largest_within(lambda r: factored_params(w.shape, "tt", r), budget, max_rank(w.shape, "tt"))
    r_old = largest_within(lambda r: old_layout_params(w.shape, r), budget, 600)
    new_err = rel(project_tt(w, r_new), w)
    old_approx, old_params = old_layout_tt(w, r_old)
    old_err = rel(old_approx, w)
    assert factored_params(w.shape, "tt", r_new) <= budget and old_params <= budget
    assert new_err < 0.7 * old_err, (new_err, old_err)


# ---------------------------------------------------------------- the factored conv


@pytest.mark.parametrize("spec", ["int", "bonds"])
def test_full_ranks_reproduce_the_dense_layer(spec):
    torch.manual_seed(3)
    conv = nn.Conv2d(24, 40, 3, stride=2, padding=1, dilation=1, bias=True, dtype=torch.float64)
    shape = tuple(conv.weight.shape)
    full = max_rank(shape, "tt") if spec == "int" else tt_layout(shape).bond_caps
    layer = factorize_module(conv, "tt", full)
    x = torch.randn(2, 24, 11, 11, dtype=torch.float64)
    for inp in (x, x.to(memory_format=torch.channels_last)):
        torch.testing.assert_close(layer(inp), conv(inp), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.to_dense_weight().double(), conv.weight, rtol=1e-5, atol=1e-5)


def test_reduced_rank_layer_computes_the_projection_and_trains():
    torch.manual_seed(4)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    rank = (2, 4, 10, 12, 4, 2)
    layer = factorize_module(conv, "tt", rank)
    x = torch.randn(2, 16, 8, 8)
    z = project(conv.weight, "tt", rank)
    torch.testing.assert_close(layer(x), F.conv2d(x, z, conv.bias, padding=1), rtol=1e-4, atol=1e-4)
    layer(x).square().sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in layer.cores)
    # The merged realization (both channel chains as matrices) is the same map.
    merged = alternatives(layer)["merged"]
    assert isinstance(merged, Tucker2Layer) and merged.rank == (10, 12)  # the bonds either side of k*k
    with torch.no_grad():
        torch.testing.assert_close(merged(x), layer(x), rtol=1e-4, atol=1e-4)
    pointwise = alternatives(factorize_module(nn.Conv2d(16, 32, 1), "tt", 5))["merged"]
    assert isinstance(pointwise, SVDLayer) and pointwise.rank == 5


@pytest.mark.parametrize(("shape", "h", "stride"), [((64, 64, 3, 3), 8, 1), ((128, 64, 3, 3), 16, 2)])
def test_tt_conv_flops_below_dense(shape, h, stride):
    """Counted by FlopCounterMode; at half the parameters the FLOPs drop by about as much."""
    c_out, c_in, k, _ = shape
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=1, bias=False)
    rank = rank_for_keep_ratio(shape, "tt", 0.5)
    layer = factorize_module(conv, "tt", rank)
    x = torch.randn(2, c_in, h, h)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        y = layer(x)
    ho = y.shape[-1]
    tt = factored_flops(shape, "tt", rank, (ho, ho), in_hw=(h, h))  # per image
    # Per forward, not per image: contracting the merged chains' matrices from the cores.
    assert counter.get_total_flops() == 2 * tt + per_forward_flops(shape, "tt", rank)
    dense = dense_flops(shape, (ho, ho))
    params_x = dense_params(shape) / factored_params(shape, "tt", rank)
    assert params_x >= 2 and dense / tt > 1
    if stride == 1:  # strided: the in-channel chain runs at input resolution, 4x the output pixels
        assert dense / tt > 0.85 * params_x, (dense / tt, params_x)


# ---------------------------------------------------------------- planning and manifests


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(16, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False)
        self.c = nn.Conv2d(32, 64, 1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        return self.fc(x.mean((2, 3)))


def test_per_layer_bond_ranks_plan_and_manifest_rebuilds_the_layer():
    torch.manual_seed(5)
    model = _Net().eval()
    infos = [LayerInfo(n, tuple(m.weight.shape), (8, 8)) for n, m in model.named_children()]
    bonds = [2, 8, 12, 10, 4, 2]  # the 6 bonds of b (32, 32, 3, 3): modes (2, 4, 4, 9, 4, 4, 2)
    plan = plan_ranks(infos, infos[:3], "tt", 0.5, ranks={"b": bonds})
    by_name = plan.by_name()
    assert by_name["b"].rank == tt_layout((32, 32, 3, 3)).ranks(bonds)[1:-1]
    assert isinstance(by_name["a"].rank, int)  # the budget planner varies one int per layer
    assert plan.params_after_total <= 0.5 * plan.dense_params_total
    x = torch.randn(2, 16, 8, 8)
    decompose_model(model, plan)
    assert isinstance(model.b, TTLayer) and model.b.rank == by_name["b"].rank
    buf = io.BytesIO()  # a checkpoint as trainer.phases writes it
    torch.save({"model": model.state_dict(), "surgery": json.loads(json.dumps(manifest_of(model)))}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = apply_manifest(_Net(), saved["surgery"]).eval()
    fresh.load_state_dict(saved["model"], strict=True)
    assert manifest_of(fresh) == manifest_of(model)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert module_from_spec(saved["surgery"]["b"]).spec() == model.b.spec()


def test_to_tt_orders_out_spatial_in():
    w = torch.arange(6 * 10 * 9, dtype=torch.float32).reshape(6, 10, 3, 3)
    layout = tt_layout(w.shape)
    assert layout.modes == (2, 3, 9, 5, 2)  # in-channel factors mirror the out side: small at the end
    t = to_tt(w, layout)
    assert t[1, 2, 5, 3, 1] == w[1 * 3 + 2, 3 * 2 + 1, 5 // 3, 5 % 3]


@pytest.mark.parametrize("shape", [(64, 64, 3, 3), (128, 64, 3, 3), (256, 64, 1, 1)])
def test_merged_chains_compute_the_same_map_with_fewer_flops(shape):
    """With one int rank the chains run as their contracted matrices; forcing the per-core chain gives
    the same output and gradients, at more FLOPs."""
    c_out, c_in, k, _ = shape
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False)
    layer = factorize_module(conv, "tt", rank_for_keep_ratio(shape, "tt", 0.5))
    x = torch.randn(2, c_in, 8, 8).contiguous(memory_format=torch.channels_last)
    assert layer._in_cost.merge and layer._out_cost.merge  # bonds at their caps: one matrix costs less

    def run() -> tuple[torch.Tensor, list[torch.Tensor], int]:
        layer.zero_grad()
        with FlopCounterMode(display=False) as counter:
            y = layer(x)
        y.square().sum().backward()
        return y.detach(), [c.grad.clone() for c in layer.cores], counter.get_total_flops()

    merged_y, merged_g, merged_flops = run()
    layer.merge_chains = False
    chain_y, chain_g, chain_flops = run()
    torch.testing.assert_close(merged_y, chain_y, atol=1e-4, rtol=1e-4)
    for a, b in zip(merged_g, chain_g):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    assert merged_flops < chain_flops


@pytest.mark.parametrize("fused", [False, True])
def test_merged_chains_follow_the_cores_after_an_optimizer_step(fused):
    """An inference forward after a training step uses the updated cores: torch's fused SGD updates
    parameters in place without bumping their version counters, so nothing may be cached on those."""
    conv = nn.Conv2d(32, 32, 3, padding=1, bias=False)
    layer = factorize_module(conv, "tt", rank_for_keep_ratio((32, 32, 3, 3), "tt", 0.33))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, fused=fused)
    x = torch.randn(2, 32, 8, 8)
    for _ in range(2):
        layer.train()
        layer(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        layer.eval()
        with torch.no_grad():
            merged = layer(x)
            layer.merge_chains = False
            per_core = layer(x)
            layer.merge_chains = True
        torch.testing.assert_close(merged, per_core, atol=1e-4, rtol=1e-4)
