"""A worker: pop a study's trials, run each end to end, record the result; poll until the study is done.

DESIGN.md "Sweeps — contract". One function runs a popped trial (:func:`_run_one`): its configuration
(a grid point read back, or proposed by the sampler), an MLflow child run, the training
(``trial_fn``), the objective, the tags, and Optuna's ``tell``. A trial that raises is FAIL (user
attribute ``error``), its MLflow run FAILED with the error, and the worker goes on; a pruned trial is
PRUNED in Optuna and a FINISHED MLflow run tagged ``pruned=true``; a KeyboardInterrupt fails the
trial, marks its run KILLED and propagates. A trial that another process failed as stale while it
ran (its heartbeat was lost) is reported and skipped, never a dead worker.

Resume (DESIGN.md "Checkpoints and resume — contract"): before training, a trial looks for the
newest FAIL trial of its slot (same point and seed) whose folder ``runs/trials/<study>/<NNNN>/
checkpoints/`` holds a checkpoint written for the same trial recipe, and passes it to the trial
function as ``resume_from``; it records ``resumed_from`` ("trial N epoch E", user attribute and
MLflow tag), ``resume_checkpoint`` (the file) and ``resumed_from_run`` (the old MLflow run id, a tag
linking the new child run to the KILLED/FAILED one, which stays as it is). The trial function replays
the checkpoint's epochs to ``on_epoch``, so the new child run holds the whole metric history. A
checkpoint whose resume failed with a ``CheckpointError`` is not tried again. ``ctx.resume`` False
(``--no-resume``) starts every point from scratch. Checkpoints of a slot are removed once it is
COMPLETE or PRUNED, and never logged as MLflow artifacts.

Objectives are the final values of the objective metrics (``TrialResult.final``); a trial's
non-numeric final facts (``TrialResult.tags``, e.g. ``precision``, ``not_learning``) are tags of its
MLflow child run and the user attribute ``tags``. The pruner (median / hyperband) sees the objective
metric every epoch, or ``val/top1`` when the objective is not a per-epoch measure and is maximised.

The same loop serves the in-process runner (``repsearch run``), each process of
``repsearch run --workers N`` (:mod:`repsearch.sweep.pool`) and ``repsearch worker STUDY --storage
URL`` on any machine, which needs nothing but the storage: the study's user attributes carry the
recipe, the MLflow tracking URI, experiment and artifact location, and the parent's git commit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from repsearch.spec import Choices, Recipe, recipe_hash, trial_recipe
from repsearch.sweep.plan import SweepError, _Slot, _configurations, _encode, _seeds, _slot_key, point_id
from repsearch.sweep.queue import _Ctx, _enqueue, _enqueue_missing, _fail_stale, _pop_waiting, process_start_id
from repsearch.sweep.storage import _open_study, open_storage, storage_kind
from repsearch.tracking import Stores, Tracker, flatten_params

log = logging.getLogger(__name__)

#: A trial folder's checkpoints (:data:`repsearch.checkpoint.DIRNAME`; that module imports torch, so
#: it is imported where a trial runs, not here).
CHECKPOINTS = "checkpoints"

#: Seconds between polls of an empty queue while the study's trials run in other workers.
POLL_S = 2.0
#: Seconds between stale-trial checks of a polling worker (each one reads the MLflow store too).
STALE_CHECK_S = 10.0


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


def _trial_dir(ctx: _Ctx, number: int) -> Path:
    """``<runs>/trials/<study>/<NNNN>``: a trial's scratch folder (artifacts, checkpoints)."""
    return ctx.stores.runs_dir / "trials" / ctx.name / f"{number:04d}"


def _slot_failures(ctx: _Ctx, number: int, attrs: dict) -> list[FrozenTrial]:
    """The FAIL trials of the slot of ``attrs`` (same point and seed) other than ``number``, newest
    first; trials failed as duplicates (never run) are left out."""
    key = _slot_key(attrs)
    if key is None:
        return []
    failed = ctx.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    same = [t for t in failed if t.number != number and _slot_key(t.user_attrs) == key and "duplicate_of" not in t.user_attrs]
    return sorted(same, key=lambda t: -t.number)


