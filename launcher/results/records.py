"""Run records: one small JSON file per `tdcompress run`, readable without MLflow, loadable back into it.

A record holds what the tables and plots of a study need, and little else:
the parent run's identity (name, id, experiment, status, start and end time, wall seconds, command,
commit), its tags and flattened config (params), its final metrics and, for the parent and every phase
child, the per-epoch history of each metric (``[step, value]`` pairs; a metric logged once, at step 0, is
only in the final metrics). Per-step series (loss, lr,
images/s) are kept only at the steps where an epoch ended (where the phase logged ``epoch``);
MLflow's system metrics and the per-layer ``layers/`` series are left out. Files are written with
sorted keys and atomically, so re-exporting an unchanged run gives the same bytes.

``as_run`` turns a record back into an ``mlflow.entities.Run``, so :mod:`launcher.results.compare` reads
records exactly as it reads a store, filter strings included (MLflow's own in-memory search).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from launcher.schema import ConfigError
from trainer.checkpoints import files as ckpt
from trainer.tracking import tracker as tracking

SCHEMA = "tdcompress-record/1"
# Left out of every record: MLflow's bookkeeping that the import re-creates or that is large and useless offline.
DROPPED_TAGS = ("mlflow.parentRunId", "mlflow.runName", "mlflow.log-model.history")
DROPPED_METRIC_PREFIXES = ("system/", "layers/")
_NUM = r"(-?[0-9][0-9.eE+-]*|NaN|-?Infinity)"
_POINT = re.compile(rf"\[\s+{_NUM},\s+{_NUM}\s+\]")


def _kept(key: str) -> bool:
    return not key.startswith(DROPPED_METRIC_PREFIXES)


def _history(client: Any, run: Any) -> dict[str, list[list[float]]]:
    """``{key: [[step, value], ...]}`` of ``run``'s kept metrics; at epoch ends only when the run logs ``epoch``."""
    keys = sorted(k for k in run.data.metrics if _kept(k))
    series = {k: sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, k))
              for k in keys}
    epoch_steps = {s for s, _, _ in series.get("epoch", [])}
    out: dict[str, list[list[float]]] = {}
    for k, points in series.items():
        if epoch_steps:
            points = [p for p in points if p[0] in epoch_steps]
        last: dict[int, float] = {}
        for step, _, value in points:  # one value per step: the last one logged there
            last[step] = value
        if last and not (len(last) == 1 and 0 in last and last[0] == run.data.metrics[k]):
            out[k] = [[step, last[step]] for step in sorted(last)]  # a lone step-0 value is the final one
    return out


def _run_part(client: Any, run: Any) -> dict[str, Any]:
    info = run.info
    return {"run_id": info.run_id, "name": info.run_name, "status": info.status, "start_time": info.start_time,
            "end_time": info.end_time,
            "tags": {k: v for k, v in sorted(run.data.tags.items()) if k not in DROPPED_TAGS},
            "params": dict(sorted(run.data.params.items())),
            "metrics": {k: v for k, v in sorted(run.data.metrics.items()) if _kept(k)},
            "history": _history(client, run)}


