"""The run's exported model as an MLflow model: the ONNX flavor (with pyfunc) plus the torch export's files.

``mlflow.pyfunc.load_model("runs:/<parent>/model")`` (or ``models:/<name>/<version>`` when registered)
gives a model whose ``predict`` takes a float32 array ``(N, 3, H, W)`` of normalised images (the
ONNX model's ``images`` input; the ONNX metadata says how to normalise) and returns the logits
``(N, num_classes)``. The same directory also holds ``model.safetensors`` + ``manifest.json``,
so ``trainer.export.torch_export.load_exported`` reads it with torch alone, no pickle.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from trainer.export.onnx_export import INPUT, OUTPUT, write_onnx
from trainer.export.torch_export import MANIFEST, WEIGHTS, read_manifest


def save_mlflow_model(export_dir: str | Path, dest: str | Path) -> Path:
    """Write an MLflow model directory at ``dest`` (which must not exist) for the export in ``export_dir``.

    Writes ``model.onnx`` into ``export_dir`` first when it is not there (checked against torch,
    :func:`trainer.export.onnx_export.write_onnx`). The signature fixes the input to float32
    ``(-1, 3, S, S)`` and the output to ``(-1, num_classes)``; onnxruntime runs on the CPU
    provider with all graph optimisations. The pip requirements are stated, not inferred: what the ONNX
    pyfunc imports is known (mlflow, numpy, onnx, onnxruntime), and MLflow's inference loads the model in a
    subprocess to find it out, several seconds at the end of every run.
    """
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    export_dir, dest = Path(export_dir), Path(dest)
    manifest = read_manifest(export_dir)
    onnx_file = export_dir / "model.onnx"
    if not onnx_file.is_file():
        onnx_file, _ = write_onnx(export_dir)
    size, classes = manifest["image_size"], manifest["num_classes"]
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size), INPUT)]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes), OUTPUT)]))
    mlflow.onnx.save_model(onnx.load(str(onnx_file)), str(dest), signature=signature,
                           onnx_execution_providers=["CPUExecutionProvider"],
                           onnx_session_options={"graph_optimization_level": 99},  # ORT_ENABLE_ALL
                           save_as_external_data=False,
                           pip_requirements=[f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}",
                                             *mlflow.onnx.get_default_pip_requirements()],
                           metadata={"tdcompress_model": manifest["model"],
                                     "factored_layers": len(manifest.get("surgery") or {})})
    for name in (WEIGHTS, MANIFEST):
        shutil.copy2(export_dir / name, dest / name)
    return dest
