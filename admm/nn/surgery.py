"""Model surgery: swap planned dense layers for factored ones, and rebuild that structure from a manifest.

Works on the unwrapped ``nn.Module`` (before a DeepSpeed engine is built around
it). The surgery manifest ``{dotted layer name: FactoredLayer.spec()}`` is a
plain JSON-able dict stored on the model (read it with :func:`manifest_of`); checkpoints
save it, and :func:`apply_manifest` replays it on a freshly built dense model
before ``load_state_dict`` (trainer.checkpoints.stateful.restore_model, trainer.export.torch_export).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor, nn

from admm.nn.layers import FactoredLayer, Geometry, factorize_module, layer_class
from admm.nn.layers_prune import PrunableSVDLayer

if TYPE_CHECKING:  # keep apply_manifest's import light for torch-only export loading
    from admm.planning.rank_plan import RankPlan

__all__ = ["apply_manifest", "decompose_model", "get_submodule", "manifest_of", "module_from_spec",
           "set_submodule", "set_manifest"]

_MANIFEST_ATTR = "tdc_manifest"


def module_from_spec(spec: dict[str, Any], *, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> FactoredLayer:
    """Rebuild a factored layer (zero factors) from :meth:`FactoredLayer.spec`, ready for ``load_state_dict``."""
    if spec.get("parametrization") == "usv":  # svd mid-way through rank pruning
        return PrunableSVDLayer.empty(spec, device=device, dtype=dtype)
    return layer_class(str(spec.get("format"))).empty(spec, device=device, dtype=dtype)


def manifest_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The surgery manifest ``{layer: spec}`` of ``model`` (a copy; empty for a dense model)."""
    return dict(getattr(model, _MANIFEST_ATTR, None) or {})


def set_manifest(model: nn.Module, manifest: Mapping[str, Mapping[str, Any]]) -> None:
    """Store ``manifest`` on ``model`` (checkpoints and exports read it back with :func:`manifest_of`)."""
    setattr(model, _MANIFEST_ATTR, dict(manifest))


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted ``name`` (``""`` is the model itself); AttributeError names what is missing."""
    return model.get_submodule(name)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (e.g. ``"layer1.0.conv1"``, ``"features.3"``) by ``module``."""
    if not name:
        raise ValueError("cannot replace the root module")
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if attr not in parent._modules:
        raise AttributeError(f"{type(parent).__name__} {parent_name or '<root>'!r} has no submodule {attr!r}")
    setattr(parent, attr, module)


def _dense_layer(model: nn.Module, name: str) -> nn.Conv2d | nn.Linear:
    module = get_submodule(model, name)
    if isinstance(module, FactoredLayer):
        raise ValueError(f"layer {name!r} is already factored ({module.format})")
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        raise TypeError(f"layer {name!r} is a {type(module).__name__}, not an nn.Conv2d or nn.Linear")
    return module


def decompose_model(model: nn.Module, plan: "RankPlan", weights: Mapping[str, Tensor] | None = None) -> nn.Module:
    """Replace every layer of ``plan`` in ``model`` (in place) by its factored layer; return ``model``.

    Factors come from the layer's trained weight, or ``weights[name]`` when given
    (e.g. ADMM's Z, whose shape must be the weight's). Each new layer keeps the
    dense layer's bias, device, dtype and train/eval mode. All layers are checked
    before any is replaced. Sets the model's manifest ``{name: spec}`` (merged
    with an existing manifest).

    Raises:
        ValueError: a planned layer is already factored, its shape differs from
            the plan, or ``weights`` names a layer the plan does not.
    """
    weights = dict(weights or {})
    planned = {p.name for p in plan.layers}
    unknown = sorted(set(weights) - planned)
    if unknown:
        raise ValueError(f"weights given for layers that are not planned: {unknown}")
    dense = {}
    for p in plan.layers:
        module = _dense_layer(model, p.name)
        if tuple(module.weight.shape) != tuple(p.shape):
            raise ValueError(f"layer {p.name!r} has weight shape {tuple(module.weight.shape)}, "
                             f"the plan says {tuple(p.shape)}")
        dense[p.name] = module
    manifest = manifest_of(model)
    for p in plan.layers:
        layer = factorize_module(dense[p.name], p.fmt, p.rank, weight=weights.get(p.name))
        set_submodule(model, p.name, layer)
        manifest[p.name] = layer.spec()
    set_manifest(model, manifest)
    return model


def apply_manifest(model: nn.Module, manifest: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """Rebuild the factored structure a manifest describes (zero factors) in ``model``; return ``model``.

    Each named dense layer is replaced by ``module_from_spec(spec)`` on its
    device and dtype, after checking that its geometry matches the spec. A layer
    that is already factored with the same spec is kept (replaying is
    idempotent). Load the weights afterwards with ``load_state_dict``.

    Raises:
        ValueError: a layer's geometry or existing factored spec disagrees with the manifest.
    """
    specs = {name: dict(spec) for name, spec in manifest.items()}
    built: dict[str, nn.Module] = {}
    for name, spec in specs.items():  # check everything before changing anything
        current = get_submodule(model, name)
        if isinstance(current, FactoredLayer):
            if current.spec() != module_from_spec(spec, device="meta").spec():
                raise ValueError(f"layer {name!r} is factored as {current.spec()}, the manifest says {spec}")
            continue
        dense = _dense_layer(model, name)
        if Geometry.of(dense) != Geometry.from_spec(spec):
            raise ValueError(f"layer {name!r} has geometry {Geometry.of(dense).to_spec()}, "
                             f"the manifest says {spec}")
        layer = module_from_spec(spec, device=dense.weight.device, dtype=dense.weight.dtype)
        layer.train(dense.training)
        built[name] = layer
    for name, layer in built.items():
        set_submodule(model, name, layer)
    merged = manifest_of(model)
    merged.update({name: get_submodule(model, name).spec() for name in specs})  # type: ignore[operator]
    set_manifest(model, merged)
    return model
