"""Run by tests/test_engine_paths.py in a fresh interpreter: a few engine steps under the ADMM penalty.

    python tests/engine_paths_probe.py MODEL DEVICE WITH_COMPILE(0|1)

prints one line ``RESULT {json}`` with the eager (and, when asked, compiled) run's
losses, final primal residual and the dtypes seen.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from admm.admm_component import AdmmComponent
from admm.config import AdmmConfig, CompressionConfig
from admm.planning.model_plan import plan_for_model
from cluster.ray_runtime import init_local_group
from trainer.config import EngineConfig, OptimConfig
from trainer.core.engine import build_engine, resolve_precision
from trainer.models import build_model

BATCH = 16


def steps(model_name: str, compile_model: bool, device: torch.device, n: int = 6) -> dict:
    engine_cfg = EngineConfig(compile=compile_model)
    compression = CompressionConfig(format="svd", keep_ratio=0.5, exclude=[], min_channels=3)
    admm_cfg = AdmmConfig(rho=0.5)  # large: the penalty moves the weights well beyond the tolerance
    precision = resolve_precision(engine_cfg, device)
    torch.manual_seed(0)
    model = build_model(model_name, 10).to(device)
    seen: dict[str, str] = {}
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.setdefault("conv_out", str(o.dtype)) and None)
    comp = AdmmComponent(plan_for_model(model, compression), admm_cfg, rank=0, world=1, grad_accum=1,
                         log=lambda m, s: None)
    groups = comp.prepare(model, OptimConfig().weight_decay)
    engine = build_engine(model, OptimConfig(), engine_cfg, batch_size=BATCH, lr=0.05, total_steps=n,
                          steps_per_epoch=n, world_size=1, precision=precision, extra_groups=groups)
    comp.attach(engine.module, optimizer=engine.optimizer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (BATCH,), generator=g).to(device)
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


def main(argv: list[str]) -> None:
    model_name, device, with_compile = argv[0], torch.device(argv[1]), argv[2] == "1"
    init_local_group(gpu=device.type == "cuda")
    out = {"eager": steps(model_name, False, device),
           "compiled": steps(model_name, True, device) if with_compile else None}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
