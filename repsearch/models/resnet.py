"""ResNet-18/34/50 with the CIFAR stem (DESIGN.md "Models — contract").

torchvision's ``BasicBlock`` / ``Bottleneck`` blocks, and torchvision's module names (``conv1``,
``bn1``, ``layer1``..``layer4``, ``avgpool``, ``fc``), with the stem replaced for 32x32 inputs:
one 3x3 stride-1 conv (no 7x7 stride-2 conv, no max-pool), as in He et al. 2016 Sec. 4.2 and the
usual CIFAR ports. ResNet-18 for 10 classes has 11,173,962 parameters.
``stem="imagenet"`` keeps torchvision's ImageNet stem (7x7 stride-2 conv, 3x3 stride-2 max-pool) for
224x224 inputs: then the model is torchvision's ResNet (same parameter names and shapes; ResNet-18
for 1000 classes: 11,689,512 parameters, 1.81 G MACs at 224x224), as DyRep Table 3 trains it.
Source: He et al. 2016 (ResNet), Table 1 (stage depths).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from repsearch.models.vgg import scale_width


class CifarResNet(nn.Module):
    """ResNet with a CIFAR stem and a width multiplier.

    Args:
        block: ``torchvision.models.resnet.BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        num_classes: logits of ``fc``.
        width: multiplier of the stem and of every stage's planes (64, 128, 256, 512):
            ``max(1, round(c * width))``; a Bottleneck's output is 4x its planes.
        stem: ``"cifar"`` (3x3 stride-1 conv, no max-pool; 32x32 inputs) or ``"imagenet"`` (7x7
            stride-2 conv + 3x3 stride-2 max-pool ``maxpool``; 224x224 inputs, He et al. Table 1).
    Input float ``(N, 3, H, W)`` (32x32 for CIFAR; global average pooling makes any size work);
    output logits ``(N, num_classes)``. Every conv is followed by its BN (convs without bias).
    Raises:
        ValueError: an unknown ``stem``.
    Source: He et al. 2016 Table 1; torchvision.models.resnet.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, ...],
        num_classes: int = 10,
        width: float = 1.0,
        stem: str = "cifar",
    ) -> None:
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        planes = [scale_width(p, width) for p in (64, 128, 256, 512)]
        self.inplanes = planes[0]
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        self.layer1 = self._make_layer(block, planes[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes[3] * block.expansion, num_classes)
        self.num_classes = num_classes
        self.width = width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` -> logits ``(N, num_classes)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10, width: float = 1.0, stem: Literal["cifar", "imagenet"] = "cifar") -> CifarResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2) with the CIFAR stem (``stem="imagenet"``: torchvision's)."""
    return CifarResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, width=width, stem=stem)


def resnet34(num_classes: int = 10, width: float = 1.0, stem: Literal["cifar", "imagenet"] = "cifar") -> CifarResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3) with the CIFAR stem (``stem="imagenet"``: torchvision's)."""
    return CifarResNet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, width=width, stem=stem)


def resnet50(num_classes: int = 10, width: float = 1.0, stem: Literal["cifar", "imagenet"] = "cifar") -> CifarResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3) with the CIFAR stem (``stem="imagenet"``: torchvision's)."""
    return CifarResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, width=width, stem=stem)
