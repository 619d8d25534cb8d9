"""Study dependencies: a recipe field that names an artifact of another study's run (RepOpt: the
target recipe's ``method.scales_from`` names the Hyper-Search study whose ``scales.pt`` it trains
with). Two stages are two studies, not one trial that trains twice.

Before the parent names its study (:func:`repsearch.spec.study_name`), :func:`resolve_dependencies`
turns every dependency of the recipe's ``method`` section (``MethodSpecModel.dependencies()``) into a
local file:

- ``{recipe: <path>, profile: <name>}``: that recipe's study. If it is incomplete, it is run first
  in this process (said on the console) — or, with ``run_missing=False`` (``repsearch run --no-deps``),
  refused with one line. The artifact comes from its best COMPLETE trial by its first objective
  (validation only), downloaded from MLflow.
- an MLflow run id (32 hex digits): that run's artifact, downloaded.
- a file path: used as it is.

The section then records the local path, the content sha256 and the run id
(``MethodSpecModel.resolved``): the sha256, not the path, enters the study hash, so re-running the
same recipe against the same scales adds nothing, and new scales make a new study.

A sweep may not override a dependency field (``sweep.params`` / ``sweep.baselines``): every arm of
a study shares the base recipe's resolved dependency.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

from repsearch.deployed import RUN_ID, fetch_run_artifact
from repsearch.errors import UserError

log = logging.getLogger(__name__)


class DependencyError(UserError):
    """A dependency that cannot be resolved: an incomplete study with ``--no-deps``, a failed
    dependency study, an unknown run, a missing artifact (one line)."""


def _find_recipe(ref_path: str, recipe_path: str | Path) -> Path:
    p = Path(ref_path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, Path(recipe_path).resolve().parent / p, Path(recipe_path).resolve().parent.parent / p]
    for c in candidates:
        if c.is_file():
            return c
    raise DependencyError(f"dependency recipe {ref_path} not found (looked in {', '.join(str(c.parent) for c in candidates)})")


def _sha256(path: Path) -> str:
    from repsearch.methods.scales import load_scales

    return load_scales(path)["sha256"]


def _check_sweep_does_not_override(recipe: Any, fields: list[str]) -> None:
    if recipe.sweep is None:
        return
    keys = set(recipe.sweep.params)
    for b in recipe.sweep.baselines:
        keys |= set(b)
    for f in fields:
        if f"method.{f}" in keys:
            raise DependencyError(
                f"sweep: method.{f} cannot be swept (every arm shares the base recipe's resolved {f})"
            )


def resolve_dependencies(
    recipe: Any,
    recipe_path: str | Path,
    stores: Any,
    *,
    run_missing: bool = True,
    run_study_fn: Optional[Callable[..., Any]] = None,
    say: Callable[[str], None] = lambda s: None,
    **run_kwargs: Any,
) -> Any:
    """Resolve the recipe's ``method`` dependencies (see the module docstring) and return the recipe
    with them filled in (the input is not modified; a recipe without dependencies is returned as is).

    Args:
        recipe: the validated :class:`repsearch.spec.Recipe` (profile and ``--set`` applied).
        recipe_path: its file (relative dependency recipes resolve against the working directory,
            then its folder, then the folder above).
        stores: the depending study's stores; a dependency study uses the same runs folder, MLflow
            and Optuna stores, with its own experiment (its recipe's stem).
        run_missing: run an incomplete dependency study first (False: refuse with one line).
        run_study_fn: the study runner (default :func:`repsearch.sweep.run_study`; tests inject).
        say: prints one line to the user (e.g. a rich console's print).
        run_kwargs: passed to ``run_study_fn`` (``device``, ``data_root``, ``console``, ``progress``,
            ``trial_fn``).

    Raises:
        DependencyError: see the class; repsearch.methods.scales.ScalesError: a missing, malformed
            or mismatched scales file; repsearch.spec.RecipeError: a dependency recipe that does not
            validate.
    """
    deps = recipe.method.dependencies()
    if not deps:
        return recipe
    from repsearch.spec import Recipe, load_recipe
    from repsearch.sweep import run_study, study_state
    from repsearch.tracking import resolve_stores

    _check_sweep_does_not_override(recipe, list(deps))
    updates: dict[str, Any] = {}
    for fld, artifact in deps.items():
        source = getattr(recipe.method, fld)
        run_id: Optional[str] = None
        if hasattr(source, "recipe"):  # a StudyRef
            dep_path = _find_recipe(source.recipe, recipe_path)
            dep_recipe, _ = load_recipe(dep_path, source.profile)
            dep_stores = resolve_stores(
                dep_recipe, dep_path, runs_dir=stores.runs_dir, tracking_uri=stores.tracking_uri,
                storage=stores.storage, profile=source.profile,
            )
            label = f"{dep_path.name}" + (f" --profile {source.profile}" if source.profile else "")
            state = study_state(dep_recipe, dep_path, source.profile, dep_stores)
            if state["best_run_id"] is None or state["waiting"] or state["running"]:
                done = state["complete"] + state["pruned"]
                if not run_missing:
                    raise DependencyError(
                        f"method.{fld}: study {state['name']} ({label}) is incomplete ({done}/{state['total']} trials); "
                        "run it first or drop --no-deps"
                    )
                say(f"method.{fld} depends on study {state['name']} ({label}, {done}/{state['total']} complete): running it first")
                (run_study_fn or run_study)(dep_recipe, dep_path, source.profile, dep_stores, **run_kwargs)
                state = study_state(dep_recipe, dep_path, source.profile, dep_stores)
            if state["best_run_id"] is None:
                raise DependencyError(f"method.{fld}: study {state['name']} ({label}) has no complete trial (see its failures)")
            run_id = state["best_run_id"]
            path = fetch_run_artifact(run_id, artifact, recipe, stores)
            say(f"method.{fld}: {artifact} of run {run_id} (study {state['name']}, best val {state['best_value']:.2f})")
        elif isinstance(source, str) and RUN_ID.match(source) and not Path(source).exists():
            run_id = source
            path = fetch_run_artifact(run_id, artifact, recipe, stores)
        else:
            path = Path(str(source)).expanduser()
            if not path.is_file():
                raise DependencyError(f"method.{fld}: {source} is neither an existing file nor an MLflow run id")
        path = path.resolve()
        sha = _sha256(path)
        pinned = getattr(recipe.method, f"{fld.removesuffix('_from')}_sha256", None)
        if pinned is not None and pinned != sha:
            raise DependencyError(f"method.{fld}: {path} has content sha256 {sha[:12]}, the recipe pins {pinned[:12]}")
        updates.update(recipe.method.resolved(fld, run_id, str(path), sha))
    d = recipe.model_dump(mode="json")
    d["method"].update(updates)
    resolved = Recipe.model_validate(d)
    check = getattr(resolved.method, "check_resolved", None)
    if check is not None:
        check(resolved)
    return resolved
