"""The engine's fast paths: bf16 really on (GPU only) and torch.compile giving eager's loss curve.

Both runs train under the ADMM penalty (the component's in-place gradient hooks),
so the compiled path is also checked to apply it exactly as eager does.

Each check runs in a fresh interpreter through ``cluster.ray_runtime.run_local``
(one-rank gloo or nccl group), so the device and process group it needs never
meet the ones this test process already holds.
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

SCRIPT = r'''
import json, sys, torch, torch.nn.functional as F
from admm.component import AdmmComponent, plan_for_model
from cluster.ray_runtime import run_local
from launcher.schema import CompressionConfig, Config
from trainer.engine import build_engine, resolve_precision
from trainer.models import build_model

def steps(compile_model, device, n=6):
    cfg = Config(name="paths")
    cfg.cluster.use_gpu = "yes" if device.type == "cuda" else "no"
    cfg.engine.compile = compile_model
    cfg.data.batch_size = 16
    cfg.compression = CompressionConfig(format="svd", keep_ratio=0.5, exclude=[], min_channels=3)
    cfg.admm.rho = 0.5  # large: the penalty moves the weights well beyond the tolerance
    precision = resolve_precision(cfg, device)
    torch.manual_seed(0)
    model = build_model(sys.argv[1], 10).to(device)
    seen = {}
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.setdefault("conv_out", str(o.dtype)) and None)
    comp = AdmmComponent(plan_for_model(model, cfg.compression), cfg.admm, rank=0, world=1, grad_accum=1,
                         log=lambda m, s: None)
    penalized = comp.prepare(model)
    engine = build_engine(model, cfg, lr=0.05, total_steps=n, steps_per_epoch=n, world_size=1, precision=precision,
                          penalized=penalized)
    comp.attach(engine.module, optimizer=engine.optimizer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (16,), generator=g).to(device)
    if precision.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    losses = []
    for _ in range(n):
        loss = F.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    weight = next(engine.module.parameters())
    primal = comp.z_update(n)["admm_primal"]
    return {"losses": losses, "primal": primal, "bf16": precision.bf16, "param_dtype": str(weight.dtype),
            "grad_dtype": str(weight.grad.dtype) if weight.grad is not None else None, **seen}

device = torch.device(sys.argv[2])
cfg = Config(name="paths"); cfg.cluster.use_gpu = "yes" if device.type == "cuda" else "no"
out = run_local(lambda _: {"eager": steps(False, device), "compiled": steps(True, device)
                           if sys.argv[3] == "1" else None}, {}, cfg)
print("RESULT " + json.dumps(out))
'''


def _run(model: str, device: str, with_compile: bool) -> dict:
    res = subprocess.run([sys.executable, "-c", SCRIPT, model, device, "1" if with_compile else "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bf16_is_really_on_gpu():
    """DeepSpeed switches an outer autocast off; the engine's torch_autocast section must keep bf16 on."""
    out = _run("resnet20", "cuda", with_compile=False)["eager"]
    assert out["bf16"] and out["conv_out"] == "torch.bfloat16", out
    assert out["param_dtype"] == "torch.float32"  # master weights and optimizer stay fp32


HAS_CXX = bool(shutil.which("c++") or shutil.which("g++"))  # inductor compiles C++ for the CPU


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CXX, reason="torch.compile on CPU needs a C++ compiler")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))])
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
