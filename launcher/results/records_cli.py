"""`tdcompress records export|import|render`: run records as small JSON files, and documents built from them.

    tdcompress records export DIR [--filter EXPR] [RUN ...]   one JSON per parent run (launcher/results/records.py)
    tdcompress records import DIR [--tracking-uri URI]        back into an MLflow store (launcher/results/records_import.py)
    tdcompress records curve DIR [--table rows|curve|best|trend]    a study's stages, budget curve, best models
                                                                    and each arm's gap to dense by budget
    tdcompress records render RESULTS.md [--check]            regenerate the file's tables

A table in a rendered file is the output of the `tdcompress compare` or `tdcompress records curve` command
written in the HTML comment above it, up to the next ``<!-- end -->``::

    <!-- tdcompress compare --records configs/study/records/r20-budget --format markdown --plot '' -->
    | run | ... |
    <!-- end -->

A command with ``--records DIR`` reads committed records (paths relative to the file's directory's
checkout, i.e. the current directory), so the file regenerates on a fresh clone without any store; one
without needs ``--tracking-uri`` given to `render`, which adds it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

from launcher.schema import ConfigError

BLOCK = re.compile(r"(<!-- (tdcompress (?:compare|records curve) [^\n]*?) -->\n)(.*?)(<!-- end -->)", re.S)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("records", help="export runs as JSON records, import them into MLflow, render tables")
    rsub = p.add_subparsers(dest="records_command", required=True)

    ex = rsub.add_parser("export", help="write one JSON record per parent run (params, tags, per-epoch metrics of "
                         "every phase, final figures, command, commit, wall time)")
    ex.add_argument("dir", help="records directory (created; a run's file is <run name>.json, rewritten in place)")
    ex.add_argument("runs", nargs="*", help="only these run names or ids")
    ex.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)")
    ex.add_argument("--experiment", default="tdcompress", help="MLflow experiment (default: tdcompress)")
    ex.add_argument("--filter", default="", metavar="EXPR",
                    help="MLflow search filter, e.g. \"tags.`tdcompress.sweep` = 'r20-budget'\"")
    ex.add_argument("--all", action="store_true", help="also runs that did not finish (FAILED, KILLED, RUNNING)")
    ex.set_defaults(func=_cmd_export)

    im = rsub.add_parser("import", help="load a records directory into an MLflow store (parents, phases, histories)")
    im.add_argument("dir", help="records directory written by `tdcompress records export`")
    im.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db; "
                    "created when missing)")
    im.add_argument("--experiment", help="put every run in this experiment (default: each record's own)")
    im.set_defaults(func=_cmd_import)

    cv = rsub.add_parser("curve", help="a study from its records: every row's top-1 at each stage, ADMM minus "
                         "direct by budget and ratio, the best model per ratio")
    cv.add_argument("dir", help="records directory (e.g. docs/records/r20-budget)")
    cv.add_argument("--table", default="curve", help="rows (every row, each stage), curve (ADMM - direct by "
                    "budget; default), best (the best row per ratio, with its command) or trend (each arm's "
                    "gap to dense by budget, its gain per doubling and the budget that meets --goal)")
    cv.add_argument("--goal", default="", metavar="KEEP=POINTS,...", help="for --table trend and --plot: the most points "
                    "below dense each keep ratio may end, e.g. 0.33=1.0,0.2=2.5 (default: none)")
    cv.add_argument("--format", default="table", help="table (default), markdown, csv or json")
    cv.add_argument("--plot", default="", metavar="PNG", help="also draw the budget curve here (e.g. "
                    "docs/r20_budget_curve.png; default: none)")
    cv.set_defaults(func=_cmd_curve)

    rd = rsub.add_parser("render", help="regenerate the `tdcompress compare` tables of a markdown file")
    rd.add_argument("file", help="markdown file with <!-- tdcompress compare ... --> ... <!-- end --> blocks")
    rd.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file is out of date")
    rd.add_argument("--tracking-uri", help="store for the blocks whose command has no --records")
    rd.set_defaults(func=_cmd_render)


def _cmd_export(args: argparse.Namespace) -> int:
    from launcher.results.compare import store_uri
    from launcher.results.records import export_records
    from trainer.tracking.tracker import resolve_tracking_uri

    uri = store_uri(resolve_tracking_uri(args.tracking_uri))
    paths = export_records(uri, args.experiment, Path(args.dir), args.runs, args.filter, args.all)
    if not paths:
        raise ConfigError(f"no {'' if args.all else 'finished '}runs to export from {uri}"
                          f"{' matching ' + repr(args.filter) if args.filter else ''}")
    print(f"exported {len(paths)} record(s) to {args.dir}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from launcher.results.records_import import import_records
    from trainer.tracking.tracker import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    done = import_records(uri, Path(args.dir), args.experiment)
    for name, run_id, new in done:
        print(f"{name}: {'imported as' if new else 'already there,'} {run_id}")
    print(f"{sum(new for _, _, new in done)} imported, {sum(not new for _, _, new in done)} already in {uri}")
    return 0


def _cmd_curve(args: argparse.Namespace) -> int:
    from launcher.results.compare_plot import check_plot_path
    from launcher.results.records import load_records
    from launcher.results.study_curve import study_rows
    from launcher.results.study_curve import table as curve_table
    from launcher.results.study_curve_plot import plot_curve
    from launcher.results.study_trend import parse_goals

    plot_path = check_plot_path(Path(args.plot)) if args.plot else None  # a bad path fails before any reading
    goals = parse_goals(args.goal)
    rows = study_rows(load_records(Path(args.dir)))
    print(curve_table(rows, args.table, args.format, args.dir, goals))
    if plot_path and plot_curve(rows, plot_path, goals):
        print(f"plot: {plot_path}", file=sys.stderr)
    return 0


def table(command: str, tracking_uri: str | None) -> str:
    """What ``command`` (a `tdcompress compare` or `records curve` line) prints, run in this process; ends in a
    newline."""
    from launcher.results import compare_cli

    argv = shlex.split(command)[1:]
    if argv[:2] == ["records", "curve"]:
        parser = argparse.ArgumentParser(prog="tdcompress")
        add_parser(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(argv)
        if args.plot:
            raise ConfigError(f"{command!r}: a rendered block draws no plot; remove --plot from it")
        return _captured(args)
    if "--tracking-uri" in argv:
        raise ConfigError(f"{command!r}: give --records DIR (or --tracking-uri to render), not --tracking-uri")
    if "--records" not in argv:
        if not tracking_uri:
            raise ConfigError(f"{command!r} reads an MLflow store: add --records DIR to it, or pass --tracking-uri")
        argv += ["--tracking-uri", tracking_uri]
    if argv[:1] != ["compare"]:
        raise ConfigError(f"{command!r}: a block's command must be 'tdcompress compare ...'")
    parser = argparse.ArgumentParser(prog="tdcompress")
    compare_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return _captured(parser.parse_args(argv))


def _captured(args: argparse.Namespace) -> str:
    """What the parsed command ``args`` prints, ending in a newline."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        args.func(args)
    out = buf.getvalue()
    return out if out.endswith("\n") else out + "\n"


def render(text: str, tracking_uri: str | None) -> str:
    """``text`` with every compare block's body replaced by its command's output."""
    return BLOCK.sub(lambda m: m.group(1) + table(m.group(2), tracking_uri) + m.group(4), text)


def _cmd_render(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise ConfigError(f"file: {path} does not exist")
    text = path.read_text()
    if not BLOCK.search(text):
        raise ConfigError(f"file: {path} has no '<!-- tdcompress compare ... -->' (or 'records curve') ... "
                          "'<!-- end -->' block")
    new = render(text, args.tracking_uri)
    if args.check:
        print("up to date" if new == text else f"{path} is out of date: run tdcompress records render {path}")
        return 0 if new == text else 1
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".render-")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, path)
    print(f"wrote {path} ({len(BLOCK.findall(new))} tables)", file=sys.stderr)
    return 0
