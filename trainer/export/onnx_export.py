"""ONNX export of a torch export (safetensors + manifest), and an onnxruntime model that evaluates like torch.

The ONNX graph is traced from the model :func:`trainer.export.torch_export.load_exported`
builds, so it is the torch export operator for operator: BatchNorm already
folded, every factored layer as its own chain of standard ONNX operators
(Conv, MatMul, Reshape, Transpose, ...; no custom domain), the realizations
a ``--tune-batch`` export chose. Input ``images``: float32 ``(N, 3, H, W)``
normalised as in training (metadata ``mean``/``std``), N dynamic; output
``logits`` ``(N, num_classes)``. The manifest's fields are the model's
metadata props (strings; structured fields as JSON), so the ``.onnx`` file
alone says what it is.

Every export is checked before it is kept: ``onnx.checker`` (full check, with
shape inference) and onnxruntime's logits against torch's on two batch sizes,
within ``TOLERANCE`` relative to the largest logit.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.data import CIFAR10_STATS, CIFAR100_STATS, IMAGENET_STATS
from trainer.export.torch_export import ExportError, load_exported, validate_manifest

ONNX_FILE = "model.onnx"
# 18: the torch.onnx (dynamo) exporter's native opset (onnxruntime reads it).
OPSET = 18
INPUT, OUTPUT = "images", "logits"
# max |onnxruntime - torch| / max |torch| allowed on the export-time check (fp32; measured ~3e-7 on ResNet-20).
TOLERANCE = 1e-4
METADATA_PREFIX = "tdcompress."
MANIFEST_KEY = METADATA_PREFIX + "manifest"

# Per-channel (mean, std) of [0, 1] pixels the model was trained with, by dataset (trainer.data's transforms).
_STATS = {"packed": CIFAR10_STATS, "cifar10": CIFAR10_STATS, "cifar100": CIFAR100_STATS,
          "imagenet": IMAGENET_STATS, "shards": IMAGENET_STATS}


def metadata_props(manifest: dict[str, Any]) -> dict[str, str]:
    """The manifest as ONNX metadata: ``tdcompress.manifest`` (all of it, JSON) and one readable key per field.

    ``tdcompress.<field>`` is the value itself for strings, JSON otherwise; ``tdcompress.input``
    says what the input tensor holds and, for known datasets, ``tdcompress.mean`` / ``tdcompress.std``
    (JSON lists of 3 floats) how it was normalised.
    """
    props = {MANIFEST_KEY: json.dumps(manifest)}
    props.update({METADATA_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in manifest.items()})
    size = manifest["image_size"]
    props[METADATA_PREFIX + "input"] = (f"{INPUT}: float32 (N, 3, {size}, {size}), pixels in [0, 1] minus mean, "
                                        f"divided by std, per channel; {OUTPUT}: float32 (N, "
                                        f"{manifest['num_classes']})")
    stats = _STATS.get(str(manifest.get("dataset")))
    if stats is not None:
        props[METADATA_PREFIX + "mean"], props[METADATA_PREFIX + "std"] = (json.dumps(list(s)) for s in stats)
    return props


def manifest_from_metadata(props: dict[str, str], source: str) -> dict[str, Any]:
    """The manifest stored by :func:`metadata_props`, validated like manifest.json.

    Raises:
        ExportError: no ``tdcompress.manifest`` key, not JSON, or a field out of bounds.
    """
    if MANIFEST_KEY not in props:
        raise ExportError(f"{source}: no {MANIFEST_KEY} metadata prop; not written by `tdcompress export "
                          "--format onnx`")
    try:
        manifest = json.loads(props[MANIFEST_KEY])
    except json.JSONDecodeError as e:
        raise ExportError(f"{source}: metadata prop {MANIFEST_KEY} is not valid JSON ({e})") from None
    validate_manifest(manifest, f"{source} ({MANIFEST_KEY})")
    return manifest


def _relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))


def check_against_torch(path: Path, model: nn.Module, image_size: int, batches: tuple[int, ...] = (1, 3),
                        seed: int = 0) -> float:
    """Largest relative logit difference, onnxruntime vs ``model``, on random inputs of each batch size.

    Raises:
        ExportError: a difference above ``TOLERANCE``.
    """
    session = make_session(path)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in batches:
        x = torch.randn(batch, 3, image_size, image_size, generator=gen)
        with torch.no_grad():
            ref = model(x).numpy()
        got = session.run([OUTPUT], {INPUT: x.numpy()})[0]
        if got.shape != ref.shape:
            raise ExportError(f"{path}: onnxruntime gave logits of shape {got.shape} at batch {batch}, torch "
                              f"{ref.shape}")
        worst = max(worst, _relative_error(got, ref))
    if worst > TOLERANCE:
        raise ExportError(f"{path}: onnxruntime's logits differ from torch's by {worst:.2e} relative "
                          f"(allowed {TOLERANCE:.0e})")
    return worst


def write_onnx(export_dir: str | Path) -> tuple[Path, float]:
    """Write ``model.onnx`` beside the torch export in ``export_dir``; return its path and the checked error."""
    export_dir = Path(export_dir)
    model, manifest = load_exported(export_dir)
    path = export_dir / ONNX_FILE
    return path, export_onnx(model, manifest, path)


def export_onnx(model: nn.Module, manifest: dict[str, Any], path: str | Path) -> float:
    """Trace ``model`` (eval mode, CPU) to ONNX at ``path`` with ``manifest`` as metadata; return the checked error.

    The file is written under a temporary name and renamed only after ``onnx.checker`` and
    :func:`check_against_torch` pass, so a ``model.onnx`` that exists is one that was checked.

    Raises:
        ExportError: the checker rejected the graph, or onnxruntime disagrees with torch.
    """
    import onnx

    path = Path(path)
    model = model.eval()
    size = int(manifest["image_size"])
    example = torch.randn(2, 3, size, size)  # batch 2: a batch of 1 would be specialised as a constant
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT],
                                output_names=[OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                optimize=True, verbose=False)
    proto = program.model_proto
    proto.producer_name = "tdcompress"
    proto.doc_string = (f"{manifest['model']} with {len(manifest.get('surgery') or {})} factored layers, "
                        "BatchNorm folded; exported by `tdcompress export --format onnx`")
    del proto.metadata_props[:]
    for key, value in metadata_props(manifest).items():
        proto.metadata_props.add(key=key, value=value)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(proto, str(tmp))
    try:
        onnx.checker.check_model(str(tmp), full_check=True)
        error = check_against_torch(tmp, model, size)
    except onnx.checker.ValidationError as e:
        tmp.unlink()
        raise ExportError(f"{path}: onnx.checker rejected the graph: {e}") from None
    except ExportError:
        tmp.unlink()
        raise
    tmp.replace(path)
    return error


def make_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session with all graph optimisations; ``threads`` intra-op threads (default: torch's)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or torch.get_num_threads()  # the same threads torch times with
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OnnxRuntimeModel(nn.Module):
    """An onnxruntime session behind the ``nn.Module`` call: ``(N, 3, H, W)`` float tensor -> ``(N, classes)`` logits.

    Holds no parameters: ``trainer.core.loop.evaluate`` and ``trainer.export.latency.measure_latency`` run it
    exactly as they run a torch model. The input is made contiguous float32 (onnxruntime reads NCHW).
    """

    def __init__(self, session: Any, weights: int = 0) -> None:
        super().__init__()
        self.session = session
        self.weights = weights  # elements of the graph's initializers (its stored weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to(torch.float32).contiguous().cpu().numpy()
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: array})[0])


def onnx_path(path: str | Path) -> Path:
    """The ``.onnx`` file of an export directory (or the file itself)."""
    path = Path(path)
    file = path / ONNX_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path} holds no ONNX model: {file} does not exist; write one with "
                                "`tdcompress export RUN_DIR --format onnx`")
    return file


def load_onnx(path: str | Path, threads: int | None = None) -> tuple[OnnxRuntimeModel, dict[str, Any]]:
    """The ONNX export at ``path`` (export directory or .onnx file) in onnxruntime, and its manifest.

    The manifest is read from the model's own metadata props, so the ``.onnx`` file alone suffices.
    """
    import onnx

    file = onnx_path(path)
    try:
        proto = onnx.load_model(str(file), load_external_data=False)
    except Exception as e:  # not protobuf, truncated
        raise ExportError(f"{file}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    manifest = manifest_from_metadata({p.key: p.value for p in proto.metadata_props}, str(file))
    weights = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    return OnnxRuntimeModel(make_session(file, threads), weights), manifest


__all__ = ["INPUT", "ONNX_FILE", "OPSET", "OUTPUT", "OnnxRuntimeModel", "TOLERANCE",
           "check_against_torch", "export_onnx", "load_onnx", "make_session", "manifest_from_metadata", "metadata_props",
           "onnx_path", "write_onnx"]
