"""`tdcompress plan CONFIG` under ``compression.budget=latency``: measure (or reuse), plan, check end to end.

The layers' latencies come from ``trainer.export.latency_table`` (timed once per device and
cached), the ranks from the pure planner (``admm.planning.latency_budget``). The plan is then
checked: the dense model and the model decomposed by the plan are timed end to end
now, on the same device, runtime and batch, and both figures are printed beside the
prediction.
"""
from __future__ import annotations

import json

from admm.planning.rank_plan import RankPlan
from launcher.config import ConfigError
from launcher.schema import Config


def ranks_override(plan: RankPlan) -> str:
    """The key=value overrides that fix a run to ``plan``'s ranks (a run plans no latency budget itself)."""
    ranks = {p.name: list(p.rank) if isinstance(p.rank, tuple) else p.rank for p in plan.layers}
    return f"compression.budget=params compression.latency=null compression.keep_ratio=1 'compression.ranks={json.dumps(ranks)}'"


def latency_plan_command(cfg: Config, config_name: str, weights: str | None, run: str | None,
                         cache_path: str | None) -> int:
    """Print the latency plan of ``cfg`` (on ``weights``/``run`` when given), its predicted and measured latency."""
    import torch

    from admm.planning.model_plan import plan_for_model
    from launcher.plan import load_weights, model_with
    from trainer.config import COMPRESSING_PHASES
    from trainer.data import DATASET_SHAPES
    from trainer.export.latency_table import LatencyCache, measure_costs, measure_planned
    from trainer.models import build_model

    if not any(p.kind in COMPRESSING_PHASES for p in cfg.phases):
        print(f"{config_name}: no admm or decompose phase, nothing to plan")
        return 0
    c, target = cfg.compression, cfg.compression.latency
    assert target is not None  # CompressionConfig requires it under budget=latency
    classes, size = DATASET_SHAPES[cfg.data.dataset]
    shape = (1, 3, size, size)
    if weights or run:
        state, source = load_weights(weights, run)
        model, on = model_with(cfg, classes, state, source), f"the weights of {source}"
    else:
        model, on = build_model(cfg.model.name, classes), "untrained weights (shapes only)"
    allocation = c.allocation
    notes = []
    if allocation == "error" and not (weights or run):
        allocation = "uniform"
        notes.append("compression.allocation=error needs trained weights (--weights or --run): this is the "
                     "UNIFORM allocation over the same measured latencies")
    try:
        cache = LatencyCache.open(cache_path)
    except ValueError as e:
        raise ConfigError(f"--latency-cache: {e}") from None
    try:
        costs = measure_costs(model, c, shape, cache, say=print)
        plan = plan_for_model(model, c, cfg.cluster.num_workers, input_shape=shape, allocation=allocation,
                              latency=costs)
    except ValueError as e:
        raise ConfigError(str(e) if str(e).startswith("compression") else f"compression: {e}") from None
    plan.notes.extend(notes)
    print(f"rank plan ({c.format}, budget latency: target {target.target} of the dense latency at batch "
          f"{target.batch}, {target.runtime}, {torch.get_num_threads()} threads; allocation {allocation}, "
          f"rank_multiple {c.rank_multiple}, {target.points} candidate ranks per layer; {cfg.model.name} at {size} px, "
          f"on {on}):\n{plan.table()}")
    dense_ms, planned_ms = measure_planned(model, plan, c, shape)
    print(f"latency per batch of {target.batch}, measured end to end now: dense {dense_ms:.2f} ms, planned "
          f"{planned_ms:.2f} ms = {planned_ms / dense_ms:.3f} of dense ({dense_ms / planned_ms:.2f}x); predicted "
          f"{plan.latency_after_total:.2f} ms = {plan.kept:.3f} of the table's dense {plan.dense_latency_ms:.2f} ms; "
          f"target {target.target}")
    print(f"a run with exactly these ranks: tdcompress run {config_name} {ranks_override(plan)}")
    return 0
