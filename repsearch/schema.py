"""Building blocks of the recipe schema shared by :mod:`repsearch.spec` and the methods' own recipe
sections (each method defines its ``method:`` section next to its code, in ``methods/<name>.py``).

This module imports only pydantic and, lazily, :mod:`repsearch.spaces` and :mod:`repsearch.scoring`,
so a method module can import it without a cycle (``spec`` imports the methods' registry to build the
``method`` union).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class SpecModel(BaseModel):
    """Base of every recipe section: unknown keys are errors, defaults are validated too
    (DESIGN.md "Recipes and overrides — contract")."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class MethodSpecModel(SpecModel):
    """Base of a method's recipe section (``method:``). Subclasses declare ``name: Literal["<name>"]``
    (the discriminator of the ``method`` union) and their own fields with the paper's defaults."""

    name: str

    def hash_ignored(self) -> set[str]:
        """Fields that cannot change results in this configuration and so stay out of the study hash
        (default: none)."""
        return set()

    def dependencies(self) -> dict[str, str]:
        """``{field: artifact file name}`` for the fields of this section that name another study's
        artifact (e.g. RepOpt's ``scales_from`` -> ``scales.pt``). The parent resolves them before it
        names the study (:mod:`repsearch.dependencies`); default: none."""
        return {}

    def check_dependency_recipe(self, field: str, dep_recipe: Any, recipe: Any) -> None:
        """Before a dependency study runs: check that ``dep_recipe`` (the study named by dependency
        ``field``) produces an artifact this ``recipe`` can use (default: no check).

        Raises:
            ValueError subclass / UserError: one line naming the mismatch.
        """

    def resolved(self, field: str, run_id: str | None, path: str, sha256: str) -> dict[str, Any]:
        """The field updates (dotted paths inside this section) once dependency ``field`` is resolved
        to ``path`` (content ``sha256``, from MLflow run ``run_id`` or None for a local file). Must be
        overridden by a section whose :meth:`dependencies` is not empty.

        Raises:
            NotImplementedError: the section declares dependencies but no resolution.
        """
        raise NotImplementedError(f"{type(self).__name__} declares dependencies but does not resolve them")


def check_space(value: Any) -> Any:
    """Validate an operation space (a name from ``spaces/`` or an inline list of branch types).

    Raises:
        ValueError: unknown space or branch type (the message lists the allowed ones).
    """
    from repsearch.spaces import SpaceError, resolve_space

    try:
        resolve_space(value)
    except SpaceError as exc:
        raise ValueError(str(exc)) from None
    return value


def check_saliency_metric(value: str) -> str:
    """Validate a saliency metric name against :mod:`repsearch.scoring`'s registry.

    Raises:
        ValueError: ``'<value>' is not one of random, grad_norm, ...``.
    """
    from repsearch.scoring import available_metrics

    names = available_metrics()
    if value not in names:
        raise ValueError(f"{value!r} is not one of {', '.join(names)}")
    return value
