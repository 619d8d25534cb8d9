"""Methods behind one interface (DESIGN.md "The method interface"): one module per method.

Every module of this package is imported here, so a method registers itself (its class and its
recipe section) with :func:`repsearch.methods.base.register_method` in its own file: adding a method
touches that one file. :data:`METHODS` maps ``method.name`` to the class.
"""

from __future__ import annotations

import importlib
import pkgutil

from repsearch.methods.base import METHODS, EpochChanges, Method, register_method

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    importlib.import_module(f"{__name__}.{_info.name}")


def method_specs() -> dict[str, type]:
    """``method.name`` -> the recipe section class of every registered method (origin first, then
    alphabetical)."""
    names = sorted(METHODS, key=lambda n: (n != "origin", n))
    return {n: METHODS[n].Spec for n in names}


def build_method(recipe, device="cpu") -> Method:
    """Instantiate the method of a trial's ``recipe`` (its ``method`` section) for ``device``.

    Raises:
        ValueError: unknown method name (the recipe validation normally rejects it first).
    """
    spec = recipe.method
    try:
        cls = METHODS[spec.name]
    except KeyError:
        raise ValueError(f"unknown method '{spec.name}'; one of {', '.join(METHODS)}") from None
    return cls(spec, recipe=recipe, device=device)


__all__ = ["METHODS", "EpochChanges", "Method", "build_method", "method_specs", "register_method"]
