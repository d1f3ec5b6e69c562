"""`tdcompress plan CONFIG --weights FILE | --run RUN_DIR`: both rank allocations on trained weights, side by side.

Without weights the plan command prints the driver's plan (``pipeline.make_plan``).
With weights -- a state_dict file, a checkpoint's ``shared.pt``, or the newest
checkpoint of a run that still holds the dense model -- it plans the same
budget twice, ``uniform`` and ``error`` (:mod:`admm.planning.allocate`), and prints each
layer's ranks and relative projection error ||W - Proj(W)|| / ||W|| under both,
with the totals.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from admm.planning.planner import with_errors
from admm.planning.rank_plan import RankPlan
from launcher.config import ConfigError
from launcher.schema import Config


def _state_dict(obj: Any, source: str) -> Mapping[str, Tensor]:
    """The weights in what torch.load gave: a state_dict, ``{"weights": ...}``, or a checkpoint's ``{"model": ...}``."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if isinstance(obj, Mapping) and obj.get("surgery"):
        raise ConfigError(f"--weights: {source} holds a decomposed model ({len(obj['surgery'])} factored layers); "
                          "give weights from before the decompose phase (e.g. a pretrain or admm checkpoint)")
    if isinstance(obj, Mapping) and isinstance(obj.get("weights"), Mapping):
        obj = obj["weights"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError(f"--weights: {source} is not a state_dict (name -> tensor) nor a tdcompress checkpoint")
    return obj


def load_weights(weights: str | None, run: str | None) -> tuple[Mapping[str, Tensor], str]:
    """The dense weights from ``weights`` (a file) or ``run`` (its newest checkpoint with a dense model)."""
    from trainer.checkpoints import files as ckpt

    if weights:
        path = Path(weights)
        if path.is_dir() and (path / "shared.pt").is_file():
            path = path / "shared.pt"
        if not path.is_file():
            raise ConfigError(f"--weights: no file {path}")
        return _state_dict(torch.load(path, map_location="cpu", weights_only=True), str(path)), str(path)
    root = Path(run) / "checkpoints"  # type: ignore[arg-type]
    dirs = ckpt.checkpoint_dirs(root) if root.is_dir() else []
    for path in reversed(dirs):
        if ckpt.checkpoint_problem(path, hash=False) is None:
            model = ckpt.load_shared(path)["model"]
            if not model.get("surgery"):
                return _state_dict(model, str(path)), str(path)
    raise ConfigError(f"--run: no intact checkpoint with a dense (not yet decomposed) model under {root}")


def model_with(cfg: Config, classes: int, state: Mapping[str, Tensor], source: str) -> nn.Module:
    """``cfg.model.name`` with ``classes`` outputs holding ``state`` (a ConfigError naming ``source`` if it does not fit)."""
    from trainer.models import build_model

    model = build_model(cfg.model.name, classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"--weights: {source} does not fit model.name={cfg.model.name} with {classes} classes: "
                          f"{str(e).splitlines()[0]}") from None
    return model


def _global_error(plan: RankPlan, model: nn.Module) -> float:
    """sqrt(sum_l ||W_l - Z_l||^2 / sum_l ||W_l||^2): the model-wide relative error (admm_decomp_err's formula)."""
    modules = dict(model.named_modules())
    sq = [float(modules[p.name].weight.detach().double().square().sum()) for p in plan.layers]
    return math.sqrt(sum(p.error ** 2 * s for p, s in zip(plan.layers, sq)) / max(sum(sq), 1e-30))


def compare_table(uniform: RankPlan, error: RankPlan, model: nn.Module) -> str:
    """One row per layer: ranks and relative error under both allocations; then totals."""
    by_name = error.by_name()
    rows = [("layer", "shape", "format", "uniform ranks", "params", "rel. err", "error ranks", "params", "rel. err")]
    for u in uniform.layers:
        e = by_name[u.name]
        rows.append((u.name, "x".join(map(str, u.shape)), u.fmt, str(u.rank), f"{u.params_after:,}", f"{u.error:.4f}",
                     str(e.rank), f"{e.params_after:,}", f"{e.error:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    for name, p in (("uniform", uniform), ("error", error)):
        lines.append(f"{name:>7}: params {p.dense_params_total:,} -> {p.params_after_total:,} ({p.compression:.2f}x), "
                     f"FLOPs/image {p.dense_flops_total / 1e6:.2f}M -> {p.flops_after_total / 1e6:.2f}M "
                     f"({p.dense_flops_total / max(1, p.flops_after_total):.2f}x); budget {p.budget}: kept "
                     f"{p.kept:.4f}; "
                     f"sum of per-layer ||W-Z||^2/||W||^2 {p.error_sum:.4f}, model-wide ||W-Z||/||W|| "
                     f"{_global_error(p, model):.4f}")
    lines += [f"note: {n}" for n in dict.fromkeys(uniform.notes + error.notes)]
    return "\n".join(lines)


def plan_command(cfg: Config, config_name: str, weights: str | None, run: str | None) -> int:
    """`tdcompress plan`: the driver's plan, or with weights both allocations compared on them."""
    from admm.planning.model_plan import plan_for_model
    from launcher.run.pipeline import make_plan
    from trainer.data import DATASET_SHAPES

    classes, size = DATASET_SHAPES[cfg.data.dataset]
    plan = make_plan(cfg, classes, size)
    if plan is None:
        print(f"{config_name}: no admm or decompose phase, nothing to plan")
        return 0
    c = cfg.compression
    head = (f"{c.format}, keep_ratio {c.keep_ratio} of the {c.budget}, rank_multiple {c.rank_multiple}, owners for "
            f"{cfg.cluster.num_workers} workers; {cfg.model.name} at {size} px")
    if not (weights or run):
        print(f"rank plan ({head}):\n{plan.table()}")
        return 0
    state, source = load_weights(weights, run)
    model = model_with(cfg, classes, state, source)
    shape = (1, 3, size, size)
    try:
        plans = {a: plan_for_model(model, c, cfg.cluster.num_workers, input_shape=shape, allocation=a)
                 for a in ("uniform", "error")}
    except ValueError as e:
        raise ConfigError(str(e) if str(e).startswith("compression") else f"compression: {e}") from None
    # uniform is planned from shapes alone; its errors are measured on the same weights
    modules = dict(model.named_modules())
    uniform = with_errors(plans["uniform"], {p.name: modules[p.name].weight for p in plans["uniform"].layers})
    print(f"rank plans ({head}) on the weights of {source}; this config uses allocation={c.allocation}:\n"
          f"{compare_table(uniform, plans['error'], model)}")
    return 0
