"""Feature fit and rank pruning: decompose one trained ResNet-20 by weight-only vs feature fit; rank_prune step vs a plain step.

    python -m bench.feature_fit_bench CHECKPOINT [--keep 0.5 0.33] [--formats svd lowrank_sparse tucker2]

CHECKPOINT is a dense checkpoint (``runs/<exp>/<run>/checkpoints/ckpt-N``) of a
CIFAR model, or a run directory (its latest checkpoint, as ``model.init`` takes it).
First it times optimizer steps through the project's DeepSpeed engine (one rank,
ZeRO 0, batch ``--batch``, same process, same data, the two kinds interleaved so
that load drifts hit both alike): a plain (pretrain/finetune) step of the dense
model against a rank_prune step (every planned layer as U diag(s) V^T, the
penalty hooks on, the phase's param groups), at full rank and after pruning to
``--prune-keep`` of the dense parameters; it prints their ratios and the device.
Then, for each format and keep ratio, the top-1 right after decomposition (on
``--eval`` test images) and the wall time of the fit, for ``fit: weights`` and
``fit: features`` (``--calib`` training images). No Ray.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from admm.config import CompressionConfig
from admm.nn.layers_prune import plan_prune
from admm.nn.surgery import decompose_model
from admm.planning.model_plan import plan_for_model
from bench.common import add_json_option, device_name, init_process_group, start
from trainer.checkpoints import files as ckpt
from trainer.checkpoints.stateful import restore_model
from trainer.config import EngineConfig, OptimConfig, RankPruneConfig
from trainer.core.engine import Precision, build_engine, prepare_deepspeed_env
from trainer.core.loop import evaluate
from trainer.data import load_datasets, make_loader
from trainer.models import build_model
from trainer.phases.feature_decompose import calibration_sample, decompose_by_features
from trainer.phases.rank_prune import RankPruner, planned_shapes, prunable_layers, to_prunable
from trainer.worker_config import WorkerConfig


def _engine(model: torch.nn.Module, batch: int, extra_groups: list) -> object:
    optim = OptimConfig(lr=0.01, momentum=0.9, weight_decay=5e-4, fused=False)
    return build_engine(model, optim, EngineConfig(), batch_size=batch, lr=0.01, total_steps=10**6,
                        steps_per_epoch=1000, world_size=1, precision=Precision(False, False),
                        extra_groups=extra_groups)


def step_times(engines: dict[str, object], batches: list, repeats: int) -> dict[str, float]:
    """Median seconds of one optimizer step (forward, backward, step) per engine, over ``repeats`` rounds
    after 2 warm-up rounds; each round steps every engine once on the same batch (interleaved)."""
    times: dict[str, list[float]] = {k: [] for k in engines}
    for i in range(repeats + 2):
        x, y = batches[i % len(batches)]
        for name, eng in engines.items():
            t0 = time.perf_counter()
            eng.backward(F.cross_entropy(eng(x), y))  # type: ignore[attr-defined]
            eng.step()  # type: ignore[attr-defined]
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def rank_prune_engine(dense: torch.nn.Module, batch: int, prune_keep: float | None) -> tuple[object, RankPruner]:
    """The rank_prune phase's engine on a copy of ``dense`` (hooks on); ``prune_keep``: first pruned to that
    fraction of the planned layers' dense parameters (the weakest directions go, as the phase's budget does)."""
    cfg = WorkerConfig()
    shapes = planned_shapes(dense, cfg)
    model = to_prunable(copy.deepcopy(dense), shapes, "trained", 0)
    pruner = RankPruner(RankPruneConfig(), shapes, epochs=1, grad_accum=1)
    if prune_keep is not None:
        layers = prunable_layers(model)
        keep = plan_prune({n: m.s for n, m in layers.items()}, shapes, threshold=0.0, min_rank=1,
                          allowed=prune_keep * pruner.dense_params)
        for name, index in keep.items():
            layers[name].keep(index)
    params = [p for m in prunable_layers(model).values() for p in (m.u, m.s, m.v)]
    eng = _engine(model, batch, [{"params": params, "weight_decay": 0.0}])
    pruner.hook_gradients(eng.module)  # type: ignore[attr-defined]
    return eng, pruner


# long: the benchmark's options, then its steps in the order it prints them
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path, help="a checkpoint directory, or a run directory (its latest)")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.33])
    ap.add_argument("--formats", nargs="*", default=["svd", "lowrank_sparse", "tucker2"], help="none: step times only")
    ap.add_argument("--calib", type=int, default=512, help="calibration images (training split)")
    ap.add_argument("--eval", type=int, default=2000, help="test images for top-1")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--prune-keep", type=float, default=0.5, help="the pruned rank_prune step's parameter fraction")
    ap.add_argument("--no-steps", action="store_true", help="skip the step-time comparison")
    add_json_option(ap)
    args = ap.parse_args()
    if (args.checkpoint / "checkpoints").is_dir():
        args.checkpoint = ckpt.latest_checkpoint(args.checkpoint / "checkpoints")

    meta = ckpt.read_meta(args.checkpoint)
    state = ckpt.load_shared(args.checkpoint)["model"]
    dense = restore_model(build_model(meta["model"], meta["num_classes"]), state).eval()
    device, precision = torch.device("cpu"), Precision(bf16=False, channels_last=False)
    report = start("feature_fit_bench", device, args)
    root = os.environ.get("TDC_DATA_ROOT")
    sets = load_datasets(meta["dataset"], root, augment=False, seed=0, eval_subset=args.eval)
    train = make_loader(sets.train, args.batch, rank=0, world_size=1, shuffle=True, seed=0, drop_last=True)
    evals = make_loader(sets.eval, 256, rank=0, world_size=1, shuffle=False, seed=0, drop_last=False)
    calib = calibration_sample(train, max(1, args.calib // args.batch))
    print(f"device: {device_name(device)}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"{meta['model']} from {args.checkpoint} (phase {meta['phase']}, epoch {meta['epoch']})")
    if not args.no_steps:
        prepare_deepspeed_env()
        init_process_group(device)
        gen = torch.Generator().manual_seed(0)
        labels = [(x, torch.randint(0, meta["num_classes"], (x.shape[0],), generator=gen)) for x in calib]
        plain = _engine(copy.deepcopy(dense), args.batch, [])
        full, _ = rank_prune_engine(dense, args.batch, None)
        pruned, _ = rank_prune_engine(dense, args.batch, args.prune_keep)
        t = step_times({"plain": plain, "full": full, "pruned": pruned}, labels, args.repeats)
        report.add({"kind": "step_time", "batch": args.batch, "repeats": args.repeats, "prune_keep": args.prune_keep,
                    **{f"{k}_s": v for k, v in t.items()}, "full_ratio": t["full"] / t["plain"],
                    "pruned_ratio": t["pruned"] / t["plain"]})
        print(f"optimizer step through the engine, batch {args.batch}, median of {args.repeats}: plain (dense) "
              f"{t['plain'] * 1e3:.1f} ms; rank_prune at full rank {t['full'] * 1e3:.1f} ms "
              f"({t['full'] / t['plain']:.2f}x); rank_prune pruned to {args.prune_keep:.2f} of the planned "
              f"parameters {t['pruned'] * 1e3:.1f} ms ({t['pruned'] / t['plain']:.2f}x)", flush=True)
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
            report.add({"kind": "fit", "format": fmt, "keep": keep, "params_x": plan.compression,
                        "weights_top1": row[0], "weights_fit_s": row[1], "features_top1": row[2],
                        "features_fit_s": row[3], "dense_top1": base})
    report.finish()


if __name__ == "__main__":
    main()
