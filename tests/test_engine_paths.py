"""The engine's fast paths: bf16 really on (GPU only) and torch.compile giving eager's loss curve.

Both runs train under the ADMM penalty (the component's in-place gradient hooks),
so the compiled path is also checked to apply it exactly as eager does.

Each check runs ``engine_paths_probe.py`` in a fresh interpreter (one-rank gloo
or nccl group), so the device and process group it needs never meet the ones
this test process already holds.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

PROBE = Path(__file__).with_name("engine_paths_probe.py")


def _run(model: str, device: str, with_compile: bool) -> dict:
    res = subprocess.run([sys.executable, str(PROBE), model, device, "1" if with_compile else "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bf16_is_really_on_gpu():
    """DeepSpeed switches an outer autocast off; the engine's torch_autocast section must keep bf16 on."""
    out = _run("resnet20", "cuda", with_compile=False)["eager"]
    assert out["bf16"] and out["conv_out"] == "torch.bfloat16", out
    assert out["param_dtype"] == "torch.float32"  # master weights and optimizer stay fp32


HAS_CXX = bool(shutil.which("c++") or shutil.which("g++"))  # inductor compiles C++ for the CPU


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CXX, reason="torch.compile on CPU needs a C++ compiler")),
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")])])
def test_compiled_engine_follows_the_eager_loss_curve(device):
    """engine.compile=true trains like eager, ADMM penalty included: the same losses and residual."""
    out = _run("tinycnn" if device == "cpu" else "resnet20", device, with_compile=True)
    eager, compiled = out["eager"]["losses"], out["compiled"]["losses"]
    assert eager[-1] < eager[0]  # it trains
    tol = 2e-2 if device == "cuda" else 1e-4  # bf16 on the GPU; fp32 on CPU differs only in summation order
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= tol * max(1.0, abs(a)), (eager, compiled)
    primal = out["eager"]["primal"], out["compiled"]["primal"]
    assert abs(primal[0] - primal[1]) <= tol * 10 * primal[0], primal
