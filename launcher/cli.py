"""`tdcompress` command line.

    tdcompress run CONFIG [key.sub=value ...]        train (embedded Ray by default)
    tdcompress config show CONFIG [key=value ...]    print the resolved config
    tdcompress plan CONFIG [key=value ...]           print the rank plan (layers, ranks, params, FLOPs)
    tdcompress export RUN_DIR [--tune-batch N]       safetensors + manifest of the run's model
                                                     (N: per-layer latency table picks each layer's realization)
    tdcompress export RUN_DIR --format onnx          ... and model.onnx (checked against torch in onnxruntime)
    tdcompress evaluate EXPORT_DIR [--compile]       top-1/top-5 and latency, torch alone
    tdcompress evaluate EXPORT_DIR --runtime onnxruntime   the same, from model.onnx in onnxruntime
    tdcompress compare [RUN ...]                     runs side by side (MLflow) + accuracy-vs-compression plot
    tdcompress records export|import|render ...      runs as small JSON records; tables from them, no store
    tdcompress sweep SWEEP.yaml [--dry-run]          a grid of runs (dense parents first), resumable
    tdcompress pack SRC DST [--max-side PX ...]      ImageFolder tree -> tar shards (data.dataset=shards)
    tdcompress submit CONFIG [key=value ...]         run it as a Ray Job (--address http://HEAD:8265)
    tdcompress jobs list|status|logs|stop [JOB]      watch and stop Ray Jobs
    tdcompress cluster up|down [--nodes N]           a multi-node Ray cluster + MLflow server on 127.0.0.1
    tdcompress configs list | copy NAME DEST         the experiment configs shipped with the package
    python -m tdcompress ...                         the same commands

Exit codes: 0 done; 2 bad input (config, paths, data, a damaged checkpoint or export; also found by a worker),
said in one line; 1 the run failed (one line, the worker's own error; the traceback is in the run's driver.log);
130 interrupted (Ctrl-C, SIGTERM).
"""
from __future__ import annotations

import argparse
import sys

from launcher.config import ConfigError, dump_yaml, load_config
from launcher.signals import sigterm_interrupts


def _cmd_run(args: argparse.Namespace) -> int:
    from launcher import pipeline

    cfg = load_config(args.config, args.overrides)
    sigterm_interrupts()
    try:
        pipeline.run(cfg)
    except (KeyboardInterrupt, ConfigError):
        raise
    except Exception as e:
        from launcher.run_failure import report_run_failure

        if not report_run_failure(cfg, e):  # bad input found late (data, checkpoint): main says it plainly
            raise
        return 1
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from trainer.export import export_run

    if args.tune_batch:
        print(f"timing every factored layer's realizations at batch {args.tune_batch} (CPU, "
              f"{'channels_last' if args.channels_last else 'contiguous'}) to export the fastest:", flush=True)
    out = export_run(args.run, args.out, tune_batch=args.tune_batch, channels_last=args.channels_last,
                     progress=lambda line: print(f"  {line}", flush=True))
    files = "model.safetensors, manifest.json"
    if args.format == "onnx":
        from trainer.export_onnx import OPSET, TOLERANCE, write_onnx

        path, error = write_onnx(out)
        files += f", {path.name}"
        print(f"onnx: opset {OPSET}, dynamic batch, onnx.checker passed; onnxruntime vs torch logits "
              f"{error:.1e} relative (allowed {TOLERANCE:.0e})")
    print(f"exported {args.run} -> {out} ({files})")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """Load an export with torch alone; report top-1/top-5 on the eval split and latency."""
    import torch

    from trainer.data import load_datasets, make_loader
    from trainer.engine import Precision
    from trainer.export import load_exported
    from trainer.latency import measure_latency
    from trainer.loop import evaluate
    from trainer.malloc import malloc_tuned

    onnx = args.runtime == "onnxruntime"
    if onnx and args.compile:
        print("tdcompress: --compile applies to --runtime torch, not onnxruntime", file=sys.stderr)
        return 2
    if onnx:
        from trainer.export_onnx import load_onnx

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


def _cmd_plan(args: argparse.Namespace) -> int:
    """Print the rank plan a run of CONFIG would use, without data, Ray or any training."""
    from launcher.pipeline import make_plan
    from trainer.data import DATASET_SHAPES

    cfg = load_config(args.config, args.overrides)
    if cfg.compression.budget == "latency":  # measured layer latencies, predicted vs measured: launcher/latency_plan.py
        from launcher.latency_plan import latency_plan_command

        return latency_plan_command(cfg, args.config, args.weights, args.run, args.latency_cache)
    if args.weights or args.run:  # both allocations on trained weights: launcher/plan.py
        from launcher.plan import plan_command

        return plan_command(cfg, args.config, args.weights, args.run)
    classes, size = DATASET_SHAPES[cfg.data.dataset]
    plan = make_plan(cfg, classes, size)
    if plan is None:
        print(f"{args.config}: no admm or decompose phase, nothing to plan")
        return 0
    c = cfg.compression
    print(f"rank plan ({c.format}, keep_ratio {c.keep_ratio}, rank_multiple {c.rank_multiple}, owners for "
          f"{cfg.cluster.num_workers} workers; {cfg.model.name} at {size} px):\n{plan.table()}")
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


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
                        "(trainer/malloc.py; only the `tdcompress` console command re-runs)")


