"""Exact alternative realizations of a factored layer, for inference speed.

A factored layer's map can be computed in more than one way. All of these give
the same output (up to float rounding); they differ in FLOPs, in how many
activation tensors they read and write, and in how well the kernels fit the
hardware. Which is fastest depends on the device, the batch and the layer
shape, so :mod:`trainer.export.latency` measures them and this module only builds them:

``factored``
    the layer as trained (e.g. tucker2: 1x1 -> kxk -> 1x1).
``merged``
    tucker2 only: the first 1x1 factor folded into the core, giving the two-conv
    svd structure ``kxk C_in -> r_out`` then ``1x1 r_out -> C_out``. One fewer
    activation pass. For a 1x1 kernel the core folds into the side of larger rank,
    so the result is a rank ``min(r_out, r_in)`` svd with fewer FLOPs than the chain.
    tt: each channel chain contracted into one matrix, giving a Tucker-2 layer of
    ranks ``(a_p, b_0)`` (the bonds either side of the spatial core; an svd of the
    middle bond's rank for 1x1 kernels and Linear). Fewer, larger matmuls than the
    chain, more parameters.
``sparse``
    lowrank_sparse conv only: the same layer applying its sparse kernel S at its
    real density (``sparse_form`` ``gather``, :mod:`admm.nn.sparse_conv`) instead
    of as one more dense conv. Fewer FLOPs; an index gather the dense conv does not pay.
``dense``
    one ``nn.Conv2d``/``nn.Linear`` carrying :meth:`FactoredLayer.to_dense_weight`:
    more FLOPs, but a single pass over the activations.

:func:`realize` swaps the chosen modules into a model and keeps its surgery
manifest (:func:`admm.nn.surgery.manifest_of`) in step: a ``dense`` layer leaves the manifest
(a plain layer needs no rebuilding), a ``merged`` one is recorded as svd (tt: tucker2 or svd), a
``sparse`` one as lowrank_sparse with ``sparse_form: gather``.
"""
from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from admm.nn.layers import LowRankSparseLayer, SVDLayer, TTLayer, Tucker2Layer
from admm.nn.layers_base import FactoredLayer, assign
from admm.nn.surgery import get_submodule, manifest_of, set_manifest, set_submodule

__all__ = ["REALIZATIONS", "alternatives", "dense_module", "merged_module", "realize", "sparse_module"]

REALIZATIONS = ("factored", "merged", "dense", "sparse")


@torch.no_grad()
def dense_module(layer: FactoredLayer) -> nn.Conv2d | nn.Linear:
    """The plain layer computing ``layer``'s map: weight ``to_dense_weight()``, the same bias and geometry."""
    g = layer.geometry
    weight = layer.to_dense_weight().detach()
    factory = {"device": weight.device, "dtype": weight.dtype}
    if g.kind == "linear":
        dense: nn.Conv2d | nn.Linear = nn.Linear(g.in_channels, g.out_channels, bias=g.bias, **factory)
    else:
        dense = nn.Conv2d(g.in_channels, g.out_channels, g.kernel_size, stride=g.stride, padding=g.padding,
                          dilation=g.dilation, bias=g.bias, **factory)
    dense.weight.copy_(weight)
    if g.bias:
        dense.bias.copy_(layer.bias)
    return dense.train(layer.training)


