"""RepVGG / RepOpt-VGG plain bodies (ImageNet configs) and RepAn's CIFAR RepVGG variants.

Every layer is one *unit* ``relu(bn(conv3x3(x)))`` (conv without bias), the deploy-time architecture
of RepVGG and the only architecture of RepOpt-VGG (RepOpt-VGG is RepVGG's plain body trained with
Grad Mult). Layout, relied on by the RepOpt and RepAn methods:

- ``model.stage0``: the stem, one :class:`ConvBNReLU` unit; ``model.stage1`` ... ``model.stageN``:
  ``nn.Sequential`` of units (N = 4 for the ImageNet family and RepAn's CIFAR variants);
- ``model.gap`` (``AdaptiveAvgPool2d(1)``) and ``model.linear`` (``nn.Linear``);
- ``model.blocks()``: one :class:`BlockInfo` per unit, in forward order, the stem included.

ImageNet family (RepVGG Table 2; RepOpt Table 1; DingXiaoH/RepOptimizers ``main_repopt.py``):
stage depths ``1 (stem), d1, d2, d3, d4`` and widths ``min(64, 64a), 64a, 128a, 256a, 512b``,
stride 2 in the stem and in the first unit of every stage.

======== ================ ===== =====
name     depths d1..d4      a     b
======== ================ ===== =====
A0       2, 4, 14, 1       0.75  2.5
A1       2, 4, 14, 1       1     2.5
A2       2, 4, 14, 1       1.5   2.75
B0       4, 6, 16, 1       1     2.5
B1       4, 6, 16, 1       2     4
B2       4, 6, 16, 1       2.5   5
B3       4, 6, 16, 1       3     5
L1       8, 14, 24, 1      2     4    (RepOpt Table 1: B1 widths)
L2       8, 14, 24, 1      2.5   5    (RepOpt Table 1: B2 widths)
======== ================ ===== =====

RepAn's CIFAR variants (xfey/RepAn ``net/repvgg_cifar.py``, functions ``RepVGG_A0`` ...
``RepVGG_B3``): five "stages" with the stem as the first (depth 1), strides ``1, 1, 2, 2, 1``
(so 32x32 inputs end at 8x8) and the widths of :data:`REPAN_CIFAR_CONFIGS`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Sequence

import torch
from torch import nn

from repsearch.models.vgg import scale_width


class BlockInfo(NamedTuple):
    """One unit (conv3x3-BN-ReLU layer) of a :class:`RepVGG` model.

    Fields:
        path: dotted module path of the unit; its conv is ``f"{path}.conv"``, its BN ``f"{path}.bn"``.
        stage: stage number (0 = the stem).
        index: 0-based index of the unit within its stage (the stem: 0).
        has_identity: the unit's conv has ``in_channels == out_channels`` and stride 1, i.e. RepVGG
            would give it an identity (BN) branch (RepVGG Sec. 3.3).
    Source: RepVGG Sec. 3.3; RepOpt Sec. 3 (the Grad Mult per block depends on this list; the
    Hyper-Search scale init of block i >= 1 of a stage is sqrt(2 / i), DingXiaoH/RepOptimizers ``repoptvgg_model.py``).
    """

    path: str
    stage: int
    index: int
    has_identity: bool


class ConvBNReLU(nn.Module):
    """One plain RepVGG unit: ``relu(bn(conv(x)))``.

    Children: ``conv`` (``nn.Conv2d`` 3x3, padding 1, bias=False), ``bn`` (``nn.BatchNorm2d``, γ=1,
    β=0), ``relu`` (``nn.ReLU``). Attributes ``in_channels``, ``out_channels``, ``stride`` (ints) keep
    the unit's geometry when ``conv`` is later swapped for a RepBlock. Input ``(N, in_channels, H, W)``; output
    ``(N, out_channels, ceil(H / stride), ceil(W / stride))``.
    Source: RepVGG Fig. 2 (the deploy-time block); RepOpt-VGG's ``RealVGGBlock``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = int(in_channels), int(out_channels), int(stride)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    @property
    def has_identity(self) -> bool:
        """``in_channels == out_channels`` and stride 1 (where RepVGG has an identity branch)."""
        return self.in_channels == self.out_channels and self.stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, H, W)`` -> ``(N, C_out, H', W')``."""
        return self.relu(self.bn(self.conv(x)))


class RepVGG(nn.Module):
    """Plain RepVGG-style network configured by per-stage depth, width and first stride.

    Args:
        depths: units per stage, the stem first (``depths[0]`` must be 1), e.g. ``(1, 2, 4, 14, 1)``.
        channels: output channels per stage before the width multiplier, same length.
        strides: stride of the first unit of each stage (the others have stride 1), same length.
        num_classes: logits of ``linear``.
        width: multiplier of every channel count: ``max(1, round(c * width))`` (:func:`scale_width`).
    Structure: ``stage0`` (a :class:`ConvBNReLU`), ``stage1..stageN`` (``nn.Sequential`` of
    :class:`ConvBNReLU`), ``gap``, ``linear``. Attributes ``depths``, ``channels`` (after the
    multiplier), ``strides``, ``num_classes``, ``width``. Conv init is PyTorch's default (as RepVGG
    and RepOpt); BN γ=1, β=0.
    Input float ``(N, 3, H, W)`` (any size: global average pooling); output ``(N, num_classes)``.
    Raises:
        ValueError: the three sequences differ in length or are empty, ``depths[0] != 1``, a depth
            < 1, a channel count < 1 or a stride < 1.
    Source: RepVGG (Ding et al. 2021) Sec. 3.4 / Table 2; RepOpt (Ding et al. 2023) Table 1.
    """

    def __init__(
        self,
        depths: Sequence[int],
        channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int = 10,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        depths, channels, strides = tuple(depths), tuple(channels), tuple(strides)
        if not depths or not (len(depths) == len(channels) == len(strides)):
            raise ValueError(
                f"depths, channels and strides must be non-empty and of equal length, got {len(depths)}, "
                f"{len(channels)}, {len(strides)}"
            )
        if depths[0] != 1:
            raise ValueError(f"the stem (stage 0) is one unit: depths[0] must be 1, got {depths[0]}")
        if min(depths) < 1 or min(channels) < 1 or min(strides) < 1:
            raise ValueError(f"depths, channels and strides must be >= 1, got {depths}, {channels}, {strides}")
        widths = tuple(scale_width(int(c), width) for c in channels)
        self.depths, self.channels, self.strides = depths, widths, strides
        self.num_classes = num_classes
        self.width = width
        self.num_stages = len(depths)
        self.stage0 = ConvBNReLU(3, widths[0], strides[0])
        c_in = widths[0]
        for s in range(1, self.num_stages):
            units = []
            for i in range(depths[s]):
                units.append(ConvBNReLU(c_in, widths[s], strides[s] if i == 0 else 1))
                c_in = widths[s]
            setattr(self, f"stage{s}", nn.Sequential(*units))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stage(self, s: int) -> nn.Module:
        """Stage ``s`` (0 = the stem unit, else an ``nn.Sequential`` of units).

        Raises:
            IndexError: ``s`` outside ``0 .. num_stages - 1``.
        """
        if not 0 <= s < self.num_stages:
            raise IndexError(f"stage {s} out of range 0..{self.num_stages - 1}")
        return getattr(self, f"stage{s}")

    def blocks(self) -> list[BlockInfo]:
        """Every unit in forward order, the stem first (stage 0, index 0); see :class:`BlockInfo`.

        Built from the units' construction geometry, so it stays valid after a unit's ``conv`` has
        been expanded into a RepBlock (``repsearch.rep.expand``).
        """
        out = [BlockInfo("stage0", 0, 0, self.stage0.has_identity)]
        for s in range(1, self.num_stages):
            for i, unit in enumerate(self.stage(s)):
                out.append(BlockInfo(f"stage{s}.{i}", s, i, unit.has_identity))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` -> logits ``(N, num_classes)``."""
        for s in range(self.num_stages):
            x = getattr(self, f"stage{s}")(x)
        return self.linear(torch.flatten(self.gap(x), 1))


