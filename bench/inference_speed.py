"""Inference speed of decomposed models divided by the dense model's, same process.

For ResNet-50 (default) at two compression levels and each format, the
factored model (admm.surgery.decompose_model with a plan from the same
planner the runs use) is timed against the dense model built from the same
weights: CPU fp32 at batch 1 and 32; on a GPU bf16 at batch 1 and 256,
eager and torch.compile'd. Ratios below 1 are reported as they are.

    PYTHONPATH=. python bench/inference_speed.py
    PYTHONPATH=. python bench/inference_speed.py --model resnet50 --formats tucker2,svd --keep 0.5,0.33 --json out.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from admm.component import plan_for_model  # noqa: E402
from admm.surgery import decompose_model  # noqa: E402
from launcher.schema import CompressionConfig  # noqa: E402
from trainer.latency import measure_latency  # noqa: E402
from trainer.models import build_model  # noqa: E402


def timed(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device, bf16: bool, repeats: int) -> float:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return measure_latency(model, shape, repeats=repeats, warmup=3, device=device)


def main() -> None:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--formats", default="tucker2,svd,tt,cp")
    p.add_argument("--keep", default="0.5,0.33", help="compression.keep_ratio levels")
    p.add_argument("--batches", default="1,256" if gpu else "1,32")
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--repeats", type=int, default=20 if gpu else 5)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models (GPU)")
    p.add_argument("--fold", action="store_true", help="fold BatchNorm into the convs of both models (as export does)")
    p.add_argument("--json")
    args = p.parse_args()
    name = torch.cuda.get_device_name() if gpu else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {name} | torch {torch.__version__} | {args.model} {args.image}px | "
          f"{'bf16' if gpu else 'fp32'} | BN folded: {args.fold}", flush=True)
    classes = 1000 if args.model in ("resnet18", "resnet50") else 10
    torch.manual_seed(0)
    dense = build_model(args.model, classes).to(device).eval()
    base_state = {k: v.clone() for k, v in dense.state_dict().items()}
    if args.fold:
        from admm.fold import fold_batchnorm

        fold_batchnorm(dense)
    if gpu:
        dense = dense.to(memory_format=torch.channels_last)
    batches = [int(b) for b in args.batches.split(",")]
    modes = ["eager", "compiled"] if args.compile else ["eager"]
    dense_t = {(b, m): timed(torch.compile(dense) if m == "compiled" else dense, (b, 3, args.image, args.image),
                             device, gpu, args.repeats) for b in batches for m in modes}
    rows = []
    for fmt in args.formats.split(","):
        for keep in [float(k) for k in args.keep.split(",")]:
            plan = plan_for_model(dense, CompressionConfig(format=fmt, keep_ratio=keep),
                                  input_shape=(1, 3, args.image, args.image))
            model = build_model(args.model, classes).to(device)
            model.load_state_dict(base_state)
            model = decompose_model(model, plan).eval()
            if args.fold:
                fold_batchnorm(model)
            for b in batches:
                for m in modes:
                    t = timed(torch.compile(model) if m == "compiled" else model, (b, 3, args.image, args.image),
                              device, gpu, args.repeats)
                    row = {"format": fmt, "keep": keep, "batch": b, "mode": m,
                           "params_x": plan.compression,
                           "flops_x": plan.dense_flops_total / max(1, plan.flops_after_total),
                           "dense_ms": 1e3 * dense_t[(b, m)], "factored_ms": 1e3 * t,
                           "speedup": dense_t[(b, m)] / t}
                    rows.append(row)
                    print(f"{fmt:8s} keep {keep:.2f} params {row['params_x']:.2f}x FLOPs {row['flops_x']:.2f}x  "
                          f"batch {b:3d} {m:8s} dense {row['dense_ms']:8.1f} ms  factored {row['factored_ms']:8.1f} ms"
                          f"  speed {row['speedup']:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
