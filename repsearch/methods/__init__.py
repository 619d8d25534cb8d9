"""Methods behind one interface (DESIGN.md): ``origin``, ``static``, ``dyrep``; later ``repopt``, ``repan``."""

from __future__ import annotations

from repsearch.methods.base import Method
from repsearch.methods.dyrep import DyRep
from repsearch.methods.origin import Origin
from repsearch.methods.static import Static

METHODS: dict[str, type[Method]] = {"origin": Origin, "static": Static, "dyrep": DyRep}


def build_method(spec, label_smoothing: float = 0.0, seed: int = 0) -> Method:
    """Instantiate the method named by ``spec.name`` (a validated ``method`` section).

    Raises:
        ValueError: unknown method name (the recipe validation normally rejects it first).
    """
    try:
        cls = METHODS[spec.name]
    except KeyError:
        raise ValueError(f"unknown method '{spec.name}'; one of {', '.join(METHODS)}") from None
    return cls(spec, label_smoothing=label_smoothing, seed=seed)


__all__ = ["METHODS", "Method", "build_method", "Origin", "Static", "DyRep"]