def _resume_point(ctx: _Ctx, number: int, attrs: dict, recipe: Recipe) -> Optional[tuple[FrozenTrial, Path, int]]:
    """``(failed trial, checkpoint file, its epoch)`` to resume trial ``number`` from: the newest
    checkpoint of the newest FAIL trial of the same slot that holds one written for this trial
    recipe (its hash) and whose resume has not already failed with a ``CheckpointError``; None when
    there is none. Reads only the checkpoints' headers (memory-mapped)."""
    from repsearch.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint

    same = _slot_failures(ctx, number, attrs)
    tried_bad = {
        str(t.user_attrs["resume_checkpoint"]) for t in same
        if t.user_attrs.get("resume_checkpoint") and str(t.user_attrs.get("error", "")).startswith("CheckpointError")
    }
    want = recipe_hash(recipe)
    for t in same:
        path = latest_checkpoint(_trial_dir(ctx, t.number) / CHECKPOINTS)
        if path is None:
            continue
        if str(path) in tried_bad:
            log.warning("trial %d: checkpoint %s failed to resume before; not used", number, path)
            continue
        try:
            head = load_checkpoint(path, mmap=True)
        except CheckpointError as exc:
            log.warning("trial %d: %s; not used", number, exc)
            continue
        if head.get("meta", {}).get("recipe_hash") != want:
            log.warning("trial %d: checkpoint %s was written for another trial recipe; not used", number, path)
            continue
        return t, path, int(head["epoch"])
    return None


