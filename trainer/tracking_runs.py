"""The MLflow child run of each phase, opened by rank 0 when the phase starts and closed when it ends.

So a child's start and end time are the phase's own, and a phase that never ran has no child run.
A resumed phase reopens the child it started earlier (found by the parent's id and the phase
index), so one phase has one child over all attempts. Tracking problems never stop training: a
child that cannot be created is a warning, and that phase's records are then not logged.
"""
from __future__ import annotations

import sys
from typing import Any

from trainer import tracking

PHASE_INDEX_TAG = "tdcompress.phase_index"
PHASE_TAG = "tdcompress.phase"
ERROR_TAG = "tdcompress.error"  # on a FAILED run: the exception's type and first line


def phase_children(uri: str, parent_id: str) -> dict[int, Any]:
    """Phase index -> the child run (``mlflow.entities.Run``) of that phase, for the phases that started."""
    c = tracking.client(uri)
    exp = c.get_run(parent_id).info.experiment_id
    runs = c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)
    return {int(r.data.tags[PHASE_INDEX_TAG]): r for r in runs if PHASE_INDEX_TAG in r.data.tags}


def start_phase_run(uri: str, parent_id: str, index: int, kind: str, run_name: str) -> str | None:
    """The child run of phase ``index``, RUNNING from now: the one an earlier attempt started, else a new one.

    Returns its id, or None (with a warning) when MLflow does not answer.
    """
    try:
        c = tracking.client(uri)
        earlier = phase_children(uri, parent_id).get(index)
        if earlier is not None:
            c.update_run(earlier.info.run_id, status="RUNNING")
            if ERROR_TAG in earlier.data.tags:  # the earlier attempt's error is not this one's
                c.delete_tag(earlier.info.run_id, ERROR_TAG)
            return earlier.info.run_id
        exp = c.get_run(parent_id).info.experiment_id
        tags = {"mlflow.parentRunId": parent_id, PHASE_TAG: kind, PHASE_INDEX_TAG: str(index)}
        return c.create_run(exp, run_name=f"{index}-{kind} ({run_name})", tags=tags).info.run_id
    except Exception as e:  # tracking must never stop training
        print(f"WARNING mlflow: could not open the MLflow run of phase {index} ({kind}) at {uri}: "
              f"{tracking.short_error(e)}; this phase's metrics are not logged", file=sys.stderr, flush=True)
        return None


def error_text(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 500 characters): what a FAILED run's error tag says."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:500] if first else type(e).__name__


def end_phase_run(uri: str, run_id: str | None, status: str, error: BaseException | None = None) -> None:
    """Close a phase's child run as ``status`` (FINISHED, FAILED, KILLED), with the error as a tag; never raises."""
    if run_id is None:
        return
    try:
        c = tracking.client(uri)
        if error is not None:
            c.set_tag(run_id, ERROR_TAG, error_text(error))
        c.set_terminated(run_id, status)
    except Exception as e:  # the driver closes what is left RUNNING (launcher.mlflow_runs.close_runs)
        print(f"WARNING mlflow: could not close the MLflow run of a phase as {status}: {tracking.short_error(e)}",
              file=sys.stderr, flush=True)
