"""Direct decomposition of a trained dense model (no ADMM): weight error and top-1, uniform vs error allocation.

For each format and target compression the same parameter budget is planned
twice -- ``compression.allocation=uniform`` (one keep fraction for every layer)
and ``error`` (admm.planning.allocate: ranks that minimise the summed relative
projection error of these weights) -- the model is decomposed (admm.nn.surgery,
the decompose phase's code) and evaluated at once, without fine-tuning:

    relative weight error, measured from the factored layers (to_dense_weight):
        sum_l ||W_l - W'_l||^2 / ||W_l||^2  (the allocation's objective)  and
        sqrt(sum_l ||W_l - W'_l||^2 / sum_l ||W_l||^2)  (model-wide)
    top-1 on the eval split right after decomposition

    TDC_DATA_ROOT=../shared/data/cifar10 python -m bench.decompose_quality \
        --checkpoint runs/<exp>/<run>/checkpoints/ckpt-00000N [--formats tucker2,svd] [--ratios 2,3]

``--checkpoint``: a checkpoint directory, its shared.pt, or a state_dict file with
dense weights (e.g. the pretrain phase's checkpoint). Prints one row per
(format, ratio, allocation) and the device; ``--json`` writes the rows.
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from torch import nn

from admm.config import CompressionConfig
from admm.nn.surgery import decompose_model
from admm.planning.model_plan import plan_for_model
from admm.planning.planner import RankPlan, with_errors
from bench.common import add_json_option, device_name, pick_device, start
from launcher.plan import load_weights
from trainer.core.engine import Precision
from trainer.core.loop import evaluate
from trainer.data import load_datasets, make_loader
from trainer.models import build_model


def measured_errors(model: nn.Module, dense: dict[str, torch.Tensor], plan: RankPlan) -> tuple[float, float]:
    """(sum of per-layer relative squared errors, model-wide relative error) of the factored layers' weights."""
    modules = dict(model.named_modules())
    rel_sq, diff_sq, w_sq = 0.0, 0.0, 0.0
    for p in plan.layers:
        w = dense[p.name].double()
        d = float((modules[p.name].to_dense_weight().detach().double().reshape(w.shape) - w).square().sum())
        s = float(w.square().sum())
        rel_sq, diff_sq, w_sq = rel_sq + d / s, diff_sq + d, w_sq + s
    return rel_sq, math.sqrt(diff_sq / w_sq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir, shared.pt or state_dict with dense weights")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--dataset", default="packed")
    ap.add_argument("--data-root", default=None, help="default: $TDC_DATA_ROOT")
    ap.add_argument("--formats", default="tucker2,svd")
    ap.add_argument("--ratios", default="2,3", help="target compression of the conv/linear parameters")
    ap.add_argument("--min-rank-ratio", type=float, default=0.0, help="compression.min_rank_ratio of the error plan")
    ap.add_argument("--limit", type=int, default=0, help="evaluate on this many images (0 = the whole eval split)")
    add_json_option(ap)
    args = ap.parse_args()

    device = pick_device()
    report = start("decompose_quality", device, args)
    state, source = load_weights(args.checkpoint, None)
    sets = load_datasets(args.dataset, args.data_root, augment=False, eval_subset=args.limit)
    # Decode the eval split once; every model below sees the same tensors.
    batches = [(x, y) for x, y in make_loader(sets.eval, 500, rank=0, world_size=1, shuffle=False, seed=0,
                                             drop_last=False)]
    base = build_model(args.model, sets.num_classes)
    base.load_state_dict(state)
    base.to(device).eval()
    size = sets.image_size
    precision = Precision(device.type == "cuda", False)
    dense = evaluate(base, batches, device=device, precision=precision)
    n = int(dense["eval_images"])
    print(f"{args.model} from {source}; {device_name(device)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; eval on {n} {args.dataset} images")
    print(f"dense: top1 {dense['top1']:.2f}%")
    header = ("format", "target", "allocation", "params kept", "compression", "sum rel.err^2", "model rel.err",
              "top1", "drop")
    print("  ".join(f"{h:>13}" for h in header))
    weights = {k: v.detach().clone() for k, v in state.items()}
    for fmt in args.formats.split(","):
        for ratio in (float(r) for r in args.ratios.split(",")):
            for alloc in ("uniform", "error"):
                model = copy.deepcopy(base)
                cfg = CompressionConfig(format=fmt, keep_ratio=1 / ratio, allocation=alloc,
                                        min_rank_ratio=args.min_rank_ratio if alloc == "error" else 0.0)
                t0 = time.perf_counter()
                plan = plan_for_model(model, cfg, input_shape=(1, 3, size, size))
                plan_s = time.perf_counter() - t0
                decompose_model(model, plan)
                dense_w = {p.name: weights[f"{p.name}.weight"] for p in plan.layers}
                rel_sq, model_err = measured_errors(model, dense_w, plan)
                est = with_errors(plan, {p.name: dense_w[p.name] for p in plan.layers}).error_sum
                res = evaluate(model, batches, device=device, precision=precision)
                row = {"format": fmt, "ratio": ratio, "allocation": alloc,
                       "params_kept": plan.params_after_total / plan.dense_params_total,
                       "compression": plan.compression, "rel_err_sq_sum": rel_sq, "rel_err_sq_sum_planned": est,
                       "model_rel_err": model_err, "top1": res["top1"], "top1_drop": dense["top1"] - res["top1"],
                       "plan_seconds": plan_s, "ranks": {p.name: p.rank for p in plan.layers}}
                report.add(row)
                print("  ".join(f"{v:>13}" for v in (fmt, f"{ratio:g}x", alloc, f"{row['params_kept']:.4f}",
                                                      f"{plan.compression:.3f}x", f"{rel_sq:.4f}", f"{model_err:.4f}",
                                                      f"{res['top1']:.2f}%", f"{row['top1_drop']:.2f}")),
                      flush=True)
    report.finish(dense_top1=dense["top1"], images=n, source=str(source))


if __name__ == "__main__":
    main()
