"""The rank plan of a model: its layers described, selected by the compression config, planned, given owners.

Pure: the caller hands in the data-parallel group (``comm``) so that every rank
gets rank 0's plan, and reads or writes the plan's JSON document itself.
"""
from __future__ import annotations

import dataclasses
import json

from torch import nn

from admm.comm import SINGLE, Comm
from admm.config import CompressionConfig
from admm.planning.latency_budget import LatencyCosts, plan_latency
from admm.planning.layer_info import describe_layers
from admm.planning.owners import with_owners
from admm.planning.planner import plan_ranks, select
from admm.planning.rank_plan import RankPlan


def plan_for_model(model: nn.Module, compression: CompressionConfig, world: int = 1,
                   input_shape: tuple[int, ...] | None = None, allocation: str | None = None,
                   fixed: RankPlan | None = None, comm: Comm = SINGLE,
                   latency: LatencyCosts | None = None) -> RankPlan:
    """Plan ranks (and owners for ``world`` ranks) for ``model`` from a CompressionConfig.

    ``allocation`` overrides ``compression.allocation`` (the driver has no trained weights and asks for
    "uniform"); "error" plans from the model's current weights. ``fixed``: take every layer's format
    and ranks from this earlier plan (recounting params and FLOPs at ``input_shape``). With ``world`` > 1
    every rank gets rank 0's plan (``comm.broadcast``, a collective), so float differences between hosts
    can never split the ranks' plans. ``compression.budget=flops`` needs ``input_shape``
    (N, C, H, W): the FLOPs of a conv depend on its output size, which one forward pass records.
    ``compression.budget=latency`` needs ``latency``: the measured times of the dense model and of every
    planned layer at its candidate ranks (``trainer.export.latency_table.measure_costs``).
    """
    if compression.budget == "flops" and input_shape is None and fixed is None:
        raise ValueError("compression.budget=flops: planning a FLOPs budget needs the model's input shape "
                         "(plan_for_model(..., input_shape=(1, C, H, W))); budget=params needs none")
    if compression.budget == "latency" and fixed is None and latency is None:
        raise ValueError("compression.budget=latency: planning needs the measured latencies of the dense model and "
                         "of each planned layer per candidate rank (trainer.export.latency_table.measure_costs; "
                         "`tdcompress plan CONFIG` measures and caches them)")
    if compression.budget == "latency" and input_shape is None and fixed is None:
        raise ValueError("compression.budget=latency: planning needs the model's input shape (1, C, H, W)")
    layers = describe_layers(model, input_shape)
    planned = select(layers, compression.include, compression.exclude, compression.min_channels)
    if not planned:
        raise ValueError("compression: no layer matches include/exclude/min_channels; nothing to compress")
    allocation = allocation or compression.allocation
    if fixed is not None:
        mine = {layer.name for layer in planned}
        if {p.name for p in fixed.layers} != mine:
            theirs = sorted(p.name for p in fixed.layers)
            raise ValueError(f"compression: the stored plan covers other layers ({theirs}) than this config plans "
                             f"({sorted(mine)})")
        plan = plan_ranks(layers, planned, compression.format, 1.0, {p.name: p.rank for p in fixed.layers},
                          sparse_fraction=compression.sparse_fraction)
        old = fixed.by_name()
        plan = dataclasses.replace(plan, allocation=fixed.allocation, notes=list(fixed.notes), budget=fixed.budget,
                                   dense_latency_ms=fixed.dense_latency_ms,
                                   layers=[dataclasses.replace(p, error=old[p.name].error,
                                                               latency_before=old[p.name].latency_before,
                                                               latency_after=old[p.name].latency_after)
                                           for p in plan.layers])
    elif compression.budget == "latency":
        modules = dict(model.named_modules())
        weights = {layer.name: modules[layer.name].weight for layer in planned} if allocation == "error" else None
        plan = plan_latency(layers, planned, compression.format, compression.latency,  # type: ignore[arg-type]
                            latency, ranks=compression.ranks, allocation=allocation,  # type: ignore[arg-type]
                            weights=weights, min_rank_ratio=compression.min_rank_ratio, max_keep=compression.max_keep)
    else:
        modules = dict(model.named_modules())
        weights = {layer.name: modules[layer.name].weight for layer in planned} if allocation == "error" else None
        plan = plan_ranks(layers, planned, compression.format, compression.keep_ratio, compression.ranks,
                          sparse_fraction=compression.sparse_fraction, rank_multiple=compression.rank_multiple,
                          allocation=allocation, weights=weights, min_rank_ratio=compression.min_rank_ratio,
                          max_keep=compression.max_keep, budget=compression.budget)
    if world > 1:
        plan = comm.broadcast(plan, src=0)
    return with_owners(plan, world)


def _compression_key(compression: CompressionConfig) -> str:
    return json.dumps(dataclasses.asdict(compression), sort_keys=True)


def plan_document(plan: RankPlan, compression: CompressionConfig) -> str:
    """``plan`` as JSON, with the compression config it was made for (read back by :func:`plan_from_document`)."""
    return json.dumps({"compression": json.loads(_compression_key(compression)), "plan": plan.to_json()}, indent=1)


def plan_from_document(text: str, compression: CompressionConfig) -> RankPlan | None:
    """The plan of a :func:`plan_document`; None when it was made for another compression config (a resume
    with ``allow_config_change``: the phase plans anew)."""
    data = json.loads(text)
    if json.dumps(data.get("compression"), sort_keys=True) != _compression_key(compression):
        return None
    return RankPlan.from_json(data["plan"])
