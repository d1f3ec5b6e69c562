"""The MLflow child run of each phase, opened by rank 0 when the phase starts and closed when it ends.

So a child's start and end time are the phase's own, and a phase that never ran has no child run.
A resumed phase reopens the child it started earlier (found by the parent's id and the phase
index), so one phase has one child over all attempts. Opening and closing a child are tracking
records like its metrics (:class:`trainer.tracking.tracker.Tracker`): while the server is away they wait in
the run directory's buffer under a stand-in id (:func:`pending_id`) and are replayed in order, with
their original times, when it answers again (or by the next resume), so an outage across a phase
start loses nothing.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from trainer.tracking import tracker as tracking
from trainer.tracking.phase_records import (  # noqa: F401 (the names other modules read here)
    ACTIVE_TAG,
    ERROR_TAG,
    PHASE_INDEX_TAG,
    PHASE_TAG,
    children_of,
    close_phase_run,
    open_phase_run,
)


def phase_children(uri: str, parent_id: str) -> dict[int, Any]:
    """Phase index -> the child run (``mlflow.entities.Run``) of that phase, for the phases that started."""
    return children_of(tracking.client(uri), parent_id)


def pending_id(parent_id: str, index: int) -> str:
    """The stand-in run id of phase ``index``'s child until the server has created it (the same in every
    process, so records a killed attempt kept and those of its resume name one child)."""
    return f"pending-{parent_id}-{index}"


def start_phase_tracker(uri: str, parent_id: str, index: int, kind: str, params: dict[str, Any],
                        buffer: str | Path) -> tracking.Tracker:
    """A Tracker for phase ``index``'s child run, which it opens first (never raises, never blocks the phase
    longer than the bounded HTTP retries): the run an earlier attempt started, else a new one named
    ``<parent's name>-<index>-<kind>`` with the phase's ``params``. Until MLflow answers, the opening and
    every record after it wait in ``buffer``."""
    t = tracking.Tracker(uri, pending_id(parent_id, index), buffer=buffer)
    t.submit_record({"kind": "open_phase", "parent": parent_id, "index": index, "phase": kind,
                     "params": {k: str(v) for k, v in params.items()}, "start_ms": int(time.time() * 1000)})
    return t


def error_message(e: BaseException) -> str:
    """The first line of ``e``'s message; for an error a DataLoader process re-raised ("Caught X in DataLoader
    worker process N" + the worker's traceback) the worker's own message, the traceback's last line."""
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    if not lines:
        return ""
    if len(lines) > 1 and lines[0].startswith("Caught ") and any("Original Traceback" in x for x in lines):
        last, marker = lines[-1].strip(), f"{type(e).__name__}: "  # "pkg.mod.Type: message" or "Type: message"
        return last.split(marker, 1)[1] if marker in last else last
    return lines[0].strip()


def error_text(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 500 characters): what a FAILED run's error tag says."""
    first = error_message(e)
    return f"{type(e).__name__}: {first}"[:500] if first else type(e).__name__


def end_phase_run(tracker: tracking.Tracker, status: str, error: BaseException | None = None,
                  active_s: float | None = None) -> None:
    """Close the phase's child run (opened by :func:`start_phase_tracker`) as ``status`` (FINISHED, FAILED,
    KILLED), with the error as a tag; buffered like any record, never raises. ``active_s``: the seconds a
    resumed phase ran over all its attempts (None: not resumed)."""
    tracker.submit_record({"kind": "close_phase", "status": status, "end_ms": int(time.time() * 1000),
                           "error": error_text(error) if error is not None else None, "active_s": active_s})


def phase_params(cfg: Any, index: int, run_dir: str | Path) -> dict[str, Any]:
    """The settings phase ``index`` runs with, as its child run's params: kind, epochs, lr, steps, and for the
    compressing phases the format, budget and where the ranks come from."""
    phase = cfg.phases[index]
    out: dict[str, Any] = {"phase": phase.kind, "phase_index": index}
    if phase.trains:
        out.update({"epochs": phase.epochs, "lr": phase.lr or cfg.optim.lr, "steps_per_epoch": phase.steps_per_epoch
                    or "all", "batch_size": cfg.data.batch_size})
    c = cfg.compression
    if phase.kind in ("admm", "decompose"):
        out.update({"format": c.format, "keep_ratio": c.keep_ratio, "budget": c.budget, "allocation": c.allocation})
        if c.ranks:
            out["ranks"] = "fixed in compression.ranks"
    if phase.kind == "admm":
        a = cfg.admm
        out.update({"rho": a.rho, "rho_growth": a.rho_growth, "rho_max": a.rho_max, "interval": a.interval,
                    "unit": a.unit, "ranks_file": str(Path(run_dir) / f"phase{index}" / "rank_plan.json")})
    if phase.kind == "decompose":
        admm = [k for k in range(index) if cfg.phases[k].kind == "admm"]
        out["fit"] = cfg.decompose.fit
        out["ranks_file"] = (str(Path(run_dir) / f"phase{admm[-1]}" / "rank_plan.json") if admm
                             else "planned from the weights at this phase")
    if phase.kind == "rank_prune":
        r = cfg.rank_prune
        out.update({"l1": r.l1, "orth": r.orth, "threshold": r.threshold, "keep_ratio": r.keep_ratio})
    return out
