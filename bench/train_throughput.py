"""Training throughput: the project's DeepSpeed step divided by a plain PyTorch loop, same process.

For each model: a plain loop (SGD, bf16 autocast + channels_last on a GPU,
fp32 on CPU) and the project's engine (trainer.core.engine.build_engine with the
config the project uses on that device) run the same synthetic batch; both
are timed A/B/A so drift shows. On a GPU it also reports peak memory per
ZeRO stage 0/1/2. ``--fused 1,0`` times both SGD kernels (torch's fused one,
the project's default, and the per-tensor one), the same on both sides.
No Ray, no MLflow: runs on a bare GPU box.

    python -m bench.train_throughput                # device defaults
    python -m bench.train_throughput --models resnet50 --batch 256 --steps 30 --compile
    python -m bench.train_throughput --models resnet20 --batch 64 --fused 1 --precision fp32,bf16 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import typing

import torch
import torch.nn.functional as F

from bench.common import (
    add_json_option,
    add_malloc_option,
    apply_malloc_option,
    classes_for,
    image_size,
    init_process_group,
    peak_memory_gib,
    start,
    synthetic_batch,
    time_fn,
)
from trainer.config import EngineConfig, OptimConfig
from trainer.core.engine import Precision, build_engine, prepare_deepspeed_env, resolve_precision
from trainer.models import build_model


def plain_step_fn(model, x, y, precision: Precision, fused: bool, lr: float = 0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=fused)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision.bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def engine_step_fn(engine, x, y):
    def step():
        loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()

    return step


def bench_model(name: str, batch: int, steps: int, warmup: int, device: torch.device, zero: int,
                compile_: bool, fused: bool, precision_name: str = "auto") -> dict:
    optim = OptimConfig(fused=fused)
    engine_cfg = EngineConfig(zero_stage=zero, compile=compile_, precision=precision_name)
    precision = resolve_precision(engine_cfg, device)
    size, classes = image_size(name, device), classes_for(name)
    x, y = synthetic_batch(batch, size, classes, device, precision.channels_last)

    torch.manual_seed(0)
    plain = build_model(name, classes).to(device)
    if precision.channels_last:
        plain = plain.to(memory_format=torch.channels_last)
    plain_fn = plain_step_fn(plain, x, y, precision, fused)
    torch.manual_seed(0)
    model = build_model(name, classes).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine = build_engine(model, optim, engine_cfg, batch_size=batch, lr=0.1, total_steps=10**6,
                          steps_per_epoch=1000, world_size=1, precision=precision)
    eng_fn = engine_step_fn(engine, x, y)
    a1 = time_fn(plain_fn, steps, warmup, device).median
    b = time_fn(eng_fn, steps, warmup, device).median
    a2 = time_fn(plain_fn, steps, warmup, device).median
    peak = peak_memory_gib(device)
    plain_ips = batch / statistics.mean([a1, a2])
    return {"model": name, "batch": batch, "image": size, "zero": zero, "compile": compile_, "fused": fused,
            "bf16": precision.bf16, "channels_last": precision.channels_last,
            "plain_img_s": plain_ips, "plain_spread": abs(a1 - a2) / min(a1, a2),
            "engine_img_s": batch / b, "ratio": (batch / b) / plain_ips, "peak_gib": peak}


def main() -> None:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,resnet18,resnet32" if gpu else "resnet32,resnet18")
    p.add_argument("--batch", default="256,256,128" if gpu else "32,16")
    p.add_argument("--steps", type=int, default=30 if gpu else 5)
    p.add_argument("--warmup", type=int, default=10 if gpu else 2)
    p.add_argument("--zero", default="0,1,2" if gpu else "0")
    p.add_argument("--compile", action="store_true", help="also time engine.compile()")
    p.add_argument("--compile-only", action="store_true", help="time engine.compile() alone (no eager rows)")
    p.add_argument("--fused", default="1,0", help="optim.fused values to time (1: torch's fused SGD, in both "
                   "the engine and the plain loop; 0: its default per-tensor SGD)")
    p.add_argument("--precision", default="auto", help="engine.precision values to time, comma-separated "
                   "(auto, fp32, bf16; auto: bf16 on a GPU, fp32 on a CPU); the plain loop follows each")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_malloc_option(p)
    add_json_option(p)
    args = p.parse_args()
    precisions = args.precision.split(",")
    allowed = typing.get_args(typing.get_type_hints(EngineConfig)["precision"])
    if bad := [v for v in precisions if v not in allowed]:
        p.error(f"--precision: {bad} not among {list(allowed)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    apply_malloc_option(args, device)
    prepare_deepspeed_env()
    init_process_group(device)
    report = start("train_throughput", device, args)
    models = args.models.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    for m, b in zip(models, batches):
        for zero in [int(z) for z in args.zero.split(",")]:
            for comp in [True] if args.compile_only else [False, True] if args.compile else [False]:
                for fused, prec in [(bool(int(f)), v) for f in args.fused.split(",") for v in precisions]:
                    r = bench_model(m, b, args.steps, args.warmup, device, zero, comp, fused, prec)
                    report.add(r)
                    print(f"{m:9s} batch {b:4d} {r['image']}px zero {zero} compile {comp!s:5s} "
                          f"fused {fused!s:5s} bf16 {r['bf16']!s:5s} "
                          f"plain {r['plain_img_s']:9,.0f} img/s (A/A spread {100 * r['plain_spread']:.1f}%)  "
                          f"engine {r['engine_img_s']:9,.0f} img/s  ratio {r['ratio']:.3f}  "
                          + (f"peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""), flush=True)
    report.finish()


if __name__ == "__main__":
    main()
