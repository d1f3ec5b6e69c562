"""ADMM step throughput divided by plain step throughput: same DeepSpeed engine, same process.

For each model the project's engine (trainer.core.engine.build_engine, world size 1,
ZeRO 0 unless --zero) trains on one fixed synthetic batch in five timed runs:

    P1 plain -> A admm (AdmmComponent attached: hooks add rho (U - Z), the optimizer's
       ADMM group adds rho W as weight decay) -> P2 plain (detached)
       -> N naive penalty -> P3 plain

A is reported against mean(P1, P2) and N against mean(P2, P3), so drift over
the run shows up as a P1/P2/P3 spread instead of as overhead. "naive" is the
alternative the in-place gradient hook replaces, built here only as the baseline: the
penalty as a Python sum of per-layer rho/2 ||W - Z + U||^2 added to the loss,
using the component's own Z, U and rho. Both variants add the same gradient
rho (W - Z + U) (checked once before timing and printed as `grad check`).

"floor" is the ratio the step would have if the penalty cost no more than its
arithmetic: one in-place add of rho V into a gradient-sized tensor per planned
layer, timed alone (penalty_floor). It bounds what any hook can reach.

No Z-update runs inside a timed window (the interval is an epoch); its cost
is bench/zupdate.py's subject. The Z/U initialisation at attach (one
projection per layer) happens before timing.

    python -m bench.admm_overhead        # device defaults
    python -m bench.admm_overhead --models resnet50,resnet18,resnet32 \
        --batch 256,256,128 --steps 20 --warmup 5 --json admm_overhead.json
"""
from __future__ import annotations

import argparse
import gc
import statistics
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from admm.admm_component import AdmmComponent
from admm.config import AdmmConfig, CompressionConfig
from bench.common import (
    Timing,
    add_json_option,
    add_malloc_option,
    apply_malloc_option,
    classes_for,
    image_size,
    init_process_group,
    peak_memory_gib,
    pick_device,
    start,
    synthetic_batch,
    time_fn,
)
from trainer.config import EngineConfig, OptimConfig
from trainer.core.engine import build_engine, prepare_deepspeed_env, resolve_precision
from trainer.models import build_model


