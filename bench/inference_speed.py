"""Inference speed of decomposed models divided by the dense model's, same process.

For ResNet-50 (default) at two compression levels and each format, the
factored model (admm.nn.surgery.decompose_model with a plan from the same
planner the runs use) is timed against the dense model built from the same
weights: CPU fp32 at batch 1 and 32; on a GPU bf16 at batch 1 and 256,
eager, (``--compile``) torch.compile'd and (``--onnx``) in onnxruntime (the model exported by
trainer.export.onnx_export, CPU execution provider, all graph optimisations, torch's thread count).
Ratios below 1 are reported as they are; ``of FLOPs`` is the speed-up divided by the FLOPs ratio
(the plan's; for the tuned model the FLOPs it runs, counted by FlopCounterMode: the table's merged
layers run fewer FLOPs than planned, its dense ones more).

Both models always get the same treatment: BN folded into the convs (``--no-fold``
to keep BN), channels_last (``--contiguous`` for NCHW), and on Linux/glibc the
process re-runs itself with trainer.export.malloc's tunables (``--no-malloc-tuning`` to
measure without). ``--tune`` adds a third column: the factored model after the
per-layer latency table (trainer.export.latency) picked each layer's fastest exact
realization at that batch, as ``tdcompress export --tune-batch`` does.
``--fuse`` adds the mode ``fused``: eager with every conv's ReLU and residual add run inside
the conv's oneDNN call (trainer.export.fuse), for the dense and the factored models alike (CPU).
``--tt-per-core`` adds, for tt, the same factored model with its chains forced to run
core by core (``TTLayer.merge_chains = False``, the forward before the merged chains),
timed in the same dense-factored-...-dense window.

    python -m bench.inference_speed --formats tucker2,svd --tune
    python -m bench.inference_speed --formats svd,tucker2 --keep 0.5,0.33 --fuse --compile --onnx
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from admm.config import CompressionConfig
from admm.nn.fold import fold_batchnorm
from admm.nn.layers_tt import TTLayer
from admm.nn.realize import realize
from admm.nn.surgery import decompose_model, manifest_of
from admm.planning.model_plan import plan_for_model
from bench.common import add_json_option, add_malloc_option, apply_malloc_option, classes_for, start
from trainer.export.fuse import fuse_conv_activations
from trainer.export.latency import format_row, layer_latency_table, measure_latency
from trainer.export.onnx_export import OnnxRuntimeModel, export_onnx, make_session
from trainer.export.torch_export import FORMAT_VERSION
from trainer.models import build_model
from trainer.phases.decompose import measured_flops


def timed(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device, bf16: bool, repeats: int,
          channels_last: bool) -> float:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return measure_latency(model, shape, repeats=repeats, warmup=3, device=device, channels_last=channels_last)


# long: the benchmark's options, then its steps in the order it prints them
def main() -> None:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--formats", default="tucker2,svd,tt,cp")
    p.add_argument("--keep", default="0.5,0.33", help="compression.keep_ratio levels")
    p.add_argument("--rank-multiple", default="1", help="compression.rank_multiple values, e.g. 1,16")
    p.add_argument("--batches", default="1,256" if gpu else "1,32")
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--repeats", type=int, default=20 if gpu else 7)
    p.add_argument("--fuse", action="store_true",
                   help="also time eager models with conv+ReLU / conv+add+ReLU fused (trainer.export.fuse; CPU only)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    p.add_argument("--onnx", action="store_true", help="also time the models exported to ONNX, in onnxruntime (CPU)")
    p.add_argument("--no-fold", dest="fold", action="store_false", help="keep BatchNorm (default: folded in both)")
    p.add_argument("--contiguous", dest="channels_last", action="store_false", help="NCHW instead of channels_last")
    add_malloc_option(p)
    p.add_argument("--tune", action="store_true", help="also time the latency-table realization per batch")
    p.add_argument("--table", action="store_true", help="print the per-layer latency tables of --tune")
    p.add_argument("--tt-per-core", action="store_true",
                   help="tt: also time the factored model with per-core chains (TTLayer.merge_chains=False)")
    add_json_option(p)
    args = p.parse_args()
    if args.fuse and gpu:
        p.error("--fuse: the fused oneDNN kernels are CPU float32 only; this run is on a GPU in bf16")
    apply_malloc_option(args, device)
    report = start("inference_speed", device, args)
    print(f"{args.model} {args.image}px | {'bf16' if gpu else 'fp32'} | BN folded {args.fold} | "
          f"channels_last {args.channels_last}", flush=True)
    classes = classes_for(args.model)
    torch.manual_seed(0)
    dense = build_model(args.model, classes).to(device).eval()
    base_state = {k: v.clone() for k, v in dense.state_dict().items()}
    if args.fold:
        fold_batchnorm(dense)
    batches = [int(b) for b in args.batches.split(",")]
    modes = ["eager"] + (["fused"] if args.fuse else []) + (["compiled"] if args.compile else []) + (["onnxruntime"] if args.onnx else [])
    onnx_dir = tempfile.TemporaryDirectory(prefix="tdc-bench-onnx-")
    sessions: dict[torch.nn.Module, torch.nn.Module] = {}

    def in_onnxruntime(model: torch.nn.Module) -> torch.nn.Module:
        """``model`` exported to ONNX (checked against torch) and loaded in onnxruntime, once per model."""
        if model not in sessions:
            path = Path(onnx_dir.name) / f"m{len(sessions)}.onnx"
            manifest = {"format_version": FORMAT_VERSION, "model": args.model, "num_classes": classes,
                        "image_size": args.image, "dataset": None, "surgery": manifest_of(model), "folded_bn": []}
            export_onnx(model.to(memory_format=torch.contiguous_format), manifest, path)
            sessions[model] = OnnxRuntimeModel(make_session(path))
        return sessions[model]

    compiled: dict[torch.nn.Module, torch.nn.Module] = {}  # keyed by the module itself: ids can be reused
    fused: dict[torch.nn.Module, torch.nn.Module] = {}

    def run(model: torch.nn.Module, b: int, mode: str) -> float:
        if mode == "onnxruntime":  # NCHW input: onnxruntime chooses its own blocked layouts inside
            return timed(in_onnxruntime(model), (b, 3, args.image, args.image), device, False, args.repeats, False)
        if mode == "fused":
            if model not in fused:
                fused[model] = fuse_conv_activations(model)
            model = fused[model]
        if mode == "compiled":
            if model not in compiled:
                compiled[model] = torch.compile(model, dynamic=False)  # one graph per batch size
            model = compiled[model]
        return timed(model, (b, 3, args.image, args.image), device, gpu, args.repeats, args.channels_last)

    if args.compile:
        # Inference graphs: let inductor constant-fold the weights (prepacked oneDNN/cuDNN convs).
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        # Every model shares torchvision's forward code object; each (model, batch) is one more entry.
        dynamo_config.recompile_limit = 256
    for fmt in args.formats.split(","):
        for keep, multiple in [(float(k), int(m)) for k in args.keep.split(",") for m in args.rank_multiple.split(",")]:
            plan = plan_for_model(dense, CompressionConfig(format=fmt, keep_ratio=keep, rank_multiple=multiple),
                                  input_shape=(1, 3, args.image, args.image))

            def factored(plan=plan) -> torch.nn.Module:  # this iteration's plan
                model = build_model(args.model, classes).to(device)
                model.load_state_dict(base_state)
                model = decompose_model(model, plan).eval()
                if args.fold:
                    fold_batchnorm(model)
                return model

            model = factored()
            per_core = None
            if fmt == "tt" and args.tt_per_core:
                per_core = factored()
                for mod in per_core.modules():
                    if isinstance(mod, TTLayer):
                        mod.merge_chains = False
            for b in batches:
                tuned, choices = None, {}
                if args.tune:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):  # as it will be served
                        table = layer_latency_table(model, (b, 3, args.image, args.image), device=device,
                                                    channels_last=args.channels_last)
                    choices = {r.name: r.choice for r in table if r.choice != "factored"}
                    if args.table:
                        print("\n".join(format_row(r) for r in table))
                    tuned = realize(factored(), choices)
                    # merged layers run fewer FLOPs than the plan counts, dense ones more: count what runs
                    one = (1, 3, args.image, args.image)
                    tuned_flops_x = measured_flops(dense, one) / measured_flops(tuned, one)
                for m in modes:
                    # dense, factored, tuned, dense: the baseline is the mean of the two dense timings,
                    # so host drift during the pair hits both sides (this is a shared machine).
                    d1 = run(dense, b, m)
                    t = run(model, b, m)
                    tt = run(tuned, b, m) if tuned is not None else None
                    pc = run(per_core, b, m) if per_core is not None else None
                    d2 = run(dense, b, m)
                    base = (d1 + d2) / 2
                    row = {"format": fmt, "keep": keep, "rank_multiple": multiple, "batch": b, "mode": m,
                           "params_x": plan.compression,
                           "flops_x": plan.dense_flops_total / max(1, plan.flops_after_total),
                           "dense_ms": 1e3 * base, "dense_spread": abs(d1 - d2) / min(d1, d2),
                           "factored_ms": 1e3 * t, "speedup": base / t}
                    row["of_flops"] = row["speedup"] / row["flops_x"]
                    line = (f"{fmt:8s} keep {keep:.2f} x{multiple:<2d} params {row['params_x']:.2f}x "
                            f"FLOPs {row['flops_x']:.2f}x  batch {b:3d} {m:11s} dense {row['dense_ms']:7.1f} ms "
                            f"(A/A {100 * row['dense_spread']:2.0f}%)  factored {row['factored_ms']:7.1f} ms "
                            f"({row['speedup']:.2f}x, {row['of_flops']:.2f} of FLOPs)")
                    if tt is not None:
                        kinds = sorted(set(choices.values()))
                        row.update(tuned_ms=1e3 * tt, tuned_speedup=base / tt, choices=choices,
                                   tuned_flops_x=tuned_flops_x, tuned_of_flops=base / tt / tuned_flops_x)
                        line += (f"  tuned {row['tuned_ms']:7.1f} ms ({row['tuned_speedup']:.2f}x, FLOPs run "
                                 f"{tuned_flops_x:.2f}x, {row['tuned_of_flops']:.2f} of them; "
                                 f"{len(choices)} layers changed{': ' + ', '.join(kinds) if kinds else ''})")
                    if pc is not None:
                        row.update(per_core_ms=1e3 * pc, per_core_speedup=base / pc)
                        line += f"  per-core chains {row['per_core_ms']:7.1f} ms ({row['per_core_speedup']:.2f}x)"
                    report.add(row)
                    print(line, flush=True)
    report.finish()


if __name__ == "__main__":
    main()
