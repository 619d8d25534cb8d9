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


def content_sha256(path: Path, artifact: str) -> str:
    """The content hash that names a depending study: a scales file's own content hash
    (:func:`repsearch.methods.scales.load_scales`, independent of serialisation), else the SHA-256 of
    the file's bytes.

    Raises:
        repsearch.methods.scales.ScalesError: a malformed or altered scales file.
    """
    if artifact == "scales.pt":
        from repsearch.methods.scales import load_scales

        return load_scales(path)["sha256"]
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part) if not isinstance(obj, dict) else obj.get(part)
    return obj


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
        run_kwargs: passed to ``run_study_fn`` (``device``, ``data_root``, ``console``, ``progress``, ``resume``,
            ``trial_fn``).

    Raises:
        DependencyError: see the class; repsearch.methods.scales.ScalesError: a missing, malformed
            or mismatched scales file; repsearch.spec.RecipeError: a dependency recipe that does not
            validate.
    """
    from repsearch.spec import Recipe, load_recipe, set_dotted
    from repsearch.sweep import run_study, study_state
    from repsearch.tracking import resolve_stores

    deps = recipe.method.dependencies()
    init_from = getattr(recipe.model, "init_from", None)
    init_run = isinstance(init_from, str) and RUN_ID.match(init_from) and not Path(init_from).exists()
    if not deps and not init_run:
        _check_points(recipe)
        return recipe
    _check_sweep_does_not_override(recipe, list(deps))
    d = recipe.model_dump(mode="json")
    if init_run:  # model.init_from by run id: that run's deployed.pt, from this study's MLflow store
        path = fetch_run_artifact(init_from, "deployed.pt", recipe, stores)
        d["model"]["init_from"] = str(Path(path).resolve())
        say(f"model.init_from: deployed.pt of run {init_from}")
    for fld, artifact in deps.items():
        source = _get(recipe.method, fld)
        run_id: Optional[str] = None
        if hasattr(source, "recipe"):  # a StudyRef
            dep_path = _find_recipe(source.recipe, recipe_path)
            dep_recipe, _ = load_recipe(dep_path, source.profile)
            # before running anything: does that study produce what this recipe can use?
            recipe.method.check_dependency_recipe(fld, dep_recipe, recipe)
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
        path = Path(path).resolve()
        sha = content_sha256(path, artifact)
        for key, value in recipe.method.resolved(fld, run_id, str(path), sha).items():
            set_dotted(d["method"], key, value)
    resolved = Recipe.model_validate(d)
    _check_points(resolved)
    return resolved


def _check_points(recipe: Any) -> None:
    """Every trial of the study must find its dependencies resolved and fitting: a sweep arm may not
    need an artifact the base recipe does not name (e.g. ``method.scales: searched`` over a base with
    ``scales: ones``), nor train a model the artifact does not fit (a sweep over ``model.width``).

    Raises:
        DependencyError / the method's own error (e.g. ScalesError): one line naming the arm.
    """
    from repsearch.spec import trial_recipe
    from repsearch.sweep import plan_points

    seen: set[str] = set()
    for point in plan_points(recipe):
        if point.point_id in seen:
            continue
        seen.add(point.point_id)
        tr = trial_recipe(recipe, point.overrides, point.seed)
        missing = tr.method.dependencies()
        if missing:
            raise DependencyError(
                f"sweep arm {point.point_id}: needs {', '.join('method.' + f for f in missing)} resolved, but the base "
                "recipe's own configuration needs none, so it is not resolved (make the base need it, e.g. "
                "method.scales: searched)"
            )
        check = getattr(tr.method, "check_resolved", None)
        if check is not None:
            check(tr)
