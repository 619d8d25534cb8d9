"""Model registry: plain conv-BN CNNs built by name (DESIGN.md "Models — contract").

A deployed-model artifact stores ``{"model": name, "kwargs": {every constructor argument},
"state_dict": ...}`` (:func:`model_kwargs`); ``build_model(name, **kwargs)`` rebuilds exactly that
architecture. A constructor's keyword arguments beyond ``num_classes`` and ``width`` are recipe
options of ``model:`` (checked by :func:`check_model_options` against the signature).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

from torch import nn

from repsearch.models.mobilenet import MobileNetV1, mobilenet_v1
from repsearch.models.repvgg import REPVGG_MODELS, BlockInfo, ConvBNReLU, RepVGG, repan_repvgg, repvgg
from repsearch.models.resnet import CifarResNet, resnet18, resnet34, resnet50
from repsearch.models.vgg import VGG, scale_width, vgg16

#: name -> constructor ``(num_classes: int, width: float) -> nn.Module``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "vgg16": vgg16,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "mobilenet_v1": mobilenet_v1,
    **REPVGG_MODELS,  # repvgg_a0 .. repvgg_l2, repan_repvgg_a0 .. repan_repvgg_b3
}


def model_names() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


def build_model(name: str, num_classes: int = 10, width: float = 1.0, **options: Any) -> nn.Module:
    """Build a registered model with freshly initialised weights.

    Args:
        name: a key of :data:`MODELS`.
        num_classes: number of logits (>= 1).
        width: channel multiplier (> 0); channels become ``max(1, round(c * width))``.
        options: further constructor keyword arguments (see :func:`check_model_options`).
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
    return MODELS[name](num_classes=int(num_classes), width=float(width), **options)


#: Constructor arguments that are not recipe options of ``model:`` (``num_classes`` comes from the data).
_RESERVED = ("num_classes",)


def _option_params(name: str) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(MODELS[name])
    return {
        k: p for k, p in sig.parameters.items()
        if k not in _RESERVED and k != "width" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def check_model_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Validate ``model:`` keys beyond ``name``/``width`` against ``name``'s constructor.

    Each key must be a keyword parameter of the constructor; its value is validated (and converted)
    with pydantic against the parameter's annotation when it has one.

    Returns:
        the validated options.
    Raises:
        ValueError: an unknown model, an option the constructor does not take (the message lists the
            allowed keys), or a value of the wrong type.
    """
    from pydantic import TypeAdapter, ValidationError

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(model_names())}")
    params = _option_params(name)
    hints = {}
    try:
        import typing

        hints = typing.get_type_hints(MODELS[name])
    except Exception:  # unresolvable annotations: values are passed as they are
        pass
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in params:
            allowed = ", ".join(["name", "width", *params])
            raise ValueError(f"unknown key '{key}' for model {name}; allowed keys: {allowed}")
        ann = hints.get(key)
        if ann is not None:
            try:
                value = TypeAdapter(ann).validate_python(value)
            except ValidationError as exc:
                msg = exc.errors(include_url=False)[0]["msg"]
                raise ValueError(f"{key}: {value!r} is not allowed: {msg}") from None
        out[key] = value
    return out


def model_kwargs(name: str, num_classes: int, width: float = 1.0, **options: Any) -> dict[str, Any]:
    """Every constructor argument of model ``name`` (defaults filled in), as ``deployed.pt`` stores
    it, so the checkpoint rebuilds the same architecture even if a default changes later.

    Raises:
        ValueError: an unknown model or option (see :func:`check_model_options`).
    """
    opts = check_model_options(name, options)
    bound = inspect.signature(MODELS[name]).bind(num_classes=int(num_classes), width=float(width), **opts)
    bound.apply_defaults()
    return dict(bound.arguments)


__all__ = ["MODELS", "VGG", "MobileNetV1", "mobilenet_v1", "BlockInfo", "CifarResNet", "ConvBNReLU", "RepVGG", "repan_repvgg", "repvgg", "build_model", "check_model_options", "model_kwargs", "model_names", "scale_width", "vgg16", "resnet18", "resnet34", "resnet50"]