# ------------------------------------------------------------------------------ ImageNet family
#: name -> (stage depths d1..d4, a, b); RepVGG Table 2, RepOpt Table 1 (L1/L2 as ``main_repopt.py``).
REPVGG_CONFIGS: dict[str, tuple[tuple[int, int, int, int], float, float]] = {
    "A0": ((2, 4, 14, 1), 0.75, 2.5),
    "A1": ((2, 4, 14, 1), 1.0, 2.5),
    "A2": ((2, 4, 14, 1), 1.5, 2.75),
    "B0": ((4, 6, 16, 1), 1.0, 2.5),
    "B1": ((4, 6, 16, 1), 2.0, 4.0),
    "B2": ((4, 6, 16, 1), 2.5, 5.0),
    "B3": ((4, 6, 16, 1), 3.0, 5.0),
    "L1": ((8, 14, 24, 1), 2.0, 4.0),
    "L2": ((8, 14, 24, 1), 2.5, 5.0),
}


def repvgg(config: str, num_classes: int = 10, width: float = 1.0, stem_stride: int = 2) -> RepVGG:
    """The plain RepVGG / RepOpt-VGG body of ``config`` (a key of :data:`REPVGG_CONFIGS`).

    Widths ``min(64, int(64a)), int(64a), int(128a), int(256a), int(512b)``, then ``width``;
    strides ``stem_stride, 2, 2, 2, 2``. With ``stem_stride=2`` a 224x224 input ends at 7x7 and a
    32x32 one at 1x1 (RepOpt's CIFAR Hyper-Search keeps all five stride-2 layers, its Table 6);
    ``stem_stride=1`` is the usual CIFAR stem (32x32 -> 2x2).

    Raises:
        ValueError: unknown ``config`` or ``stem_stride`` not 1 or 2.
    Source: RepVGG Table 2; RepOpt Table 1 / Table 6.
    """
    if config not in REPVGG_CONFIGS:
        raise ValueError(f"unknown RepVGG config {config!r}; available: {', '.join(REPVGG_CONFIGS)}")
    if isinstance(stem_stride, bool) or stem_stride not in (1, 2):
        raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride!r}")
    depths, a, b = REPVGG_CONFIGS[config]
    chans = (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))
    return RepVGG((1, *depths), chans, (int(stem_stride), 2, 2, 2, 2), num_classes=num_classes, width=width)


