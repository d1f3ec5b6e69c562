"""Z-update wall time of all planned ResNet-50 layers, on one rank and sharded over 2/4/8 owners.

For each format the plan comes from the project's planner
(admm.component.plan_for_model(build_model('resnet50', 1000),
CompressionConfig(format=fmt, keep_ratio=...), world)). Every planned layer's
projection Z = project(W + U, fmt, rank) is timed once (after one untimed
warmup projection), on the GPU when there is one, else on the CPU. The
one-rank total is the sum; for world size w the owner map of the plan for w
(admm.planner.assign_owners, longest-first on projection_cost) is applied to
the measured per-layer times and the largest shard is reported: with one
owner per rank and ranks working in parallel, that shard is the Z-update's
wall time. Also shown: the largest shard if owners were balanced on the
measured times instead of the cost model, and the bound max(total / w,
slowest layer).

The derived shards assume each rank has its own device (GPUs, or CPU ranks
that do not share cores); on one shared CPU the ranks would compete.

Note: AdmmComponent.z_update with decomp_error=True (the default of
AdmmComponent.create) runs a second projection per layer, project(W), for the
logged decomposition error; this benchmark times the Z-update proper.

    PYTHONPATH=. .venv/bin/python bench/zupdate.py                  # svd, tucker2, tt
    PYTHONPATH=. .venv/bin/python bench/zupdate.py --formats svd,tucker2,tt,cp --worlds 2,4,8 --json zupdate.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from admm.component import plan_for_model  # noqa: E402
from admm.config import CompressionConfig  # noqa: E402
from admm.planner import assign_owners  # noqa: E402
from admm.projections import project  # noqa: E402
from bench.common import banner, banner_line, pick_device, time_fn, write_json  # noqa: E402
from trainer.models import build_model  # noqa: E402


def largest_shard(times: list[float], owners: list[int], world: int) -> float:
    loads = [0.0] * world
    for t, o in zip(times, owners):
        loads[o] += t
    return max(loads)


def bench_format(model: torch.nn.Module, fmt: str, keep: float, worlds: list[int], rounds: int, repeats: int,
                 device: torch.device) -> list[dict]:
    """``rounds`` sweeps over all planned layers; one result row per sweep."""
    cc = CompressionConfig(format=fmt, keep_ratio=keep)
    plan = plan_for_model(model, cc, 1)
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(0)
    inputs = []
    for lp in plan.layers:
        w = modules[lp.name].weight.detach().float()
        # A U of the size ADMM's scaled dual reaches: the projection sees a generic dense W + U.
        u = 0.01 * w.std() * torch.randn(w.shape, generator=g)
        inputs.append((w.to(device), u.to(device)))
    owners = {wld: [lp.owner for lp in plan_for_model(model, cc, wld).layers] for wld in worlds}

    def proj(i: int):
        w, u = inputs[i]
        return lambda: project(w + u, fmt, plan.layers[i].rank)

    time_fn(proj(0), 1, 1, device)  # warmup: library init, backend switch, first kernels
    rows = []
    for rnd in range(rounds):
        times = [time_fn(proj(i), repeats, 0, device).median for i in range(len(plan.layers))]
        total = sum(times)
        slowest = max(times)
        shards = {}
        for wld in worlds:
            cost_model = largest_shard(times, owners[wld], wld)
            measured = largest_shard(times, assign_owners(times, wld), wld)
            shards[str(wld)] = {"largest_shard_s": cost_model, "speedup": total / cost_model,
                                "largest_shard_measured_lpt_s": measured,
                                "bound_s": max(total / wld, slowest)}
        rows.append({"format": fmt, "keep_ratio": keep, "round": rnd + 1, "layers": len(plan.layers),
                     "one_rank_total_s": total, "slowest_layer_s": slowest,
                     "slowest_layer": plan.layers[times.index(slowest)].name, "shards": shards,
                     "per_layer_s": {lp.name: t for lp, t in zip(plan.layers, times)},
                     "ranks": {lp.name: list(lp.rank) if isinstance(lp.rank, tuple) else lp.rank
                               for lp in plan.layers}})
    return rows


def print_table(rows: list[dict], worlds: list[int], device: str) -> None:
    cols = "".join(f"  {'world ' + str(w) + ' (speedup)':>20s}" for w in worlds)
    print(f"{'format':8s} {'rnd':>3s} {'layers':>6s} {'1 rank':>9s}{cols}  {'slowest layer':>24s}  device")
    for r in rows:
        shards = "".join(f"  {s['largest_shard_s']:10.3f} s ({s['speedup']:4.1f}x)"
                         for s in (r["shards"][str(w)] for w in worlds))
        slow = f"{r['slowest_layer']} {r['slowest_layer_s']:.3f} s"
        print(f"{r['format']:8s} {r['round']:3d} {r['layers']:6d} {r['one_rank_total_s']:7.3f} s{shards}  "
              f"{slow:>24s}  {device}", flush=True)
    print("largest shard if owners were balanced on the measured times / bound max(total/w, slowest layer):")
    for r in rows:
        alt = "  ".join(f"w{w}: {r['shards'][str(w)]['largest_shard_measured_lpt_s']:.3f} / "
                        f"{r['shards'][str(w)]['bound_s']:.3f} s" for w in worlds)
        print(f"  {r['format']:8s} round {r['round']}: {alt}", flush=True)


def main() -> None:
    device = pick_device()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="svd,tucker2,tt", help="add cp explicitly: slow on CPU (20 ALS sweeps)")
    p.add_argument("--keep", type=float, default=0.5, help="compression.keep_ratio of the plan")
    p.add_argument("--worlds", default="2,4,8", help="world sizes to shard over")
    p.add_argument("--rounds", type=int, default=2, help="sweeps over all layers (one table row each)")
    p.add_argument("--repeats", type=int, default=1, help="timed projections per layer per sweep (median)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    worlds = [int(w) for w in args.worlds.split(",")]
    info = banner(device)
    print(banner_line(info), flush=True)
    torch.manual_seed(0)
    model = build_model("resnet50", 1000)
    rows = []
    for fmt in args.formats.split(","):
        got = bench_format(model, fmt, args.keep, worlds, args.rounds, args.repeats, device)
        rows += got
        totals = [r["one_rank_total_s"] for r in got]
        print(f"{fmt}: {got[0]['layers']} layers, one-rank totals {', '.join(f'{t:.3f}' for t in totals)} s "
              f"(median {statistics.median(totals):.3f} s)", flush=True)
    print()
    print_table(rows, worlds, info["device"])
    if args.json:
        write_json(args.json, {"banner": info, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
