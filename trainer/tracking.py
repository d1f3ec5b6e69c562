"""MLflow logging: one parent run per `tdcompress run`, one child per phase.

The driver creates the runs and hands their ids to the workers; only rank 0
logs, through an explicit :class:`mlflow.tracking.MlflowClient` bound to a
run id (no global "active run" state, so nothing leaks between phases and
no other rank creates a run of its own).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def resolve_tracking_uri(uri: str | None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a SQLite file in the current directory.

    A relative SQLite path is made absolute so that Ray workers, whose working
    directory differs, write to the same database.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlruns.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    elif "://" not in uri:  # a bare path: treat as a SQLite file, not the deprecated file store
        uri = prefix + str(Path(uri).resolve())
    return uri


def artifact_root_for(uri: str) -> str | None:
    """Where artifacts go for a SQLite store: beside the database, not in the cwd."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return Path(uri[len(prefix):]).with_suffix("").as_posix() + "-artifacts"
    return None


def client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def get_or_create_experiment(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root_for(uri)
    return c.create_experiment(name, artifact_location=Path(root, name).as_uri() if root else None)


class Tracker:
    """Logs metrics/params/artifacts to one MLflow run; a no-op without a run id (ranks != 0)."""

    def __init__(self, uri: str | None, run_id: str | None) -> None:
        self.run_id = run_id
        self._client = client(uri) if (uri and run_id) else None
        self.best: dict[str, float] = {}

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self._client:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def best_of(self, key: str, value: float, step: int) -> None:
        """Log ``best_<key>`` whenever ``value`` beats the best so far (higher is better)."""
        if value > self.best.get(key, float("-inf")):
            self.best[key] = value
            self.metrics({f"best_{key}": value}, step)

    def params(self, values: dict[str, Any]) -> None:
        if not self._client:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in values.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def tags(self, values: dict[str, str]) -> None:
        if self._client:
            for k, v in values.items():
                self._client.set_tag(self.run_id, k, v)

    def artifact(self, path: str | Path, subdir: str | None = None) -> None:
        if self._client:
            self._client.log_artifact(self.run_id, str(path), subdir)

    def text(self, text: str, name: str) -> None:
        if self._client:
            self._client.log_text(self.run_id, text, name)