class NaivePenalty:
    """The baseline: rho/2 * sum_l ||W_l - Z_l + U_l||^2 as a Python sum in the loss graph."""

    def __init__(self, comp: AdmmComponent, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        self.rho = comp.state.rho
        self.terms = [(modules[name].weight, s.z, s.u) for name, s in comp.state.layers.items()]

    def __call__(self) -> torch.Tensor:
        total = 0.0
        for w, z, u in self.terms:
            total = total + (w - z + u).square().sum()
        return 0.5 * self.rho * total


def step_fn(engine, x: torch.Tensor, y: torch.Tensor,
            penalty: Callable[[], torch.Tensor] | None = None) -> Callable[[], None]:
    """One optimizer step as the train loop does it: forward + loss -> engine.backward -> engine.step."""

    def step() -> None:
        loss = F.cross_entropy(engine(x), y)
        if penalty is not None:
            loss = loss + penalty()
        engine.backward(loss)
        engine.step()

    return step


def grad_check(comp: AdmmComponent, model: nn.Module, optimizer) -> float:
    """Max relative difference between the project's and the naive penalty's gradient (hooks attached).

    The loss is 0 * sum(W), so the hook's gradient is its penalty term alone: rho V, to which
    the optimizer's ADMM group adds rho W as weight decay (checked here by adding it).
    The hooks act on ``.grad`` after accumulation, so this runs ``backward``, not ``autograd.grad``.
    """
    naive = NaivePenalty(comp, model)
    weights = [w for w, _, _ in naive.terms]
    for w in weights:
        w.grad = None
    sum((w * 0).sum() for w in weights).backward()
    hooked = [w.grad + comp.state.rho * w.detach() for w in weights]
    comp.detach(keep_hooks=True)
    plain = torch.autograd.grad(naive(), weights)
    for w in weights:
        w.grad = None
    comp.attach(model, optimizer=optimizer)
    num = max(float((a - b).abs().max()) for a, b in zip(hooked, plain))
    den = max(float(b.abs().max()) for b in plain)
    return num / max(den, 1e-30)


def penalty_floor(comp: AdmmComponent) -> Callable[[], None]:
    """The hook's arithmetic alone: one in-place ``g += c V`` per owned layer, into scratch gradients.

    Any penalty applied as an op of its own reads V and the gradient and writes the
    gradient once, so this is the least it can cost; the hook adds only Python calls.
    """
    vs = [s.v for s in comp.state.layers.values()]
    grads = [torch.zeros_like(v) for v in vs]

    def add() -> None:
        for g, v in zip(grads, vs):
            g.add_(v, alpha=comp.state.rho)

    return add


def interleaved(plain: Callable[[], None], naive: Callable[[], None], comp: AdmmComponent, model: nn.Module,
                optimizer, steps: int, warmup: int, device: torch.device) -> dict[str, Timing]:
    """Plain, ADMM and naive steps taken in turn (order rotated every round), each timed alone.

    Drift slower than one step (other jobs on a shared machine, clocks) hits all three
    alike, so the ratios of the medians are steadier than block A/B/A on a busy host.
    Switching the penalty on/off between steps is outside the timed calls.
    """
    fns = {"plain": plain, "admm": plain, "naive": naive}  # "admm" is the plain step with the hooks attached
    out = {k: Timing() for k in fns}
    kinds = list(fns)
    for i in range(warmup + steps):
        for kind in kinds[i % 3:] + kinds[:i % 3]:
            if kind == "admm":
                comp.attach(model, optimizer=optimizer)
            t = time_fn(fns[kind], 1, 0, device).times[0]
            if kind == "admm":
                comp.detach(keep_hooks=True)
            if i >= warmup:
                out[kind].times.append(t)
    return out


# long: one interleaved timing cycle; split, its parts would share the engine, batches and timers
def bench_model(name: str, batch: int, steps: int, warmup: int, rounds: int, device: torch.device, zero: int,
                fmt: str, size: int | None, inter: bool) -> list[dict]:
    """``rounds`` cycles of P1 A P2 N P3 on one engine; one result row per cycle."""
    optim, engine_cfg = OptimConfig(), EngineConfig(zero_stage=zero)
    precision = resolve_precision(engine_cfg, device)
    size = size or image_size(name, device)
    classes = classes_for(name)
    x, y = synthetic_batch(batch, size, classes, device, precision.channels_last)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(name, classes).to(device)
    # lr 0.01 (not the default 0.1): 100+ steps on one random batch must not diverge; the step's cost
    # does not depend on it.
    comp = AdmmComponent.create(model, CompressionConfig(format=fmt), AdmmConfig(), rank=0, world=1, grad_accum=1,
                                log=lambda metrics, step: None)
    engine = build_engine(model, optim, engine_cfg, batch_size=batch, lr=0.01, total_steps=10**6,
                          steps_per_epoch=1000, world_size=1, precision=precision,
                          extra_groups=comp.prepare(model, optim.weight_decay))
    # The hooks stay registered (as in training, before the engine's own); "plain" runs with
    # them switched off, which costs one Python call per planned layer that returns at once.

    plain = step_fn(engine, x, y)
    base = {"model": name, "batch": batch, "image": size, "zero": zero, "format": fmt,
            "planned_layers": len(comp.plan.layers), "bf16": precision.bf16,
            "channels_last": precision.channels_last, "steps": steps, "warmup": warmup}
    rows = []
    for rnd in range(rounds):
        p1 = time_fn(plain, steps, warmup, device)
        # first time: Z = Proj(W), U = 0 per planned layer, outside the timed window
        comp.attach(engine.module, optimizer=engine.optimizer)
        if rnd == 0:
            # Under ZeRO 1/2 a plain backward would feed DeepSpeed's reduce hooks: checked at ZeRO 0 only.
            check = grad_check(comp, engine.module, engine.optimizer) if zero == 0 else float("nan")
            naive = step_fn(engine, x, y, NaivePenalty(comp, engine.module))  # needs Z, U: built after attach
            floor = time_fn(penalty_floor(comp), steps, warmup, device)
        a = time_fn(plain, steps, warmup, device)  # the same step; now with the penalty rho (W - Z + U)
        comp.detach(keep_hooks=True)
        p2 = time_fn(plain, steps, warmup, device)
        n = time_fn(naive, steps, warmup, device)
        p3 = time_fn(plain, steps, warmup, device)
        il = interleaved(plain, naive, comp, engine.module, engine.optimizer, steps, warmup, device) if inter else None
        plains = [p1.median, p2.median, p3.median]
        base_a = statistics.mean(plains[:2])
        base_n = statistics.mean(plains[1:])
        rows.append({**base, "round": rnd + 1,
                     "plain_img_s": [batch / t for t in plains],
                     "plain_spread": (max(plains) - min(plains)) / min(plains),
                     "admm_img_s": batch / a.median, "admm_ratio": base_a / a.median,
                     "naive_img_s": batch / n.median, "naive_ratio": base_n / n.median,
                     "grad_check_rel_diff": check,
                     # ADMM/plain if the penalty cost exactly its arithmetic (penalty_floor), vs mean(P1, P2)
                     "floor_ratio": base_a / (base_a + floor.median), "floor_ms": 1e3 * floor.median,
                     "timings_s": {"plain1": p1.to_json(), "admm": a.to_json(), "plain2": p2.to_json(),
                                   "naive": n.to_json(), "plain3": p3.to_json()}})
        if il is not None:
            rows[-1].update({"interleaved_admm_ratio": il["plain"].median / il["admm"].median,
                             "interleaved_naive_ratio": il["plain"].median / il["naive"].median,
                             "interleaved_plain_img_s": batch / il["plain"].median})
            rows[-1]["timings_s"].update({f"interleaved_{k}": v.to_json() for k, v in il.items()})
        rows[-1]["peak_gib"] = peak_memory_gib(device)  # training with the penalty: Z and U live beside W
    del engine, model, comp
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict], device: str) -> None:
    print(f"{'model':9s} {'rnd':>3s} {'batch':>5s} {'px':>4s}  {'plain img/s P1/P2/P3':>22s} {'spread':>6s}  "
          f"{'admm img/s':>10s} {'(ratio)':>7s}  {'naive img/s':>11s} {'(ratio)':>7s}  "
          f"{'interleaved admm/naive':>22s} {'floor':>6s}  device")
    for r in rows:
        p = "/".join(f"{v:,.1f}" for v in r["plain_img_s"])
        il = (f"{r['interleaved_admm_ratio']:.3f} / {r['interleaved_naive_ratio']:.3f}"
              if "interleaved_admm_ratio" in r else "-")
        print(f"{r['model']:9s} {r['round']:3d} {r['batch']:5d} {r['image']:4d}  {p:>22s} "
              f"{100 * r['plain_spread']:5.1f}%  {r['admm_img_s']:10,.1f} {r['admm_ratio']:7.3f}  "
              f"{r['naive_img_s']:11,.1f} {r['naive_ratio']:7.3f}  {il:>22s} {r['floor_ratio']:6.3f}  {device}",
              flush=True)


