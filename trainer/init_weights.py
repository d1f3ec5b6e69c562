"""``model.init``: start a run from trained weights (another run's checkpoint or a weights file).

The driver resolves the source once (:func:`resolve_path`; an MLflow run id is turned into its run
directory by :mod:`launcher.run.init_source`), loads it and checks it against the model this run builds
(:func:`check_compatible`), all before any worker starts. The result, an :class:`InitSource`, pins
the exact file and its sha256; every worker re-reads that file, verifies the hash (a source run that
moved on since is an error, not a silent different start) and loads it into its freshly built model
at the start of the first phase. On resume the run's own checkpoint wins and the init is not applied.

Sources:
- a run directory (``<storage>/<name>/<run>``): the model weights of its newest intact checkpoint,
  which must hold the dense model (a run past its decompose phase is refused);
- a checkpoint directory (``.../checkpoints/ckpt-000012``): that checkpoint;
- a weights file: a torchvision-style ``state_dict`` (``.pth``/``.pt``, read with
  ``torch.load(weights_only=True)``; a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and a
  DataParallel ``module.`` prefix are accepted) or a ``.safetensors`` file.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from trainer.checkpoints import files as ckpt

InitKind = Literal["checkpoint", "file"]
_WRAPPERS = ("state_dict", "model", "weights")  # keys under which weight files commonly nest the state_dict


class InitError(ValueError):
    """``model.init`` cannot be used; the message starts with ``model.init:`` and says why."""


@dataclass(frozen=True)
class InitSource:
    """A resolved ``model.init``: the one file the weights are read from, pinned by its sha256."""

    spec: str  # model.init as the user wrote it
    kind: InitKind
    file: str  # absolute path of the file read: a checkpoint's shared.pt, or the weights file
    sha256: str
    checkpoint: str | None = None  # the checkpoint directory (kind "checkpoint")
    run_dir: str | None = None  # the source run's directory, when the source is a run
    mlflow_run_id: str | None = None  # the source run's MLflow parent run, when known
    phase: str | None = None  # the source checkpoint's phase and epoch
    epoch: int | None = None
    model: str | None = None  # the model name the source checkpoint recorded

    def tags(self) -> dict[str, str]:
        """MLflow tags recording where the weights came from (``tdcompress.init.<field>``)."""
        return {f"tdcompress.init.{k}": str(v) for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        where = f"checkpoint {self.checkpoint} (phase {self.phase!r}, epoch {self.epoch})" \
            if self.kind == "checkpoint" else f"weights file {self.file}"
        return f"{where}, sha256 {self.sha256[:16]}..."


def _run_json_parent(run_dir: Path) -> str | None:
    try:
        state = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return state.get("parent_id") if isinstance(state, dict) else None


def _from_checkpoint(spec: str, path: Path, run_dir: Path | None, mlflow_run_id: str | None) -> InitSource:
    problem = ckpt.checkpoint_problem(path)  # full sha256 check: the manifest's hash is then the file's
    if problem is not None:
        raise InitError(f"model.init: checkpoint {path} is damaged: {problem}")
    meta = ckpt.read_meta(path)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    return InitSource(spec=spec, kind="checkpoint", file=str((path / "shared.pt").resolve()),
                      sha256=manifest["files"]["shared.pt"][ckpt.HASH], checkpoint=str(path.resolve()),
                      run_dir=str(run_dir.resolve()) if run_dir else None,
                      mlflow_run_id=mlflow_run_id or (_run_json_parent(run_dir) if run_dir else None),
                      phase=meta.get("phase"), epoch=meta.get("epoch"), model=meta.get("model"))


def resolve_path(spec: str, path: str | Path, mlflow_run_id: str | None = None) -> InitSource:
    """Resolve a run directory, checkpoint directory or weights file to the :class:`InitSource` to load.

    Args:
        spec: ``model.init`` as given (recorded).
        path: where it points (for an MLflow run id: the run directory it resolved to).
        mlflow_run_id: the MLflow run ``spec`` named, if any.
    Raises:
        InitError: nothing usable there (no checkpoint, none intact, not a file or directory).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "meta.json").is_file() and (path / "shared.pt").is_file():  # a checkpoint directory
            run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
            return _from_checkpoint(spec, path, run_dir, mlflow_run_id)
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found, skipped = ckpt.latest_intact_checkpoint(root)
        if found is None:
            why = "".join(f"\n  {p}: {w}" for p, w in skipped) or " none found"
            raise InitError(f"model.init: {path} holds no intact checkpoint to start from (looked in {root}):{why}")
        return _from_checkpoint(spec, found, root.parent if root.name == "checkpoints" else None, mlflow_run_id)
    if path.is_file():
        return InitSource(spec=spec, kind="file", file=str(path.resolve()), sha256=ckpt.file_digest(path),
                          mlflow_run_id=mlflow_run_id)
    raise InitError(f"model.init: {str(path)!r} does not exist; give a run directory, a checkpoint directory, a "
                    "weights file (.pth/.pt state_dict or .safetensors), or an MLflow run id")


