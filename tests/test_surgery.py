"""Model surgery (admm.nn.surgery) on the real models: counts, manifest replay, checkpoint round trip."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from torch import nn

from admm.config import CompressionConfig
from admm.formats.projections import project
from admm.nn.layers import FactoredLayer
from admm.nn.surgery import apply_manifest, decompose_model, get_submodule, manifest_of, set_submodule
from admm.planning.model_plan import plan_for_model
from trainer.models import build_model


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _dense_weight_params(model: nn.Module) -> int:
    """Weights of the dense conv/linear layers (what RankPlan.dense_params_total counts)."""
    return sum(m.weight.numel() for m in model.modules()
               if (isinstance(m, nn.Conv2d) and m.groups == 1) or isinstance(m, nn.Linear))


def _surgery_roundtrip(name: str, classes: int, fmt: str, x: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = build_model(name, classes).eval()
    plan = plan_for_model(model, CompressionConfig(format=fmt, keep_ratio=0.5))
    other = _n_params(model) - _dense_weight_params(model)  # biases, BatchNorm
    assert plan.dense_params_total == _dense_weight_params(model)

    decompose_model(model, plan)
    factored = [n for n, m in model.named_modules() if isinstance(m, FactoredLayer)]
    assert sorted(factored) == sorted(p.name for p in plan.layers)
    assert _n_params(model) == plan.params_after_total + other
    manifest = manifest_of(model)
    # Each layer is built in its planned format (tucker2 plans 1x1 convs as svd).
    assert set(manifest) == set(factored)
    assert all(manifest[p.name]["format"] == p.fmt for p in plan.layers)
    assert {p.fmt for p in plan.layers} <= {fmt, "svd"}
    assert not model.training and not any(get_submodule(model, n).training for n in factored)

    # A checkpoint as trainer.phases writes it: state dict + JSON-able manifest, loaded weights_only.
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "surgery": json.loads(json.dumps(manifest))}, buf)
    buf.seek(0)
    shared = torch.load(buf, weights_only=True)
    fresh = apply_manifest(build_model(name, classes), shared["surgery"]).eval()
    fresh.load_state_dict(shared["model"], strict=True)
    assert manifest_of(fresh) == manifest
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    apply_manifest(fresh, manifest)  # replaying on the factored model changes nothing
    assert _n_params(fresh) == _n_params(model)


@pytest.mark.parametrize("fmt", ["svd", "tucker2", "tt", "cp", "lowrank_sparse"])
def test_resnet20_surgery(fmt):
    _surgery_roundtrip("resnet20", 10, fmt, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("fmt", ["svd", "tucker2"])
def test_resnet50_surgery(fmt):
    _surgery_roundtrip("resnet50", 1000, fmt, torch.randn(1, 3, 64, 64))


def test_decompose_from_given_weights_equals_dense_with_z():
    """Factors from ADMM's Z: the factored model computes what the dense model carrying Z computes."""
    torch.manual_seed(1)
    model = build_model("resnet20", 10).eval()
    plan = plan_for_model(model, CompressionConfig(format="svd", keep_ratio=0.5))
    z = {p.name: project(get_submodule(model, p.name).weight.detach(), p.fmt, p.rank) for p in plan.layers}
    dense_z = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in z.items():
            get_submodule(dense_z, name).weight.copy_(w)
    decompose_model(model, plan, weights=z)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense_z(x), rtol=1e-4, atol=1e-4)


def test_surgery_errors():
    model = build_model("resnet20", 10)
    plan = plan_for_model(model, CompressionConfig(format="tucker2", keep_ratio=0.5))
    with pytest.raises(ValueError, match="not planned"):
        decompose_model(model, plan, weights={"fc": torch.zeros(10, 64)})
    decompose_model(model, plan)
    with pytest.raises(ValueError, match="already factored"):
        decompose_model(model, plan)
    # A manifest for another model does not fit.
    wrong = {"layer1.0.conv1": {**manifest_of(model)["layer3.0.conv2"]}}
    with pytest.raises(ValueError, match="geometry"):
        apply_manifest(build_model("resnet20", 10), wrong)
    with pytest.raises(ValueError, match="factored as"):
        apply_manifest(model, {"layer1.0.conv1": manifest_of(model)["layer1.0.conv2"] | {"rank": [1, 1]}})


def test_set_submodule_in_sequential():
    seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))
    set_submodule(seq, "1.1", nn.Identity())
    assert isinstance(seq[1][1], nn.Identity)
    with pytest.raises(AttributeError):
        set_submodule(seq, "1.5", nn.Identity())
