"""Model registry: names, parameter counts, output shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.models import MODEL_NAMES, build_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_registered_model_maps_images_to_logits(name: str) -> None:
    """Every name the config allows builds (tests/test_layout.py: the names and the builders agree)."""
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert build_model(name, 7).eval()(x).shape == (2, 7)


@pytest.mark.parametrize("name, expected", [
    # He et al. 2016, Table 6 (option A); option B adds ~2.7k projection parameters.
    ("resnet20", 0.27e6), ("resnet32", 0.46e6), ("resnet56", 0.85e6),
    ("resnet18", 11.69e6), ("resnet50", 25.56e6),
])
def test_param_counts(name: str, expected: float) -> None:
    k = 1000 if name in ("resnet18", "resnet50") else 10
    assert n_params(build_model(name, k)) == pytest.approx(expected, rel=0.03)


def test_tinycnn_is_tiny_and_has_no_batchnorm() -> None:
    model = build_model("tinycnn", 10)
    assert n_params(model) < 5000
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet56", "tinycnn"])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_output_shape(name: str, num_classes: int) -> None:
    model = build_model(name, num_classes).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, num_classes) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_resnet18_small_input() -> None:
    model = build_model("resnet18", 7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_cifar_resnet_structure() -> None:
    model = build_model("resnet20", 10)
    convs = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "downsample" not in n]
    assert len(convs) + 1 == 20  # 6n + 2 weighted layers: 19 convs + fc
    shortcuts = [n for n, _ in model.named_modules() if n.endswith("downsample")]
    assert shortcuts == ["layer2.0.downsample", "layer3.0.downsample"]  # option B, at the two downsamplings
    assert model.conv1.kernel_size == (3, 3) and model.conv1.out_channels == 16
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
            model.layer3[0].conv1.out_channels] == [16, 32, 64]


def test_models_are_freshly_initialised() -> None:
    a, b = build_model("resnet20", 10), build_model("resnet20", 10)
    assert not torch.equal(a.conv1.weight, b.conv1.weight)
    # Kaiming normal, fan_out: std = sqrt(2 / (16 * 3 * 3)) for the stem.
    assert a.conv1.weight.std().item() == pytest.approx((2 / (16 * 9)) ** 0.5, rel=0.25)


@pytest.mark.parametrize("name, k", [("vgg16", 10), ("ResNet20", 10), ("resnet20", 0)])
def test_bad_arguments(name: str, k: int) -> None:
    with pytest.raises(ValueError) as err:
        build_model(name, k)
    if k:
        assert "resnet20" in str(err.value) and "tinycnn" in str(err.value)
