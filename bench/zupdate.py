"""Z-update wall time of all planned ResNet-50 layers, on one rank and sharded over 2/4/8 owners.

For each format the plan comes from the project's planner
(admm.planning.model_plan.plan_for_model(build_model('resnet50', 1000),
CompressionConfig(format=fmt, keep_ratio=...), world)). Every planned layer's
projection Z = project(W + U, fmt, rank) is timed once (after one untimed
warmup projection), on the GPU when there is one, else on the CPU. The
one-rank total is the sum; for world size w the owner map of the plan for w
(admm.planning.planner.assign_owners, longest-first on projection_cost) is applied to
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

A format may name a method: ``tucker2:hosvd`` (no HOOI sweep), ``tucker2:warm`` /
``cp:warm`` (started from the factors of the projection of W, as every
Z-update after the first is, admm.formats.warm); a plain ``tucker2`` / ``cp`` is the cold
first Z-update (HOSVD + HOOI_SWEEPS sweeps / svd init + CP_N_ITER ALS sweeps).

``--dedupe``: time each distinct (shape, format, rank) once per sweep and give that time to
every layer sharing it (ResNet-50's 48 planned layers have 16 distinct shapes; the cost of a
projection depends on shape and rank, the values of W change it little, and the iterative
ones run a fixed number of sweeps at tol 0). The totals and shards are still over all 48
layers; it makes slow formats (cp: 20 ALS sweeps) measurable on a loaded CPU in minutes.

``--hooi``: per planned tucker2 layer, error ||W - Z|| / ||W|| and time of HOSVD,
cold HOOI (``--cold-sweeps``, 100), and warm HOOI with 1, 2, 3 sweeps after
W' = W + ``--step`` ||W|| (Gaussian direction), started from the cold factors of
W; and the same HOOI sweep through tensorly's partial_tucker (init = the warm
factors) for the time ratio. ``--cp-idempotence``: ||Proj(Proj(W)) - Proj(W)|| /
||Proj(W)|| of cp, cold and warm, on Gaussian 32x32x9, 64x64x9, 512x512x9 kernels
at the planner's keep-0.5 ranks.

    python -m bench.zupdate                  # svd, tucker2, tt
    python -m bench.zupdate --formats svd,tucker2,tt,cp --worlds 2,4,8 --json zupdate.json
    python -m bench.zupdate --formats tucker2:hosvd,tucker2,tucker2:warm,cp:warm
    python -m bench.zupdate --hooi --cp-idempotence --formats ''
    python -m bench.zupdate --formats svd,tucker2,tucker2:warm,tt,cp:warm --dedupe --rounds 1
"""
from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable

import torch

from admm.config import CompressionConfig
from admm.formats.projections import max_rank, project
from admm.formats.warm import ProjectionOptions, project_warm
from admm.planning.model_plan import plan_for_model
from admm.planning.owners import assign_owners
from bench.common import add_json_option, classes_for, pick_device, start, time_fn
from trainer.models import build_model


def largest_shard(times: list[float], owners: list[int], world: int) -> float:
    loads = [0.0] * world
    for t, o in zip(times, owners):
        loads[o] += t
    return max(loads)


def _key(lp: Any) -> tuple:
    return (tuple(lp.shape), lp.fmt, lp.rank)


