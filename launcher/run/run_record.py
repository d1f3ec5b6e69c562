"""What a run's MLflow parent says about it: a descriptive name, the tags users filter on, the command.

``method_of`` derives the method from the phases; :data:`METHOD_RULES` is the one place to extend
when a phase kind or an option makes a new method (first matching rule wins).
"""
from __future__ import annotations

import getpass
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

from launcher.schema import Config
from trainer.data import data_root, dataset_identity

# (method name, predicate on the config), first match wins; "dense" when none matches.
METHOD_RULES: list[tuple[str, Callable[[Config], bool]]] = [
    ("rank_prune", lambda cfg: any(p.kind == "rank_prune" for p in cfg.phases)),
    ("admm", lambda cfg: any(p.kind == "admm" for p in cfg.phases)),
    # decomposed without ADMM, each layer fitted to its outputs on real images (decompose.fit=features)
    ("direct_features", lambda cfg: any(p.kind == "decompose" for p in cfg.phases)
     and getattr(getattr(cfg, "decompose", None), "fit", "weights") == "features"),
    ("direct", lambda cfg: any(p.kind == "decompose" for p in cfg.phases)),  # decomposed without ADMM
]


def method_of(cfg: Config) -> str:
    """The compression method of ``cfg``'s phases: admm, direct (decompose alone), rank_prune, ... or dense."""
    return next((name for name, matches in METHOD_RULES if matches(cfg)), "dense")


def format_and_keep(cfg: Config) -> tuple[str, str]:
    """The run's factored format and kept fraction of parameters, as tagged: ``("dense", "1")`` without
    compression; rank_prune holds SVD factors with its own budget (``auto``: no budget, the threshold decides)."""
    method = method_of(cfg)
    if method == "dense":
        return "dense", "1"
    if method == "rank_prune":
        keep = getattr(getattr(cfg, "rank_prune", None), "keep_ratio", 0.0)
        return "svd", f"{keep:g}" if keep else "auto"
    c = cfg.compression
    return c.format, "ranks" if getattr(c, "ranks", None) else f"{c.keep_ratio:g}"


def describe(cfg: Config) -> str:
    """``resnet20-tucker2-k0.33`` (compressed runs) or ``resnet20-dense``: model, format, keep ratio."""
    fmt, keep = format_and_keep(cfg)
    return f"{cfg.model.name}-dense" if fmt == "dense" else f"{cfg.model.name}-{fmt}-k{keep}"


def mlflow_run_name(cfg: Config, run_name: str) -> str:
    """The parent run's name: ``run_name`` when the user chose it, else the description and the run's timestamp."""
    if cfg.run_name:
        return cfg.run_name
    stamp = run_name.rsplit("-", 2)[-2:]  # <config>-YYYYmmdd-HHMMSS: keep the timestamp
    return f"{describe(cfg)}-{'-'.join(stamp)}"


GIT_COMMIT_ENV = "TDC_GIT_COMMIT"  # `tdcompress submit` passes the client's commit: a job's upload has no .git


def git_commit(where: Path | None = None) -> str | None:
    """The commit the code runs from: ``$TDC_GIT_COMMIT`` (set by `tdcompress submit`), else that of the git
    checkout holding this file, else None (not a checkout, or no git)."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    where = where or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def ray_job_id() -> str | None:
    """The Ray Jobs submission id when this driver runs as a Ray job, else None.

    Ray's job supervisor starts the entrypoint with ``$RAY_JOB_CONFIG_JSON_ENV_VAR``, a JSON job config
    whose ``metadata.job_submission_id`` is the id `ray job submit` and `tdcompress submit` print.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        job = json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):  # not Ray's JSON: no id to record
        return None
    return str(job) if job else None


def command_line() -> str:
    """The command that started this process, as a user would type it again (``tdcompress run ...``)."""
    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if argv0 in ("__main__.py", "cli.py"):
        argv0 = "tdcompress"
    return shlex.join([argv0, *sys.argv[1:]])


def run_tags(cfg: Config, run_dir: Path) -> dict[str, str]:
    """The parent run's tags: what the run is (model, dataset and its storage format, method, format, keep
    ratio, seed) and where
    it came from (git commit, Ray job, user, command, run directory)."""
    fmt, keep = format_and_keep(cfg)
    tags = {**getattr(cfg.tracking, "tags", {}), "tdcompress.run_dir": str(run_dir), "tdcompress.config": cfg.name, "model": cfg.model.name,
            "dataset": dataset_identity(cfg.data.dataset, cfg.data.root), "data_format": cfg.data.dataset,
            "method": method_of(cfg), "seed": str(cfg.seed), "format": fmt,
            "keep_ratio": keep,
            "tdcompress.command": command_line(), "mlflow.source.name": command_line()[:500],
            "mlflow.source.type": "JOB" if ray_job_id() else "LOCAL", "mlflow.user": _user()}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    job = ray_job_id()
    if job:
        tags["ray_job_id"] = job
    root = data_root(cfg.data.root)
    if root:
        tags["data_root"] = str(Path(root).expanduser().resolve())
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"


def resolved_data_root(cfg: Config) -> str | None:
    """``data.root`` as the workers read it (``$TDC_DATA_ROOT`` when the config leaves it empty), absolute."""
    root = data_root(cfg.data.root)
    return str(Path(root).expanduser().resolve()) if root else None
