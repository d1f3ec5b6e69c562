"""Issue 13 figures: decompose one trained ResNet-20 by weight-only vs feature fit; rank_prune step vs a plain step.

    python bench/feature_fit_bench.py CHECKPOINT_DIR [--keep 0.5 0.33] [--formats svd lowrank_sparse tucker2]

CHECKPOINT_DIR is a dense checkpoint (``runs/<exp>/<run>/checkpoints/ckpt-N``) of
a CIFAR model. For each format and keep ratio it prints the top-1 right after
decomposition (on ``--eval`` test images) and the wall time of the fit, for
``fit: weights`` and ``fit: features`` (``--calib`` training images). Then it
times SGD steps (batch ``--batch``, same process, same data) of the dense model
and of the model held as U diag(s) V^T at full rank with the rank_prune
penalty hooks, and prints their ratio and the device. No Ray, no DeepSpeed.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from admm.component import plan_for_model  # noqa: E402
from admm.config import CompressionConfig  # noqa: E402
from admm.surgery import decompose_model  # noqa: E402
from bench.common import device_name  # noqa: E402
from trainer import checkpoint as ckpt  # noqa: E402
from trainer.config import RankPruneConfig, WorkerConfig  # noqa: E402
from trainer.data import load_datasets, make_loader  # noqa: E402
from trainer.engine import Precision  # noqa: E402
from trainer.feature_decompose import calibration_sample, decompose_by_features  # noqa: E402
from trainer.loop import evaluate  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.rank_prune import RankPruner, planned_shapes, to_prunable  # noqa: E402
from trainer.stateful import restore_model  # noqa: E402


def step_time(model: torch.nn.Module, batches: list, repeats: int) -> float:
    """Median seconds of one SGD step (forward, backward, update) over ``repeats`` steps after 2 warm-ups."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    times = []
    for i in range(repeats + 2):
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.33])
    ap.add_argument("--formats", nargs="*", default=["svd", "lowrank_sparse", "tucker2"], help="none: step times only")
    ap.add_argument("--calib", type=int, default=512, help="calibration images (training split)")
    ap.add_argument("--eval", type=int, default=2000, help="test images for top-1")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    meta = ckpt.read_meta(args.checkpoint)
    state = ckpt.load_shared(args.checkpoint)["model"]
    dense = restore_model(build_model(meta["model"], meta["num_classes"]), state).eval()
    device, precision = torch.device("cpu"), Precision(bf16=False, channels_last=False)
    root = os.environ.get("TDC_DATA_ROOT")
    sets = load_datasets(meta["dataset"], root, augment=False, seed=0, eval_subset=args.eval)
    train = make_loader(sets.train, args.batch, rank=0, world_size=1, shuffle=True, seed=0, drop_last=True)
    evals = make_loader(sets.eval, 256, rank=0, world_size=1, shuffle=False, seed=0, drop_last=False)
    calib = calibration_sample(train, max(1, args.calib // args.batch))
    print(f"device: {device_name(device)}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"{meta['model']} from {args.checkpoint} (phase {meta['phase']}, epoch {meta['epoch']})")
    if args.formats:
        base = evaluate(dense, evals, device=device, precision=precision)["top1"]
        print(f"dense top-1 {base:.2f}% on {args.eval} test images; calibration {len(calib) * args.batch} train images")
        print(f"{'format':15s} {'keep':>5s} {'params x':>8s} {'weights top1':>12s} {'fit s':>6s} "
              f"{'features top1':>13s} {'fit s':>6s}")
    for fmt in args.formats:
        for keep in args.keep:
            plan = plan_for_model(dense, CompressionConfig(format=fmt, keep_ratio=keep))  # type: ignore[arg-type]
            row = []
            for fit in ("weights", "features"):
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                if fit == "weights":
                    model = decompose_model(model, plan)
                else:
                    model, _ = decompose_by_features(model, plan, calib, device)
                seconds = time.perf_counter() - t0
                row += [evaluate(model, evals, device=device, precision=precision)["top1"], seconds]
            print(f"{fmt:15s} {keep:5.2f} {plan.compression:8.2f} {row[0]:11.2f}% {row[1]:6.1f} "
                  f"{row[2]:12.2f}% {row[3]:6.1f}", flush=True)

    gen = torch.Generator().manual_seed(0)
    labels = [(x, torch.randint(0, meta["num_classes"], (x.shape[0],), generator=gen)) for x in calib]
    cfg = WorkerConfig()
    prunable = to_prunable(copy.deepcopy(dense), planned_shapes(dense, cfg), "trained", 0)
    pruner = RankPruner(RankPruneConfig(), planned_shapes(dense, cfg), epochs=1, grad_accum=1)
    pruner.hook_gradients(prunable)
    plain_t = step_time(copy.deepcopy(dense), labels, args.repeats)
    prune_t = step_time(prunable, labels, args.repeats)
    pruner.unhook()
    nohook_t = step_time(prunable, labels, args.repeats)
    print(f"SGD step, batch {args.batch}: dense {plain_t * 1e3:.1f} ms; U diag(s) V^T at full rank with penalty "
          f"hooks {prune_t * 1e3:.1f} ms ({prune_t / plain_t:.2f}x), without hooks {nohook_t * 1e3:.1f} ms "
          f"({nohook_t / plain_t:.2f}x)")


if __name__ == "__main__":
    main()
