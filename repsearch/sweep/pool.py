"""``repsearch run --workers N``: N worker processes on one study, one progress line per worker.

The parent (:func:`repsearch.sweep.study.run_study`) has created the stores, the MLflow parent run and
the queue; :func:`run_pool` starts N processes (``multiprocessing`` with the ``spawn`` start method:
nothing of the parent's torch threads, CUDA context or database connections is inherited), each
running the same worker loop as ``repsearch worker`` (:func:`repsearch.sweep.worker.work`), and
waits. Scheduling is Optuna's: the workers pop WAITING trials from the study's storage.

- **Devices**: on CUDA one worker per device, round-robin over ``devices`` (default: every visible
  GPU), pinned with ``CUDA_VISIBLE_DEVICES`` (the worker then uses ``cuda``). On CPU each worker gets
  ``torch.set_num_threads(max(1, cores // N))`` (and ``OMP_NUM_THREADS``): measured on 2 cores, two
  2-thread processes at once collapse to 192 img/s each, two 1-thread processes run 1,190 + 1,172.
- **Progress**: each worker sends its trial events through a queue; the parent shows one line per
  worker (rich), with the trial, its epoch and last ``val/top1``, and prints each trial's start and
  result above them.
- **Ctrl-C**: every worker fails its running trial and marks its MLflow run KILLED (one SIGINT each;
  a second one is ignored so that this cleanup finishes), the parent waits up to
  :data:`STOP_GRACE_S` seconds, terminates the rest, fails their trials as stale, and re-raises.
  Finished trials are in the storage: nothing finished is lost.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import sys
from typing import Any, Callable, Optional

from repsearch.errors import UserError
from repsearch.sweep.plan import SweepError
from repsearch.sweep.queue import _Ctx, _fail_stale

log = logging.getLogger(__name__)

#: Seconds the parent waits for interrupted workers to record their trials before terminating them.
STOP_GRACE_S = 60.0


def cpu_cores() -> int:
    """CPU cores this process may run on (``sched_getaffinity``; ``os.cpu_count`` elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_plan(n: int, device: str, devices: Optional[list[str]] = None, cores: Optional[int] = None) -> list[dict[str, Any]]:
    """Per-worker placement: ``[{"worker_id", "device", "threads", "env"}]``.

    Args:
        n: worker processes (>= 1).
        device: the run's device: ``cpu``, ``cuda`` or ``cuda:N``.
        devices: CUDA device ids for round-robin placement (default: ``N`` of ``cuda:N``, else every
            visible GPU).
        cores: CPU cores to share (default :func:`cpu_cores`).

    Raises:
        SweepError: ``devices`` with a CPU run, or no CUDA device to place workers on.
    """
    cores = cores or cpu_cores()
    threads = max(1, cores // n)
    env_threads = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if not device.startswith("cuda"):
        if devices:
            raise SweepError("--devices places workers on CUDA devices; this run is on the CPU (--device cpu)")
        return [{"worker_id": i, "device": device, "threads": threads, "env": dict(env_threads)} for i in range(n)]
    if not devices:
        if ":" in device:
            devices = [device.split(":", 1)[1]]
        else:
            import torch

            devices = [str(i) for i in range(torch.cuda.device_count())]
    if not devices:
        raise SweepError("no CUDA device to place the workers on")
    return [
        {"worker_id": i, "device": "cuda", "threads": threads,
         "env": {**env_threads, "CUDA_VISIBLE_DEVICES": str(devices[i % len(devices)])}}
        for i in range(n)
    ]


def _on_sigint(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # one interrupt is enough: let the trial's cleanup finish
    raise KeyboardInterrupt


def _worker_main(spec: dict[str, Any], events: Any) -> None:
    """Entry point of one pool process (spawned): place it, then run the worker loop."""
    os.environ.update(spec["env"])
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        # a parent started with SIGINT ignored (nohup, `cmd &` in a script) ignores Ctrl-C, and its
        # workers (which inherit that) must too, or they would stop while the parent carries on
        signal.signal(signal.SIGINT, _on_sigint)
    logging.basicConfig(level=spec["log_level"], format=f"%(levelname)s w{spec['worker_id']} %(name)s: %(message)s")
    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(spec["threads"])
    from repsearch.sweep.worker import work

    wid = spec["worker_id"]

    def notify(event: str, **data: Any) -> None:
        events.put((wid, event, data))

    try:
        n = work(
            spec["study_name"], spec["stores"], recipe=spec["recipe"], device=spec["device"], data_root=spec["data_root"],
            trial_fn=spec["trial_fn"], progress=False, worker_id=wid, notify=notify, resume=spec.get("resume", True),
        )
        events.put((wid, "exit", {"ran": n}))
    except KeyboardInterrupt:
        events.put((wid, "exit", {"interrupted": True}))
        sys.exit(130)
    except UserError as exc:
        events.put((wid, "exit", {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}))
        sys.exit(2)


class _Display:
    """One rich progress line per worker, trial lines printed above them (or plain lines)."""

    def __init__(self, ctx: _Ctx, n: int, progress: bool):
        self.ctx = ctx
        self.progress = None
        if progress and ctx.console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[val]}"),
                TimeElapsedColumn(), console=ctx.console, transient=True,
            )
            self.tasks = [self.progress.add_task(f"w{i} starting", total=None, val="") for i in range(n)]

    def __enter__(self) -> "_Display":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def print(self, text: str, style: Optional[str] = None) -> None:
        log.info(text)
        console = self.progress.console if self.progress is not None else self.ctx.console
        if console is not None:
            console.print(text, style=style, markup=False, highlight=False)

    def event(self, wid: int, event: str, data: dict[str, Any]) -> None:
        if event == "say":
            self.print(f"[w{wid}] {data.get('text', '')}", data.get("style"))
            return
        if self.progress is None:
            return
        task = self.tasks[wid]
        if event == "start":
            self.progress.reset(task, total=data.get("epochs"), description=f"w{wid} {data.get('label', '')}", val="")
        elif event == "epoch":
            v = data.get("val_top1")
            self.progress.update(task, completed=data.get("epoch", 0), val="" if v is None else f"val {v:.2f}")
        elif event == "idle":
            self.progress.update(task, description=f"w{wid} waiting for the study's running trials")
        elif event == "exit":
            self.progress.update(task, description=f"w{wid} done", val="")


def run_pool(ctx: _Ctx, n: int, *, devices: Optional[list[str]] = None, trial_fn: Optional[Callable] = None) -> list[tuple[str, Optional[str]]]:
    """Run the study's queue in ``n`` worker processes and wait for them.

    Args:
        ctx: the parent's study context (stores, recipe, device, data root, console, progress).
        n: worker processes.
        devices: CUDA device ids (:func:`worker_plan`).
        trial_fn: the trial function (picklable: a module-level function); None: the real trial.

    Returns:
        (state, error) for each trial the workers ran (COMPLETE / PRUNED / FAIL / LOST).

    Raises:
        SweepError: bad placement, or a worker that refused to start (its one line).
        KeyboardInterrupt: after the workers have recorded their interrupted trials.
    """
    plan = worker_plan(n, ctx.device, devices)
    mpctx = mp.get_context("spawn")
    events = mpctx.Queue()
    level = logging.getLogger().getEffectiveLevel()
    procs = []
    for p in plan:
        spec = {
            **p, "study_name": ctx.name, "stores": ctx.stores, "recipe": ctx.recipe, "data_root": ctx.data_root,
            "trial_fn": trial_fn, "log_level": level, "resume": ctx.resume,
        }
        proc = mpctx.Process(target=_worker_main, args=(spec, events), name=f"repsearch-worker-{p['worker_id']}", daemon=False)
        proc.start()
        procs.append(proc)
    ctx.say(f"started {n} workers: " + ", ".join(
        f"w{p['worker_id']} pid {proc.pid} on {p['env'].get('CUDA_VISIBLE_DEVICES', p['device'])}"
        + ("" if p["device"].startswith("cuda") else f" ({p['threads']} thread{'s' if p['threads'] > 1 else ''})")
        for p, proc in zip(plan, procs)
    ))
    outcomes: list[tuple[str, Optional[str]]] = []
    errors: list[str] = []
    with _Display(ctx, n, ctx.progress) as display:
        try:
            while True:
                try:
                    wid, event, data = events.get(timeout=0.5)
                except queue_mod.Empty:
                    if not any(proc.is_alive() for proc in procs):
                        break
                    continue
                display.event(wid, event, data)
                if event == "end":
                    outcomes.append((data.get("state", "?"), data.get("text") if data.get("state") in ("FAIL", "LOST") else None))
                elif event == "exit" and data.get("error"):
                    errors.append(f"worker {wid}: {data['error']}")
            for proc in procs:
                proc.join()
        except KeyboardInterrupt:
            display.print(f"interrupted: stopping {sum(p.is_alive() for p in procs)} workers (their trials are recorded as failed)", "yellow")
            _stop(procs)
            with ctx.lock():
                _fail_stale(ctx)  # a worker terminated before recording its trial
            raise
    crashed = [f"worker {i} exited with code {proc.exitcode}" for i, proc in enumerate(procs) if proc.exitcode not in (0, None)]
    if crashed:
        with ctx.lock():
            _fail_stale(ctx)  # their running trials: failed now, their MLflow runs KILLED
    if errors and not outcomes:
        raise SweepError(errors[0])
    for line in errors + [c for c in crashed if not any(c.startswith(e.split(":")[0]) for e in errors)]:
        ctx.say(line, style="red")
    return outcomes


def _stop(procs: list[Any]) -> None:
    """SIGINT every live worker (once), wait :data:`STOP_GRACE_S`, then terminate, then kill."""
    import time

    for proc in procs:
        if proc.is_alive():
            try:
                os.kill(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
