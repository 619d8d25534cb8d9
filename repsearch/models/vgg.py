"""VGG-16 for CIFAR, as DyRep's code builds it (DESIGN.md "Models — contract").

13 x (conv3x3, bias=False) - BN - ReLU with channels
``64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512`` (``M``: max-pool
2x2 stride 2), a 2x2 stride-1 max-pool after the last conv (2x2 -> 1x1 for 32x32 inputs), flatten,
``Linear(512, 512)`` + ReLU, ``Linear(512, num_classes)``. For 10 classes at width 1:
14,986,698 parameters and 313,463,808 MACs (DyRep Table 2: "313 M", "15.0 M").
Source: Simonyan & Zisserman 2015 (configuration D); DyRep (Huang et al. 2022) Table 2.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

#: Conv widths of VGG-16; "M" is a 2x2 stride-2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def scale_width(channels: int, width: float) -> int:
    """Channels after a width multiplier: ``max(1, round(channels * width))`` (Python's round)."""
    return max(1, round(channels * width))


class VGG(nn.Module):
    """Plain conv-BN VGG for 32x32 inputs.

    Args:
        cfg: conv widths and ``"M"`` pools (default :data:`VGG16_CFG`).
        num_classes: logits of the last linear layer.
        width: multiplier of every conv width and of the hidden linear layer.
        hidden: hidden linear width before the multiplier (512).
    Structure: ``features`` (nn.Sequential of Conv2d, BatchNorm2d, ReLU, MaxPool2d; every conv is
    immediately followed by its BN) and ``classifier`` (Linear, ReLU, Linear).
    Input float ``(N, 3, 32, 32)``; output logits ``(N, num_classes)``. Other input sizes do not
    reduce to 1x1 before the classifier and fail at the first linear layer.
    Source: DyRep Table 2 / DESIGN.md "Models — contract".
    """

    def __init__(
        self,
        cfg: Sequence[int | str] = VGG16_CFG,
        num_classes: int = 10,
        width: float = 1.0,
        hidden: int = 512,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            c_out = scale_width(int(item), width)
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        layers.append(nn.MaxPool2d(kernel_size=2, stride=1))
        self.features = nn.Sequential(*layers)
        c_hidden = scale_width(hidden, width)
        self.classifier = nn.Sequential(nn.Linear(c_in, c_hidden), nn.ReLU(inplace=True), nn.Linear(c_hidden, num_classes))
        self.num_classes = num_classes
        self.width = width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 32, 32)`` -> logits ``(N, num_classes)``."""
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg16(num_classes: int = 10, width: float = 1.0) -> VGG:
    """VGG-16 (CIFAR) with ``num_classes`` outputs and a width multiplier; see :class:`VGG`."""
    return VGG(VGG16_CFG, num_classes=num_classes, width=width)