def repvgg_a0(num_classes: int = 10, width: float = 1.0, stem_stride: Literal[1, 2] = 2) -> RepVGG:
    """RepVGG-A0 / RepOpt-VGG-A0 plain body (8.30 M params with 1000 classes, deployed); see :func:`repvgg`."""
    return repvgg("A0", num_classes, width, stem_stride)


def repvgg_a1(num_classes: int = 10, width: float = 1.0, stem_stride: Literal[1, 2] = 2) -> RepVGG:
    """RepVGG-A1 plain body (12.78 M params, 1000 classes); see :func:`repvgg`."""
    return repvgg("A1", num_classes, width, stem_stride)


def repvgg_a2(num_classes: int = 10, width: float = 1.0, stem_stride: Literal[1, 2] = 2) -> RepVGG:
    """RepVGG-A2 plain body (25.49 M params, 1000 classes); see :func:`repvgg`."""
    return repvgg("A2", num_classes, width, stem_stride)


def repvgg_b0(num_classes: int = 10, width: float = 1.0, stem_stride: Literal[1, 2] = 2) -> RepVGG:
    """RepVGG-B0 plain body (14.33 M params, 1000 classes); see :func:`repvgg`."""
    return repvgg("B0", num_classes, width, stem_stride)


def repvgg_b1(num_classes: int = 10, width: float = 1.0, stem_stride: Literal[1, 2] = 2) -> RepVGG:
    """RepVGG-B1 / RepOpt-VGG-B1 plain body (51.82 M params, 1000 classes); see :func:`repvgg`."""
    return repvgg("B1", num_classes, width, stem_stride)


def repvgg_b2(num_classes: int = 10, width: float = 1.0, stem_stride: Literal[1, 2] = 2) -> RepVGG:
    """RepVGG-B2 / RepOpt-VGG-B2 plain body (80.31 M params, 1000 classes); see :func:`repvgg`."""
    return repvgg("B2", num_classes, width, stem_stride)


def repvgg_b3(num_classes: int = 10, width: float = 1.0, stem_stride: Literal[1, 2] = 2) -> RepVGG:
    """RepVGG-B3 plain body (110.96 M params, 1000 classes); see :func:`repvgg`."""
    return repvgg("B3", num_classes, width, stem_stride)


def repvgg_l1(num_classes: int = 10, width: float = 1.0, stem_stride: Literal[1, 2] = 2) -> RepVGG:
    """RepOpt-VGG-L1 plain body (RepOpt Table 1: 76.0 M params, 1000 classes); see :func:`repvgg`."""
    return repvgg("L1", num_classes, width, stem_stride)


def repvgg_l2(num_classes: int = 10, width: float = 1.0, stem_stride: Literal[1, 2] = 2) -> RepVGG:
    """RepOpt-VGG-L2 plain body (RepOpt Table 1: 118.1 M params, 1000 classes); see :func:`repvgg`."""
    return repvgg("L2", num_classes, width, stem_stride)


# ------------------------------------------------------------------------------ RepAn CIFAR variants
#: name -> (depths, channels, strides), stem first. Channels as xfey/RepAn ``net/repvgg_cifar.py``
#: computes them: ``filter_list = [16, 16, 32, 64, 64]`` times ``width_factor`` (``[w]*4 + [w_last]``),
#: the stem ``min(16, 16 * w)``, ``int()`` truncation.
REPAN_CIFAR_CONFIGS: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "A0": ((1, 2, 4, 14, 1), (12, 12, 24, 48, 160), (1, 1, 2, 2, 1)),   # w 0.75, last 2.5
    "A1": ((1, 2, 4, 14, 1), (16, 16, 32, 64, 160), (1, 1, 2, 2, 1)),   # w 1, last 2.5
    "A2": ((1, 2, 4, 14, 1), (16, 24, 48, 96, 176), (1, 1, 2, 2, 1)),   # w 1.5, last 2.75
    "B0": ((1, 4, 6, 16, 1), (16, 16, 32, 64, 160), (1, 1, 2, 2, 1)),   # w 1, last 2.5
    "B1": ((1, 4, 6, 16, 1), (16, 32, 64, 128, 256), (1, 1, 2, 2, 1)),  # w 2, last 4
    "B2": ((1, 4, 6, 16, 1), (16, 40, 80, 160, 320), (1, 1, 2, 2, 1)),  # w 2.5, last 5
    "B3": ((1, 4, 6, 16, 1), (16, 48, 96, 192, 320), (1, 1, 2, 2, 1)),  # w 3, last 5
}


