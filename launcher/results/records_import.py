"""`tdcompress records import DIR`: load run records (launcher/results/records.py) into an MLflow store.

Each record becomes a parent run (its name, tags, params, start and end time, status) with one child
run per phase (tagged with the parent and the phase index, as `tdcompress run` makes them), and every
metric's history at its steps, the final value last, so MLflow's UI and `tdcompress compare` show the
run as it was. Every imported run is tagged ``tdcompress.imported_from`` with its original run id;
importing the same records again skips what is already there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.tracking import tracker as tracking

IMPORTED_TAG = "tdcompress.imported_from"
TERMINAL = ("FINISHED", "FAILED", "KILLED")
# MLflow's log_batch limits (per call): 1000 metrics, 100 params, 100 tags.
_BATCH = {"metrics": 1000, "params": 100}


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def _log(client: Any, run_id: str, part: dict[str, Any]) -> None:
    """Params, then each metric's history (one value per step), then the final values at the last step."""
    from mlflow.entities import Metric, Param

    t0 = int(part["start_time"])
    params = [Param(k, str(v)) for k, v in part.get("params", {}).items()]
    metrics, last = [], {}
    for key, points in part.get("history", {}).items():
        for i, (step, value) in enumerate(points):
            metrics.append(Metric(key, float(value), t0 + i, int(step)))
        if points:
            last[key] = (int(points[-1][0]), float(points[-1][1]))
    # A final value that its history does not end with is logged last, at the history's last step (step 0
    # without one), so that it is the value MLflow reports as the run's.
    longest = max((len(p) for p in part.get("history", {}).values()), default=0)
    end = max(int(part.get("end_time") or t0), t0 + longest) + 1
    metrics += [Metric(k, float(v), end, last.get(k, (0, None))[0]) for k, v in part.get("metrics", {}).items()
                if last.get(k, (0, None))[1] != float(v)]
    for chunk in _chunks(params, _BATCH["params"]):
        client.log_batch(run_id, params=chunk)
    for chunk in _chunks(metrics, _BATCH["metrics"]):
        client.log_batch(run_id, metrics=chunk)


def _close(client: Any, run_id: str, part: dict[str, Any]) -> None:
    if part["status"] in TERMINAL:
        client.set_terminated(run_id, part["status"], end_time=part.get("end_time"))
    else:
        client.update_run(run_id, status=part["status"])


def _create(client: Any, exp: str, part: dict[str, Any], extra_tags: dict[str, str]) -> str:
    tags = {**part.get("tags", {}), **extra_tags, IMPORTED_TAG: part["run_id"]}
    run_id = client.create_run(exp, start_time=part["start_time"], tags=tags, run_name=part["name"]).info.run_id
    _log(client, run_id, part)
    _close(client, run_id, part)
    return run_id


def already_imported(client: Any, exp: str, original_id: str) -> str | None:
    """The id of the run in ``exp`` that is ``original_id`` (the run itself, or imported from it), or None."""
    from mlflow.exceptions import MlflowException

    try:
        if client.get_run(original_id).info.experiment_id == exp:
            return original_id
    except MlflowException:
        pass
    found = client.search_runs([exp], filter_string=f"tags.`{IMPORTED_TAG}` = '{original_id}'", max_results=1)
    return found[0].info.run_id if found else None


def import_record(uri: str, rec: dict[str, Any], experiment: str | None = None) -> tuple[str, bool]:
    """Import one record (parent and phases) into ``uri``; returns (parent run id, False when it was there)."""
    client = tracking.client(uri)
    exp = tracking.get_or_create_experiment(uri, experiment or rec.get("experiment") or "tdcompress")
    there = already_imported(client, exp, rec["run_id"])
    if there:
        return there, False
    parent = _create(client, exp, rec, {})
    for phase in rec.get("phases", []):
        _create(client, exp, phase, {"mlflow.parentRunId": parent})
    return parent, True


def import_records(uri: str, records_dir: Path, experiment: str | None = None) -> list[tuple[str, str, bool]]:
    """Import every record of ``records_dir``; returns (run name, run id in ``uri``, newly imported) per record."""
    from launcher.results.records import load_records

    return [(rec["name"], *import_record(uri, rec, experiment)) for rec in load_records(records_dir)]
