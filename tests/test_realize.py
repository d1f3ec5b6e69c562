"""Exact realizations of factored layers (admm.nn.realize), the per-layer latency table and tuned malloc."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from admm.config import CompressionConfig
from admm.nn.fold import apply_folding, fold_batchnorm
from admm.nn.layers import SVDLayer, factorize_module
from admm.nn.realize import alternatives, merged_module, realize
from admm.nn.surgery import apply_manifest, decompose_model, manifest_of
from admm.planning.model_plan import plan_for_model
from trainer.export.latency import factored_input_shapes, layer_latency_table, measure_latency
from trainer.export.malloc import TUNABLES, has_glibc, malloc_tuned, tuned_env
from trainer.models import build_model

CASES = [  # (dense module, format, rank)
    (nn.Conv2d(12, 20, 3, stride=2, padding=1, bias=True), "tucker2", (7, 5)),
    (nn.Conv2d(12, 20, 3, padding=2, dilation=2, bias=False), "tucker2", (5, 9)),
    (nn.Conv2d(16, 24, 1, bias=True), "tucker2", (6, 9)),
    (nn.Conv2d(16, 24, 1, stride=2, bias=False), "tucker2", (9, 6)),
    (nn.Linear(16, 10), "tucker2", (4, 6)),
    (nn.Conv2d(12, 20, 3, stride=2, padding=1), "svd", 6),
    (nn.Conv2d(12, 20, 3, padding=1), "cp", 10),
    (nn.Conv2d(16, 16, 3, padding=1), "tt", 4),
    (nn.Conv2d(16, 24, 1, stride=2, bias=False), "tt", (2, 6, 8, 4, 2)),  # merged: svd of the middle bond
    (nn.Linear(16, 10), "tt", 3),
    (nn.Conv2d(12, 20, 3, padding=1), "lowrank_sparse", (4, 30)),
]


def _input(module: nn.Module) -> torch.Tensor:
    return torch.randn(3, module.in_features) if isinstance(module, nn.Linear) else torch.randn(2, module.in_channels, 9, 9)


@pytest.mark.parametrize("dense,fmt,rank", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_every_realization_computes_the_factored_map(dense, fmt, rank):
    torch.manual_seed(0)
    layer = factorize_module(dense, fmt, rank).eval()
    x = _input(dense)
    options = alternatives(layer)
    expected = {"factored", "dense"} | ({"merged"} if fmt in ("tucker2", "tt") else set())
    assert set(options) == expected | ({"sparse"} if fmt == "lowrank_sparse" else set())
    with torch.no_grad():
        ref = layer(x)
        for name, module in options.items():
            torch.testing.assert_close(module.eval()(x), ref, rtol=1e-4, atol=1e-5, msg=name)
    assert isinstance(options["dense"], type(dense))


def test_merged_tucker2_shapes():
    spatial = merged_module(factorize_module(nn.Conv2d(12, 20, 3, padding=1), "tucker2", (7, 5)))
    assert isinstance(spatial, SVDLayer) and spatial.rank == 7
    assert spatial.factors[0].shape == (7, 12, 3, 3) and spatial.factors[1].shape == (20, 7, 1, 1)
    pointwise = merged_module(factorize_module(nn.Conv2d(16, 24, 1), "tucker2", (9, 6)))
    assert pointwise.rank == 6  # the smaller rank: fewer FLOPs than the 3-factor chain
    assert merged_module(factorize_module(nn.Conv2d(12, 20, 3), "svd", 4)) is None


def _factored_resnet20(fmt: str = "tucker2") -> nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    plan = plan_for_model(model, CompressionConfig(format=fmt, keep_ratio=0.4), input_shape=(1, 3, 32, 32))
    return decompose_model(model, plan).eval()


def test_realize_updates_the_manifest_and_round_trips():
    model = _factored_resnet20()
    folded = [list(p) for p in fold_batchnorm(model)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    realize(model, {"layer1.0.conv1": "dense", "layer2.1.conv2": "merged"})
    manifest = manifest_of(model)
    assert "layer1.0.conv1" not in manifest and manifest["layer2.1.conv2"]["format"] == "svd"
    assert isinstance(model.layer1[0].conv1, nn.Conv2d) and model.layer1[0].conv1.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
    # what load_exported does: a fresh dense model, folding structure, then the manifest, then strict weights
    fresh = apply_manifest(apply_folding(build_model("resnet20", 10), folded), manifest)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), ref, rtol=1e-4, atol=1e-4)


def test_realize_rejects_bad_choices():
    model = _factored_resnet20("svd")
    with pytest.raises(ValueError, match=r"can be realized as \['dense', 'factored'\], got 'merged'"):
        realize(model, {"layer1.0.conv1": "merged"})
    with pytest.raises(ValueError, match="not a factored layer"):
        realize(model, {"conv1": "dense"})
    assert "layer1.0.conv1" in manifest_of(model)  # nothing changed


def test_layer_latency_table():
    model = _factored_resnet20()
    shapes = factored_input_shapes(model, (4, 3, 32, 32), torch.device("cpu"))
    assert len(shapes) == len(manifest_of(model)) and shapes["layer3.0.conv1"] == (4, 32, 16, 16)
    seen = []
    rows = layer_latency_table(model, (4, 3, 32, 32), channels_last=True, repeats=2, warmup=1, progress=seen.append)
    assert [r.name for r in rows] == list(shapes) and seen == rows
    for r in rows:
        assert set(r.ms) == {"factored", "merged", "dense"} and all(v > 0 for v in r.ms.values())
        assert r.choice == "factored" or r.ms[r.choice] < 0.97 * r.ms["factored"]
    # A margin no realization can beat keeps every layer factored.
    assert {r.choice for r in layer_latency_table(model, (1, 3, 32, 32), repeats=1, warmup=0, margin=1.0)} == {"factored"}
    assert measure_latency(model, (2, 3, 32, 32), repeats=2, warmup=1, channels_last=True) > 0


def test_tuned_env_keeps_other_tunables():
    env = tuned_env({"GLIBC_TUNABLES": "glibc.cpu.x86_foo=1", "PATH": "/bin"})
    assert env["GLIBC_TUNABLES"] == f"glibc.cpu.x86_foo=1:{TUNABLES}" and env["PATH"] == "/bin"
    assert malloc_tuned(env) and not malloc_tuned({"PATH": "/bin"})


@pytest.mark.skipif(not has_glibc(), reason="glibc only")
def test_reexec_sets_the_tunables_once():
    code = ("import os, sys; print('start', flush=True); from trainer.export.malloc import reexec_with_tuned_malloc; "
            "reexec_with_tuned_malloc(); print('tunables', os.environ['GLIBC_TUNABLES'])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "TDC_MALLOC_TUNED")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("start") == 2 and f"tunables {TUNABLES}" in res.stdout  # ran twice, then stopped


@pytest.mark.skipif(not has_glibc(), reason="glibc only")
def test_cpu_ray_workers_start_with_the_tunables(monkeypatch):
    from cluster.ray_runtime import worker_env

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.x86_foo=1")
    assert worker_env(use_gpu=False)["GLIBC_TUNABLES"] == f"glibc.cpu.x86_foo=1:{TUNABLES}"
    assert "GLIBC_TUNABLES" not in worker_env(use_gpu=True)  # GPU activations do not live in malloc
