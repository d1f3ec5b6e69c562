"""`tdcompress export RUN_DIR` and `tdcompress evaluate EXPORT_DIR`: the run's model outside training.

export writes safetensors + a JSON manifest (optionally model.onnx, checked in onnxruntime, and each
factored layer in its fastest exact form on this CPU); evaluate loads an export with torch alone (or
onnxruntime) and prints top-1/top-5 and latency.
"""
from __future__ import annotations

import argparse
import sys


def _int_list(minimum: int):
    """argparse type: comma-separated ints, each >= ``minimum`` (one int gives a one-element list)."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"every value must be >= {minimum}, got {text!r}")
        return values

    return parse


def _int_at_least(minimum: int):
    """argparse type: one int >= ``minimum``."""

    def parse(text: str) -> int:
        values = _int_list(minimum)(text)
        if len(values) != 1:
            raise argparse.ArgumentTypeError(f"expected one integer, got {text!r}")
        return values[0]

    return parse


def _memory_format_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contiguous", dest="channels_last", action="store_false",
                   help="NCHW tensors instead of channels_last (the default: oneDNN's convs are faster in it)")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="do not re-run with glibc malloc tunables that keep activation buffers mapped "
                        "(trainer/export/malloc.py; only the `tdcompress` console command re-runs)")


def _cmd_export(args: argparse.Namespace) -> int:
    from trainer.export.torch_export import export_run

    if args.tune_batch:
        print(f"timing every factored layer's realizations at batch {args.tune_batch} (CPU, "
              f"{'channels_last' if args.channels_last else 'contiguous'}) to export the fastest:", flush=True)
    out = export_run(args.run, args.out, tune_batch=args.tune_batch, channels_last=args.channels_last,
                     progress=lambda line: print(f"  {line}", flush=True))
    files = "model.safetensors, manifest.json"
    if args.format == "onnx":
        from trainer.export.onnx_export import OPSET, TOLERANCE, write_onnx

        path, error = write_onnx(out)
        files += f", {path.name}"
        print(f"onnx: opset {OPSET}, dynamic batch, onnx.checker passed; onnxruntime vs torch logits "
              f"{error:.1e} relative (allowed {TOLERANCE:.0e})")
    print(f"exported {args.run} -> {out} ({files})")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """Load an export with torch alone; report top-1/top-5 on the eval split and latency."""
    import torch

    from trainer.core.engine import Precision
    from trainer.core.loop import evaluate
    from trainer.data import load_datasets, make_loader
    from trainer.export.latency import measure_latency
    from trainer.export.malloc import malloc_tuned
    from trainer.export.torch_export import load_exported

    onnx = args.runtime == "onnxruntime"
    if onnx and args.compile:
        print("tdcompress: --compile applies to --runtime torch, not onnxruntime", file=sys.stderr)
        return 2
    if onnx:
        from trainer.export.onnx_export import load_onnx

        model, manifest = load_onnx(args.export)
        layout = "NCHW input"  # onnxruntime picks its own blocked layouts inside
    else:
        model, manifest = load_exported(args.export)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        layout = "channels_last" if args.channels_last else "contiguous"
    size = manifest["image_size"]
    params = model.weights if onnx else sum(p.numel() for p in model.parameters())
    print(f"{manifest['model']} ({len(manifest.get('surgery') or {})} factored layers), {params:,} "
          f"{'weights in the graph' if onnx else 'parameters'}; "
          f"runtime {args.runtime}, {layout}, malloc tuned: {malloc_tuned()}")
    dataset = args.dataset or manifest.get("dataset")
    if dataset and not args.no_data:
        sets = load_datasets(dataset, args.data_root, augment=False,
                             eval_subset=args.limit)
        loader = make_loader(sets.eval, args.batch, rank=0, world_size=1, shuffle=False, seed=0, drop_last=False)
        res = evaluate(model, loader, device=torch.device("cpu"), precision=Precision(False, False))
        print(f"top1 {res['top1']:.2f}%  top5 {res['top5']:.2f}%  on {int(res['eval_images'])} {dataset} images")
    timed, mode = model, "onnxruntime" if onnx else "eager"
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # inference: constant-fold the weights into prepacked oneDNN convs
        timed, mode = torch.compile(model, dynamic=False), "compiled"
    for batch in args.latency_batches:
        sec = measure_latency(timed, (batch, 3, size, size), channels_last=args.channels_last and not onnx)
        print(f"latency batch {batch}: {sec * 1e3:.2f} ms ({batch / sec:,.0f} img/s, CPU, "
              f"{torch.get_num_threads()} threads, {mode})")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` and ``evaluate`` commands to the top-level parser's subcommands."""
    export = sub.add_parser("export", help="write a run's model as safetensors + JSON manifest")
    export.add_argument("run", help="run directory printed by `tdcompress run` (runs/<name>/<run>)")
    export.add_argument("--out", help="output directory (default: RUN/export)")
    export.add_argument("--tune-batch", type=_int_at_least(0), default=0, metavar="N",
                        help="time each factored layer's exact realizations (factored/merged/dense) on this CPU "
                             "at batch N and export the fastest (default 0: export as trained)")
    export.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors",
                        help="onnx: also write model.onnx (opset 18, dynamic batch, checked against torch with "
                             "onnxruntime) beside model.safetensors")
    _memory_format_args(export)
    export.set_defaults(func=_cmd_export)

    ev = sub.add_parser("evaluate", help="load an export with torch alone; top-1/top-5 and latency")
    ev.add_argument("export", help="directory written by `tdcompress export`")
    ev.add_argument("--dataset", help="dataset name (default: the one the model was trained on)")
    ev.add_argument("--data-root", help="dataset directory (default: $TDC_DATA_ROOT)")
    ev.add_argument("--limit", type=int, default=0, help="evaluate on this many images (0 = all)")
    ev.add_argument("--batch", type=int, default=256, help="images per evaluation batch (default 256)")
    ev.add_argument("--no-data", action="store_true", help="latency only")
    ev.add_argument("--latency-batches", type=_int_list(1), default=[1, 32],
                    help="comma-separated batch sizes to time (default 1,32)")
    ev.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                    help="onnxruntime: run the export's model.onnx (CPU provider, all graph optimisations, "
                         "torch's thread count) instead of the torch model")
    ev.add_argument("--compile", action="store_true",
                    help="time the torch.compile'd model (inductor, weights frozen; needs a C++ compiler)")
    _memory_format_args(ev)
    ev.set_defaults(func=_cmd_evaluate)
