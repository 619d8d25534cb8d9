"""Recipe.sweep -> an Optuna study: points enqueued once by the parent, workers pop them.

DESIGN.md "Sweeps — contract". The parent process (:func:`run_study`)

1. opens the Optuna storage (``RDBStorage`` with heartbeats for ``sqlite://``/``postgresql://``/
   ``mysql://`` URLs; ``JournalStorage`` for a journal file path) and creates the study once
   (``load_if_exists``; directions from ``sweep.objective``; user attributes: recipe hash and YAML);
2. fails stale trials: RUNNING trials whose recorded worker (host name, pid and the process's start
   time, in user attributes) is gone from this host, at once, and those whose heartbeat expired
   (``optuna.storages.fail_stale_trials``); their MLflow child runs are marked KILLED, and so is
   every other RUNNING child run of the study whose trial is not RUNNING (a worker killed after
   creating the run but before recording its id in the trial);
3. enqueues every slot (point × seed) that has no COMPLETE or PRUNED trial and no WAITING or
   RUNNING one (``study.enqueue_trial``; point id, overrides and seed in ``user_attrs``). A FAILED
   slot is therefore enqueued again; ``GridSampler`` and ``skip_if_exists`` are never used;
4. runs the worker loop (:func:`work`) in-process: pop the oldest WAITING trial (WAITING -> RUNNING
   through the storage, so two workers never take the same one, and never a fresh sampler trial
   when the queue is empty), run it, tell the result, until no WAITING trial is left.

Grid studies: the points are the product of ``sweep.params`` choices plus ``baselines``, × seeds.
Their Optuna params (for optuna-dashboard) are ``point`` (categorical over the point ids), each
swept key (categorical; lists are JSON strings) and ``seed`` (int); the sampler never chooses.

Other samplers (tpe, random, cmaes, nsga2, seeded from ``recipe.seed`` and the study's trial count,
so a resumed study does not replay the same proposals): configuration k (k < ``n_trials``) is a
"propose" trial for ``seeds[0]`` whose worker asks the sampler (``suggest_*`` on ``sweep.params``),
then enqueues the same configuration (fixed params) for the other seeds. ``seed`` is a user
attribute only there (a param would enter the sampler's search space). Baselines are fixed slots
without Optuna params.

Objectives are the final values of the objective metrics (``TrialResult.final``); a trial's
non-numeric final facts (``TrialResult.tags``, e.g. ``precision``, ``not_learning``) are tags of
its MLflow child run and the user attribute ``tags`` (a dict, next to ``final``). The pruner
(median / hyperband) sees the objective metric every epoch, or ``val/top1`` when the objective is
not a per-epoch measure and is maximised; a pruned trial is PRUNED in Optuna and a FINISHED MLflow
run tagged ``pruned=true``. A trial that raises is FAIL (user attribute ``error``), its MLflow run
FAILED with the error; the sweep goes on. A KeyboardInterrupt fails the trial, marks its run KILLED
and propagates.

``optuna`` is imported at module top (this module is all Optuna); ``repsearch.trial`` (torch) and
``mlflow`` are imported only when a study runs.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from repsearch.errors import UserError
from repsearch.report import ParetoFront, ReportRow, not_learning_warnings, pareto_front, rows_from_trials
from repsearch.spec import Choices, Objective, Range, Recipe, recipe_hash, recipe_yaml, study_name as make_study_name, trial_recipe
from repsearch.tracking import Stores, Tracker, flatten_params

log = logging.getLogger(__name__)

#: RDBStorage heartbeat: every 30 s; a RUNNING trial without one for 90 s is failed by the next run.
HEARTBEAT_INTERVAL_S = 30
GRACE_PERIOD_S = 90
#: Median pruner: no pruning before this many trials completed (Optuna's default).
MEDIAN_STARTUP_TRIALS = 5
DEFAULT_POINT = "default"
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_ACTIVE = (TrialState.WAITING, TrialState.RUNNING)


class SweepError(UserError):
    """A sweep that cannot run as asked: bad storage, parallel workers, a malformed range."""


class Point(NamedTuple):
    """One configuration × seed of a study.

    Attributes:
        point_id: stable readable id without the seed: ``method.scoring=snip``,
            ``baseline:method.name=origin``, ``default`` (a recipe without sweep params).
        overrides: dotted path -> value applied to the recipe (:func:`repsearch.spec.trial_recipe`).
        seed: the trial's seed.
    """

    point_id: str
    overrides: dict
    seed: int


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


# ------------------------------------------------------------------------------------- points
def _fmt_value(v: Any, short: bool = False) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float) and short:
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_value(x, short) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt_value(x, short)}" for k, x in v.items()) + "}"
    return str(v)


def point_id(overrides: dict, short: bool = False) -> str:
    """Readable id of a configuration: ``"k1=v1, k2=v2"`` (``default`` when empty)."""
    if not overrides:
        return DEFAULT_POINT
    return ", ".join(f"{k}={_fmt_value(v, short)}" for k, v in overrides.items())


def _configurations(recipe: Recipe) -> list[tuple[str, dict, str]]:
    """(point id, overrides, kind) of the fixed configurations: grid points (grid only) and baselines."""
    sw = recipe.sweep
    if sw is None:
        return [(DEFAULT_POINT, {}, "grid")]
    out: list[tuple[str, dict, str]] = []
    if sw.sampler == "grid":
        keys = list(sw.params)
        for values in itertools.product(*(sw.params[k].choices for k in keys)):
            ov = dict(zip(keys, values))
            out.append((point_id(ov), ov, "grid"))
    for b in sw.baselines:
        out.append(("baseline:" + point_id(dict(b)), dict(b), "baseline"))
    seen: set[str] = set()
    for pid, _, _ in out:
        if pid in seen:
            raise SweepError(f"sweep: the point '{pid}' appears twice (sweep.params choices or sweep.baselines repeat)")
        seen.add(pid)
    return out


def _seeds(recipe: Recipe) -> list[int]:
    return [recipe.seed] if recipe.sweep is None else list(recipe.sweep.seeds)


def plan_points(recipe: Recipe) -> list[Point]:
    """The fixed points of a study, seed-major (every configuration for ``seeds[0]`` first).

    Grid: product of ``sweep.params`` choices (in the recipe's key order) plus ``baselines``, × seeds.
    Other samplers: only the baselines × seeds (the sampler proposes the rest while the study runs).
    A recipe without ``sweep`` is one point ``default`` (no overrides, seed = ``recipe.seed``).

    Raises:
        SweepError: two identical points.
    """
    configs = _configurations(recipe)
    return [Point(pid, ov, s) for s in _seeds(recipe) for pid, ov, _ in configs]


def _objectives(recipe: Recipe) -> list[Objective]:
    return recipe.sweep.objectives if recipe.sweep is not None else [Objective()]


def _check_sweep(recipe: Recipe) -> None:
    sw = recipe.sweep
    if sw is None:
        return
    for key, dist in sw.params.items():
        if key in ("seed", "point"):
            raise SweepError(f"sweep.params.{key}: not a swept field; list seeds in sweep.seeds")
        if isinstance(dist, Range):
            if dist.log and dist.step is not None:
                raise SweepError(f"sweep.params.{key}: a log range cannot have a step (Optuna samples log ranges continuously)")
            if dist.int and (dist.low != int(dist.low) or dist.high != int(dist.high) or (dist.step or 1) != int(dist.step or 1)):
                raise SweepError(f"sweep.params.{key}: an int range needs integer low, high and step")


# ------------------------------------------------------------------------------- Optuna pieces
def open_storage(url: str):
    """Open an Optuna storage (wrapped as the study will use it).

    ``sqlite:///…``, ``postgresql://…``, ``mysql://…``: ``RDBStorage`` with ``heartbeat_interval``
    :data:`HEARTBEAT_INTERVAL_S` and ``grace_period`` :data:`GRACE_PERIOD_S` (SQLite waits up to 60 s
    for a lock). Anything else is a journal file path: ``JournalStorage(JournalFileBackend(path))``
    (no heartbeats: only the dead-process check applies).

    Raises:
        SweepError: an unsupported URL scheme, a missing database driver, a database that cannot be
            opened, a folder or an SQLite database given as a journal path.
    """
    from optuna.storages import JournalStorage, RDBStorage, get_storage
    from optuna.storages.journal import JournalFileBackend

    if "://" in url:
        scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
        if scheme not in ("sqlite", "postgresql", "postgres", "mysql"):
            raise SweepError(f"storage '{url}': expected sqlite:///..., postgresql://..., mysql://... or a journal file path")
        if scheme == "sqlite":
            db = url.split("://", 1)[1][1:].split("?", 1)[0]  # sqlite:///rel.db, sqlite:////abs.db
            if db and db != ":memory:":
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
        else:
            kwargs = {"pool_pre_ping": True}
        try:
            with warnings.catch_warnings():  # heartbeat_interval is "experimental" in Optuna 5.0
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                rdb = RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=GRACE_PERIOD_S)
        except ImportError as exc:
            raise SweepError(f"storage '{url}': database driver missing ({exc}); e.g. pip install psycopg2-binary") from None
        except Exception as exc:  # sqlalchemy errors: unreachable server, bad credentials, bad path
            if type(exc).__module__.startswith("sqlalchemy"):
                raise SweepError(f"storage '{url}': cannot open: {str(exc).splitlines()[0]}") from None
            raise
        return get_storage(rdb)
    path = Path(url).expanduser()
    if path.is_dir():
        raise SweepError(f"storage '{url}': is a folder; give a journal file path or a sqlite:///... URL")
    if path.is_file():
        with open(path, "rb") as fh:
            if fh.read(16) == b"SQLite format 3\x00":
                raise SweepError(f"storage '{url}': is an SQLite database; pass it as sqlite:///{path.resolve()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def make_sampler(recipe: Recipe, n_existing: int = 0, salt: int = 0) -> "optuna.samplers.BaseSampler":
    """The study's sampler, seeded with ``recipe.seed`` mixed with the number of trials already in
    the study (a resumed study continues the sequence instead of replaying it) and ``salt`` (extra
    workers pass their pid so that two of them never propose in lockstep). A grid study gets a
    RandomSampler, which never chooses anything since every param is fixed by its point."""
    name = recipe.sweep.sampler if recipe.sweep is not None else "grid"
    seed = (recipe.seed * 1_000_003 + n_existing + salt * 7919) % (2**32)
    s = optuna.samplers
    if name == "tpe":
        return s.TPESampler(seed=seed)
    if name == "cmaes":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return s.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "nsga2":
        return s.NSGAIISampler(seed=seed)
    return s.RandomSampler(seed=seed)


def make_pruner(recipe: Recipe) -> "optuna.pruners.BasePruner":
    """``none`` -> NopPruner; ``median`` -> MedianPruner(5 startup trials, warm-up max(1, epochs // 10)
    epochs); ``hyperband`` -> HyperbandPruner(min 1, max ``train.epochs`` epochs, reduction factor 3)."""
    name = recipe.sweep.pruner if recipe.sweep is not None else "none"
    epochs = recipe.train.epochs
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=max(1, epochs // 10))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs), reduction_factor=3)
    return optuna.pruners.NopPruner()


def _encode(v: Any) -> Any:
    """A value Optuna's CategoricalDistribution accepts (lists/dicts as JSON strings)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return json.dumps(v, sort_keys=True)


# ---------------------------------------------------------------------------- process identity
def _proc_stat(pid: int) -> Optional[list[str]]:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def process_start_id(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux ``/proc``), or None elsewhere."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def process_alive(pid: int, start_id: Optional[str] = None) -> bool:
    """Whether process ``pid`` runs on this host (a zombie counts as dead; with ``start_id``, a
    different process that reuses the pid counts as dead too)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OverflowError, ValueError):
        return False
    fields = _proc_stat(int(pid))
    if fields is not None:
        if fields[0] in ("Z", "X"):
            return False
        if start_id is not None and len(fields) > 19 and fields[19] != str(start_id):
            return False
    return True


# ---------------------------------------------------------------------------------- the study
@dataclass
class _Slot:
    key: tuple
    point: Optional[str]
    overrides: Optional[dict]
    seed: int
    kind: str  # grid | baseline | sampled | propose
    config: Optional[int] = None


def _slot_key(attrs: dict) -> Optional[tuple]:
    if "seed" not in attrs:
        return None
    if attrs.get("config") is not None:
        return ("config", int(attrs["config"]), int(attrs["seed"]))
    if attrs.get("point") is not None:
        return ("point", attrs["point"], int(attrs["seed"]))
    return None


@dataclass
class _Ctx:
    recipe: Recipe
    stores: Stores
    name: str
    storage: Any
    study: "optuna.Study"
    study_id: int
    tracker: Optional[Tracker]
    parent_run_id: Optional[str]
    device: str
    data_root: Optional[str]
    trial_fn: Callable
    console: Any
    progress: bool
    rhash: str
    host: str = field(default_factory=socket.gethostname)

    @property
    def grid(self) -> bool:
        return self.recipe.sweep is None or self.recipe.sweep.sampler == "grid"

    @property
    def objectives(self) -> list[Objective]:
        return _objectives(self.recipe)

    def say(self, text: str, style: Optional[str] = None) -> None:
        log.info(text)
        if self.console is not None:
            self.console.print(text, style=style, markup=False, highlight=False)


def _wanted(ctx: _Ctx, trials: list[FrozenTrial]) -> list[_Slot]:
    """Every slot the study must hold (propose slots for sampled configurations not yet known)."""
    recipe = ctx.recipe
    seeds = _seeds(recipe)
    slots: list[_Slot] = []
    fixed = _configurations(recipe)
    if ctx.grid:
        for s in seeds:
            for pid, ov, kind in fixed:
                slots.append(_Slot(("point", pid, s), pid, ov, s, kind))
        return slots
    for s in seeds:
        for pid, ov, kind in fixed:  # baselines
            slots.append(_Slot(("point", pid, s), pid, ov, s, kind))
    known: dict[int, tuple[str, dict]] = {}
    for t in trials:
        a = t.user_attrs
        if a.get("config") is not None and a.get("overrides") is not None and a.get("point") is not None:
            known.setdefault(int(a["config"]), (a["point"], json.loads(a["overrides"])))
    configs = {int(t.user_attrs["config"]) for t in trials if t.user_attrs.get("config") is not None}
    n_configs = max([recipe.sweep.n_trials or 0] + [c + 1 for c in configs])
    for s_i, s in enumerate(seeds):
        for k in range(n_configs):
            if k in known:
                pid, ov = known[k]
                slots.append(_Slot(("config", k, s), pid, ov, s, "sampled", k))
            elif s_i == 0:
                slots.append(_Slot(("config", k, s), None, None, s, "propose", k))
            else:  # enqueued by the propose trial once the sampler chose; counted here
                slots.append(_Slot(("config", k, s), None, None, s, "pending", k))
    return slots


def _grid_params(ctx: _Ctx, slot: _Slot) -> dict[str, Any]:
    if not ctx.grid:
        if slot.kind == "sampled" and slot.overrides is not None:
            return {k: _encode(v) for k, v in slot.overrides.items() if k in ctx.recipe.sweep.params}
        return {}
    params: dict[str, Any] = {"point": slot.point}
    if slot.kind == "grid":
        params.update({k: _encode(v) for k, v in slot.overrides.items()})
    params["seed"] = slot.seed
    return params


def _enqueue(ctx: _Ctx, slot: _Slot) -> None:
    attrs: dict[str, Any] = {"seed": slot.seed, "kind": slot.kind}
    if slot.point is not None:
        attrs["point"] = slot.point
    if slot.overrides is not None:
        attrs["overrides"] = json.dumps(slot.overrides)
    if slot.config is not None:
        attrs["config"] = slot.config
    ctx.study.enqueue_trial(params=_grid_params(ctx, slot), user_attrs=attrs)


def _slot_states(trials: list[FrozenTrial]) -> dict[tuple, set]:
    states: dict[tuple, set] = {}
    for t in trials:
        key = _slot_key(t.user_attrs)
        if key is not None:
            states.setdefault(key, set()).add(t.state)
    return states


def _enqueue_missing(ctx: _Ctx) -> int:
    trials = ctx.study.get_trials(deepcopy=False)
    states = _slot_states(trials)
    n = 0
    for slot in _wanted(ctx, trials):
        if slot.kind == "pending":
            continue
        if states.get(slot.key, set()) & set(_FINISHED + _ACTIVE):
            continue
        _enqueue(ctx, slot)
        n += 1
    return n


def _fail_stale(ctx: _Ctx) -> list[FrozenTrial]:
    """Fail RUNNING trials whose worker died on this host or whose heartbeat expired; mark their
    MLflow runs KILLED, and every other RUNNING child run of the study whose trial is no longer
    RUNNING (:func:`_kill_orphan_runs`). Returns the trials failed."""
    running = {t.number: t for t in ctx.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    reasons: dict[int, str] = {}
    if not running:
        _kill_orphan_runs(ctx, reasons)
        return []
    now = datetime.now()
    for t in running.values():
        a = t.user_attrs
        pid = a.get("worker_pid")
        reason = None
        if a.get("worker_host") == ctx.host and pid is not None and not process_alive(pid, a.get("worker_started")):
            reason = f"worker {ctx.host}:{pid} is gone"
        elif pid is None and t.datetime_start is not None and (now - t.datetime_start).total_seconds() > GRACE_PERIOD_S:
            reason = f"taken {GRACE_PERIOD_S}+ s ago by a worker that never recorded itself"
        if reason is not None:
            tid = ctx.storage.get_trial_id_from_study_id_trial_number(ctx.study_id, t.number)
            try:
                ctx.storage.set_trial_user_attr(tid, "error", reason)
                ctx.storage.set_trial_state_values(tid, state=TrialState.FAIL)
                reasons[t.number] = reason
            except UpdateFinishedTrialError:
                pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(ctx.study)
    failed = [t for t in ctx.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in running]
    for t in failed:
        reason = reasons.get(t.number, f"heartbeat older than {GRACE_PERIOD_S} s")
        log.warning("trial %d (%s, seed %s) failed as stale: %s", t.number, t.user_attrs.get("point"), t.user_attrs.get("seed"), reason)
        reasons[t.number] = reason
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id and ctx.tracker is not None:
            ctx.tracker.kill_run(run_id, reason)
    _kill_orphan_runs(ctx, reasons)
    return failed


def _kill_orphan_runs(ctx: _Ctx, reasons: dict[int, str]) -> list[str]:
    """Mark KILLED every RUNNING MLflow child run of the study whose Optuna trial is not RUNNING.

    Such a run is an orphan: its worker died after creating it (e.g. before recording its id in the
    trial's ``mlflow_run_id``, so the stale-trial pass could not find it), and nobody will finish it.
    The runs are listed before the trials are read, so a run that a live worker creates meanwhile is
    never taken for one; a run that ended meanwhile is left as it is, and so is a run whose trial
    number this study does not hold. ``reasons``: trial number ->
    why it was failed now. Returns the run ids marked KILLED.
    """
    if ctx.tracker is None:
        return []
    try:
        candidates = ctx.tracker.running_trial_runs(ctx.name)
    except Exception as exc:  # MLflow trouble must not stop the study
        log.warning("could not look for orphan MLflow runs of study %s: %s", ctx.name, exc)
        return []
    if not candidates:
        return []
    trials = {t.number: t for t in ctx.study.get_trials(deepcopy=False)}
    killed = []
    for run_id, number in candidates:
        t = trials.get(number)
        if t is None or t.state == TrialState.RUNNING:  # unknown here (another storage?): not ours to judge
            continue
        if ctx.tracker.run_status(run_id) != "RUNNING":
            continue
        why = reasons.get(number) or t.user_attrs.get("error") or f"trial {number} is {t.state.name}"
        reason = f"orphan run of trial {number} ({why})"
        log.warning("MLflow run %s: %s; marked KILLED", run_id, reason)
        ctx.tracker.kill_run(run_id, reason)
        killed.append(run_id)
    return killed


class _Heartbeat:
    """Records the trial's heartbeat now and then every :data:`HEARTBEAT_INTERVAL_S` (RDB only)."""

    def __init__(self, storage: Any, trial_id: int):
        interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def __enter__(self) -> "_Heartbeat":
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)
            self.thread = threading.Thread(target=self._loop, name=f"heartbeat-{self.trial_id}", daemon=True)
            self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # a lost heartbeat is not worth killing the trial
                log.warning("heartbeat of trial id %d failed: %s", self.trial_id, exc)

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def _pop_waiting(ctx: _Ctx) -> Optional[int]:
    """Take the oldest WAITING trial (WAITING -> RUNNING in the storage); None when none is left."""
    for t in ctx.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        tid = ctx.storage.get_trial_id_from_study_id_trial_number(ctx.study_id, t.number)
        try:
            if ctx.storage.set_trial_state_values(tid, state=TrialState.RUNNING):
                return tid
        except UpdateFinishedTrialError:
            continue
    return None


def _suggest(ctx: _Ctx, trial: "optuna.Trial") -> dict[str, Any]:
    """Sample (or, for enqueued trials, read back) the sweep params; returns the overrides."""
    ov: dict[str, Any] = {}
    for key, dist in ctx.recipe.sweep.params.items():
        if isinstance(dist, Choices):
            enc = [_encode(c) for c in dist.choices]
            v = trial.suggest_categorical(key, enc)
            ov[key] = dist.choices[enc.index(v)]
        elif dist.int:
            ov[key] = trial.suggest_int(key, int(dist.low), int(dist.high), step=int(dist.step or 1), log=dist.log)
        else:
            ov[key] = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return ov


def _record_grid_params(ctx: _Ctx, trial: "optuna.Trial", attrs: dict) -> None:
    ids = [pid for pid, _, _ in _configurations(ctx.recipe)]
    seeds = _seeds(ctx.recipe) + [int(attrs["seed"])]
    try:
        if attrs.get("point") in ids:
            trial.suggest_categorical("point", ids)
        if attrs.get("kind") == "grid" and ctx.recipe.sweep is not None:
            for key, dist in ctx.recipe.sweep.params.items():
                trial.suggest_categorical(key, [_encode(c) for c in dist.choices])
        trial.suggest_int("seed", min(seeds), max(seeds))
    except ValueError as exc:  # a distribution that changed since the study was created
        log.warning("trial %d: params not recorded in Optuna (%s); see its user attributes", trial.number, exc)


def _report_metric(ctx: _Ctx, metrics: dict) -> Optional[str]:
    obj = ctx.objectives
    if len(obj) != 1:
        return None
    if obj[0].metric in metrics:
        return obj[0].metric
    if obj[0].direction == "maximize" and "val/top1" in metrics:
        return "val/top1"
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 500 else text[:497] + "..."


def _run_one(ctx: _Ctx, trial_id: int) -> tuple[str, Optional[str]]:
    """Run one popped trial end to end; returns (final state name, error line or None)."""
    study, tracker = ctx.study, ctx.tracker
    trial = optuna.Trial(study, trial_id)
    attrs = dict(trial.user_attrs)
    for k, v in (
        ("worker_host", ctx.host),
        ("worker_pid", os.getpid()),
        ("worker_started", process_start_id(os.getpid())),
        ("started_at", datetime.now(timezone.utc).isoformat(timespec="seconds")),
    ):
        trial.set_user_attr(k, v)
    run_id: Optional[str] = None
    out_dir = ctx.stores.runs_dir / "trials" / ctx.name / f"{trial.number:04d}"
    t0 = time.perf_counter()
    last_epoch = [0]
    seed = int(attrs["seed"])
    point = attrs.get("point")
    with _Heartbeat(ctx.storage, trial_id):
        try:
            # -- the configuration -------------------------------------------------------------
            if attrs.get("kind") == "propose":
                overrides = _suggest(ctx, trial)
                point = f"#{int(attrs['config'])} " + point_id(overrides, short=True)
                trial.set_user_attr("point", point)
                trial.set_user_attr("overrides", json.dumps(overrides))
                for s in _seeds(ctx.recipe):
                    if s != seed:
                        _enqueue(ctx, _Slot(("config", attrs["config"], s), point, overrides, s, "sampled", int(attrs["config"])))
            else:
                overrides = json.loads(attrs.get("overrides") or "{}")
                if ctx.grid:
                    _record_grid_params(ctx, trial, attrs)
                elif attrs.get("kind") == "sampled":
                    _suggest(ctx, trial)  # fixed params: records them for the sampler
            label = f"trial {trial.number}: {point} seed {seed}"
            ctx.say(f"{label} ...")
            # -- MLflow child run ----------------------------------------------------------------
            if tracker is not None:
                run_id = tracker.start_trial(
                    ctx.parent_run_id,
                    run_name=f"{point} seed={seed}",
                    tags={
                        "study_name": ctx.name,
                        "optuna.trial_number": trial.number,
                        "point": point,
                        "seed": seed,
                        "recipe_hash": ctx.rhash,
                        "device": ctx.device,
                    },
                )
                trial.set_user_attr("mlflow_run_id", run_id)
            recipe = trial_recipe(ctx.recipe, overrides, seed)
            if tracker is not None:
                tracker.log_params(run_id, flatten_params(recipe.model_dump(mode="json", exclude={"sweep", "profiles", "tracking"})))

            def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
                last_epoch[0] = epoch
                if tracker is not None:
                    tracker.log_metrics(run_id, metrics, step=epoch)
                key = _report_metric(ctx, metrics)
                if key is None:
                    return
                value = float(metrics[key])
                if math.isfinite(value):
                    trial.report(value, epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned at epoch {epoch}: {key} {value:.4g}")

            result = ctx.trial_fn(
                recipe, data_root=ctx.data_root, device=ctx.device, out_dir=out_dir, on_epoch=on_epoch, progress=ctx.progress
            )
            final = {k: float(v) for k, v in dict(result.final).items() if _is_number(v)}
            tags = {str(k): str(v) for k, v in dict(getattr(result, "tags", None) or {}).items()}
            trial.set_user_attr("tags", tags)
            if tracker is not None and tags:
                tracker.set_tags(run_id, tags)  # before the objective checks: a trial failed below keeps them
            values = []
            for obj in ctx.objectives:
                if obj.metric not in final:
                    raise KeyError(f"objective metric '{obj.metric}' is not among the final measures ({', '.join(sorted(final))})")
                if not math.isfinite(final[obj.metric]):
                    raise ValueError(f"objective metric '{obj.metric}' is {final[obj.metric]}")
                values.append(final[obj.metric])
            step = max(last_epoch[0], len(getattr(result, "history", []) or []))
            trial.set_user_attr("final", final)
            trial.set_user_attr("duration_s", round(time.perf_counter() - t0, 3))
            if tracker is not None:
                last = (result.history[-1] if getattr(result, "history", None) else {}) or {}
                new = {k: v for k, v in final.items() if k not in last or last[k] != v}
                tracker.log_metrics(run_id, new, step=step)
                tracker.log_artifacts(run_id, list(result.artifacts or []))
                tracker.finish_trial(run_id, status="FINISHED")
            study.tell(trial, values if len(values) > 1 else values[0])
            if tracker is not None and out_dir.is_dir():
                shutil.rmtree(out_dir, ignore_errors=True)  # logged to MLflow; no second copy
                for parent in (out_dir.parent, out_dir.parent.parent):
                    try:
                        parent.rmdir()  # only when empty
                    except OSError:
                        break
            shown = ", ".join(f"{o.metric} {v:.4g}" for o, v in zip(ctx.objectives, values))
            ctx.say(f"{label}: {shown} ({time.perf_counter() - t0:.1f} s)")
            return "COMPLETE", None
        except optuna.TrialPruned as exc:
            trial.set_user_attr("pruned_at_epoch", last_epoch[0])
            if tracker is not None and run_id is not None:
                _quietly(tracker.finish_trial, run_id, status="FINISHED", tags={"pruned": "true", "pruned_at_epoch": last_epoch[0]})
            study.tell(trial, state=TrialState.PRUNED)
            ctx.say(f"trial {trial.number}: {point} seed {seed}: {exc}")
            return "PRUNED", None
        except Exception as exc:
            line = _one_line(exc)
            tb = traceback.format_exc()
            log.debug("trial %d failed:\n%s", trial.number, tb)
            _quietly(trial.set_user_attr, "error", line)
            if tracker is not None and run_id is not None:
                if out_dir.is_dir():
                    _quietly(tracker.log_artifacts, run_id, sorted(out_dir.iterdir()))
                _quietly(tracker.fail_trial, run_id, line, tb)
            study.tell(trial, state=TrialState.FAIL)
            ctx.say(f"trial {trial.number}: {point} seed {seed} FAILED: {line}", style="red")
            return "FAIL", line
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: fail the trial, stop the loop
            _quietly(trial.set_user_attr, "error", _one_line(exc) if str(exc) else type(exc).__name__)
            if tracker is not None and run_id is not None:
                _quietly(tracker.kill_run, run_id, f"interrupted ({type(exc).__name__})")
            _quietly(study.tell, trial, state=TrialState.FAIL)
            raise


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def _quietly(fn: Callable, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        log.warning("%s failed while recording a trial's end: %s", getattr(fn, "__name__", fn), exc)


def _work_loop(ctx: _Ctx, max_trials: Optional[int] = None) -> list[tuple[str, Optional[str]]]:
    done: list[tuple[str, Optional[str]]] = []
    while max_trials is None or len(done) < max_trials:
        tid = _pop_waiting(ctx)
        if tid is None:
            break
        done.append(_run_one(ctx, tid))
    return done


# ------------------------------------------------------------------------------------ opening
def _open_study(recipe: Recipe, name: str, stores: Stores, create: bool, salt: int = 0) -> tuple[Any, "optuna.Study", int]:
    storage = open_storage(stores.storage)
    directions = [o.direction for o in _objectives(recipe)]
    if create:
        study = optuna.create_study(
            study_name=name, storage=storage, directions=directions, load_if_exists=True,
            sampler=optuna.samplers.RandomSampler(), pruner=make_pruner(recipe),
        )
    else:
        try:
            study = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(), pruner=make_pruner(recipe))
        except KeyError:
            raise SweepError(f"study '{name}' does not exist in {stores.storage}; run the recipe first") from None
    if [d.name.lower() for d in study.directions] != directions:
        raise SweepError(f"study '{name}' in {stores.storage} has directions {[d.name.lower() for d in study.directions]}, the recipe {directions}")
    study.sampler = make_sampler(recipe, len(study.get_trials(deepcopy=False)), salt)
    study_id = storage.get_study_id_from_name(name)
    return storage, study, study_id


def _account(ctx: _Ctx) -> dict[str, Any]:
    trials = ctx.study.get_trials(deepcopy=False)
    states = _slot_states(trials)
    out = {"total": 0, "complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0, "failures": []}
    last_error: dict[tuple, str] = {}
    for t in trials:
        key = _slot_key(t.user_attrs)
        if key is not None and t.state == TrialState.FAIL:
            last_error[key] = t.user_attrs.get("error", "failed")
    for slot in _wanted(ctx, trials):
        out["total"] += 1
        st = states.get(slot.key, set())
        if TrialState.COMPLETE in st:
            out["complete"] += 1
        elif TrialState.PRUNED in st:
            out["pruned"] += 1
        elif TrialState.RUNNING in st:
            out["running"] += 1
        elif TrialState.WAITING in st:
            out["waiting"] += 1
        elif TrialState.FAIL in st:
            out["failed"] += 1
            point = slot.point or next(
                (t.user_attrs.get("point") for t in trials if _slot_key(t.user_attrs) == slot.key and t.user_attrs.get("point")),
                f"#{slot.config}",
            )
            out["failures"].append((point, slot.seed, last_error.get(slot.key, "failed")))
    return out


def _rows(ctx: _Ctx) -> tuple[list[ReportRow], Optional[ParetoFront]]:
    trials = ctx.study.get_trials(deepcopy=False)
    metrics = [o.metric for o in ctx.objectives]
    rows = rows_from_trials(
        trials, order=[pid for pid, _, _ in _configurations(ctx.recipe)], keys=metrics, method=ctx.recipe.method.name
    )  # labelled as `repsearch compare` labels them (report.config_label)
    pareto = None
    if len(metrics) > 1:
        pareto = pareto_front(ctx.study, metrics)
        pareto.title = f"{ctx.name}: Pareto front ({', '.join(f'{o.metric} {o.direction}' for o in ctx.objectives)})"
    return rows, pareto


def _default_trial_fn() -> Callable:
    from repsearch.trial import run_trial

    return run_trial


def _workers(recipe: Recipe, workers: Optional[int]) -> int:
    n = workers if workers is not None else (recipe.sweep.workers if recipe.sweep is not None else 1)
    if n > 1:
        raise SweepError(
            f"sweep.workers: {n} parallel workers are not implemented yet; use workers: 1"
        )
    return n


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
) -> StudySummary:
    """Create (or resume) the recipe's study, enqueue what is missing and run it in-process.

    Args:
        recipe: the validated recipe (a recipe without ``sweep`` is one trial).
        recipe_path, profile: name the study (:func:`repsearch.spec.study_name`) and the experiment.
        stores: from :func:`repsearch.tracking.resolve_stores`.
        device: ``cpu``, ``cuda`` or ``cuda:N`` (recorded as the ``device`` tag).
        data_root: passed to ``trial_fn``.
        trial_fn: ``trial_fn(recipe, *, data_root, device, out_dir, on_epoch, progress)`` returning an
            object with ``final`` (dict), ``history`` (list of dicts) and ``artifacts`` (paths);
            default :func:`repsearch.trial.run_trial`.
        console: a ``rich.console.Console`` for one line per trial (None: logging only).
        progress: passed to ``trial_fn`` (progress bars).
        workers: overrides ``sweep.workers``.

    Returns:
        :class:`StudySummary`. When nothing is left it prints
        ``study <name>: 7/7 trials complete, nothing to run`` and creates no run.

    Raises:
        SweepError: workers > 1, a storage that cannot be opened, a malformed sweep.
        KeyboardInterrupt: after failing the running trial (its MLflow run KILLED).
    """
    _workers(recipe, workers)
    _check_sweep(recipe)
    plan_points(recipe)  # raises on duplicate points
    name = make_study_name(recipe_path, profile, recipe)
    rhash = recipe_hash(recipe)
    storage, study, study_id = _open_study(recipe, name, stores, create=True)
    study.set_user_attr("recipe_hash", rhash)
    study.set_user_attr("recipe_yaml", recipe_yaml(recipe))
    tracker = Tracker(stores)
    ctx = _Ctx(
        recipe=recipe, stores=stores, name=name, storage=storage, study=study, study_id=study_id, tracker=tracker,
        parent_run_id=None, device=device, data_root=data_root, trial_fn=trial_fn or _default_trial_fn(),
        console=console, progress=progress, rhash=rhash,
    )
    _fail_stale(ctx)
    _enqueue_missing(ctx)
    acc = _account(ctx)
    if acc["waiting"] == 0:
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
    ctx.parent_run_id = tracker.parent_run(
        name,
        tags={"recipe_hash": rhash, "sampler": recipe.sweep.sampler if recipe.sweep else "none", "optuna.storage": stores.storage},
        recipe_text=recipe_yaml(recipe),
    )
    study.set_user_attr("mlflow_parent_run_id", ctx.parent_run_id)
    ctx.say(f"study {name}: {acc['complete'] + acc['pruned']}/{acc['total']} trials complete, {acc['waiting']} to run")
    status = "FAILED"
    try:
        outcomes = _work_loop(ctx)
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


def work(
    study_name: str,
    stores: Stores,
    *,
    recipe: Optional[Recipe] = None,
    device: str,
    data_root: Optional[str],
    trial_fn: Optional[Callable] = None,
    console: Any = None,
    progress: bool = True,
    max_trials: Optional[int] = None,
) -> int:
    """A worker: pop WAITING trials of an existing study and run them until none is left.

    Creates nothing (the parent created the storage, the study, the MLflow experiment and the parent
    run, and enqueued the points). Without ``recipe`` the study's recipe is read back from its user
    attribute ``recipe_yaml``. Returns the number of trials run.

    Raises:
        SweepError: the study does not exist.
    """
    import yaml

    storage = open_storage(stores.storage)
    try:
        attrs = optuna.load_study(study_name=study_name, storage=storage).user_attrs
    except KeyError:
        raise SweepError(f"study '{study_name}' does not exist in {stores.storage}; run the recipe first") from None
    if recipe is None:
        recipe = Recipe.model_validate(yaml.safe_load(attrs["recipe_yaml"]))
    storage, study, study_id = _open_study(recipe, study_name, stores, create=False, salt=os.getpid())
    tracker = Tracker(stores)
    parent = attrs.get("mlflow_parent_run_id") or tracker.find_parent(study_name)
    ctx = _Ctx(
        recipe=recipe, stores=stores, name=study_name, storage=storage, study=study, study_id=study_id, tracker=tracker,
        parent_run_id=parent, device=device, data_root=data_root, trial_fn=trial_fn or _default_trial_fn(),
        console=console, progress=progress, rhash=attrs.get("recipe_hash", recipe_hash(recipe)),
    )
    return len(_work_loop(ctx, max_trials))


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
