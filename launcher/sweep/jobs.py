"""Running a sweep on a Ray cluster: every ready row is a Ray Job; Ray places them side by side.

A row is ready when its dense row has finished (dense rows are ready at once). Each is checked on this
machine and submitted exactly as `tdcompress submit` would (launcher/submit.py); their states are read
every :data:`POLL_S` seconds, and a row whose job ended is recorded (its record exported) and may make
grid rows ready. Ctrl-C / SIGTERM stops the jobs this sweep submitted, so none is left driving a run
directory that the next sweep resumes.
"""
from __future__ import annotations

import os
import time

from launcher.sweep.rows import Where, command, configs, finished, parent_ready, status
from launcher.sweep.run import POLL_S, export_record, keep_dense, say
from launcher.sweep.spec import Sweep

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _state(info) -> str:
    return str(getattr(info.status, "value", info.status))


# long: one polling loop over the rows' states (submit the ready, reap the ended, stop its own jobs on Ctrl-C)
def run_jobs(sweep: Sweep, at: Where, address: str | None, only: set[str] | None = None,
             state_dir: str | None = None) -> list[str]:
    """Submit the unfinished rows (of ``only``, default all) as Ray Jobs, dense rows first, and wait for them;
    returns the rows that did not finish."""
    from cluster import jobs
    from launcher.submit import PROJECT, plan_submission

    target = jobs.resolve_target(address, state_dir)
    jobs.probe(target)
    st = target.state
    cfgs, dirs = configs(sweep, at)
    chosen = [r for r in sweep.rows if only is None or r.name in only]
    states = {r.name: status(sweep, at, r, cfgs, dirs) for r in chosen}
    pending = [r for r in chosen if states[r.name] not in ("finished", "recorded", "running")]
    for r in chosen:
        if states[r.name] == "finished":
            say(f"{r.name}: finished, skipped")
            keep_dense(sweep, r, cfgs, dirs)
        elif states[r.name] == "recorded":
            say(f"{r.name}: recorded in {at.records} (it ran elsewhere), skipped")
    running: dict[str, str] = {}  # row name -> job id
    failed = [n for n, s in states.items() if s == "running"]
    for name in failed:
        say(f"{name}: another process on this machine runs it; not submitted (run the sweep again when it ends)")
    try:
        while pending or running:
            for row in list(pending):
                if row.parent and (row.parent in running or any(p.name == row.parent for p in pending)):
                    continue  # its dense row is still to run
                pending.remove(row)
                if not parent_ready(sweep, row, cfgs, dirs):
                    say(f"{row.name}: skipped, its dense row {row.parent} did not finish")
                    failed.append(row.name)
                    continue
                keep_dense(sweep, row, cfgs, dirs)
                cmd = command(sweep, at, row, dirs, resume=dirs[row.name].exists())
                sub = plan_submission(row.config, cmd[3:], len(st.nodes) if st else None, bool(st and st.same_host),
                                      st.mlflow_uri if st else None, dict(os.environ))
                job_id = jobs.submit(target, sub.entrypoint, str(PROJECT), sub.env_vars,
                                     f"tdc-{sweep.name}-{row.name}-{int(time.time()) % 100000}",
                                     {"tdcompress_sweep": sweep.name, "run_name": row.name})
                running[row.name] = job_id
                say(f"{row.name}: submitted as job {job_id}: {sub.entrypoint}")
            if running:
                time.sleep(POLL_S)
            for name, job_id in list(running.items()):
                state = _state(jobs.status(target, job_id))
                if state not in TERMINAL:
                    continue
                del running[name]
                row = next(r for r in sweep.rows if r.name == name)
                if state == "SUCCEEDED" and finished(dirs[name], cfgs[name]):
                    path = export_record(sweep, at, row, cfgs[name], dirs[name])
                    say(f"{name}: job {job_id} succeeded{f'; record {path}' if path else ''}")
                    keep_dense(sweep, row, cfgs, dirs)
                else:
                    say(f"{name}: job {job_id} ended {state}; `tdcompress jobs logs {job_id}` says why")
                    failed.append(name)
    except KeyboardInterrupt:
        for name, job_id in running.items():
            jobs.stop(target, job_id)
            say(f"{name}: stopped job {job_id} (the next sweep resumes it)")
        raise
    return failed
