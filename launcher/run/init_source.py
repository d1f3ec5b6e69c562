"""The driver's side of ``model.init``: resolve it, check it against the model, record it.

All of it runs before Ray or any worker starts, so a wrong source (no such run, a damaged or
decomposed checkpoint, tensors that do not fit) costs nothing but a ConfigError naming the key.
"""
from __future__ import annotations

import re
from pathlib import Path

from launcher.config import ConfigError
from launcher.schema import Config
from trainer.checkpoints import files as ckpt
from trainer.init_weights import InitError, InitSource, check_compatible, load_state, resolve_path
from trainer.tracking import tracker as tracking

# An MLflow run id (32 hex digits), bare or as mlflow:<id> / runs:/<id>.
_RUN_ID = re.compile(r"(?:mlflow:|runs:/)?([0-9a-f]{32})/?")


def _run_dir_of(run_id: str, uri: str, key: str = "model.init") -> str:
    """The run directory an MLflow run (the parent, or one of its phase runs) of a tdcompress run records."""
    from mlflow.exceptions import MlflowException

    try:
        client = tracking.client(uri)
        run = client.get_run(run_id)
        tags = run.data.tags
        if "tdcompress.run_dir" not in tags and "mlflow.parentRunId" in tags:  # a phase run: ask its parent
            tags = client.get_run(tags["mlflow.parentRunId"]).data.tags
    except (MlflowException, OSError) as e:
        raise ConfigError(f"{key}: MLflow run {run_id} cannot be read from {uri} "
                          f"({tracking.short_error(e)}); check tracking.uri, or give the run directory") from None
    if "tdcompress.run_dir" not in tags:
        raise ConfigError(f"{key}: MLflow run {run_id} at {uri} has no tdcompress.run_dir tag (not a "
                          "tdcompress run); give its run directory or a weights file instead")
    return tags["tdcompress.run_dir"]


def resolve_init(cfg: Config, classes: int, resume_dir: Path | None = None) -> InitSource | None:
    """Resolve and check ``cfg.model.init`` (None when unset) against the model this run builds
    (``cfg.model.name`` with ``classes`` outputs).

    ``resume_dir``: the run directory a resume continues; when it holds a checkpoint the run goes on
    from that, so the init is neither needed nor checked (its source may have moved on meanwhile).

    Raises:
        ConfigError: naming ``model.init`` and why (not found, no intact checkpoint, decomposed,
            missing/unexpected keys or the first tensor of another shape).
    """
    spec = cfg.model.init
    if spec is None:
        return None
    if resume_dir is not None and ckpt.latest_checkpoint(Path(resume_dir) / "checkpoints") is not None:
        print("model.init: not applied, the run resumes from its own checkpoint", flush=True)
        return None
    source = resolve_dense(cfg, spec, cfg.model.name, classes, "model.init")
    print(f"model.init: {source.describe()}", flush=True)
    return source


def resolve_dense(cfg: Config, spec: str, model_name: str, classes: int, key: str) -> InitSource:
    """Resolve ``spec`` (run directory, checkpoint directory, MLflow run id or weights file) to dense weights
    that fit ``model_name`` with ``classes`` outputs, loading and checking them here.

    Raises:
        ConfigError: starting with ``key`` (the setting that named ``spec``) and saying why.
    """
    from trainer.models import build_model

    m = _RUN_ID.fullmatch(spec.strip())
    try:
        if m and not Path(spec).expanduser().exists():
            uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
            source = resolve_path(spec, _run_dir_of(m.group(1), uri, key), mlflow_run_id=m.group(1))
        else:
            source = resolve_path(spec, spec)
        state = load_state(source)
        if source.model and source.model != model_name:
            raise InitError(f"model.init: {source.describe()} holds a {source.model}; this run builds "
                            f"{model_name} here")
        check_compatible(build_model(model_name, classes), state, source.describe())
    except InitError as e:  # its messages say model.init: the same checks serve other settings
        msg = str(e)
        raise ConfigError(key + msg[len("model.init"):] if msg.startswith("model.init") else msg) from None
    return source


def record_init(source: InitSource | None, tracker: tracking.Tracker) -> None:
    """Tag the parent MLflow run with where the initial weights came from (path, run id, sha256, phase)."""
    if source is not None:
        tracker.tags(source.tags())
