"""Where a multi-node run may keep its run state and MLflow records.

Rank 0 writes the MLflow records and every rank writes its checkpoint shard; rank 0 can land on
any node, and after a node failure the restarted workers may land on others. So when the workers
can span more than one node, ``cluster.storage`` must be reachable at the same path from every
node, and so must a ``sqlite:///`` tracking store. This machine cannot tell a network mount from a
local disk, so "shared" means: the user says so (``cluster.shared_storage: true``), or every node
of the cluster runs on this one host (`tdcompress cluster up`), where there is one filesystem.
Storage URIs (s3://, gs://, ...) are not supported: checkpoints are written as files by path.
"""
from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path

from cluster.config import ClusterConfig

SHARED_HINT = ("set cluster.storage to a directory every node mounts at the same path (NFS, a shared volume) and "
               "cluster.shared_storage=true")


def is_uri(storage: str) -> bool:
    """True for ``scheme://...`` storage (s3://, gs://, hdfs://...), False for a path."""
    return "://" in storage and urllib.parse.urlparse(storage).scheme not in ("", "file")


def storage_problem(storage: str, shared: bool, nodes: int) -> str | None:
    """Why ``storage`` cannot hold a run whose workers may land on ``nodes`` nodes (None: it can).

    Returned text starts with the dotted key and says what to set.
    """
    if is_uri(storage):
        return (f"cluster.storage: {storage!r} is a URI; run directories and checkpoints are written as files, so "
                f"{SHARED_HINT}")
    if nodes > 1 and not shared:
        return (f"cluster.storage: {storage!r} may be local to each node, and this cluster has {nodes} nodes: a "
                f"worker restarted on another node would not find the checkpoints, and rank 0's records could land "
                f"on any node. {SHARED_HINT}")
    return None


def sqlite_path(uri: str) -> str | None:
    """The database file of a ``sqlite:///`` tracking URI (None for other URIs)."""
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


def tracking_problem(uri: str, storage: str, shared: bool, nodes: int) -> str | None:
    """Why MLflow tracking ``uri`` cannot serve a run whose rank 0 may land on any of ``nodes`` nodes (None: it can).

    A ``sqlite:///`` store is allowed only inside shared ``cluster.storage``; an MLflow server
    (``http://...``) is what multi-node runs should use.
    """
    db = sqlite_path(uri)
    if nodes <= 1 or db is None and "://" in uri:
        return None
    if db is not None and shared and db.startswith(storage.rstrip("/") + "/"):
        return None
    return (f"tracking.uri: {uri!r} is a local store and this cluster has {nodes} nodes; rank 0 can land on any "
            "node and would write it there. Point tracking.uri (or MLFLOW_TRACKING_URI) at an MLflow server, "
            "e.g. http://MLFLOW_HOST:5000 (`tdcompress cluster up` starts one), or keep the SQLite file inside "
            "shared cluster.storage with cluster.shared_storage=true (SQLite over NFS is unsafe with more than "
            "one writer)")


def job_working_dir() -> str | None:
    """Inside a Ray job with a ``working_dir`` runtime env (`ray job submit --working-dir`, `tdcompress submit`):
    the uploaded copy this process runs in (its cwd), a per-package folder of Ray's temp dir; else None."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        working_dir = (json.loads(raw).get("runtime_env") or {}).get("working_dir")
    except (ValueError, AttributeError):
        return None
    return os.getcwd() if working_dir else None


def relative_path_problem(storage: str, tracking_uri: str | None) -> str | None:
    """Why a run inside a Ray job's uploaded working dir must not keep its storage or SQLite store there (None:
    it may). Relative paths resolve inside Ray's working-dir cache, a new folder for every code version,
    removed when Ray cleans it: the run and its MLflow records would be lost to the user."""
    cwd = job_working_dir()
    if cwd is None:
        return None
    db = sqlite_path(tracking_uri or "")  # the default store, sqlite:///mlruns.db, is made absolute against the cwd
    for key, path in (("cluster.storage", None if is_uri(storage) else storage), ("tracking.uri", db)):
        if path and Path(path).resolve().is_relative_to(Path(cwd).resolve()):
            shown = tracking_uri if key == "tracking.uri" else path
            return (f"{key}: {shown!r} resolves inside the copy of the project this Ray job runs in ({cwd}, Ray's "
                    "working-dir cache, a new folder for each code version): nobody would find the run there. "
                    "Pass an absolute path that every node mounts (cluster.storage=/shared/runs; "
                    "tracking.uri=http://MLFLOW_HOST:5000 or sqlite:////shared/runs/mlflow.db); `tdcompress submit` "
                    "makes them absolute for you")
    return None


def check_cluster_run(c: ClusterConfig, tracking_uri: str | None) -> None:
    """On the driver of a run that joins a cluster (``cluster.address``), before anything of the run exists:
    raise ValueError ("cluster.storage: ..." / "tracking.uri: ...") when the cluster has more than one
    node and the run's storage or tracking store may be node-local."""
    import ray

    from cluster.ray_runtime import ensure_ray

    problem = relative_path_problem(c.storage, tracking_uri)
    if problem:
        raise ValueError(problem)
    ensure_ray(c)
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    storage = str(Path(c.storage).resolve()) if not is_uri(c.storage) else c.storage
    problem = storage_problem(storage, c.shared_storage, nodes) or (
        tracking_problem(tracking_uri, storage, c.shared_storage, nodes) if tracking_uri else None)
    if problem:
        raise ValueError(problem)