def _drop_slot_checkpoints(ctx: _Ctx, number: int, attrs: dict) -> None:
    """Remove the checkpoints of trial ``number`` and of its slot's failed trials (the slot is done:
    nothing will resume them), and their folders when nothing else is left in them."""
    from repsearch.checkpoint import remove_checkpoints

    for n in [number] + [t.number for t in _slot_failures(ctx, number, attrs)]:
        folder = _trial_dir(ctx, n)
        if (folder / CHECKPOINTS).exists():
            remove_checkpoints(folder / CHECKPOINTS)
            for parent in (folder, folder.parent, folder.parent.parent):
                try:
                    parent.rmdir()  # only when empty
                except OSError:
                    break


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
        ("worker_id", ctx.worker_id),
    ):
        trial.set_user_attr(k, v)
    run_id: Optional[str] = None
    out_dir = _trial_dir(ctx, trial.number)
    t0 = time.perf_counter()
    last_epoch = [0]
    seed = int(attrs["seed"])
    point = attrs.get("point")
    label = f"trial {trial.number}: {point} seed {seed}"
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
            _notify(ctx, "start", trial=trial.number, label=label, epochs=ctx.recipe.train.epochs)
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
            # -- resume from the checkpoint a failed or killed trial of this slot left ----------
            resume = _resume_point(ctx, trial.number, attrs, recipe) if ctx.resume else None
            extra: dict[str, Any] = {}
            if resume is not None:
                prev, path, epoch = resume
                text = f"trial {prev.number} epoch {epoch}"
                trial.set_user_attr("resumed_from", text)
                trial.set_user_attr("resume_checkpoint", str(path))
                if tracker is not None:
                    tracker.set_tags(run_id, {"resumed_from": text, "resumed_from_run": prev.user_attrs.get("mlflow_run_id", "unknown")})
                ctx.say(f"{label}: resumed from {text}")
                extra["resume_from"] = path

            def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
                last_epoch[0] = epoch
                _notify(ctx, "epoch", trial=trial.number, epoch=epoch, val_top1=metrics.get("val/top1"))
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
                recipe, data_root=ctx.data_root, device=ctx.device, out_dir=out_dir, on_epoch=on_epoch, progress=ctx.progress,
                **extra,
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
            _tell(ctx, trial, values=values if len(values) > 1 else values[0])
            _quietly(_drop_slot_checkpoints, ctx, trial.number, attrs)
            if tracker is not None and out_dir.is_dir():
                shutil.rmtree(out_dir, ignore_errors=True)  # logged to MLflow; no second copy
                for parent in (out_dir.parent, out_dir.parent.parent):
                    try:
                        parent.rmdir()  # only when empty
                    except OSError:
                        break
            shown = ", ".join(f"{o.metric} {v:.4g}" for o, v in zip(ctx.objectives, values))
            ctx.say(f"{label}: {shown} ({time.perf_counter() - t0:.1f} s)")
            _notify(ctx, "end", trial=trial.number, state="COMPLETE", text=shown)
            return "COMPLETE", None
        except optuna.TrialPruned as exc:
            trial.set_user_attr("pruned_at_epoch", last_epoch[0])
            if tracker is not None and run_id is not None:
                _quietly(tracker.finish_trial, run_id, status="FINISHED", tags={"pruned": "true", "pruned_at_epoch": last_epoch[0]})
            _tell(ctx, trial, state=TrialState.PRUNED)
            _quietly(_drop_slot_checkpoints, ctx, trial.number, attrs)
            ctx.say(f"trial {trial.number}: {point} seed {seed}: {exc}")
            _notify(ctx, "end", trial=trial.number, state="PRUNED", text=str(exc))
            return "PRUNED", None
        except Exception as exc:
            line = _one_line(exc)
            tb = traceback.format_exc()
            if _finished_elsewhere(ctx, trial_id):  # failed as stale by another process meanwhile
                why = f"trial {trial.number} was failed by another process while it ran (heartbeat lost?); its point runs again"
                log.warning("%s (%s)", why, line)
                if tracker is not None and run_id is not None:
                    _quietly(tracker.kill_run, run_id, why)
                ctx.say(f"{label}: {why}", style="yellow")
                _notify(ctx, "end", trial=trial.number, state="LOST", text=why)
                return "LOST", why
            log.debug("trial %d failed:\n%s", trial.number, tb)
            _quietly(trial.set_user_attr, "error", line)
            if tracker is not None and run_id is not None:
                if out_dir.is_dir():  # what the trial wrote, for the post-mortem (checkpoints stay for a resume)
                    _quietly(tracker.log_artifacts, run_id, sorted(p for p in out_dir.iterdir() if p.name != CHECKPOINTS))
                _quietly(tracker.fail_trial, run_id, line, tb)
            _tell(ctx, trial, state=TrialState.FAIL)
            ctx.say(f"trial {trial.number}: {point} seed {seed} FAILED: {line}", style="red")
            _notify(ctx, "end", trial=trial.number, state="FAIL", text=line)
            return "FAIL", line
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: fail the trial, stop the loop
            _quietly(trial.set_user_attr, "error", _one_line(exc) if str(exc) else type(exc).__name__)
            if tracker is not None and run_id is not None:
                _quietly(tracker.kill_run, run_id, f"interrupted ({type(exc).__name__})")
            _quietly(study.tell, trial, state=TrialState.FAIL, skip_if_finished=True)
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


def _work_loop(ctx: _Ctx, max_trials: Optional[int] = None, poll_s: float = POLL_S) -> list[tuple[str, Optional[str]]]:
    """Pop and run WAITING trials until none is left AND no trial of the study is RUNNING.

    While other workers' trials run, the queue may still grow: a non-grid study's propose trial
    enqueues its configuration's other seeds when it starts, and a trial whose worker died is failed
    as stale and enqueued again (:func:`repsearch.sweep.queue._enqueue_missing` with ``only_stale``,
    under the study lock, every :data:`STALE_CHECK_S` seconds). So the loop polls every ``poll_s``
    seconds until the study has nothing running. Returns (state, error) per trial run here.
    """
    done: list[tuple[str, Optional[str]]] = []
    last_check = 0.0
    while max_trials is None or len(done) < max_trials:
        tid = _pop_waiting(ctx)
        if tid is not None:
            done.append(_run_one(ctx, tid))
            continue
        if not ctx.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            break
        if time.monotonic() - last_check >= STALE_CHECK_S:
            last_check = time.monotonic()
            with ctx.lock():
                _fail_stale(ctx)
                if _enqueue_missing(ctx, only_stale=True):
                    continue
        _notify(ctx, "idle")
        time.sleep(poll_s)
    return done


