"""Sending a phase run's opening and closing records to MLflow (the buffer of :mod:`trainer.tracking.tracker` replays
them in order); the tags that mark a phase's child run. No import of the tracker, so the tracker can call it."""
from __future__ import annotations

from typing import Any

PHASE_INDEX_TAG = "tdcompress.phase_index"
PHASE_TAG = "tdcompress.phase"
ERROR_TAG = "tdcompress.error"  # on a FAILED run: the exception's type and first line
ACTIVE_TAG = "tdcompress.active_s"  # a resumed phase: the seconds it ran, over all attempts


def children_of(c: Any, parent_id: str) -> dict[int, Any]:
    """Phase index -> the child run of that phase under ``parent_id``, through the MLflow client ``c``."""
    exp = c.get_run(parent_id).info.experiment_id
    runs = c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)
    return {int(r.data.tags[PHASE_INDEX_TAG]): r for r in runs if PHASE_INDEX_TAG in r.data.tags}


def open_phase_run(c: Any, entry: dict[str, Any]) -> str:
    """Send an ``open_phase`` record: reopen the phase's child RUNNING or create it; returns its run id.

    Idempotent, so a replay of a record whose answer was lost does not make a second child.
    """
    parent, index = entry["parent"], int(entry["index"])
    earlier = children_of(c, parent).get(index)
    if earlier is not None:
        if earlier.info.status != "RUNNING":
            c.update_run(earlier.info.run_id, status="RUNNING")
        if ERROR_TAG in earlier.data.tags:  # the earlier attempt's error is not this one's
            c.delete_tag(earlier.info.run_id, ERROR_TAG)
        return earlier.info.run_id
    info = c.get_run(parent).info
    tags = {"mlflow.parentRunId": parent, PHASE_TAG: entry["phase"], PHASE_INDEX_TAG: str(index)}
    run = c.create_run(info.experiment_id, start_time=int(entry["start_ms"]), tags=tags,
                       run_name=f"{info.run_name}-{index}-{entry['phase']}").info.run_id
    if entry.get("params"):
        from mlflow.entities import Param

        c.log_batch(run, params=[Param(k, v[:6000]) for k, v in entry["params"].items()])
    return run


def close_phase_run(c: Any, run: str, entry: dict[str, Any]) -> None:
    """Send a ``close_phase`` record: the error tag, then the status at the phase's end.

    A resumed phase (``active_s`` set) ends at its start plus the seconds it ran, so its duration in
    MLflow leaves out the time between its attempts.
    """
    if entry.get("error"):
        c.set_tag(run, ERROR_TAG, entry["error"])
    end = int(entry["end_ms"])
    if entry.get("active_s") is not None:
        c.set_tag(run, ACTIVE_TAG, f"{entry['active_s']:.1f}")
        end = min(end, c.get_run(run).info.start_time + int(entry["active_s"] * 1000))
    c.set_terminated(run, entry["status"], end_time=end)
