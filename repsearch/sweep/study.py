"""The parent of a study: create or resume it, enqueue, run its workers, summarise it.

DESIGN.md "Sweeps — contract". :func:`run_study` is what ``repsearch run`` does; :func:`load_report`
and :func:`study_state` read a study without running anything.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
from optuna.trial import TrialState

from repsearch.report import ParetoFront, ReportRow, not_learning_warnings
from repsearch.spec import Recipe, recipe_hash, recipe_yaml, study_name as make_study_name
from repsearch.sweep.plan import SweepError, _check_sweep, plan_points
from repsearch.sweep.queue import _Ctx, _account, _count_missing, _enqueue_missing, _fail_stale, _rows
from repsearch.sweep.storage import _open_study, open_storage
from repsearch.sweep.worker import _default_trial_fn, _quietly, _work_loop
from repsearch.tracking import Stores, Tracker


@dataclass
class StudySummary:
    """What :func:`run_study` did and where the study stands.

    ``n_total`` counts slots (configuration × seed) the study must hold; ``n_complete``/``n_pruned``
    those finished so; ``n_failed`` those whose only trials FAILED; ``ran_now`` trials run by this
    call; ``failures`` = (point id, seed, one-line error) of the failed slots; ``pareto`` the Pareto
    front of a multi-objective study (rich prints it as a table), else None; ``warnings`` one line
    per COMPLETE trial tagged ``not_learning`` (:func:`repsearch.report.not_learning_warnings`),
    for the caller to print below the comparison table.
    """

    study_name: str
    n_total: int
    n_complete: int
    n_failed: int
    n_pruned: int
    ran_now: int
    nothing_to_run: bool
    rows: list[ReportRow]
    pareto: Optional[ParetoFront]
    failures: list[tuple[str, int, str]]
    n_running: int = 0
    parent_run_id: Optional[str] = None
    warnings: list[str] = field(default_factory=list)


def _workers(recipe: Recipe, workers: Optional[int]) -> int:
    n = workers if workers is not None else (recipe.sweep.workers if recipe.sweep is not None else 1)
    if n < 1:
        raise SweepError(f"--workers: {n}; give 1 or more worker processes")
    return n


def _study_attrs(stores: Stores, recipe: Recipe, rhash: str) -> dict[str, Any]:
    """What a worker on any machine needs from the study (``repsearch worker`` reads it back)."""
    from repsearch.tracking import git_info

    return {
        "recipe_hash": rhash,
        "recipe_yaml": recipe_yaml(recipe),
        "tracking_uri": stores.tracking_uri,
        "experiment": stores.experiment,
        "artifact_location": stores.artifact_location,
        "git_commit": git_info().get("git_commit", "unknown"),
        "host": socket.gethostname(),
    }


def prepare_study(
    recipe: Recipe,
    recipe_path: str | Path,
    profile: Optional[str],
    stores: Stores,
    *,
    device: str,
    data_root: Optional[str],
    trial_fn: Optional[Callable] = None,
    console: Any = None,
    progress: bool = True,
    resume: bool = True,
) -> tuple[_Ctx, dict[str, Any], int]:
    """The parent's first half: create (or open) the study and, under the study lock, record the
    workers' user attributes, fail stale trials, find or create the MLflow parent run (only when
    something is left to run) and enqueue the missing slots.

    Returns:
        (the study context, the slot counts after enqueueing (:func:`_account`), the number of
        slots left to run: 0 means nothing to run and no parent run touched).

    Raises:
        SweepError: a malformed sweep, a storage that cannot be opened.
    """
    _check_sweep(recipe)
    plan_points(recipe)  # raises on duplicate points
    name = make_study_name(recipe_path, profile, recipe)
    rhash = recipe_hash(recipe)
    storage, study, study_id = _open_study(recipe, name, stores, create=True)
    tracker = Tracker(stores)
    ctx = _Ctx(
        recipe=recipe, stores=stores, name=name, storage=storage, study=study, study_id=study_id, tracker=tracker,
        parent_run_id=None, device=device, data_root=data_root, trial_fn=trial_fn or _default_trial_fn(),
        console=console, progress=progress, rhash=rhash, resume=resume,
    )
    with ctx.lock():
        for k, v in _study_attrs(stores, recipe, rhash).items():
            study.set_user_attr(k, v)
        _fail_stale(ctx)
        acc = _account(ctx)
        to_run = acc["waiting"] + _count_missing(ctx)
        if to_run:
            ctx.parent_run_id = tracker.parent_run(
                name,
                tags={"recipe_hash": rhash, "sampler": recipe.sweep.sampler if recipe.sweep else "none", "optuna.storage": stores.storage},
                recipe_text=recipe_yaml(recipe),
            )
            study.set_user_attr("mlflow_parent_run_id", ctx.parent_run_id)
            _enqueue_missing(ctx)
            acc = _account(ctx)
    return ctx, acc, to_run


def run_study(
    recipe: Recipe,
    recipe_path: str | Path,
    profile: Optional[str],
    stores: Stores,
    *,
    device: str,
    data_root: Optional[str],
    trial_fn: Optional[Callable] = None,
    console: Any = None,
    progress: bool = True,
    workers: Optional[int] = None,
    devices: Optional[list[str]] = None,
    resume: bool = True,
) -> StudySummary:
    """Create (or resume) the recipe's study, enqueue what is missing and run it: in this process
    (one worker), or in ``workers`` worker processes (:func:`repsearch.sweep.pool.run_pool`).

    Under the study lock (:func:`repsearch.sweep.storage.study_lock`, so two parents started at once
    on one study make one parent run and one trial per slot): record what workers need in the
    study's user attributes, fail stale trials, find or create the MLflow parent run, then enqueue
    the missing slots (the parent run exists before any trial can be popped).

    Args:
        recipe: the validated recipe (a recipe without ``sweep`` is one trial).
        recipe_path, profile: name the study (:func:`repsearch.spec.study_name`) and the experiment.
        stores: from :func:`repsearch.tracking.resolve_stores`.
        device: ``cpu``, ``cuda`` or ``cuda:N`` (recorded as the ``device`` tag).
        data_root: passed to ``trial_fn``.
        trial_fn: ``trial_fn(recipe, *, data_root, device, out_dir, on_epoch, progress)`` returning an
            object with ``final`` (dict), ``history`` (list of dicts) and ``artifacts`` (paths);
            default :func:`repsearch.trial.run_trial`. A trial that resumes a checkpoint also gets
            ``resume_from`` (the file; only then, so a function without that keyword still serves
            studies that never resume). With workers > 1 it must be picklable (a module-level function).
        console: a ``rich.console.Console`` for one line per trial (None: logging only).
        progress: progress bars (one per trial in-process; one line per worker with a pool).
        workers: overrides ``sweep.workers``.
        devices: CUDA device ids for the pool's workers (round-robin, ``CUDA_VISIBLE_DEVICES``).
        resume: a point whose failed or killed trial left a checkpoint in the runs folder resumes
            from it (DESIGN.md "Checkpoints and resume — contract"); False (``--no-resume``): from
            scratch.

    Returns:
        :class:`StudySummary`. When nothing is left it prints
        ``study <name>: 7/7 trials complete, nothing to run`` and creates no run.

    Raises:
        SweepError: a storage that cannot be opened, a malformed sweep, bad workers/devices.
        KeyboardInterrupt: after failing the running trials (their MLflow runs KILLED).
    """
    n_workers = _workers(recipe, workers)
    if n_workers > 1:
        from repsearch.sweep.pool import worker_plan

        worker_plan(n_workers, device, devices)  # placement errors before anything is created
    elif devices:
        raise SweepError("--devices places a pool's workers; with one worker use --device cuda:N")
    ctx, acc, to_run = prepare_study(
        recipe, recipe_path, profile, stores, device=device, data_root=data_root, trial_fn=trial_fn, console=console,
        progress=progress, resume=resume,
    )
    name, tracker = ctx.name, ctx.tracker
    if not to_run:
        done = acc["complete"] + acc["pruned"]
        msg = f"study {name}: {done}/{acc['total']} trials complete, nothing to run"
        if acc["running"]:
            msg = f"study {name}: {done}/{acc['total']} trials complete, {acc['running']} running in other workers, nothing to run here"
        ctx.say(msg)
        rows, pareto = _rows(ctx)
        return StudySummary(
            study_name=name, n_total=acc["total"], n_complete=acc["complete"], n_failed=acc["failed"], n_pruned=acc["pruned"],
            ran_now=0, nothing_to_run=True, rows=rows, pareto=pareto, failures=acc["failures"], n_running=acc["running"],
            parent_run_id=tracker.find_parent(name), warnings=not_learning_warnings(rows),
        )
    ctx.say(
        f"study {name}: {acc['complete'] + acc['pruned']}/{acc['total']} trials complete, {acc['waiting']} to run"
        + (f" on {n_workers} workers" if n_workers > 1 else "")
    )
    status = "FAILED"
    try:
        if n_workers == 1:
            outcomes = _work_loop(ctx)
        else:
            from repsearch.sweep.pool import run_pool

            outcomes = run_pool(ctx, n_workers, devices=devices, trial_fn=trial_fn)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        acc = _account(ctx)
        _quietly(
            tracker.finish_parent, ctx.parent_run_id, status,
            {"n_total": acc["total"], "n_complete": acc["complete"], "n_pruned": acc["pruned"], "n_failed": acc["failed"]},
        )
    rows, pareto = _rows(ctx)
    ctx.say(
        f"study {name}: {acc['complete'] + acc['pruned']}/{acc['total']} trials complete"
        + (f", {acc['failed']} failed" if acc["failed"] else "")
    )
    return StudySummary(
        study_name=name, n_total=acc["total"], n_complete=acc["complete"], n_failed=acc["failed"], n_pruned=acc["pruned"],
        ran_now=len(outcomes), nothing_to_run=False, rows=rows, pareto=pareto, failures=acc["failures"],
        n_running=acc["running"], parent_run_id=ctx.parent_run_id, warnings=not_learning_warnings(rows),
    )


def load_report(study_name: str, stores: Stores, recipe: Optional[Recipe] = None) -> tuple[list[ReportRow], Optional[ParetoFront]]:
    """The comparison rows (and Pareto front, multi-objective) of an existing study, from Optuna only.

    Raises:
        SweepError: the study does not exist.
    """
    import yaml

    storage = open_storage(stores.storage)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise SweepError(f"study '{study_name}' does not exist in {stores.storage}") from None
    if recipe is None:
        recipe = Recipe.model_validate(yaml.safe_load(study.user_attrs["recipe_yaml"]))
    ctx = _Ctx(
        recipe=recipe, stores=stores, name=study_name, storage=storage, study=study, study_id=0, tracker=None,
        parent_run_id=None, device="", data_root=None, trial_fn=lambda *a, **k: None, console=None, progress=False, rhash="",
    )
    return _rows(ctx)


def study_state(recipe: Recipe, recipe_path: str | Path, profile: Optional[str], stores: Stores) -> dict[str, Any]:
    """Where a recipe's study stands, without creating or enqueueing anything (used to resolve a
    study dependency, :mod:`repsearch.dependencies`).

    Returns:
        ``{"name", "exists", "total", "complete", "pruned", "failed", "running", "waiting",
        "best_run_id", "best_value"}``: counts per wanted slot (a slot not enqueued yet counts as
        waiting); ``best_run_id`` is the MLflow run of the COMPLETE trial with the best first
        objective (validation only, e.g. ``val/top1``), None when there is none.
    """
    name = make_study_name(recipe_path, profile, recipe)
    out: dict[str, Any] = {"name": name, "exists": False, "total": len(plan_points(recipe)), "complete": 0,
                           "pruned": 0, "failed": 0, "running": 0, "waiting": 0, "best_run_id": None, "best_value": None}
    storage = open_storage(stores.storage)
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler())
    except KeyError:
        out["waiting"] = out["total"]
        return out
    ctx = _Ctx(
        recipe=recipe, stores=stores, name=name, storage=storage, study=study, study_id=0, tracker=None,
        parent_run_id=None, device="", data_root=None, trial_fn=lambda *a, **k: None, console=None, progress=False, rhash="",
    )
    acc = _account(ctx)
    out.update({k: acc[k] for k in ("total", "complete", "pruned", "failed", "running")})
    out["exists"] = True
    out["waiting"] = acc["total"] - acc["complete"] - acc["pruned"] - acc["failed"] - acc["running"]
    maximize = ctx.objectives[0].direction == "maximize"
    best = None
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id is None or not t.values:
            continue
        v = t.values[0]
        if best is None or (v > best[0] if maximize else v < best[0]):
            best = (v, run_id)
    if best is not None:
        out["best_value"], out["best_run_id"] = best
    return out