def bench_format(model: torch.nn.Module, fmt: str, keep: float, worlds: list[int], rounds: int, repeats: int,
                 device: torch.device, dedupe: bool = False) -> list[dict]:
    """``rounds`` sweeps over all planned layers; one result row per sweep. ``fmt``: format[:method].

    ``dedupe``: time the first layer of each distinct (shape, format, rank) only; the others take its time.
    """
    label, (fmt, _, method) = fmt, fmt.partition(":")
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
        rank, lfmt = plan.layers[i].rank, plan.layers[i].fmt  # (1x1 layers of a tucker2 plan are svd)
        if method == "hosvd":
            return lambda: project_warm(w + u, lfmt, rank, None, ProjectionOptions(hooi_sweeps=0))
        if method == "warm":  # the state a previous Z-update left: the factors of Proj(W)
            state = project_warm(w, lfmt, rank)[1]
            return lambda: project_warm(w + u, lfmt, rank, state)
        return lambda: project(w + u, lfmt, rank)

    time_fn(proj(0), 1, 1, device)  # warmup: library init, backend switch, first kernels
    first = {}  # (shape, fmt, rank) -> index of the first layer with it
    for i, lp in enumerate(plan.layers):
        first.setdefault(_key(lp), i)
    timed = sorted(first.values()) if dedupe else list(range(len(plan.layers)))
    rows = []
    for rnd in range(rounds):
        measured = {i: time_fn(proj(i), repeats, 0, device).median for i in timed}
        times = [measured[first[_key(lp)]] if dedupe else measured[i] for i, lp in enumerate(plan.layers)]
        total = sum(times)
        slowest = max(times)
        shards = {}
        for wld in worlds:
            cost_model = largest_shard(times, owners[wld], wld)
            measured = largest_shard(times, assign_owners(times, wld), wld)
            shards[str(wld)] = {"largest_shard_s": cost_model, "speedup": total / cost_model,
                                "largest_shard_measured_lpt_s": measured,
                                "bound_s": max(total / wld, slowest)}
        rows.append({"format": label, "keep_ratio": keep, "round": rnd + 1, "layers": len(plan.layers),
                     "timed_layers": len(timed),
                     "one_rank_total_s": total, "slowest_layer_s": slowest,
                     "slowest_layer": plan.layers[times.index(slowest)].name, "shards": shards,
                     "per_layer_s": {lp.name: t for lp, t in zip(plan.layers, times)},
                     "ranks": {lp.name: list(lp.rank) if isinstance(lp.rank, tuple) else lp.rank
                               for lp in plan.layers}})
    return rows


def _rel(w: torch.Tensor, z: torch.Tensor) -> float:
    return float((w - z).norm() / w.norm())


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Run ``fn`` once, synchronised; return (seconds, its result)."""
    out = []
    t = time_fn(lambda: out.append(fn()), 1, 0, device)
    return t.median, out[0]


def _tensorly_hooi(w2: torch.Tensor, rank: tuple[int, int], prev: dict, sweeps: int) -> torch.Tensor:
    """The same warm HOOI through tensorly's partial_tucker (init = core and the previous factors)."""
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    from admm.formats.reshape import to_3way

    w3 = to_3way(w2)
    u_out, u_in = prev["u_out"], prev["u_in"]
    core = torch.einsum("ois,or,ip->rps", w3, u_out, u_in)
    with tl.backend_context("pytorch"):
        (c, f), _ = partial_tucker(w3, rank=list(rank), modes=[0, 1], n_iter_max=sweeps,
                                   init=(core, [u_out, u_in]), tol=0)
        return tl.tenalg.multi_mode_dot(c, f, modes=[0, 1]).reshape(w2.shape)


def _hooi_layer(w2: torch.Tensor, rank: tuple[int, int], prev: dict, cold_sweeps: int,
                device: torch.device) -> dict[str, tuple[float, float]]:
    """method -> (relative error, seconds) on one layer's W'."""
    def tucker(sweeps: int, warm: dict | None) -> torch.Tensor:
        return project_warm(w2, "tucker2", rank, warm, ProjectionOptions(hooi_sweeps=sweeps))[0]

    runs = {"hosvd": lambda: tucker(0, None), f"cold{cold_sweeps}": lambda: tucker(cold_sweeps, None),
            "warm1": lambda: tucker(1, prev), "warm2": lambda: tucker(2, prev), "warm3": lambda: tucker(3, prev),
            "tensorly_warm1": lambda: _tensorly_hooi(w2, rank, prev, 1)}
    out = {}
    for m, fn in runs.items():
        secs, z = _timed(fn, device)
        out[m] = (_rel(w2, z), secs)
    return out


