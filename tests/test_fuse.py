"""conv+ReLU / conv+add+ReLU fusion for eager CPU inference (trainer.export.fuse): same map, every chain fused."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from admm.config import CompressionConfig
from admm.nn.fold import fold_batchnorm
from admm.nn.layers import CPLayer, SVDLayer, Tucker2Layer, factorize_module
from admm.nn.realize import realize
from admm.nn.surgery import decompose_model, manifest_of
from admm.planning.model_plan import plan_for_model
from trainer.export.fuse import FusedConv, fuse_conv_activations
from trainer.models import build_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


def _folded(name: str, fmt: str | None, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, 10)
    for m in model.modules():  # non-trivial BN statistics, so folding puts real biases in the convs
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    if fmt is not None:
        plan = plan_for_model(model, CompressionConfig(format=fmt, keep_ratio=0.5), input_shape=(1, *shape[1:]))
        model = decompose_model(model, plan)
    model.eval()
    fold_batchnorm(model)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fmt", [None, "svd", "tucker2"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_resnet20_computes_the_same_map(fmt, channels_last):
    shape = (4, 3, 32, 32)
    model = _folded("resnet20", fmt, shape)
    x = torch.randn(shape)
    with torch.no_grad():
        ref = model(x)
        fused = fuse_conv_activations(model)
        if channels_last:
            fused = fused.to(memory_format=torch.channels_last)
            x = x.to(memory_format=torch.channels_last)
        y = fused(x)
    # Stem conv + two per basic block (conv1 -> relu, conv2 + shortcut -> relu), 9 blocks.
    layers = [m.conv for m in fused.modules() if isinstance(m, FusedConv)]
    assert len(layers) == 19
    assert sum(isinstance(m, FusedConv) and m.residual for m in fused.modules()) == 9
    if fmt is not None:
        wanted = {"svd": SVDLayer, "tucker2": Tucker2Layer}[fmt]
        assert any(type(m) is wanted for m in layers)
    assert not any(isinstance(n.target, str) and "relu" in n.target for n in fused.graph.nodes if n.op == "call_module")
    assert _rel(y, ref) < 1e-5


def test_fused_resnet18_with_downsample_and_realized_layers():
    """torchvision blocks (projection shortcuts) and layers the latency table turned merged / dense."""
    shape = (2, 3, 64, 64)
    model = _folded("resnet18", "tucker2", shape)
    names = list(manifest_of(model))
    realize(model, {names[0]: "merged", names[1]: "dense"})
    x = torch.randn(shape)
    with torch.no_grad():
        ref = model(x)
        y = fuse_conv_activations(model)(x)
    assert _rel(y, ref) < 1e-5


def test_conv_with_two_users_is_not_fused():
    class TwoUsers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x):
            y = self.conv(x)
            return self.relu(y) + y  # the pre-activation is needed: fusing would lose it

    model = TwoUsers().eval()
    x = torch.randn(2, 3, 8, 8)
    fused = fuse_conv_activations(model)
    assert not any(isinstance(m, FusedConv) for m in fused.modules())
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))


def test_bad_inputs_are_named():
    cp = factorize_module(nn.Conv2d(8, 8, 3, padding=1), "cp", 4)
    assert isinstance(cp, CPLayer)
    with pytest.raises(ValueError, match="CPLayer"):
        FusedConv(cp, residual=False)
    with pytest.raises(ValueError, match="cpu float32"):
        fuse_conv_activations(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).double())
    layer = FusedConv(nn.Conv2d(3, 4, 3), residual=True)
    with pytest.raises(ValueError, match="residual"):
        layer(torch.randn(1, 3, 8, 8))
