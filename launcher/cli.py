"""`tdcompress` command line.

    tdcompress run CONFIG [key.sub=value ...]        train (embedded Ray by default)
    tdcompress config show CONFIG [key=value ...]    print the resolved config
"""
from __future__ import annotations

import argparse
import sys

from launcher.config import ConfigError, dump_yaml, load_config


def _cmd_run(args: argparse.Namespace) -> int:
    from launcher import pipeline

    cfg = load_config(args.config, args.overrides)
    pipeline.run(cfg)
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdcompress", description="Low-tensor-rank CNN compression with ADMM, "
                                "distributed with Ray + DeepSpeed, tracked in MLflow.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an experiment's phases (resume=true continues the last run)")
    run.add_argument("config", help="YAML experiment file, e.g. configs/quickstart.yaml")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. cluster.num_workers=1")
    run.set_defaults(func=_cmd_run)

    config = sub.add_parser("config", help="inspect configs")
    csub = config.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config after overrides and validation")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(func=_cmd_config_show)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"tdcompress: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a missing dataset and the like: say it plainly, no traceback
        from trainer.data import DatasetError

        if isinstance(e, DatasetError):
            print(f"tdcompress: data error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