def bench_hooi(model: torch.nn.Module, keep: float, cold_sweeps: int, step: float, device: torch.device,
               max_layers: int = 0) -> dict:
    """HOSVD vs cold vs warm HOOI on the planned tucker2 layers (``max_layers`` > 0: that many, evenly
    spaced); errors summed as squares over layers."""
    plan = plan_for_model(model, CompressionConfig(format="tucker2", keep_ratio=keep), 1)
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(0)
    sq: dict[str, float] = {}
    secs: dict[str, float] = {}
    worst: dict[str, float] = {}
    w_sq, layers = 0.0, 0
    cold = f"cold{cold_sweeps}"
    chosen = [lp for lp in plan.layers if lp.fmt == "tucker2"]  # 1x1 layers may be planned as svd
    if 0 < max_layers < len(chosen):
        chosen = [chosen[round(i * (len(chosen) - 1) / (max_layers - 1))] for i in range(max_layers)] \
            if max_layers > 1 else chosen[:1]
    for lp in chosen:
        layers += 1
        w = modules[lp.name].weight.detach().float().to(device)
        _, prev = project_warm(w, "tucker2", lp.rank, None, ProjectionOptions(hooi_sweeps=cold_sweeps))
        noise = torch.randn(w.shape, generator=g).to(device)
        w2 = w + step * w.norm() * noise / noise.norm()  # the drift between two Z-updates
        res = _hooi_layer(w2, lp.rank, prev, cold_sweeps, device)
        print(f"  {lp.name} {tuple(w.shape)} ranks {lp.rank}: " + ", ".join(
            f"{m} {e:.5f} {t:.3f}s" for m, (e, t) in res.items()), flush=True)
        n_sq = float(w2.square().sum())
        w_sq += n_sq
        for m, (err, t) in res.items():
            sq[m] = sq.get(m, 0.0) + err ** 2 * n_sq
            secs[m] = secs.get(m, 0.0) + t
            worst[m] = max(worst.get(m, -1.0), err / res[cold][0] - 1)
    return {"layers": layers, "step": step, "cold_sweeps": cold_sweeps,
            "error": {m: (v / w_sq) ** 0.5 for m, v in sq.items()}, "seconds": secs,
            "worst_layer_excess_over_cold": worst}


def print_hooi(r: dict, device: str) -> None:
    cold = f"cold{r['cold_sweeps']}"
    print(f"tucker2 on {r['layers']} planned ResNet-50 layers, W' = W + {r['step']:g} ||W|| noise, {device}:")
    print(f"  {'method':15s} {'error':>9s} {'vs cold':>9s} {'worst layer':>12s} {'time s':>8s} {'vs hosvd':>9s}")
    for m, e in r["error"].items():
        print(f"  {m:15s} {e:9.5f} {e / r['error'][cold]:9.5f} {r['worst_layer_excess_over_cold'][m]:+12.2e} "
              f"{r['seconds'][m]:8.3f} {r['seconds'][m] / r['seconds']['hosvd']:9.2f}", flush=True)


def bench_cp_idempotence(device: torch.device, big: bool) -> list[dict]:
    """||P(P(W)) - P(W)|| / ||P(W)|| of cp, cold (svd init, 20 and 100 sweeps) and warm (its own factors, 1 sweep)."""
    from admm.formats.cp_als import cp_reconstruct
    from admm.formats.projections import cp_factors

    rows = []
    shapes = [(32, 32, 3, 3), (64, 64, 3, 3)] + ([(512, 512, 3, 3)] if big else [])
    for shape in shapes:
        cc = CompressionConfig(format="cp", keep_ratio=0.5, exclude=[], min_channels=1)
        conv = torch.nn.Conv2d(shape[1], shape[0], 3, bias=False)
        rank = plan_for_model(torch.nn.Sequential(conv), cc, 1).layers[0].rank
        assert rank < max_rank(shape, "cp")
        w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
        for sweeps in ([20, 100] if shape[0] < 512 else [5]):
            seconds, (a, b, c) = _timed(lambda n=sweeps: cp_factors(w, rank, n), device)  # noqa: B023
            z = cp_reconstruct(a, b, c).reshape(shape)
            z_cold = project(z, "cp", rank) if sweeps == 20 else \
                cp_reconstruct(*cp_factors(z, rank, sweeps)).reshape(shape)
            z_warm = cp_reconstruct(*cp_factors(z, rank, 1, init=(a, b, c))).reshape(shape)
            rows.append({"shape": [shape[0], shape[1], 9], "rank": rank, "sweeps": sweeps,
                         "error": _rel(w, z), "seconds": seconds,
                         "idempotence_cold": _rel(z, z_cold), "idempotence_warm": _rel(z, z_warm)})
            r = rows[-1]
            print(f"cp {shape[0]}x{shape[1]}x9 R={rank} sweeps={sweeps}: error {r['error']:.4f} in "
                  f"{r['seconds']:.2f} s; idempotence cold {r['idempotence_cold']:.2e}, "
                  f"warm (1 sweep) {r['idempotence_warm']:.2e}", flush=True)
    return rows


