"""Sweep throughput: trials/hour of a tiny grid with 1, 2 and 4 worker processes on one store.

Runs the same grid (``--points`` configurations, real small training trials on CIFAR-10 subsets:
VGG-16 ×0.125, 2 epochs on 2,048 images; or
``--trial noop`` trials that only log, to isolate the queue's own overhead) through
:func:`repsearch.sweep.run_study` with ``workers = 1, 2, 4`` on a fresh SQLite store and, when a
PostgreSQL server is given (``--postgres URL``) or can be started from Debian's binaries
(``tests/pgserver.py``), on PostgreSQL. Prints wall seconds, trials/hour and the speed-up over one
worker. On CPU each of N workers gets ``cores // N`` threads (at least 1).

Usage::

    .venv/bin/python benchmarks/sweep_throughput.py                     # real tiny trials, 1/2/4 workers
    .venv/bin/python benchmarks/sweep_throughput.py --trial noop --points 24
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def noop_trial(recipe, *, data_root, device, out_dir, on_epoch=None, progress=True):
    """A trial that trains nothing: measures what the queue, Optuna and MLflow cost per trial."""
    m = {"val/top1": 10.0 + recipe.seed, "train/loss": 1.0}
    if on_epoch is not None:
        on_epoch(1, m)
    from repsearch.trial import TrialResult

    return TrialResult(final={**m, "test/top1": 10.0}, history=[m])


def tiny_recipe(points: int, seed: int):
    from repsearch.spec import Recipe

    return Recipe.model_validate({
        "seed": seed,
        "data": {"dataset": "cifar10", "train_subset": 2048, "val_size": 256, "test_subset": 256},
        "model": {"name": "vgg16", "width": 0.125},
        "method": {"name": "origin"},
        "train": {"epochs": 2, "batch_size": 64, "eval_batch_size": 256, "lr": 0.05, "warmup_epochs": 0},
        "sweep": {"params": {"train.lr": {"choices": [round(0.05 + 0.005 * i, 4) for i in range(points)]}}, "seeds": [0]},
    })


def run_once(storage: str | None, workers: int, points: int, trial: str, data_root: str, seed: int) -> float:
    from repsearch.sweep import run_study
    from repsearch.tracking import resolve_stores

    recipe = tiny_recipe(points, seed)
    with tempfile.TemporaryDirectory(prefix="repsearch-bench-") as tmp:
        stores = resolve_stores(recipe, "throughput.yaml", runs_dir=Path(tmp) / "runs", storage=storage, environ={})
        t0 = time.perf_counter()
        summary = run_study(recipe, "throughput.yaml", None, stores, device="cpu", data_root=data_root,
                            trial_fn=noop_trial if trial == "noop" else None, progress=False, workers=workers)
        wall = time.perf_counter() - t0
        if summary.n_complete != points:
            raise RuntimeError(f"{summary.n_complete}/{points} trials complete: {summary.failures}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4", help="worker counts to measure")
    ap.add_argument("--points", type=int, default=8, help="grid points (one trial each)")
    ap.add_argument("--trial", choices=["tiny", "noop"], default="tiny", help="real tiny training trials or no-op trials")
    ap.add_argument("--postgres", default=None, help="a PostgreSQL URL (default: start a server from Debian's binaries if present)")
    ap.add_argument("--no-postgres", action="store_true", help="measure SQLite only")
    ap.add_argument("--data-root", default=os.environ.get("REPSEARCH_DATA", str(ROOT.parent / "shared" / "data")))
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",")]

    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    stores: list[tuple[str, str | None]] = [("sqlite", None)]
    server = None
    if not args.no_postgres:
        if args.postgres:
            stores.append(("postgresql", args.postgres))
        else:
            sys.path.insert(0, str(ROOT / "tests"))
            from pgserver import PostgresServer, find_bin

            bindir = find_bin()
            try:
                import psycopg2  # noqa: F401

                if bindir is not None:
                    server = PostgresServer(bindir).start()
            except ImportError:
                pass
            if server is not None:
                stores.append(("postgresql", None))
            else:
                print("PostgreSQL: no server binaries or no psycopg2; measuring SQLite only")

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"sweep throughput: {args.points} {args.trial} trials per run, CPU, {cores} cores, torch {torch.__version__}")
    print(f"{'store':<11} {'workers':>7} {'wall s':>8} {'trials/h':>9} {'speed-up':>8}")
    try:
        for name, url in stores:
            base = None
            for i, n in enumerate(counts):
                storage = url if name == "sqlite" or url else server.new_database()
                wall = run_once(storage, n, args.points, args.trial, args.data_root, seed=100 + i)
                base = base or wall
                print(f"{name:<11} {n:>7} {wall:>8.1f} {args.points / wall * 3600:>9.0f} {base / wall:>7.2f}x", flush=True)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
