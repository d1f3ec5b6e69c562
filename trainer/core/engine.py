"""DeepSpeed engine setup: config dict, optimizer, warmup + cosine schedule.

The engine runs on whatever process group the caller set up (Ray Train's,
or the in-process one of the ``local`` backend). On CPU DeepSpeed picks its
CPU accelerator and gloo by itself; we only switch off its shared-memory
all-reduce op, whose JIT build costs ~30 s per process and buys nothing for
the gradient sizes of CNNs on gloo (the all-reduce stays correct without it).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from trainer.config import EngineConfig, OptimConfig


@dataclass(frozen=True)
class Precision:
    """What the engine does with numbers on this device."""

    bf16: bool  # autocast the forward pass to bfloat16 (parameters and optimizer stay fp32)
    channels_last: bool  # feed channels_last inputs (parameters stay contiguous: DeepSpeed needs that)


def resolve_precision(engine: EngineConfig, device: torch.device) -> Precision:
    """Turn ``auto`` settings into concrete ones for ``device``."""
    on_gpu = device.type == "cuda"
    bf16 = engine.precision == "bf16" or (engine.precision == "auto" and on_gpu)
    cl = engine.channels_last == "on" or (engine.channels_last == "auto" and on_gpu)
    return Precision(bf16=bf16, channels_last=cl)


def prepare_deepspeed_env() -> None:
    """Set what DeepSpeed needs before it is first used in this process.

    DeepSpeed's communication layer JIT-compiles a shared-memory all-reduce op (C++) the first time it
    initialises: over a minute of CPU, cached per Python environment (a new venv or checkout pays it
    again), for an op gloo does not need. It is marked incompatible here, so it is never built.

    DeepSpeed's autotuner, which this project never runs, imports MLflow when it is installed, at DeepSpeed's
    own import: ~2 s of CPU in every worker, although only rank 0 logs (measured: ``import deepspeed`` 4.7 s
    of CPU, 2.8 s without it). MLflow is hidden from that one import (the autotuner takes it as absent);
    whoever imports it afterwards gets it as usual."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    hide_mlflow = "deepspeed" not in sys.modules and "mlflow" not in sys.modules
    if hide_mlflow:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # an import of it raises ImportError
    try:
        import deepspeed  # noqa: WPS433 (import after the env is set)
    finally:
        if hide_mlflow:
            del sys.modules["mlflow"]

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_config(optim: OptimConfig, engine: EngineConfig, *, batch_size: int, world_size: int,
                     precision: Precision) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (``batch_size``: global images per optimizer step).

    Autocast is requested through DeepSpeed's own ``torch_autocast`` section:
    an outer ``torch.autocast`` is switched off inside the engine (measured
    0.58x on an H100: the model silently trains in fp32).
    """
    micro = batch_size // (world_size * optim.grad_accum)
    ds: dict[str, Any] = {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": optim.grad_accum,
        "zero_optimization": {"stage": engine.zero_stage},
        # Explicit: DeepSpeed's default is 1.0, a silent clip (and a global-norm pass every step).
        "gradient_clipping": optim.grad_clip,
        # We pass a torch SGD; DeepSpeed asks for this flag to pair it with ZeRO >= 1.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if precision.bf16:
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return ds


def param_groups(model: nn.Module, weight_decay: float,
                 extra_groups: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only; BN parameters and biases (1-D) get none.

    ``extra_groups`` are the groups components asked for (``Component.prepare``), kept as
    given: their parameters leave the default groups. (The ADMM component's group carries
    rho W of its penalty as weight decay; the engine need not know.)
    """
    claimed = {id(p) for g in extra_groups for p in g["params"]}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in claimed:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              *extra_groups]
    # No empty groups: DeepSpeed drops them, and the LR scheduler built on the full list would then
    # hold one learning rate too many (e.g. when every weight of a small model is planned).
    return [g for g in groups if g["params"]]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR multiplier: linear warmup from ~0 to 1, then cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def build_engine(model: nn.Module, optim: OptimConfig, engine_cfg: EngineConfig, *, batch_size: int, lr: float,
                 total_steps: int, steps_per_epoch: int, world_size: int, precision: Precision,
                 extra_groups: Sequence[dict[str, Any]] = (), start_step: int = 0):
    """Wrap ``model`` in a DeepSpeed engine with SGD and a warmup+cosine schedule.

    Args:
        batch_size: global images per optimizer step (all ranks, all micro-batches).
        total_steps: optimizer steps of the curve (sets the cosine length): the phase's, or with
            optim.schedule=one_curve those of all training phases (trainer/core/lr_curve.py).
        steps_per_epoch: optimizer steps per epoch (converts warmup_epochs).
        start_step: where on the curve this phase starts (the schedule's step 0 is curve step start_step).
        extra_groups: optimizer param groups the phase's components ask for (see param_groups).
    Returns:
        The DeepSpeed engine; ``engine.module`` is the (unwrapped) model.
    """
    prepare_deepspeed_env()  # every caller, benchmarks and probes too: none may JIT-build DeepSpeed's ops
    import deepspeed

    o = optim
    opt = torch.optim.SGD(param_groups(model, o.weight_decay, extra_groups), lr=lr, momentum=o.momentum,
                          nesterov=o.nesterov, fused=o.fused)
    warmup = int(round(o.warmup_epochs * steps_per_epoch))
    curve = warmup_cosine(total_steps, warmup, o.min_lr_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, curve if start_step == 0 else lambda s: curve(start_step + s))
    ds_config = deepspeed_config(o, engine_cfg, batch_size=batch_size, world_size=world_size, precision=precision)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    if world_size == 1 and engine_cfg.zero_stage == 0:
        # One rank: the gradient all-reduce is the identity, yet DeepSpeed still flattens every
        # gradient into a bucket (torch.cat) and copies it back each step: 76 of 178 ms of a
        # ResNet-18 CPU step (batch 16, 64 px). ZeRO 1/2 reduce inside their optimizer: untouched.
        engine.enable_backward_allreduce = False
    if engine_cfg.compile:
        engine.compile()
    return engine