def print_table(rows: list[dict], worlds: list[int], device: str) -> None:
    cols = "".join(f"  {'world ' + str(w) + ' (speedup)':>20s}" for w in worlds)
    print(f"{'format':13s} {'rnd':>3s} {'layers':>6s} {'1 rank':>9s}{cols}  {'slowest layer':>24s}  device")
    for r in rows:
        shards = "".join(f"  {s['largest_shard_s']:10.3f} s ({s['speedup']:4.1f}x)"
                         for s in (r["shards"][str(w)] for w in worlds))
        slow = f"{r['slowest_layer']} {r['slowest_layer_s']:.3f} s"
        print(f"{r['format']:13s} {r['round']:3d} {r['layers']:6d} {r['one_rank_total_s']:7.3f} s{shards}  "
              f"{slow:>24s}  {device}", flush=True)
    print("largest shard if owners were balanced on the measured times / bound max(total/w, slowest layer):")
    for r in rows:
        alt = "  ".join(f"w{w}: {r['shards'][str(w)]['largest_shard_measured_lpt_s']:.3f} / "
                        f"{r['shards'][str(w)]['bound_s']:.3f} s" for w in worlds)
        print(f"  {r['format']:13s} round {r['round']}: {alt}", flush=True)


def main() -> None:
    device = pick_device()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="svd,tucker2,tt", help="add cp explicitly: slow on CPU (20 ALS sweeps)")
    p.add_argument("--keep", type=float, default=0.5, help="compression.keep_ratio of the plan")
    p.add_argument("--worlds", default="2,4,8", help="world sizes to shard over")
    p.add_argument("--rounds", type=int, default=2, help="sweeps over all layers (one table row each)")
    p.add_argument("--repeats", type=int, default=1, help="timed projections per layer per sweep (median)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_json_option(p)
    p.add_argument("--model", default="resnet50", help="the model whose planned layers are projected (ImageNet "
                   "classes for resnet18/50, CIFAR-10 for the rest)")
    p.add_argument("--dedupe", action="store_true",
                   help="time each distinct (shape, format, rank) once; layers sharing it take its time")
    p.add_argument("--hooi", action="store_true", help="HOSVD vs cold vs warm HOOI on the tucker2 plan")
    p.add_argument("--cold-sweeps", type=int, default=100, help="--hooi: sweeps of the cold HOOI")
    p.add_argument("--max-layers", type=int, default=0, help="--hooi: that many evenly spaced layers (0: all)")
    p.add_argument("--step", type=float, default=1e-3, help="--hooi: weight change ||W' - W|| / ||W||")
    p.add_argument("--cp-idempotence", action="store_true", help="cold vs warm cp idempotence error")
    p.add_argument("--cp-big", action="store_true", help="--cp-idempotence: add 512x512x9 (minutes on CPU)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    worlds = [int(w) for w in args.worlds.split(",")]
    report = start("zupdate", device, args)
    info = report.info
    torch.manual_seed(0)
    model = build_model(args.model, classes_for(args.model))
    extra: dict = {}
    if args.cp_idempotence:
        extra["cp_idempotence"] = bench_cp_idempotence(device, args.cp_big)
    if args.hooi:
        extra["hooi"] = bench_hooi(model, args.keep, args.cold_sweeps, args.step, device, args.max_layers)
        print_hooi(extra["hooi"], info["device"])
    rows = []
    for fmt in filter(None, args.formats.split(",")):
        got = bench_format(model, fmt, args.keep, worlds, args.rounds, args.repeats, device, args.dedupe)
        for r in got:
            report.add(r)
        rows += got
        totals = [r["one_rank_total_s"] for r in got]
        print(f"{fmt}: {got[0]['layers']} layers ({got[0]['timed_layers']} timed), one-rank totals {', '.join(f'{t:.3f}' for t in totals)} s "
              f"(median {statistics.median(totals):.3f} s)", flush=True)
    if rows:
        print()
        print_table(rows, worlds, info["device"])
        base = [r["one_rank_total_s"] for r in rows if r["format"] == "svd"]
        if base:  # same process, same host state: the ratio is the figure that survives a loaded host
            ref = statistics.median(base)
            print("one-rank total / svd's (medians over rounds): " + ", ".join(
                f"{f} {statistics.median(r['one_rank_total_s'] for r in rows if r['format'] == f) / ref:.2f}x"
                for f in dict.fromkeys(r["format"] for r in rows)), flush=True)
    report.finish(**extra)


if __name__ == "__main__":
    main()