def main() -> None:
    device = pick_device()
    gpu = device.type == "cuda"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,resnet18,resnet32" if gpu else "resnet32,resnet18")
    p.add_argument("--batch", default="256,256,128" if gpu else "32,16", help="one per model")
    p.add_argument("--image", type=int, default=None,
                   help="input size in px (default: 224 for resnet18/50 on a GPU, 64 on CPU; 32 for CIFAR)")
    p.add_argument("--steps", type=int, default=20 if gpu else 10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5 if gpu else 3, help="untimed steps before each run")
    p.add_argument("--rounds", type=int, default=1 if gpu else 2,
                   help="repeat the P1 A P2 N P3 cycle this many times (one table row each)")
    p.add_argument("--no-interleaved", action="store_true",
                   help="skip the interleaved run (plain/admm/naive steps in turn) after each cycle")
    p.add_argument("--zero", type=int, default=0, choices=(0, 1, 2))
    p.add_argument("--format", default="tucker2", help="compression.format of the plan (sets which layers "
                   "get hooks; the hook costs the same for every format)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_malloc_option(p)
    add_json_option(p)
    args = p.parse_args()
    apply_malloc_option(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    if len(batches) != len(models):
        p.error(f"--batch needs one value per model ({len(models)}), got {len(batches)}")

    prepare_deepspeed_env()
    init_process_group(device)
    report = start("admm_overhead", device, args)
    info, rows = report.info, report.results
    for m, b in zip(models, batches):
        got = bench_model(m, b, args.steps, args.warmup, args.rounds, device, args.zero, args.format, args.image,
                          not args.no_interleaved)
        for r in got:
            report.add(r)
        r = got[0]
        print(f"{m}: {r['planned_layers']} planned layers ({args.format}), bf16 {r['bf16']}, channels_last "
              f"{r['channels_last']}, ZeRO {args.zero}; grad check (hook vs naive) rel diff "
              f"{r['grad_check_rel_diff']:.1e}", flush=True)
    print()
    print_table(rows, info["device"])
    for m in models:
        mine = [r for r in rows if r["model"] == m]
        if len(mine) > 1:
            for key in ("admm_ratio", "naive_ratio", "interleaved_admm_ratio", "interleaved_naive_ratio",
                        "floor_ratio"):
                vals = [r[key] for r in mine if key in r]
                if not vals:
                    continue
                print(f"{m}: {key} median {statistics.median(vals):.3f} over {len(vals)} rounds "
                      f"(min {min(vals):.3f}, max {max(vals):.3f})", flush=True)
    report.finish()


if __name__ == "__main__":
    main()
