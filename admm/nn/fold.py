"""Fold inference-mode BatchNorm into the conv (dense or factored) that feeds it.

At inference BN is an affine map per channel, y = s (x - mean) + beta with
s = gamma / sqrt(var + eps). Folding it into the producing layer's output
channels removes one full read and write of every activation it touched:
on CPUs and at batch sizes where the model is bound by activation traffic
rather than FLOPs, that is where a factored model's speed has to come from.

Producer/BN pairs are found by the naming of the registry's ResNets
(``convK`` -> ``bnK``, ``downsample.0`` -> ``downsample.1``), checked by
channel count; a BN without a matching producer is left alone.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from admm.nn.layers_base import FactoredLayer
from admm.nn.surgery import get_submodule, manifest_of, set_manifest, set_submodule

# Factored formats whose output channels are scaled by one factor: the last one, (C_out, r, 1, 1).
LAST_FACTOR_FORMATS = ("svd", "tucker2", "cp", "lowrank_sparse")


def _producer_name(bn_name: str) -> str | None:
    parent, _, leaf = bn_name.rpartition(".")
    if leaf.startswith("bn") and leaf[2:].isdigit():
        return f"{parent}.conv{leaf[2:]}" if parent else f"conv{leaf[2:]}"
    if leaf == "1" and parent.endswith(("downsample", "shortcut")):
        return f"{parent}.0"
    return None


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(producer, bn) names whose BN can be folded into the producer."""
    modules = dict(model.named_modules())
    pairs = []
    for name, bn in modules.items():
        if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats:
            continue
        prod = _producer_name(name)
        layer = modules.get(prod) if prod else None
        if isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.out_channels == bn.num_features:
            pairs.append((prod, name))
        elif (isinstance(layer, FactoredLayer) and layer.format in LAST_FACTOR_FORMATS
              and layer.geometry.kind == "conv" and layer.geometry.out_channels == bn.num_features):
            pairs.append((prod, name))
    return pairs


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale s and shift t with BN(x) = s x + t (inference mode)."""
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
    beta = bn.bias if bn.affine else torch.zeros_like(s)
    return s, beta - bn.running_mean * s


@torch.no_grad()
def _fold_into(layer: nn.Module, s: torch.Tensor, t: torch.Tensor) -> None:
    old_bias = layer.bias if layer.bias is not None else torch.zeros_like(s)
    new_bias = nn.Parameter(old_bias * s + t)
    if isinstance(layer, nn.Conv2d):
        layer.weight.mul_(s[:, None, None, None])
        layer.bias = new_bias
        return
    layer.factors[-1].mul_(s.reshape(-1, *([1] * (layer.factors[-1].ndim - 1))))
    if layer.format == "lowrank_sparse" and layer.sparse_values.numel():
        per_out = layer.geometry.in_channels * layer.geometry.kernel_size[0] * layer.geometry.kernel_size[1]
        layer.sparse_values.mul_(s[layer.sparse_index // per_out])
    layer.bias = new_bias
    layer.geometry = dataclasses.replace(layer.geometry, bias=True)


def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every foldable BN of ``model`` in place (BN -> Identity); returns the folded pairs.

    Only valid for inference: the folded model has no batch statistics to update.
    """
    pairs = foldable_pairs(model)
    for prod, bn_name in pairs:
        bn = get_submodule(model, bn_name)
        _fold_into(get_submodule(model, prod), *_bn_affine(bn))
        set_submodule(model, bn_name, nn.Identity())
    manifest = manifest_of(model)
    if manifest:  # factored layers gained a bias: the manifest must say so to rebuild them
        modules = dict(model.named_modules())
        set_manifest(model, {name: modules[name].spec() for name in manifest})
    return pairs


def apply_folding(model: nn.Module, pairs: list[list[str]] | list[tuple[str, str]]) -> nn.Module:
    """Rebuild the structure of a folded model (for loading its weights): biases on producers, BN -> Identity."""
    for prod, bn_name in pairs:
        layer = get_submodule(model, prod)
        if isinstance(layer, nn.Conv2d) and layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.out_channels, device=layer.weight.device))
        set_submodule(model, bn_name, nn.Identity())
    return model