def repan_repvgg(config: str, num_classes: int = 10, width: float = 1.0) -> RepVGG:
    """RepAn's CIFAR RepVGG plain body ``config`` (a key of :data:`REPAN_CIFAR_CONFIGS`).

    32x32 input -> 8x8 before the global average pool. The official code gives the first unit of
    every stage no identity branch even when C_in = C_out and stride 1 (its stage-1 unit 0);
    :meth:`RepVGG.blocks` reports ``has_identity`` by geometry alone.

    Raises:
        ValueError: unknown ``config``.
    Source: RepAn (CVPR 2024) supplementary; xfey/RepAn ``net/repvgg_cifar.py``.
    """
    if config not in REPAN_CIFAR_CONFIGS:
        raise ValueError(f"unknown RepAn CIFAR RepVGG config {config!r}; available: {', '.join(REPAN_CIFAR_CONFIGS)}")
    depths, chans, strides = REPAN_CIFAR_CONFIGS[config]
    return RepVGG(depths, chans, strides, num_classes=num_classes, width=width)


def repan_repvgg_a0(num_classes: int = 10, width: float = 1.0) -> RepVGG:
    """RepAn CIFAR RepVGG_A0; see :func:`repan_repvgg`."""
    return repan_repvgg("A0", num_classes, width)


def repan_repvgg_a1(num_classes: int = 10, width: float = 1.0) -> RepVGG:
    """RepAn CIFAR RepVGG_A1; see :func:`repan_repvgg`."""
    return repan_repvgg("A1", num_classes, width)


def repan_repvgg_a2(num_classes: int = 10, width: float = 1.0) -> RepVGG:
    """RepAn CIFAR RepVGG_A2; see :func:`repan_repvgg`."""
    return repan_repvgg("A2", num_classes, width)


def repan_repvgg_b0(num_classes: int = 10, width: float = 1.0) -> RepVGG:
    """RepAn CIFAR RepVGG_B0; see :func:`repan_repvgg`."""
    return repan_repvgg("B0", num_classes, width)


def repan_repvgg_b1(num_classes: int = 10, width: float = 1.0) -> RepVGG:
    """RepAn CIFAR RepVGG_B1; see :func:`repan_repvgg`."""
    return repan_repvgg("B1", num_classes, width)


def repan_repvgg_b2(num_classes: int = 10, width: float = 1.0) -> RepVGG:
    """RepAn CIFAR RepVGG_B2; see :func:`repan_repvgg`."""
    return repan_repvgg("B2", num_classes, width)


def repan_repvgg_b3(num_classes: int = 10, width: float = 1.0) -> RepVGG:
    """RepAn CIFAR RepVGG_B3; see :func:`repan_repvgg`."""
    return repan_repvgg("B3", num_classes, width)


#: Registered model name -> constructor (merged into ``repsearch.models.MODELS``).
REPVGG_MODELS = {
    "repvgg_a0": repvgg_a0,
    "repvgg_a1": repvgg_a1,
    "repvgg_a2": repvgg_a2,
    "repvgg_b0": repvgg_b0,
    "repvgg_b1": repvgg_b1,
    "repvgg_b2": repvgg_b2,
    "repvgg_b3": repvgg_b3,
    "repvgg_l1": repvgg_l1,
    "repvgg_l2": repvgg_l2,
    "repan_repvgg_a0": repan_repvgg_a0,
    "repan_repvgg_a1": repan_repvgg_a1,
    "repan_repvgg_a2": repan_repvgg_a2,
    "repan_repvgg_b0": repan_repvgg_b0,
    "repan_repvgg_b1": repan_repvgg_b1,
    "repan_repvgg_b2": repan_repvgg_b2,
    "repan_repvgg_b3": repan_repvgg_b3,
}

__all__ = [
    "REPAN_CIFAR_CONFIGS",
    "REPVGG_CONFIGS",
    "REPVGG_MODELS",
    "BlockInfo",
    "ConvBNReLU",
    "RepVGG",
    "repan_repvgg",
    "repvgg",
    *REPVGG_MODELS,
]
