"""Where MLflow records go: the tracking URI, a client bound to it, the experiment, a reachability probe.

Every process that tracks (the driver, rank 0 of the workers, the tools that read runs back) connects
through :func:`client`, which also bounds MLflow's HTTP retries, so a missing server costs seconds, not
minutes.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from trainer.tracking.buffer import short_error

# MLflow's HTTP defaults (mlflow.environment_variables: MLFLOW_HTTP_REQUEST_MAX_RETRIES=7,
# MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=2, MLFLOW_HTTP_REQUEST_TIMEOUT=120 s) block one call about
# 4 minutes when the tracking server is gone. MLflow reads them at every request, so setting them
# before the first call is enough; a value already in the environment wins. With these a refused
# connection fails in about 3 s, a server that accepts but never answers in about 30 s.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# MLflow 3's UI asks what an experiment is for and, untold, guesses; a model-training experiment opens on
# its runs (the UI's own value for "Machine learning" experiments) instead of the GenAI overview.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
PROBE_TIMEOUT_S = 5.0  # reachability check of an http(s) tracking URI at start


def bound_http() -> None:
    """Apply :data:`HTTP_ENV` to this process."""
    for key, value in HTTP_ENV.items():
        os.environ.setdefault(key, value)


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


def quiet_http_logs() -> None:
    """Silence urllib3's per-attempt "Retrying ..." warnings: an outage is said once, by the Tracker."""
    import logging

    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def client(uri: str):
    from mlflow.tracking import MlflowClient

    bound_http()  # every process that tracks (driver, rank 0) makes its client here
    quiet_http_logs()
    # Not mlflow.set_tracking_uri: it also sets $MLFLOW_TRACKING_URI for the whole process, which then
    # leaked into later runs and job submissions made from the same process (a test caught one).
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why an http(s) tracking server cannot be reached (no HTTP answer within ``timeout``), or None.

    Any HTTP answer counts as reachable; other URI schemes are not probed.
    """
    if not uri.startswith(("http://", "https://")):
        return None
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.Timeout:
        return f"no answer within {timeout:g} s"
    except requests.RequestException as e:
        errno = re.search(r"\[Errno -?\d+\] [^'\")\]]+", str(e))  # e.g. [Errno 111] Connection refused
        return errno.group(0).strip() if errno else short_error(e)
    return None


def get_or_create_experiment(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older version: open it on its runs too
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    root = artifact_root_for(uri)
    return c.create_experiment(name, artifact_location=Path(root, name).as_uri() if root else None,
                               tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