def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` state_dict inside a loaded weights file (one wrapper level allowed)."""
    if not _tensor_dict(obj) and isinstance(obj, dict):
        inner = [obj[k] for k in _WRAPPERS if k in obj and _tensor_dict(obj[k])]
        obj = inner[0] if inner else obj
    if not _tensor_dict(obj):
        raise InitError(f"model.init: {where} holds no state_dict (a dict of named tensors, possibly under "
                        f"{' / '.join(repr(k) for k in _WRAPPERS)}); got {type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):  # saved from a DataParallel/DDP wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_state(source: InitSource) -> dict[str, torch.Tensor]:
    """Read the weights of ``source`` on the CPU, after checking the file still has the pinned sha256.

    Returns:
        ``{name: tensor}``: the dense model's ``state_dict`` (parameters and buffers).
    Raises:
        InitError: the file changed or vanished since it was resolved, is unreadable, or holds a
            decomposed model.
    """
    file = Path(source.file)
    if not file.is_file():
        raise InitError(f"model.init: {file} is gone since the run started (the source run may have moved on and "
                        "pruned that checkpoint); resolve model.init again")
    digest = ckpt.file_digest(file)
    if digest != source.sha256:
        raise InitError(f"model.init: {file} changed since it was resolved (sha256 {digest[:16]}... != "
                        f"{source.sha256[:16]}...)")
    if source.kind == "checkpoint":
        model_state = ckpt.load_shared(Path(source.checkpoint or file.parent))["model"]
        if model_state.get("surgery"):
            raise InitError(f"model.init: checkpoint {source.checkpoint} (phase {source.phase!r}) holds a decomposed "
                            f"model ({len(model_state['surgery'])} factored layers); start from a dense model: a run "
                            "whose phases end before decompose, or a checkpoint written before it")
        return _unwrap(model_state["weights"], str(file))
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(file), device="cpu")
        else:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code in it, a truncated file: say which and why
        raise InitError(f"model.init: cannot load {file} as weights ({type(e).__name__}: {e}); only plain "
                        "state_dicts are read (torch.load(weights_only=True)) or .safetensors files") from e
    return _unwrap(loaded, str(file))


def check_compatible(model: nn.Module, state: dict[str, torch.Tensor], source: str = "the init weights") -> None:
    """Raise :class:`InitError` unless ``state`` has exactly ``model``'s tensor names and shapes.

    The message names the missing and unexpected keys (first few) and the first tensor whose shape
    differs, e.g. ``fc.weight: (1000, 2048) in the file, (10, 2048) in resnet50``.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatch = next(((k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
                     if k in state and state[k].shape != v.shape), None)
    if not (missing or unexpected or mismatch):
        return
    parts = []
    if mismatch:
        parts.append(f"first mismatched tensor {mismatch[0]}: {mismatch[1]} in {source}, {mismatch[2]} in the model")
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{len(keys)} {label} key(s): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}")
    raise InitError(f"model.init: {source} do not fit this model: {'; '.join(parts)}")


def apply_init(model: nn.Module, source: InitSource) -> nn.Module:
    """Load ``source``'s weights into ``model`` (in place, checked first); returns ``model``."""
    state = load_state(source)
    check_compatible(model, state, source.describe())
    model.load_state_dict(state)
    return model
