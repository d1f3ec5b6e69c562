"""What distillation costs per training step: a factored student with and without its dense teacher.

The student is ResNet-20 decomposed at ``--keep-ratio`` (default 0.33: 3x fewer conv/linear
parameters, tucker2) and trained through the project's engine (trainer.core.engine.build_engine, world
size 1, ZeRO 0) on one fixed synthetic batch. The distilled step is the train loop's: the student's
forward, :class:`trainer.core.distill.DistillLoss` (the frozen dense ResNet-20 teacher's forward under
no_grad, KL on softened logits + CE), backward, SGD step. Both steps run in this process, in
alternating rounds (plain, distill, plain, ...), so drift shows up as spread across rounds rather
than as cost; the teacher's forward alone is timed too.

    .venv/bin/python -m bench.distill_cost                    # CPU here: batch 128, 32 px
    .venv/bin/python -m bench.distill_cost --batch 256 --rounds 5 --json distill_cost.json
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from admm.config import CompressionConfig
from admm.nn.surgery import decompose_model
from admm.planning.model_plan import plan_for_model
from bench.common import (
    add_json_option,
    add_malloc_option,
    apply_malloc_option,
    init_process_group,
    pick_device,
    start,
    synthetic_batch,
    time_fn,
)
from trainer.config import DistillConfig, EngineConfig, OptimConfig
from trainer.core.distill import DistillLoss
from trainer.core.engine import build_engine, prepare_deepspeed_env, resolve_precision
from trainer.models import build_model


# long: the benchmark's options, then its steps in the order it prints them
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=15, help="timed steps per round and kind")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--format", default="tucker2")
    ap.add_argument("--keep-ratio", type=float, default=0.33)
    add_json_option(ap)
    add_malloc_option(ap)
    args = ap.parse_args()

    device = pick_device()
    apply_malloc_option(args, device)  # CPU: the malloc tunables the training workers run with
    prepare_deepspeed_env()
    init_process_group(device)
    report = start("distill_cost", device, args)
    info = report.info
    engine_cfg = EngineConfig()
    precision = resolve_precision(engine_cfg, device)
    x, y = synthetic_batch(args.batch, 32, 10, device, precision.channels_last)

    torch.manual_seed(0)
    teacher = build_model("resnet20", 10).to(device).eval().requires_grad_(False)
    student = build_model("resnet20", 10)
    plan = plan_for_model(student, CompressionConfig(format=args.format, keep_ratio=args.keep_ratio), 1,
                          input_shape=(1, 3, 32, 32))
    student = decompose_model(student, plan).to(device)
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    # lr 0.01: 100+ steps on one random batch must not diverge; the step's cost does not depend on it.
    engine = build_engine(student, OptimConfig(), engine_cfg, batch_size=args.batch, lr=0.01, total_steps=10**6,
                          steps_per_epoch=1000, world_size=1, precision=precision)
    distill = DistillLoss(teacher, DistillConfig(), precision, label_smoothing=0.0)

    def plain() -> None:
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()

    def distilled() -> None:
        engine.backward(distill(engine(x), x, y))
        engine.step()

    def teacher_only() -> None:
        distill.teacher_logits(x)

    print(f"student resnet20 {args.format} keep_ratio {args.keep_ratio}: {n_student:,} params; teacher dense "
          f"resnet20: {n_teacher:,} params; batch {args.batch}, 32 px, bf16 {precision.bf16}")
    print(f"{'round':>5s} {'plain steps/s':>13s} {'distill steps/s':>15s} {'teacher fwd ms':>14s} "
          f"{'distill/plain':>13s}  device", flush=True)
    rows = []
    for rnd in range(args.rounds):
        p = time_fn(plain, args.steps, args.warmup, device)
        d = time_fn(distilled, args.steps, args.warmup, device)
        t = time_fn(teacher_only, args.steps, args.warmup, device)
        rows.append({"round": rnd + 1, "plain_steps_s": 1 / p.median, "distill_steps_s": 1 / d.median,
                     "teacher_forward_ms": 1e3 * t.median, "ratio": p.median / d.median,
                     "timings_s": {"plain": p.to_json(), "distill": d.to_json(), "teacher": t.to_json()}})
        r = rows[-1]
        report.add(r)
        print(f"{r['round']:5d} {r['plain_steps_s']:13.2f} {r['distill_steps_s']:15.2f} "
              f"{r['teacher_forward_ms']:14.1f} {r['ratio']:13.3f}  {info['device']}", flush=True)
    ratio = statistics.median(r["ratio"] for r in rows)
    print(f"median distill/plain steps/s: {ratio:.3f} ({(1 / ratio - 1) * 100:+.0f}% time per step) on {info['device']}")
    report.finish(student_params=n_student, teacher_params=n_teacher, median_ratio=ratio)


if __name__ == "__main__":
    main()
