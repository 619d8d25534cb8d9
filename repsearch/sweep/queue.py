"""The queue of a study: enqueueing slots, popping them, failing stale trials, accounting.

DESIGN.md "Sweeps — contract". Every read-then-write step that more than one process may run at once
(fail stale trials, enqueue missing slots) runs under the study lock (``ctx.lock()``,
:func:`repsearch.sweep.storage.study_lock`); popping is one atomic WAITING -> RUNNING update, and a
popped duplicate is failed, never run.

- A slot (point × seed, :mod:`repsearch.sweep.plan`) is enqueued when it has no COMPLETE or PRUNED
  trial and no WAITING or RUNNING one (``study.enqueue_trial``; point id, overrides and seed in
  ``user_attrs``). A FAILED slot is therefore enqueued again by the next run; ``GridSampler`` and
  ``skip_if_exists`` are never used.
- Stale trials: RUNNING trials whose recorded worker (host name, pid and the process's start time,
  in user attributes) is gone from this host, at once, and those whose heartbeat expired
  (``optuna.storages.fail_stale_trials``); their MLflow child runs are marked KILLED, and so is every
  other RUNNING child run of the study whose trial is not RUNNING (a worker killed after creating the
  run but before recording its id in the trial). A worker that finds the queue empty while trials
  still run re-enqueues slots failed as stale, so a SIGKILLed worker's point is run by another.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
import warnings
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from repsearch.report import ParetoFront, ReportRow, pareto_front, rows_from_trials
from repsearch.spec import Objective, Recipe
from repsearch.sweep.plan import (
    _ACTIVE, _FINISHED, _Slot, _configurations, _grid_params, _objectives, _slot_key, _slot_states, _wanted, is_grid,
)
from repsearch.sweep import storage as _storage
from repsearch.sweep.storage import study_lock
from repsearch.tracking import Stores, Tracker

log = logging.getLogger(__name__)

#: The ``error`` of a trial failed because its worker died (heartbeat expired, process gone).
STALE_PREFIX = "stale: "
#: A slot failed as stale more than this many times is not enqueued again by polling workers.
MAX_STALE_RETRIES = 2


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
    #: ``notify(event, **data)``: trial events for a process pool's progress display (None: none).
    notify: Optional[Callable[..., None]] = None
    #: this worker's index in a pool (None: the in-process runner or ``repsearch worker``).
    worker_id: Optional[int] = None
    #: resume a point from the checkpoint its failed or killed trial left (``--no-resume``: False).
    resume: bool = True

    @property
    def grid(self) -> bool:
        return is_grid(self.recipe)

    @property
    def objectives(self) -> list[Objective]:
        return _objectives(self.recipe)

    def say(self, text: str, style: Optional[str] = None) -> None:
        log.info(text)
        if self.notify is not None:
            self.notify("say", text=text, style=style)
        elif self.console is not None:
            self.console.print(text, style=style, markup=False, highlight=False)

    def lock(self):
        """The study lock (:func:`repsearch.sweep.storage.study_lock`)."""
        return study_lock(self.stores.storage, self.storage, self.name)


def _enqueue(ctx: _Ctx, slot: _Slot) -> None:
    attrs: dict[str, Any] = {"seed": slot.seed, "kind": slot.kind}
    if slot.point is not None:
        attrs["point"] = slot.point
    if slot.overrides is not None:
        attrs["overrides"] = json.dumps(slot.overrides)
    if slot.config is not None:
        attrs["config"] = slot.config
    ctx.study.enqueue_trial(params=_grid_params(ctx.recipe, slot), user_attrs=attrs)


def _enqueue_missing(ctx: _Ctx, only_stale: bool = False) -> int:
    """Enqueue every slot without a COMPLETE/PRUNED trial and without a WAITING/RUNNING one; call it
    under the study lock. ``only_stale`` (a worker polling an empty queue): only slots whose last trial
    was failed as stale (its worker died), at most :data:`MAX_STALE_RETRIES` times, so a trial that
    fails by itself is not retried in a loop (a new ``repsearch run`` retries it). Returns the count."""
    trials = ctx.study.get_trials(deepcopy=False)
    states = _slot_states(trials)
    last: dict[tuple, FrozenTrial] = {}
    stale_count: dict[tuple, int] = {}
    for t in trials:
        key = _slot_key(t.user_attrs)
        if key is not None:
            last[key] = t  # trials come in number order
            if failed_as_stale(t):
                stale_count[key] = stale_count.get(key, 0) + 1
    n = 0
    for slot in _wanted(ctx.recipe, trials):
        if slot.kind == "pending":
            continue
        if states.get(slot.key, set()) & set(_FINISHED + _ACTIVE):
            continue
        if only_stale:
            t = last.get(slot.key)
            if t is None or not failed_as_stale(t) or stale_count.get(slot.key, 0) > MAX_STALE_RETRIES:
                continue
            log.warning("slot %s: trial %d was failed as stale; enqueued again", slot.key, t.number)
        _enqueue(ctx, slot)
        n += 1
    return n


def _count_missing(ctx: _Ctx) -> int:
    """How many slots :func:`_enqueue_missing` would enqueue now (nothing is written)."""
    trials = ctx.study.get_trials(deepcopy=False)
    states = _slot_states(trials)
    return sum(
        1 for slot in _wanted(ctx.recipe, trials)
        if slot.kind != "pending" and not states.get(slot.key, set()) & set(_FINISHED + _ACTIVE)
    )


def failed_as_stale(t: FrozenTrial) -> bool:
    """Whether a FAIL trial was failed because its worker died (:func:`_fail_stale`'s ``stale: …``
    error, or Optuna's heartbeat check, which records no error) rather than by its own error."""
    if t.state != TrialState.FAIL or "duplicate_of" in t.user_attrs:
        return False
    err = t.user_attrs.get("error")
    return err is None or str(err).startswith(STALE_PREFIX)


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
            reason = f"{STALE_PREFIX}worker {ctx.host}:{pid} is gone"
        elif pid is None and t.datetime_start is not None and (now - t.datetime_start).total_seconds() > _storage.GRACE_PERIOD_S:
            reason = f"{STALE_PREFIX}taken {_storage.GRACE_PERIOD_S}+ s ago by a worker that never recorded itself"
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
        reason = reasons.get(t.number, f"{STALE_PREFIX}heartbeat older than {_storage.GRACE_PERIOD_S} s")
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


def _pop_waiting(ctx: _Ctx) -> Optional[int]:
    """Take the oldest WAITING trial (WAITING -> RUNNING in the storage, atomic on every storage:
    :mod:`repsearch.sweep.storage`); None when none is left.

    A popped trial whose slot already has a COMPLETE/PRUNED trial, or an older WAITING/RUNNING one
    (a point enqueued twice, e.g. by two parents before the study lock existed, or a re-enqueue
    racing a late finish), is failed at once as a duplicate (user attributes ``error`` and
    ``duplicate_of``), never run, and the next one is taken.
    """
    for t in ctx.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        tid = ctx.storage.get_trial_id_from_study_id_trial_number(ctx.study_id, t.number)
        try:
            if not ctx.storage.set_trial_state_values(tid, state=TrialState.RUNNING):
                continue
        except UpdateFinishedTrialError:
            continue
        dup = _duplicate_of(ctx, t)
        if dup is None:
            return tid
        why = f"duplicate of trial {dup} (same point and seed); not run"
        log.warning("trial %d: %s", t.number, why)
        try:
            ctx.storage.set_trial_user_attr(tid, "duplicate_of", dup)
            ctx.storage.set_trial_user_attr(tid, "error", why)
            ctx.storage.set_trial_state_values(tid, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            pass
    return None


def _duplicate_of(ctx: _Ctx, popped: FrozenTrial) -> Optional[int]:
    key = _slot_key(popped.user_attrs)
    if key is None:
        return None
    for t in ctx.study.get_trials(deepcopy=False):
        if t.number == popped.number or _slot_key(t.user_attrs) != key:
            continue
        if t.state in _FINISHED or (t.state in _ACTIVE and t.number < popped.number):
            return t.number
    return None


def _account(ctx: _Ctx) -> dict[str, Any]:
    trials = ctx.study.get_trials(deepcopy=False)
    states = _slot_states(trials)
    out = {"total": 0, "complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0, "failures": []}
    last_error: dict[tuple, str] = {}
    for t in trials:
        key = _slot_key(t.user_attrs)
        if key is not None and t.state == TrialState.FAIL:
            last_error[key] = t.user_attrs.get("error", "failed")
    for slot in _wanted(ctx.recipe, trials):
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