@torch.no_grad()
def merged_module(layer: FactoredLayer) -> SVDLayer | Tucker2Layer | None:
    """tucker2 as a two-factor svd layer, tt as tucker2/svd (None for other formats); see the module docstring.

    kxk kernel: first factor ``core * U_in`` ``(r_out, C_in, kh, kw)``, last ``U_out``.
    1x1 kernel or Linear: the core joins the factor on the side of larger rank, so
    the svd rank is ``min(r_out, r_in)``.
    """
    if isinstance(layer, TTLayer):
        return _tt_merged(layer)
    if not isinstance(layer, Tucker2Layer):
        return None
    g = layer.geometry
    first, core, last = (f.detach() for f in layer.factors)
    r_out, r_in = layer.rank  # type: ignore[misc]
    u_in = first.reshape(r_in, g.in_channels)          # (r_in, C_in)
    u_out = last.reshape(g.out_channels, r_out)         # (C_out, r_out)
    spatial = g.kernel_size != (1, 1)
    if spatial:
        # (r_out, r_in, kh, kw) x (r_in, C_in) -> (r_out, C_in, kh, kw)
        new_first = torch.einsum("abhw,bi->aihw", core, u_in)
        new_last, rank = u_out, r_out
    else:
        core2 = core.reshape(r_out, r_in)
        if r_out <= r_in:
            new_first, new_last, rank = core2 @ u_in, u_out, r_out
        else:
            new_first, new_last, rank = u_in, u_out @ core2, r_in
    svd = SVDLayer(g, rank, device=first.device, dtype=first.dtype)
    assign(svd.factors[0], new_first)
    assign(svd.factors[1], new_last)
    if g.bias:
        svd.bias.copy_(layer.bias)
    return svd.train(layer.training)


@torch.no_grad()
def _tt_merged(layer: TTLayer) -> SVDLayer | Tucker2Layer:
    """tt with both channel chains as matrices: kxk -> tucker2 ``(a_p, b_0)``, 1x1/Linear -> svd."""
    g = layer.geometry
    u_in, u_out = layer.in_matrix().detach(), layer.out_matrix().detach()  # (b_0, C_in), (C_out, a_p)
    factory = {"device": u_in.device, "dtype": u_in.dtype}
    merged: SVDLayer | Tucker2Layer
    if layer.layout.has_spatial:
        merged = Tucker2Layer(g, (u_out.shape[1], u_in.shape[0]), **factory)
        for param, value in zip(merged.factors, (u_in, layer.spatial_kernel().detach(), u_out)):
            assign(param, value)
    else:
        merged = SVDLayer(g, u_in.shape[0], **factory)
        assign(merged.factors[0], u_in)
        assign(merged.factors[1], u_out)
    if g.bias:
        merged.bias.copy_(layer.bias)
    return merged.train(layer.training)


def sparse_module(layer: FactoredLayer) -> LowRankSparseLayer | None:
    """A copy of a lowrank_sparse conv applying S by gather (None: another format, a Linear, or no non-zeros)."""
    if not isinstance(layer, LowRankSparseLayer) or layer.geometry.kind != "conv" or layer.sparse_form == "gather":
        return None
    if not layer.sparse_values.numel():
        return None
    return copy.deepcopy(layer).use_sparse_form("gather")


def _build(layer: FactoredLayer, choice: str) -> nn.Module | None:
    """One realization of ``layer`` (None: not available for its format)."""
    if choice == "factored":
        return layer
    if choice == "merged":
        return merged_module(layer)
    if choice == "dense":
        return dense_module(layer)
    if choice == "sparse":
        return sparse_module(layer)
    return None


def alternatives(layer: FactoredLayer) -> dict[str, nn.Module]:
    """Every realization of ``layer`` by name (``factored`` is ``layer`` itself)."""
    built = {choice: _build(layer, choice) for choice in REALIZATIONS}
    return {choice: module for choice, module in built.items() if module is not None}


def realize(model: nn.Module, choices: Mapping[str, str]) -> nn.Module:
    """Swap each factored layer named in ``choices`` for its chosen realization, in place; return ``model``.

    Raises:
        ValueError: a name is not a factored layer, or the choice is not one of
            ``REALIZATIONS`` available for that layer's format.
    """
    built: dict[str, nn.Module] = {}
    for name, choice in choices.items():  # check everything before changing anything
        layer = get_submodule(model, name)
        if not isinstance(layer, FactoredLayer):
            raise ValueError(f"realize: layer {name!r} is a {type(layer).__name__}, not a factored layer")
        module = _build(layer, choice)
        if module is None:
            allowed = sorted(alternatives(layer))
            raise ValueError(f"realize: layer {name!r} ({layer.format}) can be realized as {allowed}, got {choice!r}")
        built[name] = module
    manifest = manifest_of(model)
    for name, module in built.items():
        set_submodule(model, name, module)
        if isinstance(module, FactoredLayer):
            manifest[name] = module.spec()
        else:
            manifest.pop(name, None)
    set_manifest(model, manifest)
    return model