def record_of(uri: str, run: Any, experiment: str) -> dict[str, Any]:
    """The record of parent run ``run`` (an ``mlflow.entities.Run`` in store ``uri``) and its phase children."""
    from trainer.tracking.runs import phase_children

    client = tracking.client(uri)
    rec = {"schema": SCHEMA, "experiment": experiment, **_run_part(client, run)}
    tags = run.data.tags
    rec["command"] = tags.get("tdcompress.command")
    rec["commit"] = tags.get("mlflow.source.git.commit")
    rec["wall_s"] = (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None
    phases = []
    for index, child in sorted(phase_children(uri, run.info.run_id).items()):
        part = _run_part(client, child)
        phases.append({"index": index, "kind": child.data.tags.get("tdcompress.phase"), **part})
    rec["phases"] = phases
    return rec


def file_name(run_name: str) -> str:
    """``<run name>.json``, with anything but letters, digits, '.', '_', '-' replaced (never a path)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", run_name).lstrip(".") + ".json"


def write_record(out_dir: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` to ``out_dir/<run name>.json`` atomically, keys sorted; returns the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / file_name(record["name"])
    text = json.dumps(record, indent=1, sort_keys=True)
    ckpt.atomic_write_text(path, _POINT.sub(r"[\1, \2]", text) + "\n")  # one line per [step, value]
    return path


def export_records(uri: str, experiment: str, out_dir: Path, names: list[str] | None = None,
                   filter_string: str = "", include_all: bool = False, limit: int = 5000) -> list[Path]:
    """Write one record per parent run that ``compare`` would select with the same arguments; returns the files.

    Two runs of one name (a run made again) would overwrite each other's file: refused, naming them.
    """
    from launcher.results.compare import parent_runs

    runs = parent_runs(uri, experiment, names, limit, filter_string, include_all)
    seen: dict[str, str] = {}
    for r in runs:
        other = seen.setdefault(file_name(r.info.run_name), r.info.run_id)
        if other != r.info.run_id:
            raise ConfigError(f"runs {other} and {r.info.run_id} are both named {r.info.run_name!r}: their records "
                              "would share a file; select one (by id, or --filter on attributes.run_id)")
    return [write_record(out_dir, record_of(uri, r, experiment)) for r in runs]


def load_records(records_dir: Path) -> list[dict[str, Any]]:
    """Every ``*.json`` record in ``records_dir`` (sorted by file name); a file that is not one is an error."""
    if not records_dir.is_dir():
        raise ConfigError(f"--records: {records_dir} is not a directory (write one with `tdcompress records export`)")
    out = []
    for path in sorted(records_dir.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--records: {path} cannot be read as JSON ({e})") from None
        if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
            got = rec.get("schema") if isinstance(rec, dict) else type(rec).__name__
            raise ConfigError(f"--records: {path} is not a run record (schema {got!r}, expected {SCHEMA!r})")
        missing = [k for k in ("run_id", "name", "status", "start_time", "tags", "params", "metrics", "phases")
                   if k not in rec]
        if missing:
            raise ConfigError(f"--records: {path} lacks {', '.join(missing)}")
        out.append(rec)
    return out


def as_run(rec: dict[str, Any], experiment_id: str = "0") -> Any:
    """The parent of ``rec`` as an ``mlflow.entities.Run`` (final metrics at their last history step)."""
    from mlflow.entities import Metric, Param, Run, RunData, RunInfo, RunTag

    info = RunInfo(run_id=rec["run_id"], experiment_id=experiment_id, user_id=rec["tags"].get("mlflow.user", ""),
                   status=rec["status"], start_time=rec["start_time"], end_time=rec.get("end_time"),
                   lifecycle_stage="active", run_name=rec["name"])
    hist = rec.get("history", {})
    metrics = [Metric(k, float(v), rec.get("end_time") or rec["start_time"], int(hist[k][-1][0]) if hist.get(k) else 0)
               for k, v in rec["metrics"].items()]
    tags = [RunTag(k, v) for k, v in {**rec["tags"], "mlflow.runName": rec["name"]}.items()]
    data = RunData(metrics=metrics, params=[Param(k, v) for k, v in rec["params"].items()], tags=tags)
    return Run(info, data)


def search_records(records_dir: Path, experiment: str | None, names: list[str] | None = None, limit: int = 100,
                   filter_string: str = "", include_all: bool = False) -> list[Any]:
    """What :func:`launcher.results.compare.parent_runs` returns for a store, from the records in ``records_dir``:
    newest first, FINISHED only unless ``include_all``, ``filter_string`` in MLflow's search syntax."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.search_utils import SearchUtils

    recs = [r for r in load_records(records_dir) if experiment is None or r.get("experiment") == experiment]
    runs = [as_run(r) for r in recs]
    clauses = [f for f in (filter_string.strip(), "" if include_all else "attributes.status = 'FINISHED'") if f]
    try:
        runs = SearchUtils.filter(runs, " and ".join(clauses))
    except MlflowException as e:
        raise ConfigError(f"--filter: MLflow cannot read {filter_string!r} ({tracking.short_error(e)}); write e.g. "
                          "\"params.compression.format = 'tucker2' and tags.method = 'admm'\"") from None
    runs.sort(key=lambda r: r.info.start_time, reverse=True)
    if names:
        runs = [r for r in runs if r.info.run_name in names or r.info.run_id in names]
    return runs[:limit]
