"""`tdcompress sweep SWEEP.yaml`: validate a sweep file, show its rows, run what is left of it."""
from __future__ import annotations

import argparse
import os

EXAMPLES = """examples:
  tdcompress sweep configs/study/sweeps/r20_budget.yaml --dry-run     every row's status and exact command
  tdcompress sweep configs/study/sweeps/r20_budget.yaml               run what is left, one row at a time
  tdcompress sweep SWEEP.yaml --only dense-r20-s0 --only r20-tucker2-3x-admm-b5-s0
  tdcompress sweep SWEEP.yaml --address http://HEAD:8265              rows as Ray Jobs, side by side
  tdcompress compare --filter "tags.\\`tdcompress.sweep\\` = 'r20-budget'"   the sweep's table
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a declarative grid of runs (dense parents first), resumable",
                       description="Expand a sweep file (a base config, axes, seeds, the dense parent run per seed) "
                       "into named rows and run the unfinished ones: finished rows are skipped, partial rows resume "
                       "from their checkpoints, every row is tagged tdcompress.sweep=<name>, and its record is "
                       "exported into the sweep's records directory when it finishes.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="YAML sweep file (see launcher/sweep/spec.py; e.g. configs/study/sweeps/*.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print every row's status and exact command; run nothing")
    p.add_argument("--only", action="append", default=[], metavar="ROW",
                   help="only this row (repeatable); its dense row must be finished or given too")
    p.add_argument("--address", help="a Ray cluster's job server (http://HEAD:8265): submit rows as Ray Jobs, "
                   "side by side as resources allow (default: one at a time on this machine)")
    p.add_argument("--storage", metavar="DIR", help="run directories go here (default: the sweep file's storage)")
    p.add_argument("--tracking-uri", metavar="URI", help="the rows' MLflow store (default: the sweep file's)")
    p.add_argument("--records", metavar="DIR", help="export each finished row's record here (default: the sweep "
                   "file's records)")
    p.add_argument("--retries", type=int, default=2, help="a row whose run fails (exit 1: a crashed worker, a Ray "
                   "that did not start) runs again from its checkpoints up to this many times (default 2; bad input "
                   "is not retried; with --address a failed job is reported, not submitted again)")
    p.add_argument("--nice", type=int, default=0, help="run the rows at this niceness (0..19; default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from launcher.schema import ConfigError
    from launcher.sweep.rows import dry_run_lines, where
    from launcher.sweep.spec import load_sweep

    sweep = load_sweep(args.sweep)
    sweep = replace(sweep, storage=args.storage or sweep.storage, tracking_uri=args.tracking_uri or sweep.tracking_uri,
                    records=args.records or sweep.records)
    names = [r.name for r in sweep.rows]
    unknown = [n for n in args.only if n not in names]
    if unknown:
        raise ConfigError(f"--only: unknown row(s) {', '.join(unknown)}; rows: {', '.join(names)}")
    if not 0 <= args.nice <= 19:
        raise ConfigError(f"--nice: must be in 0..19, got {args.nice}")
    if args.retries < 0:
        raise ConfigError(f"--retries: must be 0 or more, got {args.retries}")
    only = set(args.only) or None
    at = where(sweep)
    print(f"[sweep] {sweep.name}: {len(sweep.rows)} rows, storage {at.storage}, tracking {at.tracking_uri}, "
          f"records {at.records or '(none)'}", flush=True)
    if args.dry_run:
        print("\n".join(dry_run_lines(sweep, at, only)))
        return 0
    if args.nice:
        lower_priority(args.nice)
    if args.address:
        from launcher.sweep.jobs import run_jobs

        failed = run_jobs(sweep, at, args.address, only)
    else:
        from launcher.run.signals import sigterm_interrupts
        from launcher.sweep.run import run_local

        sigterm_interrupts()
        failed = run_local(sweep, at, only, retries=args.retries)
    print(f"[sweep] {sweep.name}: done; not finished: {', '.join(failed) or 'none'}", flush=True)
    return 1 if failed else 0


# A niced row's Ray gets no CPU for as long as other work wants it all. With Ray's defaults its raylet exits
# when the GCS has not answered for 60 s, and the GCS declares a raylet dead after 5 missed health checks
# (10 s timeout each): a study row died both ways while a test suite ran beside it. Ten minutes instead; the
# rows' embedded Ray (started by `tdcompress run`) reads these from its environment. A value set already wins.
# Ray's wait for a new node's raylet to register (30 s) is fixed in its code: a row failing there is retried
# (--retries, launcher/sweep/run.py).
STARVED_RAY_ENV = {"RAY_gcs_rpc_server_reconnect_timeout_s": "600", "RAY_health_check_timeout_ms": "60000",
                   "RAY_health_check_failure_threshold": "10", "RAY_worker_register_timeout_seconds": "600"}


def lower_priority(nice: int) -> None:
    """Run this process and every row it starts at niceness ``nice``. Under Linux's autogroup scheduling a
    niceness counts only against the processes of the same session, so a sweep started in its own session
    (setsid, a new terminal, nohup from a script) would still take half the machine from an interactive shell:
    the session's own autogroup niceness is lowered too, where the kernel has one. The rows' Ray tolerates
    being starved for minutes (:data:`STARVED_RAY_ENV`)."""
    for key, value in STARVED_RAY_ENV.items():
        os.environ.setdefault(key, value)
    os.nice(max(0, nice - os.nice(0)))  # at that niceness, never above it (already nicer: left so); rows inherit it
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:  # no autogroup here (not Linux, or a kernel without it): niceness alone counts
        pass
