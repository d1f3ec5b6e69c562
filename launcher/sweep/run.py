"""Running a sweep: the rows that are not finished, dense rows first, each as one `tdcompress run`.

On this machine (no ``--address``) the rows run one after another, each a `tdcompress run` process with
its own embedded Ray (or ``cluster.backend=local``): two embedded Rays would only share the same cores.
With ``--address`` every ready row is submitted as a Ray Job (launcher/submit.py: checked here first),
and Ray runs them side by side as far as the cluster has room; the grid rows are submitted once their
dense rows have finished. Either way a finished row is skipped and a partial one resumes from its
checkpoints (``resume=true``), and each row's record is exported into the sweep's records directory
when it finishes (a dense row's weights too, with ``dense.weights``); a row recorded on another machine
is skipped.

One sweep at a time per storage: the sweep holds a lock file there, which its running row inherits, so a
second sweep (or one started while a row of a killed sweep still runs) stops with a clear message
instead of driving the same run directory twice.
"""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher.schema import Config, ConfigError
from launcher.sweep.rows import (
    SWEEP_TAG,
    Where,
    command,
    configs,
    finished,
    keep_weights,
    kept,
    parent_of,
    running_elsewhere,
    status,
)
from launcher.sweep.spec import Row, Sweep

POLL_S = 10.0  # how often job states (cluster) or another process running a row (here) are looked at


def say(msg: str) -> None:
    print(f"[sweep] {msg}", flush=True)


def export_record(sweep: Sweep, at: Where, row: Row, cfg: Config, run_dir: Path) -> Path | None:
    """Write ``row``'s record into the sweep's records directory (if it has one); returns the file.

    The row's MLflow run is the one its run directory names (``run.json``), also when another process
    started it (e.g. a dense run begun by hand): it gets the sweep's tag if it lacks it, so that
    `compare --filter` on the tag lists every row. A record that cannot be written is a warning: the
    row's run is done and stays in the store; `tdcompress records export` can write it later.
    """
    if at.records is None or not cfg.tracking.enabled:
        return None
    from launcher.results.records import export_records
    from trainer.tracking import tracker as tracking

    try:
        parent = json.loads((run_dir / "run.json").read_text()).get("parent_id")
        if not parent:
            raise ValueError(f"{run_dir / 'run.json'} names no MLflow run")
        client = tracking.client(at.tracking_uri)
        if client.get_run(parent).data.tags.get(SWEEP_TAG) != sweep.name:
            client.set_tag(parent, SWEEP_TAG, sweep.name)
        paths = export_records(at.tracking_uri, cfg.tracking.experiment, at.records, [parent], limit=1)
        return paths[0] if paths else None
    except Exception as e:
        print(f"WARNING [sweep] {row.name}: its record was not written ({type(e).__name__}: "
              f"{tracking.short_error(e)}); write it with: tdcompress records export {at.records} {row.name} "
              f"--tracking-uri {at.tracking_uri}", file=sys.stderr, flush=True)
        return None


def keep_dense(sweep: Sweep, row: Row, cfgs: dict[str, Config], dirs: dict[str, Path]) -> None:
    """Before ``row`` runs, and after a dense row finishes: the dense weights it needs are written into
    ``dense.weights`` (a grid row's model.init names that file), from the dense row's finished run here."""
    dense = row if row.dense else parent_of(sweep, row)
    if dense is None or dense.weights is None or kept(dense) or not finished(dirs[dense.name], cfgs[dense.name]):
        return
    say(f"{dense.name}: weights kept in {keep_weights(dense, dirs[dense.name])}")


def _lock(at: Where, sweep: Sweep) -> int:
    at.storage.mkdir(parents=True, exist_ok=True)
    path = at.storage / f".sweep-{sweep.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"sweep {sweep.name}: another sweep process, or a row a killed sweep started, still holds "
                          f"{path}; wait for it to end (or stop it), then run the sweep again") from None
    return fd


def _run_local(cmd: list[str], lock_fd: int) -> int:
    """Run one row's command in a child process; Ctrl-C / SIGTERM here stops it the same way (its runs close
    KILLED, its checkpoints stay) before this process stops."""
    argv = [sys.executable, "-m", "launcher.cli", *cmd[1:]]
    proc = subprocess.Popen(argv, pass_fds=(lock_fd,))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise


# A row that exits 1 failed while it ran (a worker crashed, Ray did not start on a starved machine); bad input
# (2) fails the same way every time, and an interrupted row (130) was stopped on purpose: neither is retried.
RETRIED_EXIT = 1


def _run_row(sweep: Sweep, at: Where, row: Row, st: str, cfgs: dict[str, Config], dirs: dict[str, Path],
             lock_fd: int, retries: int) -> tuple[int, bool]:
    """Run ``row`` (status ``st``: new or partial), and again from its checkpoints after a failure, up to
    ``retries`` more times; returns (the last exit code, whether the row finished)."""
    resume = st == "partial"
    for attempt in range(retries + 1):
        cmd = command(sweep, at, row, dirs, resume=resume)
        verb = "resuming" if resume else "starting"
        if attempt:
            verb = f"retry {attempt}/{retries}, {verb}"
        say(f"{row.name}: {verb}: {shlex.join(cmd)}")
        t0 = time.time()
        rc = _run_local(cmd, lock_fd)
        done = finished(dirs[row.name], cfgs[row.name])
        say(f"{row.name}: exit {rc} after {(time.time() - t0) / 60:.1f} min{'' if done else ', not finished'}")
        if done or rc != RETRIED_EXIT:
            return rc, done
        resume = dirs[row.name].exists()
    return rc, done


def run_local(sweep: Sweep, at: Where, only: set[str] | None = None, retries: int = 0) -> list[str]:
    """Run every unfinished row (of ``only``, default all) in order on this machine; a row whose run fails
    (exit 1) runs again from its checkpoints up to ``retries`` times. Returns the names of rows that did not
    finish."""
    cfgs, dirs = configs(sweep, at)
    lock_fd = _lock(at, sweep)
    failed = []
    try:
        for row in [r for r in sweep.rows if only is None or r.name in only]:
            if pid := running_elsewhere(row):
                say(f"{row.name}: process {pid} runs it; waiting for it to end")
                while running_elsewhere(row):
                    time.sleep(POLL_S)
            st = status(sweep, at, row, cfgs, dirs)
            if st == "recorded":
                say(f"{row.name}: recorded in {at.records} (it ran elsewhere), skipped")
                continue
            if st == "finished":
                say(f"{row.name}: finished, skipped")
                if at.records and not any(at.records.glob(f"{row.name}.json")):
                    export_record(sweep, at, row, cfgs[row.name], dirs[row.name])
                keep_dense(sweep, row, cfgs, dirs)
                continue
            if st == "waiting":
                say(f"{row.name}: skipped, its dense row {row.parent} did not finish")
                failed.append(row.name)
                continue
            keep_dense(sweep, row, cfgs, dirs)
            rc, done = _run_row(sweep, at, row, st, cfgs, dirs, lock_fd, retries)
            if rc == 0 and done:
                path = export_record(sweep, at, row, cfgs[row.name], dirs[row.name])
                if path:
                    say(f"{row.name}: record {path}")
                keep_dense(sweep, row, cfgs, dirs)
            else:
                failed.append(row.name)
    finally:
        os.close(lock_fd)
    return failed