def _tell(ctx: _Ctx, trial: "optuna.Trial", **kwargs: Any) -> None:
    """``study.tell`` that survives a trial failed meanwhile by another process (stale): it logs the
    lost result instead of raising, so the worker goes on with the next trial."""
    frozen = ctx.study.tell(trial, skip_if_finished=True, **kwargs)
    wanted = kwargs.get("state") or TrialState.COMPLETE
    if frozen.state != wanted:
        log.warning("trial %d was already %s when its worker told %s (failed as stale by another process?)",
                    trial.number, frozen.state.name, wanted.name)


def _finished_elsewhere(ctx: _Ctx, trial_id: int) -> bool:
    try:
        return ctx.storage.get_trial(trial_id).state.is_finished()
    except Exception:  # the storage itself is unreachable: not a stale-trial case
        return False


def _notify(ctx: _Ctx, event: str, **data: Any) -> None:
    if ctx.notify is not None:
        try:
            ctx.notify(event, **data)
        except Exception as exc:  # a progress display must never cost a trial
            log.debug("progress event %s lost: %s", event, exc)


def _default_trial_fn() -> Callable:
    from repsearch.trial import run_trial

    return run_trial


def study_stores(study_name: str, storage_url: str, *, runs_dir: Optional[str | Path] = None,
                 tracking_uri: Optional[str] = None) -> tuple[Stores, dict[str, Any]]:
    """The stores a worker uses for an existing study, read from the study's user attributes (set by
    the parent: ``tracking_uri``, ``experiment``, ``artifact_location``), so ``--storage`` is all a
    worker needs. ``runs_dir`` (default ``./runs``) only holds the trials' scratch folders here;
    ``tracking_uri`` overrides the recorded one. Returns (stores, the study's user attributes).

    Raises:
        SweepError: the storage cannot be opened or holds no such study, or the study was made by a
            repsearch without these attributes (run the recipe again with this version first).
    """
    storage = open_storage(storage_url)
    try:
        attrs = dict(optuna.load_study(study_name=study_name, storage=storage).user_attrs)
    except KeyError:
        raise SweepError(f"study '{study_name}' does not exist in {storage_url}; run the recipe first") from None
    missing = [k for k in ("recipe_yaml", "tracking_uri", "experiment") if k not in attrs]
    if missing:
        raise SweepError(f"study '{study_name}' lacks the user attribute(s) {', '.join(missing)}; run its recipe again with this repsearch first")
    runs = Path(runs_dir or "runs").expanduser().resolve()
    runs.mkdir(parents=True, exist_ok=True)
    stores = Stores(runs_dir=runs, tracking_uri=tracking_uri or attrs["tracking_uri"], storage=storage_url,
                    experiment=attrs["experiment"], artifact_location=attrs.get("artifact_location"))
    return stores, attrs


def check_worker_host(study_name: str, stores: Stores, attrs: dict[str, Any], host: Optional[str] = None) -> None:
    """Refuse, with one line, a worker that cannot serve this study from this host.

    - a different git commit from the study's parent (``git_commit``; unknown on either side passes);
    - another host than the parent's (``host``) on a one-machine store: the journal storage (no
      heartbeats, so a trial whose worker died there would block its point forever) or SQLite, or a
      local MLflow store (its runs would land in this host's folder, not the study's).

    Raises:
        SweepError: one of the above.
    """
    from repsearch.tracking import _is_local_tracking, git_info

    here = git_info().get("git_commit", "unknown")
    there = attrs.get("git_commit", "unknown")
    if "unknown" not in (here, there) and here != there:
        raise SweepError(f"study '{study_name}' was made on commit {there[:12]}, this worker runs {here[:12]}: check out {there[:12]} first")
    host = host or socket.gethostname()
    origin = attrs.get("host")
    if origin is None or origin == host:
        return
    kind = storage_kind(stores.storage)
    if kind == "journal":
        raise SweepError(f"study '{study_name}' lives in a journal file made on {origin}: the journal storage has no heartbeats, so "
                         "workers on other hosts need PostgreSQL (--storage postgresql://...)")
    if kind == "sqlite":
        raise SweepError(f"study '{study_name}' lives in an SQLite file made on {origin}: SQLite serves one machine; use PostgreSQL for workers on other hosts")
    if _is_local_tracking(stores.tracking_uri):
        raise SweepError(f"study '{study_name}' logs to a local MLflow store ({stores.tracking_uri}) on {origin}: workers on other hosts need "
                         "a tracking server (mlflow server --artifacts-destination ... --host 0.0.0.0) passed as --tracking-uri to repsearch run")