CONFIG_HELP = "YAML experiment file, e.g. configs/quickstart.yaml (`tdcompress configs list`: the bundled ones)"
OVERRIDES_HELP = "key.sub=value overrides (YAML values; list items by index: phases.0.epochs=3)"


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("tdcompress")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdcompress", description="Low-tensor-rank CNN compression with ADMM, "
                                "distributed with Ray + DeepSpeed, tracked in MLflow.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an experiment's phases (resume=true continues the last run)")
    run.add_argument("config", help="YAML experiment file, e.g. configs/quickstart.yaml")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. cluster.num_workers=1")
    run.set_defaults(func=_cmd_run)

    plan = sub.add_parser("plan", help="print the rank plan of a config (no data, no Ray, no training)")
    plan.add_argument("config", help=CONFIG_HELP)
    plan.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    source = plan.add_mutually_exclusive_group()
    source.add_argument("--weights", metavar="FILE", help="trained weights (a state_dict file or a checkpoint's "
                        "shared.pt): show the uniform and the error allocation with each layer's error")
    source.add_argument("--run", metavar="RUN_DIR", help="like --weights, from the run's newest checkpoint that "
                        "holds the dense model")
    plan.add_argument("--latency-cache", metavar="FILE", help="compression.budget=latency: the JSON cache of "
                      "measured layer latencies (default $TDC_LATENCY_CACHE or ~/.cache/tdcompress/latency.json)")
    plan.set_defaults(func=_cmd_plan)

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

    from launcher import compare_cli  # `tdcompress compare`: filters, grouping, Pareto fronts, output formats

    compare_cli.add_parser(sub)

    from launcher import records_cli  # `tdcompress records export|import|render`: runs as JSON, and back

    records_cli.add_parser(sub)

    from launcher.sweep import cli as sweep_cli  # `tdcompress sweep SWEEP.yaml`: a declarative grid of runs

    sweep_cli.add_parser(sub)

    from launcher import pack_cli as pack_cmd  # `tdcompress pack SRC DST`: ImageFolder -> tar shards

    pack_cmd.add_parser(sub)

    from launcher import submit as submit_cmd  # `tdcompress submit|jobs|cluster`: Ray Jobs and a local cluster

    submit_cmd.add_parsers(sub)

    from launcher import configs_cli  # `tdcompress configs list|copy`: the configs shipped with the package

    configs_cli.add_parser(sub)

    config = sub.add_parser("config", help="inspect configs")
    csub = config.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config after overrides and validation")
    show.add_argument("config", help=CONFIG_HELP)
    show.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    show.set_defaults(func=_cmd_config_show)
    return p


def _override_hint(argv: list[str]) -> str | None:
    """An override written as an option (``--optim.lr=0.1``): say how overrides are written."""
    for a in argv:
        key, _, value = a.partition("=")
        if a.startswith("--") and "." in key:
            example = f"{key[2:]}={value or 'VALUE'}"
            return (f"tdcompress: {a!r} looks like a config override; overrides are key=value without dashes, "
                    f"e.g. {example}")
    return None


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides may also come after a command's options
    (``plan CONFIG --run RUN key=value``), as they may anywhere after ``run CONFIG``."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        late = [a for a in extra if "=" in a and not a.startswith("-")]
        if hasattr(args, "overrides") and len(late) == len(extra):
            args.overrides = [*(args.overrides or []), *late]
        else:
            parser.parse_args(argv)  # the usual "unrecognized arguments" message and exit 2
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    hint = _override_hint(argv)
    if hint:
        print(hint, file=sys.stderr)
        return 2
    args = _parse(build_parser(), argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("tdcompress: interrupted", file=sys.stderr)
        return 130
    except ConfigError as e:
        print(f"tdcompress: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        if args.command not in ("export", "evaluate"):
            raise
        print(f"tdcompress: {e}", file=sys.stderr)  # a wrong run or export directory: it says which and why
        return 2
    except Exception as e:  # a missing dataset, a malformed export or checkpoint: say it plainly, no traceback
        from trainer.checkpoint import CheckpointError
        from trainer.data import DatasetError
        from trainer.export import ExportError

        kinds = {DatasetError: "data", ExportError: "export", CheckpointError: "checkpoint"}
        kind = next((k for t, k in kinds.items() if isinstance(e, t)), None)
        if kind is None:
            raise
        from trainer.tracking_runs import error_message

        print(f"tdcompress: {kind} error: {error_message(e)}", file=sys.stderr)
        return 2


def console() -> int:
    """The `tdcompress` console command: ``main`` after re-running with tuned malloc for CPU timing commands."""
    argv = sys.argv[1:]
    timing = argv[:1] == ["evaluate"] or (argv[:1] == ["export"] and any(a.startswith("--tune-batch") for a in argv))
    if timing and "--no-malloc-tuning" not in argv:
        from trainer.malloc import reexec_with_tuned_malloc

        reexec_with_tuned_malloc()
    return main(argv)


if __name__ == "__main__":
    sys.exit(console())
