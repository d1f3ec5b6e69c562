"""The decompose phase: replace planned layers by factored modules (admm.nn.surgery) and measure what that costs.

The papers' key point is the accuracy right after decomposition: after ADMM the
dense model is already close to low rank, so decomposing loses little, while
decomposing a model trained without ADMM loses a lot. Both accuracies (dense,
decomposed) are logged, with parameters and FLOPs counted two ways: from the
plan's formulas and measured by ``torch.utils.flop_counter`` on rank 0.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from admm.nn.surgery import decompose_model
from admm.planning.model_plan import plan_for_model
from trainer.context import WorkerContext
from trainer.core.engine import resolve_precision
from trainer.core.loop import evaluate
from trainer.logs import get_logger
from trainer.phases.feature_decompose import calibration_sample, decompose_by_features
from trainer.phases.plan_file import PLAN_FILE, load_plan
from trainer.ranks import TorchComm

logger = get_logger(__name__)


def measured_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs (2 x MACs) of one forward pass per image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(input_shape, device=device))
    model.train(was)
    return int(counter.get_total_flops() // input_shape[0])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def decompose_model_phase(ctx: WorkerContext, index: int, model: nn.Module) -> tuple[nn.Module, dict[str, float]]:
    """Decompose ``model`` in place by the run's rank plan; returns the factored model and metrics."""
    cfg = ctx.cfg
    precision = resolve_precision(cfg.engine, ctx.device)
    tracker = ctx.phase_trackers[index]
    shape = (1, 3, ctx.image_size, ctx.image_size)
    # The ranks the ADMM phase fixed from its starting weights (phase<k>/rank_plan.json), not a new plan from
    # weights ADMM has moved; without an ADMM phase before, a plan from the weights decomposed now.
    admm_dirs = [ctx.run_dir / f"phase{k}" for k in range(index) if cfg.phases[k].kind == "admm"]
    stored = load_plan(admm_dirs[-1] / PLAN_FILE, cfg.compression) if admm_dirs else None
    plan = plan_for_model(model, cfg.compression, ctx.world, input_shape=shape, fixed=stored, comm=TorchComm(ctx.device))

    dense = evaluate(model, ctx.eval_loader, device=ctx.device, precision=precision)
    dense_params, dense_flops = count_params(model), measured_flops(model, shape)
    fit: dict[str, float] = {}
    if cfg.decompose.fit == "features":  # each layer fitted to its outputs on real training images
        batches = calibration_sample(ctx.train_loader, cfg.decompose.calibration_batches * cfg.optim.grad_accum)
        model, fit = decompose_by_features(model, plan, batches, ctx.device)
    else:
        t0 = time.perf_counter()
        model = decompose_model(model, plan)
        fit = {"fit_seconds": time.perf_counter() - t0}
    after = evaluate(model, ctx.eval_loader, device=ctx.device, precision=precision)
    params, flops = count_params(model), measured_flops(model, shape)
    # before_decompose_*: the model right before decomposition (after ADMM, where there was one); on the parent
    # dense_top1 stays the dense baseline (pretrain or model.init), so one name has one meaning everywhere.
    out = {"before_decompose_top1": dense["top1"], "before_decompose_top5": dense["top5"],
           "decomposed_top1": after["top1"], "decomposed_top5": after["top5"],
           "decompose_top1_drop": dense["top1"] - after["top1"],
           "params_dense": float(dense_params), "params_factored": float(params),
           "compression": dense_params / max(1, params), "flops_dense": float(dense_flops),
           "flops_factored": float(flops), "flops_reduction": dense_flops / max(1, flops),
           "plan_params_after": float(plan.params_after_total), "factored_layers": float(len(plan.layers)), **fit}
    tracker.metrics(out, 0)
    # plan_params_after is on the parent already (the driver logs the plan): once per step is enough.
    ctx.parent.metrics({k: v for k, v in out.items() if k not in ("factored_layers", "plan_params_after")}, 0)
    if ctx.rank == 0:
        tracker.text(plan.table(), "rank_plan.txt")
        formats = "/".join(sorted({p.fmt for p in plan.layers}))
        logger.info(f"[decompose] {len(plan.layers)} layers factored ({formats}, {plan.allocation} ranks): params "
              f"{dense_params:,} -> {params:,} ({out['compression']:.2f}x), FLOPs/image {dense_flops / 1e6:.1f}M -> "
              f"{flops / 1e6:.1f}M ({out['flops_reduction']:.2f}x); top1 {dense['top1']:.2f}% -> "
              f"{after['top1']:.2f}% right after decomposition ({cfg.decompose.fit} fit, "
              f"{out['fit_seconds']:.1f}s)")
    return model, out
