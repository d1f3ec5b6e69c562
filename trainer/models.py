"""Model registry: CIFAR ResNets, torchvision ResNets and a tiny test CNN.

``build_model(name, num_classes)`` returns a freshly initialised ``nn.Module``
that maps a float32 batch ``(B, 3, H, W)`` to logits ``(B, num_classes)``.
No pretrained weights are ever downloaded.

Layer names follow torchvision (``conv1``/``bn1`` stem, ``layer1..``,
``downsample`` shortcuts, ``fc`` classifier) in every model, so rank-planning
exclusion patterns ("stem, classifier, downsample") mean the same thing for
every architecture.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from trainer.config import MODEL_NAMES

__all__ = ["MODEL_BUILDERS", "MODEL_NAMES", "build_model", "CifarResNet", "BasicBlock", "TinyCNN"]


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity or projection shortcut.

    Input ``(B, in_planes, H, W)`` -> output ``(B, planes, H/stride, W/stride)``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            # Option B of He et al. (2016): a 1x1 conv + BN projection where the
            # shape changes. It is a real layer (unlike option A's zero padding),
            # so it can be kept dense or compressed like any other conv.
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """CIFAR ResNet of He et al. 2016 ("Deep Residual Learning", section 4.2).

    Depth ``6n + 2``: a 3x3 stem conv (16 channels), three stages of ``n``
    basic blocks with 16/32/64 channels on 32x32/16x16/8x8 feature maps
    (stride 2 at the first block of stages 2 and 3), global average pooling and
    a linear classifier. Shortcuts: identity, and option B (1x1 conv + BN
    projection) where the shape changes. Option B adds ~2.7k parameters to the
    paper's option-A counts (ResNet-20: 0.27M, ResNet-32: 0.46M, ResNet-56:
    0.85M). Kaiming-normal (fan_out, ReLU) conv init; BN weight 1, bias 0.

    Input ``(B, 3, 32, 32)`` float32 (any H, W >= 8 works) -> logits
    ``(B, num_classes)``.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyCNN(nn.Module):
    """A ~1.6k-parameter CNN for fast tests (no BatchNorm on purpose).

    conv3x3(3->8) ReLU conv3x3(8->16, stride 2) ReLU global-avg-pool
    Linear(16->num_classes). Without BatchNorm a sample's output does not
    depend on the rest of its batch, so a 1-worker run on batch 2b and a
    2-worker run on batches of b give the same averaged gradient.

    Input ``(B, 3, H, W)`` float32 -> logits ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _kaiming_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _torchvision_models():
    """torchvision.models, imported when an ImageNet ResNet is built: the import (~1.8 s of CPU, it pulls in
    torch._dynamo through torchvision.ops) is paid by every Ray worker at start otherwise, CIFAR runs included."""
    from torchvision import models

    return models


# Keyed by trainer.config.ModelName, the one list of model names (tests/test_layout.py checks they agree).
MODEL_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "resnet20": lambda k: CifarResNet(3, k),
    "resnet32": lambda k: CifarResNet(5, k),
    "resnet56": lambda k: CifarResNet(9, k),
    # weights=None: random init, never a download.
    "resnet18": lambda k: _torchvision_models().resnet18(weights=None, num_classes=k),
    "resnet50": lambda k: _torchvision_models().resnet50(weights=None, num_classes=k),
    "tinycnn": TinyCNN,
}


def build_model(name: str, num_classes: int) -> nn.Module:
    """Build a randomly initialised model by registry name.

    Args:
        name: one of ``MODEL_NAMES``.
        num_classes: width of the classifier output (>= 1).

    Returns:
        A module mapping ``(B, 3, H, W)`` float32 to logits ``(B, num_classes)``.
        CIFAR ResNets and tinycnn are meant for 32x32 inputs, torchvision
        ResNets for 224x224 (they accept smaller inputs, e.g. 64x64).

    Raises:
        ValueError: unknown name or ``num_classes < 1``.
    """
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return MODEL_BUILDERS[name](num_classes)
