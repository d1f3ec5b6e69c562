"""``decompose.fit: features``: decompose layer by layer, each layer fitted to its outputs on calibration images.

The math is :mod:`admm.feature_fit`; this module feeds it. The calibration
sample is the first ``decompose.calibration_batches`` global batches of the
training loader (epoch 0 draws, so the same images on every run of a config),
each rank reading its own shard. For every planned layer, in module order:
one forward pass of the *current* model (BatchNorm in eval mode; earlier
layers already decomposed) stops at that layer and accumulates its input
moment ``Sigma = X X^T``, and one pass of the dense model the cross moment
``M = X_dense X^T``: each layer is fitted to the *dense* model's outputs from
the inputs it now gets, so it corrects the error of the layers before it
(:func:`admm.feature_fit.corrected_target`). The ranks sum their moments (one all-reduce), every rank
fits the same factors from the same ``Sigma``, and rank 0's are broadcast so
replicas are bit-identical whatever the hardware.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist
from torch import Tensor, nn

from admm.feature_fit import fit_layer, layer_columns
from admm.nn.surgery import get_submodule, manifest_of, set_manifest, set_submodule
from admm.planning.rank_plan import RankPlan
from trainer.data.loaders import set_loader_epoch
from trainer.ranks import rank_and_world

# Images per chunk of the moment computation: bounds the unfolded patch matrix (n x pixels, float64).
_MAX_COLUMN_ELEMENTS = 2**25


class _StopForward(Exception):
    """Raised by the moment hook once the layer's input is seen: the rest of the forward pass is not needed."""


def _distributed() -> bool:
    """More than one rank (one rank needs no collective)."""
    return rank_and_world()[1] > 1


def calibration_sample(loader, micro_batches: int) -> list[Tensor]:
    """The first ``micro_batches`` input batches of ``loader`` (epoch 0 order and augmentation), on the CPU.

    Raises:
        ValueError: the loader holds fewer batches (the driver checks the global size before workers start).
    """
    set_loader_epoch(loader, 0)
    out: list[Tensor] = []
    for x, _ in loader:
        out.append(x)
        if len(out) == micro_batches:
            return out
    raise ValueError(f"decompose.calibration_batches: needs {micro_batches} batches per worker, the training "
                     f"split gives {len(out)}; lower it or enlarge data.train_subset")


def _layer_input(model: nn.Module, layer: nn.Module, x: Tensor) -> Tensor:
    """``layer``'s input when ``model`` runs ``x`` (the forward pass stops there)."""
    seen: list[Tensor] = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        seen.append(inputs[0])
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook)
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"the layer {type(layer).__name__} never ran in the model's forward pass")
    return seen[0]


@torch.no_grad()
def input_moments(model: nn.Module, name: str, reference: nn.Module, batches: list[Tensor],
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """``(Sigma, M)`` ``(n, n)`` float64, summed over ``batches`` and all ranks, of layer ``name``:
    ``Sigma = X X^T`` of its inputs in ``model`` (partly decomposed), ``M = X_ref X^T`` with the inputs
    ``X_ref`` the same layer sees in the dense ``reference``."""
    layer, ref_layer = get_submodule(model, name), get_submodule(reference, name)
    sigma = cross = None
    was = model.training
    model.eval()
    try:
        for x in batches:
            x = x.to(device)
            now, ref = _layer_input(model, layer, x), _layer_input(reference, ref_layer, x)
            per_image = max(1, layer_columns(layer, now[:1]).numel())
            step = max(1, _MAX_COLUMN_ELEMENTS // per_image)
            for a, b in zip(now.split(step), ref.split(step)):
                # float32 products (a GEMM over up to ~10^5 columns), summed in float64
                cols, ref_cols = layer_columns(layer, a, torch.float32), layer_columns(ref_layer, b, torch.float32)
                s_part, m_part = (cols @ cols.t()).double(), (ref_cols @ cols.t()).double()
                sigma = s_part if sigma is None else sigma + s_part
                cross = m_part if cross is None else cross + m_part
    finally:
        model.train(was)
    assert sigma is not None and cross is not None  # batches is never empty (calibration_sample)
    if _distributed():
        both = torch.stack([sigma, cross])
        dist.all_reduce(both)
        sigma, cross = both[0], both[1]
    return sigma, cross


def decompose_by_features(model: nn.Module, plan: RankPlan, batches: list[Tensor],
                          device: torch.device) -> tuple[nn.Module, dict[str, float]]:
    """Replace every planned layer (in module order) by its output-fitted factored layer; sets the manifest.

    Returns the model (changed in place) and ``{"fit_seconds", "calibration_images"}`` (this rank's images
    times the world size).
    """
    t0 = time.perf_counter()
    manifest = manifest_of(model)
    reference = copy.deepcopy(model).eval()  # the dense model: its layer outputs are the targets
    for p in plan.layers:
        dense = get_submodule(model, p.name)
        sigma, cross = input_moments(model, p.name, reference, batches, device)
        layer = fit_layer(dense, p.fmt, p.rank, sigma, cross)  # type: ignore[arg-type]
        if _distributed():
            for t in layer.state_dict().values():
                dist.broadcast(t, 0)
        set_submodule(model, p.name, layer)
        manifest[p.name] = layer.spec()
    set_manifest(model, manifest)
    world = rank_and_world()[1]
    return model, {"fit_seconds": time.perf_counter() - t0,
                   "calibration_images": float(sum(len(x) for x in batches) * world)}
