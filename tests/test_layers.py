"""Factored layers (admm.nn.layers): exactness against the projections, counts against admm.planning.accounting."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from admm.formats.projections import FORMATS, lowrank_sparse_parts, max_rank, project
from admm.nn.layers import FACTORED_LAYERS, FactoredLayer, factorize_module
from admm.nn.surgery import module_from_spec
from admm.planning.accounting import factored_flops, factored_param_count, factored_params, per_forward_flops

# (C_out, C_in, kernel, stride, padding, dilation, bias, H)
CONVS = [
    (40, 24, 3, 1, 1, 1, True, 8),  # non-square channels
    (16, 8, 3, 2, 1, 1, False, 9),  # stride 2
    (24, 12, 3, 1, 2, 2, True, 9),  # dilation 2
    (12, 8, (1, 3), 1, (0, 1), 1, True, 7),  # non-square kernel
    (32, 16, 1, 1, 0, 1, True, 6),  # 1x1
    (32, 16, 1, 2, 1, 1, False, 7),  # strided, padded 1x1 (border outputs are bias only)
]
LINEARS = [(10, 64, True), (40, 24, False)]


def _conv(spec, dtype=torch.float64) -> nn.Conv2d:
    c_out, c_in, k, stride, padding, dilation, bias, _ = spec
    return nn.Conv2d(c_in, c_out, k, stride, padding, dilation, bias=bias, dtype=dtype)


def _reduced(shape, fmt):
    """A rank spec well below full rank (lowrank_sparse: half rank, 10% of the entries sparse)."""
    full = max_rank(shape, fmt)
    if fmt == "tucker2":
        return (max(1, full[0] // 2), max(1, full[1] // 2))
    if fmt == "lowrank_sparse":
        return (max(1, full[0] // 2), math.prod(shape) // 10)
    return max(1, full // 3)


def _projected(weight, fmt, rank):
    if fmt == "lowrank_sparse":
        low, sparse = lowrank_sparse_parts(weight, rank)
        return low + sparse
    return project(weight, fmt, rank)


def _weight_params(layer: nn.Module) -> int:
    return sum(p.numel() for n, p in layer.named_parameters() if n != "bias")


@pytest.mark.parametrize("spec", CONVS, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_full_and_reduced_rank(fmt, spec):
    torch.manual_seed(0)
    conv = _conv(spec)
    x = torch.randn(2, conv.in_channels, spec[-1], spec[-1], dtype=torch.float64)
    shape = tuple(conv.weight.shape)
    full = factorize_module(conv, fmt, max_rank(shape, fmt))
    torch.testing.assert_close(full(x), conv(x), rtol=1e-9, atol=1e-10)
    rank = _reduced(shape, fmt)
    layer = factorize_module(conv, fmt, rank)
    z = _projected(conv.weight, fmt, rank)
    expect = F.conv2d(x, z, conv.bias, conv.stride, conv.padding, conv.dilation)
    torch.testing.assert_close(layer(x), expect, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.to_dense_weight(), z, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(z, conv.weight)  # the reduced rank really is a constraint
    # Parameters (bias excluded) are those admm.planning.accounting promises.
    count = factored_param_count(shape, fmt, rank)
    assert _weight_params(layer) == count.params
    assert sum(b.numel() for b in layer.buffers()) == count.extra
    assert (layer.bias is not None) == spec[6]


@pytest.mark.parametrize(("c_out", "c_in", "bias"), LINEARS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_full_and_reduced_rank(fmt, c_out, c_in, bias):
    torch.manual_seed(0)
    lin = nn.Linear(c_in, c_out, bias=bias, dtype=torch.float64)
    x = torch.randn(3, 2, c_in, dtype=torch.float64)  # extra leading dims as nn.Linear allows
    shape = tuple(lin.weight.shape)
    full = factorize_module(lin, fmt, max_rank(shape, fmt))
    torch.testing.assert_close(full(x), lin(x), rtol=1e-9, atol=1e-10)
    rank = _reduced(shape, fmt)
    layer = factorize_module(lin, fmt, rank)
    z = _projected(lin.weight, fmt, rank)
    torch.testing.assert_close(layer(x), F.linear(x, z, lin.bias), rtol=1e-9, atol=1e-10)
    assert _weight_params(layer) == factored_params(shape, fmt, rank)


@pytest.mark.parametrize("fmt", FORMATS)
def test_float32_full_rank_and_weight_override(fmt):
    torch.manual_seed(1)
    conv = nn.Conv2d(24, 40, 3, padding=1)
    x = torch.randn(2, 24, 8, 8)
    layer = factorize_module(conv, fmt, max_rank(conv.weight.shape, fmt))
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-4)
    # Factors from another weight (ADMM's Z), bias still from the module.
    z = torch.randn_like(conv.weight)
    layer = factorize_module(conv, fmt, max_rank(conv.weight.shape, fmt), weight=z)
    torch.testing.assert_close(layer(x), F.conv2d(x, z, conv.bias, padding=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", CONVS, ids=str)
@pytest.mark.parametrize("fmt", ["svd", "tucker2", "tt", "cp"])
def test_conv_flops_match_accounting(fmt, spec):
    """lowrank_sparse is left out: its sparse kernel runs as a materialised dense conv, which
    FlopCounterMode counts densely, while accounting counts 2*k FLOPs per pixel."""
    conv = _conv(spec, torch.float32)
    h = spec[-1]
    x = torch.randn(2, conv.in_channels, h, h)
    shape = tuple(conv.weight.shape)
    for rank in (_reduced(shape, fmt), max_rank(shape, fmt)):
        layer = factorize_module(conv, fmt, rank)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            y = layer(x)
        expect = factored_flops(shape, fmt, rank, tuple(y.shape[-2:]), in_hw=(h, h))
        assert counter.get_total_flops() == x.shape[0] * expect + per_forward_flops(shape, fmt, rank)


@pytest.mark.parametrize("fmt", FORMATS)
def test_spec_roundtrip_rebuilds_same_layer(fmt):
    torch.manual_seed(2)
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=True)
    layer = factorize_module(conv, fmt, _reduced(tuple(conv.weight.shape), fmt))
    spec = json.loads(json.dumps(layer.spec()))
    assert spec["format"] == fmt and spec["kind"] == "conv" and spec["stride"] == [2, 2]
    rebuilt = module_from_spec(spec)
    assert type(rebuilt) is FACTORED_LAYERS[fmt] and rebuilt.spec() == layer.spec()
    rebuilt.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 16, 9, 9)
    torch.testing.assert_close(rebuilt(x), layer(x))
    lin = factorize_module(nn.Linear(24, 10), fmt, _reduced((10, 24), fmt))
    assert module_from_spec(json.loads(json.dumps(lin.spec()))).spec() == lin.spec()


def test_lowrank_sparse_is_stored_sparse_and_trains():
    torch.manual_seed(3)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    rank = (4, 50)
    layer = factorize_module(conv, "lowrank_sparse", rank)
    state = layer.state_dict()
    assert state["sparse_values"].shape == (50,) and state["sparse_index"].dtype == torch.long
    assert "sparse_index" not in dict(layer.named_parameters())  # indices are storage, not parameters
    assert all(t.numel() < conv.weight.numel() for t in state.values())  # nothing dense-shaped is stored
    layer(torch.randn(2, 16, 6, 6)).square().sum().backward()
    assert layer.sparse_values.grad is not None and layer.sparse_values.grad.abs().sum() > 0
    assert all(p.grad is not None for p in layer.factors)


def test_geometry_errors_and_device_dtype():
    with pytest.raises(ValueError, match="groups"):
        factorize_module(nn.Conv2d(8, 8, 3, groups=2), "svd", 2)
    with pytest.raises(ValueError, match="padding_mode"):
        factorize_module(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), "svd", 2)
    with pytest.raises(TypeError):
        factorize_module(nn.Conv1d(8, 8, 3), "svd", 2)
    with pytest.raises(ValueError, match="unknown format"):
        factorize_module(nn.Conv2d(8, 8, 3), "nope", 2)
    with pytest.raises(ValueError, match="r_out"):
        factorize_module(nn.Conv2d(8, 8, 3), "tucker2", (99, 2))
    with pytest.raises(ValueError, match="does not fit"):
        factorize_module(nn.Conv2d(8, 8, 3), "svd", 2, weight=torch.randn(8, 8, 1, 1))
    conv = nn.Conv2d(8, 16, 3, dtype=torch.bfloat16).eval()
    layer = factorize_module(conv, "tucker2", (4, 4))
    assert isinstance(layer, FactoredLayer) and not layer.training
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    same = factorize_module(nn.Conv2d(8, 16, 3, padding="same"), "tt", 4)
    assert same(torch.randn(1, 8, 5, 5)).shape == (1, 16, 5, 5)


@pytest.mark.parametrize(("c_out", "c_in", "bias"), LINEARS)
@pytest.mark.parametrize("fmt", ["svd", "tucker2", "tt", "cp"])
def test_linear_flops_match_accounting(fmt, c_out, c_in, bias):
    """cp on a Linear applies its 1x1 "depthwise" factor as an element-wise scale, which
    FlopCounterMode does not count: accounting's 2*R FLOPs for it are missing there."""
    lin = nn.Linear(c_in, c_out, bias=bias)
    x = torch.randn(3, c_in)
    rank = _reduced((c_out, c_in), fmt)
    layer = factorize_module(lin, fmt, rank)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x)
    unseen = 2 * rank if fmt == "cp" else 0
    once = per_forward_flops((c_out, c_in), fmt, rank)
    assert counter.get_total_flops() == 3 * (factored_flops((c_out, c_in), fmt, rank, (1, 1)) - unseen) + once
