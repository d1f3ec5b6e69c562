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
from launcher.run.signals import sigterm_interrupts


def _cmd_run(args: argparse.Namespace) -> int:
    from launcher.run import pipeline

    cfg = load_config(args.config, args.overrides)
    sigterm_interrupts()
    try:
        pipeline.run(cfg)
    except (KeyboardInterrupt, ConfigError):
        raise
    except Exception as e:
        from launcher.run.run_failure import report_run_failure

        if not report_run_failure(cfg, e):  # bad input found late (data, checkpoint): main says it plainly
            raise
        return 1
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    """Print the rank plan a run of CONFIG would use, without data, Ray or any training (launcher/plan.py)."""
    from launcher.plan import plan_command

    cfg = load_config(args.config, args.overrides)
    if cfg.compression.budget == "latency":  # measured layer latencies, predicted vs measured: launcher/latency_plan.py
        from launcher.latency_plan import latency_plan_command

        return latency_plan_command(cfg, args.config, args.weights, args.run, args.latency_cache)
    return plan_command(cfg, args.config, args.weights, args.run)


def _cmd_config_show(args: argparse.Namespace) -> int:
    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


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

    from launcher import export_cli  # `tdcompress export|evaluate`: the run's model outside training

    export_cli.add_parsers(sub)

    from launcher.results import compare_cli  # `tdcompress compare`: filters, grouping, Pareto fronts, output formats

    compare_cli.add_parser(sub)

    from launcher.results import records_cli  # `tdcompress records export|import|render`: runs as JSON, and back

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
        from trainer.checkpoints.files import CheckpointError
        from trainer.data import DatasetError
        from trainer.export.torch_export import ExportError

        kinds = {DatasetError: "data", ExportError: "export", CheckpointError: "checkpoint"}
        kind = next((k for t, k in kinds.items() if isinstance(e, t)), None)
        if kind is None:
            raise
        from trainer.tracking.runs import error_message

        print(f"tdcompress: {kind} error: {error_message(e)}", file=sys.stderr)
        return 2


def console() -> int:
    """The `tdcompress` console command: ``main`` after re-running with tuned malloc for CPU timing commands."""
    argv = sys.argv[1:]
    timing = argv[:1] == ["evaluate"] or (argv[:1] == ["export"] and any(a.startswith("--tune-batch") for a in argv))
    if timing and "--no-malloc-tuning" not in argv:
        from trainer.export.malloc import reexec_with_tuned_malloc

        reexec_with_tuned_malloc()
    return main(argv)


if __name__ == "__main__":
    sys.exit(console())
