"""A latency-budget plan (compression.budget=latency) on ResNet-50: predicted vs measured, same process.

Times (or reads from the cache) every planned layer dense and at each candidate rank at
the target's batch, plans ranks for ``--target`` x the dense model's latency (the same
``trainer.export.latency_table`` + ``admm.planning.latency_budget`` as ``tdcompress plan``), then times
the dense model and the model decomposed by the plan end to end, one after the other.
Prints the predicted and the measured fraction of the dense latency, and the device.

    python -m bench.latency_budget                      # ResNet-50 svd, target 0.5, batch 32, eager
    python -m bench.latency_budget --format tucker2 --target 0.6 --cache /tmp/lat.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from admm.config import CompressionConfig, LatencyTarget
from admm.planning.model_plan import plan_for_model
from bench.common import add_malloc_option, apply_malloc_option, banner, banner_line
from trainer.export.latency_table import LatencyCache, measure_costs, measure_planned
from trainer.models import build_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--format", default="svd")
    p.add_argument("--target", type=float, default=0.5, help="fraction of the dense model's latency")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--runtime", default="eager")
    p.add_argument("--points", type=int, default=16, help="candidate ranks timed per layer")
    p.add_argument("--rank-multiple", type=int, default=16)
    p.add_argument("--allocation", default="uniform", help="uniform, or error (on the untrained weights)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cache", default=None, help="latency cache file (default: trainer.export.latency_table's)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    add_malloc_option(p)
    args = p.parse_args(argv)
    device = torch.device("cpu")
    apply_malloc_option(args, device)
    info = banner(device)
    print(banner_line(info))
    cfg = CompressionConfig(format=args.format, rank_multiple=args.rank_multiple, allocation=args.allocation,
                            budget="latency", latency=LatencyTarget(target=args.target, batch=args.batch,
                                                                    runtime=args.runtime, points=args.points))
    torch.manual_seed(0)
    model = build_model(args.model, args.classes).eval()
    shape = (1, 3, args.size, args.size)
    cache = LatencyCache.open(args.cache)
    start = time.perf_counter()
    costs = measure_costs(model, cfg, shape, cache, repeats=args.repeats, say=print)
    measure_s = time.perf_counter() - start
    try:
        plan = plan_for_model(model, cfg, 1, input_shape=shape, latency=costs)
    except ValueError as e:  # an unreachable target is a finding about this device, said in one line
        print(f"{args.model} {args.format} batch {args.batch} {args.runtime}: {e} "
              f"({cache.measured} timings measured in {measure_s:.0f} s)")
        return 2
    print(plan.table())
    dense_ms, planned_ms = measure_planned(model, plan, cfg, shape, repeats=max(args.repeats, 5))
    out = {**info, "model": args.model, "format": args.format, "target": args.target, "batch": args.batch,
           "runtime": args.runtime, "allocation": args.allocation, "points": args.points,
           "measured_timings": cache.measured, "measure_s": round(measure_s, 1),
           "table_dense_ms": costs.dense_model_ms, "predicted_ms": plan.latency_after_total,
           "predicted_fraction": plan.kept, "measured_dense_ms": dense_ms, "measured_planned_ms": planned_ms,
           "measured_fraction": planned_ms / dense_ms, "flops_ratio": plan.dense_flops_total / plan.flops_after_total,
           "params_ratio": plan.compression}
    print(f"{args.model} {args.format} target {args.target} of dense, batch {args.batch}, {args.runtime}: predicted "
          f"{plan.latency_after_total:.1f} ms = {plan.kept:.3f} of the table's dense {costs.dense_model_ms:.1f} ms; "
          f"measured end to end {planned_ms:.1f} ms = {planned_ms / dense_ms:.3f} of dense {dense_ms:.1f} ms "
          f"({dense_ms / planned_ms:.2f}x); FLOPs {out['flops_ratio']:.2f}x fewer, params {plan.compression:.2f}x "
          f"fewer; {cache.measured} timings measured in {measure_s:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
