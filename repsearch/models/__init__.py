"""Model registry: plain conv-BN CNNs built by name (DESIGN.md "Models — contract").

A deployed-model artifact stores ``{"model": name, "kwargs": {"num_classes": ..., "width": ...},
"state_dict": ...}``; ``build_model(name, **kwargs)`` rebuilds exactly that architecture.
"""

from __future__ import annotations

import math
from typing import Callable

from torch import nn

from repsearch.models.resnet import CifarResNet, resnet18, resnet34, resnet50
from repsearch.models.vgg import VGG, scale_width, vgg16

#: name -> constructor ``(num_classes: int, width: float) -> nn.Module``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "vgg16": vgg16,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}


def model_names() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


def build_model(name: str, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """Build a registered model with freshly initialised weights.

    Args:
        name: a key of :data:`MODELS`.
        num_classes: number of logits (>= 1).
        width: channel multiplier (> 0); channels become ``max(1, round(c * width))``.
    Returns:
        the ``nn.Module`` (train mode); input ``(N, 3, 32, 32)``, output ``(N, num_classes)``.
    Raises:
        ValueError: unknown name (the message lists the registered names), ``num_classes < 1`` or
            ``width`` not a positive finite number.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(model_names())}")
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if isinstance(width, bool) or not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a positive number, got {width!r}")
    return MODELS[name](num_classes=int(num_classes), width=float(width))


__all__ = ["MODELS", "VGG", "CifarResNet", "build_model", "model_names", "scale_width", "vgg16", "resnet18", "resnet34", "resnet50"]
