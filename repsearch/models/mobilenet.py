"""MobileNet v1 with a CIFAR stem (DESIGN.md "Models — contract"; torchvision has no MobileNet v1).

Howard et al. 2017 ("MobileNets", Table 1): a full 3x3 conv (32 channels), then 13
depthwise-separable blocks, each ``3x3 depthwise conv (groups = C) - BN - ReLU - 1x1 pointwise
conv - BN - ReLU``, with pointwise widths
``64, 128/2, 128, 256/2, 256, 512/2, 512 x 5, 1024/2, 1024`` (``/2``: the depthwise conv of that
block has stride 2), global average pooling and one linear layer. Every conv has no bias and is
immediately followed by its BN, so repsearch's surgery pairs all 27 convs
(:func:`repsearch.rep.conv_bn_pairs`); the 13 depthwise 3x3 convs are grouped convs that
``static``/DyRep expand with grouped branches.

CIFAR variant (``stem_stride=1``, the default; as in the usual CIFAR ports): the first conv has
stride 1, the four stride-2 blocks reduce 32x32 to 2x2 before the pooling. For 10 classes at
width 1: 3,217,226 parameters (BN included) and 46.4 M MACs per 32x32 image.
``stem_stride=2`` is the paper's ImageNet network: 1000 classes at 224x224 give 4,231,976
parameters and 568.7 M MACs (Table 1/Table 8: 4.2 M parameters, 569 M Mult-Adds).
Width multiplier α (Howard et al. Sec. 3.3): every conv width becomes ``max(1, round(c * α))``.
Source: Howard et al. 2017, Table 1, Sec. 3.3, Table 8.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from repsearch.models.vgg import scale_width

#: Pointwise widths of the 13 depthwise-separable blocks and the stride of each depthwise conv.
MOBILENET_V1_CFG: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int, groups: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class MobileNetV1(nn.Module):
    """MobileNet v1 (plain conv-BN-ReLU, depthwise-separable blocks).

    Args:
        num_classes: logits of ``classifier``.
        width: the width multiplier α applied to every conv (the stem's 32 included).
        stem_stride: stride of the first 3x3 conv: 1 for 32x32 CIFAR inputs, 2 for the paper's
            224x224 ImageNet network.
    Structure: ``features`` — ``nn.Sequential`` of ``stem`` (conv3x3-BN-ReLU) and ``block1`` ..
    ``block13`` (each an ``nn.Sequential``: depthwise conv3x3 (``groups = C``)-BN-ReLU, pointwise
    conv1x1-BN-ReLU); ``pool`` (global average) and ``classifier`` (Linear).
    Input float ``(N, 3, H, W)`` (any size: the pooling is global); output logits
    ``(N, num_classes)``.
    Raises:
        ValueError: ``stem_stride`` not 1 or 2.
    Source: Howard et al. 2017, Table 1.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, stem_stride: int = 1) -> None:
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 (CIFAR) or 2 (ImageNet), got {stem_stride!r}")
        c = scale_width(32, width)
        blocks: dict[str, nn.Module] = {"stem": nn.Sequential(*_conv_bn_relu(3, c, 3, stem_stride, 1))}
        for i, (planes, stride) in enumerate(MOBILENET_V1_CFG, start=1):
            out = scale_width(planes, width)
            blocks[f"block{i}"] = nn.Sequential(*_conv_bn_relu(c, c, 3, stride, c), *_conv_bn_relu(c, out, 1, 1, 1))
            c = out
        self.features = nn.Sequential()
        for name, module in blocks.items():
            self.features.add_module(name, module)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        self.num_classes = num_classes
        self.width = width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` -> logits ``(N, num_classes)``."""
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v1(num_classes: int = 10, width: float = 1.0, stem_stride: Literal[1, 2] = 1) -> MobileNetV1:
    """MobileNet v1; ``stem_stride=1`` is the CIFAR variant (see :class:`MobileNetV1`)."""
    return MobileNetV1(num_classes=num_classes, width=width, stem_stride=stem_stride)
