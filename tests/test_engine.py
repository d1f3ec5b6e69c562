"""The DeepSpeed engine as the project drives it: ZeRO stages, gradient accumulation, schedule, resume."""
from __future__ import annotations

import math

import pytest
import torch

from launcher.run import pipeline
from trainer.checkpoints import files as ckpt
from trainer.config import EngineConfig, OptimConfig
from trainer.core.engine import Precision, deepspeed_config, warmup_cosine
from trainer.core.faults import InjectedFailure


def _weights(info):
    return ckpt.load_shared(ckpt.latest_checkpoint(info.dir / "checkpoints"))["model"]["weights"]


def test_deepspeed_config_is_explicit():
    optim, engine = OptimConfig(grad_accum=2), EngineConfig(zero_stage=1)
    ds = deepspeed_config(optim, engine, batch_size=128, world_size=2,
                          precision=Precision(bf16=True, channels_last=False))
    assert ds["train_batch_size"] == 128 and ds["train_micro_batch_size_per_gpu"] == 128 // (2 * 2)
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"] == {"stage": 1}
    assert ds["gradient_clipping"] == 0.0  # DeepSpeed would clip at 1.0 by default
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    fp32 = deepspeed_config(optim, engine, batch_size=128, world_size=2, precision=Precision(False, False))
    assert "torch_autocast" not in fp32


def test_warmup_cosine_shape():
    f = warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) - 1e-12 for s in range(10, 100))


def test_gradient_accumulation_matches_one_big_batch(tiny):
    """tinycnn has no BatchNorm: 2 micro-batches of 32 accumulate to the step of one batch of 64."""
    one = pipeline.run(tiny("run_name=accum1", "optim.grad_accum=1"))
    two = pipeline.run(tiny("run_name=accum2", "optim.grad_accum=2"))
    a, b = _weights(one), _weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stage_matches_stage0_and_resumes(tiny, stage):
    ref = pipeline.run(tiny("run_name=z0", "phases.0.epochs=3"))
    with pytest.raises(InjectedFailure):
        pipeline.run(tiny(f"run_name=z{stage}", f"engine.zero_stage={stage}", "phases.0.epochs=3",
                          "debug.fail_at={phase: 0, epoch: 1}"))
    meta = ckpt.read_meta(ckpt.latest_checkpoint(ref.dir.parent / f"z{stage}" / "checkpoints"))
    assert meta["zero_stage"] == stage
    resumed = pipeline.run(tiny(f"run_name=z{stage}", f"engine.zero_stage={stage}", "phases.0.epochs=3",
                                "resume=true"))
    a, b = _weights(ref), _weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_label_smoothing_and_momentum_change_the_result(tiny):
    base = _weights(pipeline.run(tiny("run_name=b")))
    smooth = _weights(pipeline.run(tiny("run_name=s", "optim.label_smoothing=0.2")))
    slow = _weights(pipeline.run(tiny("run_name=m", "optim.momentum=0.5")))
    for other in (smooth, slow):
        assert any(not torch.allclose(base[k], other[k]) for k in base)


def test_one_rank_skips_the_identity_all_reduce():
    """World size 1, ZeRO 0: DeepSpeed's all-reduce would only flatten and copy back every gradient.

    Also: the SGD under the engine is torch's fused one unless ``optim.fused=false``.
    """
    from cluster.ray_runtime import init_local_group
    from trainer.core.engine import build_engine
    from trainer.models import build_model

    init_local_group(gpu=False)
    flags = {}
    for stage in (0, 1):
        engine = build_engine(build_model("tinycnn", 10), OptimConfig(fused=stage == 0),
                              EngineConfig(zero_stage=stage), batch_size=16, lr=0.1, total_steps=1,
                              steps_per_epoch=1, world_size=1, precision=Precision(False, False))
        flags[stage] = (engine.enable_backward_allreduce, engine.basic_optimizer.defaults["fused"])
    assert flags == {0: (False, True), 1: (True, False)}


def test_building_an_engine_compiles_no_deepspeed_op(tmp_path):
    """DeepSpeed's shared-memory all-reduce op is JIT-compiled (C++, over a minute of CPU, again for every new
    environment) by the first engine of a process unless it is marked incompatible: build_engine does that for
    every caller, so a fresh process that builds an engine leaves the extensions directory empty."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import torch; from cluster.dist import init_local_group; from trainer.core.engine import Precision, "
            "build_engine; from trainer.config import EngineConfig, OptimConfig; from trainer.models import "
            "build_model; init_local_group(gpu=False); build_engine(build_model('tinycnn', 10), OptimConfig(), "
            "EngineConfig(), batch_size=16, lr=0.1, total_steps=1, steps_per_epoch=1, world_size=1, "
            "precision=Precision(False, False)); print('engine ok'); torch.distributed.destroy_process_group()")
    # The group is closed before the interpreter exits: a gloo group left open can abort the exit
    # ("terminate called without an active exception") after the engine was built.
    ext = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "engine ok" in res.stdout, res.stderr[-3000:]
    assert "built successfully" not in res.stdout + res.stderr
    assert not ext.exists() or not any(ext.rglob("*")), sorted(ext.rglob("*"))
