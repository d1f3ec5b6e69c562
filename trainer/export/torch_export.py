"""Export a run's model as safetensors + a JSON manifest, and load it back with torch alone.

The manifest names the architecture (model registry name, classes, input
size) and the factored layers (``surgery``: layer -> spec), so loading builds
the dense model, rebuilds the factored structure and reads the weights: no
pickle, no Ray, no DeepSpeed, no MLflow.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from admm.nn.fold import apply_folding, fold_batchnorm
from admm.nn.realize import realize
from admm.nn.surgery import apply_manifest, manifest_of
from trainer.checkpoints import files as ckpt
from trainer.checkpoints.stateful import restore_model
from trainer.config import MODEL_NAMES
from trainer.export.latency import format_row, layer_latency_table
from trainer.models import build_model

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, fold_bn: bool = True,
               tune_batch: int = 0, channels_last: bool = True,
               progress: Callable[[str], None] | None = None) -> Path:
    """Write ``model.safetensors`` and ``manifest.json`` for the newest checkpoint of ``run_dir``.

    With ``fold_bn`` the BatchNorms are folded into the convs (dense or factored) that feed them:
    the exported model is for inference, and BN is one full pass over every activation it touches.

    With ``tune_batch > 0`` every factored layer is timed on this machine's CPU at that
    batch (in ``channels_last`` when set) as each exact realization of
    :mod:`admm.nn.realize` (factored chain, merged, dense), and the fastest is exported;
    the table goes into the manifest as ``latency_table`` and each row to ``progress``.
    ``flops_per_image`` in the manifest counts the model as exported (after that choice).
    """
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    last, skipped = ckpt.latest_intact_checkpoint(run_dir / "checkpoints")
    for path, why in skipped:
        print(f"export: skipped damaged checkpoint {path}: {why}", flush=True)
    if last is None and skipped:
        raise ckpt.CheckpointError(ckpt.no_intact_message(run_dir / "checkpoints", skipped))
    if last is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint (expected {run_dir / 'checkpoints' / 'latest'}); "
                                "pass the run directory printed by `tdcompress run`")
    meta = ckpt.read_meta(last)
    shared = ckpt.load_shared(last)
    out = Path(out_dir) if out_dir else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    model = restore_model(build_model(meta["model"], meta["num_classes"]), shared["model"])
    folded: list = []
    if fold_bn:
        model.eval()
        folded = [list(p) for p in fold_batchnorm(model)]
    table: list[dict[str, Any]] = []
    if tune_batch > 0 and manifest_of(model):
        size = int(meta["image_size"])
        rows = layer_latency_table(model, (tune_batch, 3, size, size), channels_last=channels_last,
                                   progress=(lambda r: progress(format_row(r))) if progress else None)
        realize(model, {r.name: r.choice for r in rows if r.choice != "factored"})
        table = [{"layer": r.name, "format": r.format, "input_shape": list(r.input_shape), "ms": r.ms,
                  "choice": r.choice} for r in rows]
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(out / WEIGHTS)
    manifest = {"format_version": FORMAT_VERSION, "model": meta["model"], "num_classes": meta["num_classes"],
                "image_size": meta["image_size"], "dataset": meta.get("dataset"), "surgery": manifest_of(model),
                "folded_bn": folded, "source_checkpoint": str(last), "phase": meta["phase"]}
    manifest["flops_per_image"] = _counted_flops(model, int(meta["image_size"]))
    if table:
        manifest["latency_table"] = {"batch": tune_batch, "channels_last": channels_last, "device": "cpu",
                                     "threads": torch.get_num_threads(), "rows": table}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


@torch.no_grad()
def _counted_flops(model: nn.Module, size: int) -> int:
    """FLOPs (2 x MACs) of one image through the model as exported, counted by FlopCounterMode.

    What runs is what is counted: a realized dense layer at its dense cost, lowrank_sparse's S
    gathered (``sparse`` realization) as the GEMM over the columns its non-zeros touch.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model.eval()(torch.zeros(1, 3, size, size))
    return int(counter.get_total_flops())


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not an export: {file} does not exist; write one with "
                                "`tdcompress export RUN_DIR` (default output: RUN_DIR/export)")
    try:
        manifest = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{file}: not valid JSON ({e})") from None
    validate_manifest(manifest, str(file))
    return manifest


def validate_manifest(manifest: Any, file: str) -> None:
    """Check a manifest's fields (``file`` names where it came from in the error).

    Raises:
        ExportError: not a mapping, a format_version other than ours, or a field out of bounds.
    """
    if not isinstance(manifest, dict):
        raise ExportError(f"{file}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{file}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    _check_field(file, manifest, "model", lambda v: v in MODEL_NAMES, f"one of {', '.join(MODEL_NAMES)}")
    _check_field(file, manifest, "num_classes", lambda v: _int_in(v, 1, MAX_CLASSES), f"an integer in [1, {MAX_CLASSES}]")
    _check_field(file, manifest, "image_size", lambda v: _int_in(v, 8, MAX_IMAGE_SIZE),
                 f"an integer in [8, {MAX_IMAGE_SIZE}]")
    for key in ("surgery",):
        _check_field(file, manifest, key, lambda v: v is None or isinstance(v, dict), "a mapping or null")
    _check_field(file, manifest, "folded_bn", lambda v: v is None or isinstance(v, list), "a list or null")


# Bounds on what a manifest may ask to build: a tampered file must not make us allocate without limit.
MAX_CLASSES = 100_000
MAX_IMAGE_SIZE = 4096


class ExportError(ValueError):
    """An export directory is malformed or tampered with; the message names the file and the field."""


def _int_in(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _check_field(file: str | Path, manifest: dict[str, Any], key: str, ok: Callable[[Any], bool], allowed: str) -> None:
    if not ok(manifest.get(key)):
        raise ExportError(f"{file}: {key} must be {allowed}, got {manifest.get(key)!r}")


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Build the exported model from ``path`` (a directory with manifest.json + model.safetensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path)
    model = build_model(manifest["model"], manifest["num_classes"])
    try:
        if manifest.get("folded_bn"):  # first: the folded producers carry a bias the manifest's specs expect
            model = apply_folding(model, manifest["folded_bn"])
        if manifest.get("surgery"):
            model = apply_manifest(model, manifest["surgery"])
        model.load_state_dict(load_file(str(path / WEIGHTS), device=str(device)), strict=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # a manifest that does not describe this model, or weights that do not fit it
        raise ExportError(f"{path} cannot be loaded: {type(e).__name__}: {e}") from None
    return model.to(device).eval(), manifest
