"""`tdcompress compare`: its arguments and the command (the work is in compare.py and compare_plot.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.schema import ConfigError

EXAMPLES = """examples:
  tdcompress compare                                          finished runs, newest first, + compare.png
  tdcompress compare --filter "params.compression.format = 'tucker2'"
  tdcompress compare --filter "tags.model = 'resnet20'" --group-by method,format,keep_ratio
  tdcompress compare --format markdown --plot ''              a markdown table (RESULTS.md), no plot
  tdcompress compare --all --format json                      every run, also FAILED/KILLED/RUNNING
  tdcompress compare --records configs/study/records/NAME     from exported run records, no MLflow store
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from launcher.results.compare import GROUP_KEYS, OUTPUT_FORMATS

    p = sub.add_parser("compare", help="finished runs side by side from MLflow, grouped over seeds, Pareto fronts",
                       description="Compare the runs recorded in MLflow: accuracy (dense, right after decomposition, "
                       "final, delta vs dense), size and compute (params, FLOPs and their ratios), phases, wall "
                       "time, device and command. Reads the store; never creates one.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="only these run names or ids (default: every run the filter selects)")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: tdcompress; with --records: "
                   "every record)")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db "
                   "in the current directory)")
    p.add_argument("--records", metavar="DIR", help="read the run records in DIR (`tdcompress records export`) "
                   "instead of an MLflow store; filters, grouping and formats work the same")
    p.add_argument("--filter", default="", metavar="EXPR",
                   help="MLflow search filter, e.g. \"params.compression.format = 'tucker2' and tags.method = 'admm'\" "
                        "(tags: model, dataset, method, format, keep_ratio, seed; params: the dotted config keys)")
    p.add_argument("--all", action="store_true", help="include runs that did not finish (FAILED, KILLED, RUNNING)")
    p.add_argument("--group-by", default="", metavar="KEYS",
                   help=f"comma-separated keys whose runs become one row with mean ± std (e.g. over seeds); "
                        f"allowed: {', '.join(GROUP_KEYS)}")
    p.add_argument("--format", default="table", choices=OUTPUT_FORMATS,
                   help="output: aligned table (default), markdown, csv or json")
    p.add_argument("--limit", type=int, default=100, help="at most this many runs, newest first (default 100)")
    p.add_argument("--plot", default="compare.png", metavar="PNG",
                   help="write top-1 vs params and vs FLOPs with Pareto fronts here (default compare.png; '' = none)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from launcher.results.compare import group, mark_pareto, parent_runs, render, row_of
    from launcher.results.compare_plot import check_plot_path, plot
    from trainer.tracking.tracker import resolve_tracking_uri

    plot_path = check_plot_path(Path(args.plot)) if args.plot else None  # a bad path fails before any reading
    if args.limit < 1:
        raise ConfigError(f"--limit: must be >= 1, got {args.limit}")
    if args.records:
        from launcher.results.records import search_records

        if args.tracking_uri:
            raise ConfigError("--records and --tracking-uri: give one source of runs, not both")
        where = f"the records in {args.records}"
        runs = search_records(Path(args.records), args.experiment, args.runs, args.limit, args.filter, args.all)
    else:
        args.experiment = args.experiment or "tdcompress"
        where = f"experiment {args.experiment!r} at {resolve_tracking_uri(args.tracking_uri)}"
        runs = parent_runs(resolve_tracking_uri(args.tracking_uri), args.experiment, args.runs, args.limit,
                           args.filter, args.all)
    if not runs:
        which = "" if args.all else "finished "
        more = "" if args.all else "; --all also shows FAILED, KILLED and RUNNING runs"
        raise ConfigError(f"no {which}runs in {where}"
                          f"{' matching ' + repr(args.filter) if args.filter else ''}{more}")
    rows = [row_of(r) for r in runs]
    keys = [k.strip() for k in args.group_by.split(",") if k.strip()]
    if keys:
        rows = group(rows, keys)
    mark_pareto(rows)
    print(render(rows, args.format))
    if plot_path and plot(rows, plot_path):
        print(f"plot: {plot_path}", file=sys.stderr)  # stderr: stdout stays the table (markdown, csv, json)
    return 0