def work(
    study_name: str,
    stores: Optional[Stores] = None,
    *,
    storage: Optional[str] = None,
    recipe: Optional[Recipe] = None,
    device: str,
    data_root: Optional[str],
    trial_fn: Optional[Callable] = None,
    console: Any = None,
    progress: bool = True,
    max_trials: Optional[int] = None,
    runs_dir: Optional[str | Path] = None,
    tracking_uri: Optional[str] = None,
    worker_id: Optional[int] = None,
    notify: Optional[Callable[..., None]] = None,
    poll_s: Optional[float] = None,
    resume: bool = True,
) -> int:
    """A worker (``repsearch worker``, a process of ``repsearch run --workers N``, or a test): pop
    WAITING trials of an existing study and run them until none is left and none runs elsewhere.

    Creates nothing (the parent created the storage, the study, the MLflow experiment and the parent
    run, and enqueued the points). Give ``stores``, or only ``storage`` (a URL): the rest is read from
    the study's user attributes (:func:`study_stores`) and checked (:func:`check_worker_host`).
    Without ``recipe`` the study's recipe is read back from its user attribute ``recipe_yaml``.

    Args:
        device: ``cpu``, ``cuda`` or ``cuda:N`` for this worker's trials.
        notify: ``notify(event, **data)`` receives ``say``/``start``/``epoch``/``end``/``idle`` events
            (a process pool's progress display); with it, ``console`` is not used.
        poll_s: seconds between polls of an empty queue while trials run elsewhere (default
            :data:`POLL_S`).
        resume: resume a point from the checkpoint its failed or killed trial left in this runs
            folder (False: ``--no-resume``, from scratch).

    Returns:
        The number of trials run here.

    Raises:
        SweepError: the study does not exist, or this worker cannot serve it (commit, host, stores).
    """
    import yaml

    if stores is None:
        if storage is None:
            raise SweepError("a worker needs --storage (the study's Optuna storage URL)")
        stores, attrs = study_stores(study_name, storage, runs_dir=runs_dir, tracking_uri=tracking_uri)
    else:
        st = open_storage(stores.storage)
        try:
            attrs = dict(optuna.load_study(study_name=study_name, storage=st).user_attrs)
        except KeyError:
            raise SweepError(f"study '{study_name}' does not exist in {stores.storage}; run the recipe first") from None
    check_worker_host(study_name, stores, attrs)
    if recipe is None:
        recipe = Recipe.model_validate(yaml.safe_load(attrs["recipe_yaml"]))
    st, study, study_id = _open_study(recipe, study_name, stores, create=False, salt=os.getpid())
    tracker = Tracker(stores)
    parent = attrs.get("mlflow_parent_run_id") or tracker.find_parent(study_name)
    ctx = _Ctx(
        recipe=recipe, stores=stores, name=study_name, storage=st, study=study, study_id=study_id, tracker=tracker,
        parent_run_id=parent, device=device, data_root=data_root, trial_fn=trial_fn or _default_trial_fn(),
        console=console, progress=progress, rhash=attrs.get("recipe_hash", recipe_hash(recipe)),
        notify=notify, worker_id=worker_id, resume=resume,
    )
    return len(_work_loop(ctx, max_trials, POLL_S if poll_s is None else poll_s))
