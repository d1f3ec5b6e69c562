"""Eager CPU inference: each conv's ReLU (and residual add) run inside the conv's oneDNN call.

In eager mode a ResNet runs ``conv -> relu_`` and ``conv -> add_ -> relu_`` as
separate kernels: each ReLU and each residual add reads and writes a whole
activation tensor. Those passes cost the same in the dense and in the factored
model, so they take a larger share of the faster (factored) model's time and hold
its speed-up below its FLOPs ratio. oneDNN applies them as post-ops of the
convolution that produced the tensor (``torch.ops.mkldnn._convolution_pointwise``,
the kernels torch.compile's CPU backend emits), which removes the extra passes.

:func:`fuse_conv_activations` traces the model with ``torch.fx`` (plain convs and
factored layers as leaves), drops the ``nn.Identity`` left by BN folding, and
replaces each ``conv -> relu`` and ``conv -> add(other) -> relu`` whose
intermediate has no other user by one module: a plain conv becomes one fused
call; an svd or tucker2 layer runs its leading factors as before and fuses the
activation into its last 1x1 factor. Other layers are left as they are. The map
is unchanged (tests/test_fuse.py); the result is for inference only (no
autograd formula for the fused op).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from admm.nn.layers import SVDLayer, Tucker2Layer
from admm.nn.layers_base import FactoredLayer

__all__ = ["FusedConv", "fuse_conv_activations", "fusable"]

_RELU_FUNCTIONS = (F.relu, torch.relu)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def _ints(value: Any) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * 2


def fusable(module: nn.Module) -> bool:
    """Whether ``module`` is a conv whose last convolution :class:`FusedConv` can fuse with its activation.

    Plain ``nn.Conv2d`` with zero padding given as ints, and svd / tucker2 conv layers
    (exact types: a subclass such as lowrank_sparse adds terms after the last factor).
    """
    if type(module) is nn.Conv2d:
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if type(module) in (SVDLayer, Tucker2Layer):
        return module.geometry.kind == "conv" and not isinstance(module.geometry.padding, str)
    return False


class FusedConv(nn.Module):
    """``relu(conv(x))`` or ``relu(conv(x) + other)`` with the ReLU and add inside the last conv call.

    ``conv`` is an ``nn.Conv2d``, an :class:`SVDLayer` or a :class:`Tucker2Layer`
    (see :func:`fusable`); its parameters are used as they are, not copied.
    Input ``(N, C_in, H, W)``, ``other`` of the output's shape ``(N, C_out, H_out, W_out)``.
    CPU float32 only (oneDNN).
    """

    def __init__(self, conv: nn.Module, residual: bool) -> None:
        super().__init__()
        if not fusable(conv):
            raise ValueError(f"FusedConv: cannot fuse a {type(conv).__name__} (allowed: Conv2d, SVDLayer, "
                             "Tucker2Layer with integer zero padding)")
        self.conv = conv
        self.residual = residual

    def _last(self, x: Tensor, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any, dilation: Any,
              groups: int, other: Tensor | None) -> Tensor:
        args = (weight, bias, _ints(padding), _ints(stride), _ints(dilation), groups)
        if other is None:
            return torch.ops.mkldnn._convolution_pointwise(x, *args, "relu", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(x, other, *args, "add", None, "relu", [], "")

    def forward(self, x: Tensor, other: Tensor | None = None) -> Tensor:
        if self.residual != (other is not None):
            raise ValueError(f"FusedConv(residual={self.residual}) called {'with' if other is not None else 'without'}"
                             " a residual input")
        conv = self.conv
        if isinstance(conv, nn.Conv2d):
            return self._last(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, other)
        g = conv.geometry
        if isinstance(conv, Tucker2Layer):
            first, core, last = conv.factors
            x = F.conv2d(F.conv2d(x, first), core, None, **g.conv_kwargs)
        else:
            first, last = conv.factors
            x = F.conv2d(x, first, None, **g.conv_kwargs)
        return self._last(x, last, conv.bias, 1, 0, 1, 1, other)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # Factored layers stay whole: fusion swaps a layer, it never rewrites one's internals.
        return isinstance(m, FactoredLayer) or super().is_leaf_module(m, qualname)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules[str(node.target)]) is nn.ReLU
    return node.op == "call_function" and node.target in _RELU_FUNCTIONS


def _conv_of(node: Any, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The fusable conv module ``node`` calls with one positional input and one user, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_module" or len(node.users) != 1 or len(node.args) != 1:
        return None
    module = modules[str(node.target)]
    return module if fusable(module) else None


def fuse_conv_activations(model: nn.Module) -> fx.GraphModule:
    """A copy-free ``fx.GraphModule`` of ``model`` (eval, CPU float32) with conv(+add)+ReLU chains fused.

    Raises:
        ValueError: the model is not on CPU in float32, or this torch has no oneDNN.
    """
    if not torch.backends.mkldnn.is_available():
        raise ValueError("fuse_conv_activations: this torch build has no oneDNN (torch.backends.mkldnn)")
    bad = {(p.device.type, p.dtype) for p in model.parameters()} - {("cpu", torch.float32)}
    if bad:
        raise ValueError(f"fuse_conv_activations: parameters must be cpu float32, found {sorted(map(str, bad))}")
    model.eval()
    gm = fx.GraphModule(model, _Tracer().trace(model))
    modules = dict(gm.named_modules())
    graph = gm.graph
    for node in list(graph.nodes):  # folded BNs: nothing to run, and they would hide conv -> relu
        if node.op == "call_module" and type(modules[str(node.target)]) is nn.Identity:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    fused = 0
    for node in list(graph.nodes):
        if not _is_relu(node, modules):
            continue
        src = node.args[0]
        conv_node, other = None, None
        if _conv_of(src, modules) is not None:
            conv_node = src
        elif (isinstance(src, fx.Node) and src.op == "call_function" and src.target in _ADD_FUNCTIONS
              and len(src.users) == 1 and len(src.args) == 2 and not src.kwargs):
            for i, arg in enumerate(src.args):
                if _conv_of(arg, modules) is not None and isinstance(src.args[1 - i], fx.Node):
                    conv_node, other = arg, src.args[1 - i]
                    break
        if conv_node is None:
            continue
        name = f"fused_{fused}"
        fused += 1
        gm.add_submodule(name, FusedConv(modules[str(conv_node.target)], residual=other is not None))
        with graph.inserting_before(node):
            new = graph.call_module(name, (conv_node.args[0],) + ((other,) if other is not None else ()))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if other is not None:
            graph.erase_node(src)
        graph.erase_node(conv_node)
    graph.lint()
    gm.recompile()
    return gm
