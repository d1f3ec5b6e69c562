"""The MLflow runs of one `tdcompress run`: a parent and one child per phase, opened, reopened and closed.

Run states follow what happened, also after faults: a run the driver saw end is closed as
FINISHED, FAILED or KILLED (Ctrl-C); phases complete by the checkpoints are FINISHED, the one
that was running gets the run's status, the ones that never started KILLED; a resume sets the
phases it runs RUNNING again; a parent found RUNNING without a note from its driver was left by a
killed driver and is marked KILLED first. Tracking problems never replace the run's outcome.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config import ConfigError, dump_yaml, flatten, to_dict
from launcher.schema import Config
from trainer import checkpoint as ckpt
from trainer import tracking

DRIVER_BUFFER = "tracking-buffer-driver.jsonl"  # what the driver's Trackers could not send (workers: rank0)


@dataclass
class RunInfo:
    name: str
    dir: Path
    tracking_uri: str | None
    parent_id: str | None
    phase_ids: list[str | None]
    resumed: bool = False  # the MLflow runs existed before this command (they already hold the plan)


def _phases_done(run_dir: Path) -> int:
    """Index of the last phase the run's newest checkpoint says is complete (-1: none)."""
    last = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if last is None:
        return -1
    meta = ckpt.read_meta(last)
    return meta["phase_index"] - (0 if meta["phase_done"] else 1)


def _phase_status(index: int, done: int, status: str) -> str:
    """The honest end status of phase ``index`` of a run that ended as ``status`` with phases <= ``done`` complete.

    Complete phases FINISHED; the first incomplete one, running when the run stopped, ``status``;
    the ones after it never started: KILLED (stopped before they began), not FAILED (nothing of
    theirs failed) and not left RUNNING (nothing runs them). A resume sets them RUNNING again.
    """
    return "FINISHED" if index <= done else status if index == done + 1 else "KILLED"


def open_runs(cfg: Config, run_name: str, run_dir: Path, state: dict[str, Any]) -> tuple[str | None, str | None, list]:
    """Create the parent and phase runs, or reopen them on resume; nothing here creates the run directory.

    A tracking server that does not answer is a ConfigError within seconds (the HTTP retries are
    bounded in ``trainer.tracking``), raised before anything of the run exists.
    """
    if not cfg.tracking.enabled:
        return None, None, [None] * len(cfg.phases)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    hint = ("start an MLflow tracking server there or point tracking.uri (or MLFLOW_TRACKING_URI) at a running "
            "one, or train without tracking: tracking.enabled=false")
    why = tracking.probe(uri)
    if why:
        raise ConfigError(f"tracking.uri: the MLflow tracking server {uri} cannot be reached ({why}); {hint}")
    from mlflow.exceptions import MlflowException

    done = _phases_done(run_dir)  # outside the try: a checkpoint problem is not an MLflow one
    try:
        client = tracking.client(uri)
        if state.get("parent_id"):
            parent, children = state["parent_id"], state["phase_ids"]
            # Every exit Python sees closes the runs (close_runs; when the server was away then, it
            # noted the status in run.json), so a parent still RUNNING without that note was left by a
            # driver that died without closing it (SIGKILL, OOM killer, lost machine); one run directory
            # has one driver at a time, so nothing else runs it. Record what happened to that attempt
            # before continuing: the parent and the phase it was in KILLED, complete phases FINISHED.
            if client.get_run(parent).info.status == "RUNNING":
                ended = state.get("mlflow_unclosed") or "KILLED"
                for i, rid in enumerate(children):
                    if rid and client.get_run(rid).info.status == "RUNNING":
                        client.set_terminated(rid, _phase_status(i, done, ended))
                client.set_terminated(parent, ended)
                if ended == "KILLED":
                    killed = int(client.get_run(parent).data.tags.get("tdcompress.killed_attempts", "0")) + 1
                    client.set_tag(parent, "tdcompress.killed_attempts", str(killed))
                    print(f"mlflow: run {run_name} was left RUNNING by a driver that was killed; marked it "
                          "KILLED before resuming", flush=True)
            # The phases this command runs (from the first incomplete one) are RUNNING again, so a
            # resume that finishes ends FINISHED; completed phases keep their status.
            for i, rid in enumerate(children):
                if rid and i > done:
                    client.update_run(rid, status="RUNNING")
            client.update_run(parent, status="RUNNING")
            return uri, parent, children
        exp = tracking.get_or_create_experiment(uri, cfg.tracking.experiment)
        parent = client.create_run(exp, run_name=run_name, tags={"tdcompress.run_dir": str(run_dir),
                                                                 "tdcompress.config": cfg.name}).info.run_id
        children = []
        for i, phase in enumerate(cfg.phases):
            run = client.create_run(exp, run_name=f"{run_name}/{i}-{phase.kind}",
                                    tags={"mlflow.parentRunId": parent, "tdcompress.phase": phase.kind})
            children.append(run.info.run_id)
    except (MlflowException, OSError) as e:
        raise ConfigError(f"tracking.uri: MLflow at {uri} failed: {tracking.short_error(e)}; {hint}") from None
    t = tracking.Tracker(uri, parent, buffer=run_dir / DRIVER_BUFFER)  # never raises: keeps what it cannot send
    t.params(flatten(to_dict(cfg)))
    t.text(dump_yaml(cfg), "config.yaml")
    return uri, parent, children


def close_runs(info: RunInfo, status: str) -> None:
    """Send kept tracking records and close the MLflow runs; never raises an Exception.

    A tracking problem here must not replace the outcome of the run: it becomes one warning, and
    the calls are bounded (the HTTP retries of ``trainer.tracking``; nothing more is tried once
    the server has not answered), and ``status`` is noted in run.json for the next command to
    apply. Phase statuses: :func:`_phase_status` (``status`` is FAILED, or KILLED on Ctrl-C).
    """
    if not info.tracking_uri:
        return
    try:
        # Records the driver's or the workers' Trackers kept (the workers are done): send them now.
        kept = sorted({info.dir / DRIVER_BUFFER, *info.dir.glob("tracking-buffer-*.jsonl")})
        if not all(tracking.Tracker(info.tracking_uri, info.parent_id, buffer=f).flush() for f in kept
                   if f.is_file()):
            raise ConnectionError("the kept tracking records could not be sent")
        client = tracking.client(info.tracking_uri)
        done = _phases_done(info.dir)
        for i, rid in enumerate(info.phase_ids):
            if rid and client.get_run(rid).info.status == "RUNNING":
                client.set_terminated(rid, _phase_status(i, done, status))
        client.set_terminated(info.parent_id, status)
    except Exception as e:
        print(f"WARNING mlflow: could not close the MLflow runs of {info.name} as {status} at {info.tracking_uri} "
              f"({tracking.short_error(e)}); the next `tdcompress run CONFIG run_name={info.name} resume=true` "
              "that reaches the server does", file=sys.stderr, flush=True)
        try:
            state_file = info.dir / "run.json"
            state = json.loads(state_file.read_text())
            ckpt.atomic_write_text(state_file, json.dumps({**state, "mlflow_unclosed": status}, indent=1))
        except Exception as e2:
            print(f"WARNING: could not note the run's status in {info.dir / 'run.json'}: {e2}", file=sys.stderr,
                  flush=True)
