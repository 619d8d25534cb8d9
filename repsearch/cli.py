"""The ``repsearch`` command line (click): ``run``, ``worker``, ``validate``, ``compare``, ``quantize``, ``spaces``, ``ui``.

User mistakes (:class:`repsearch.errors.UserError`) print one line ``repsearch: error: ...`` on stderr
and exit with status 2, no traceback; anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import click

from repsearch.errors import UserError


def _fail(message: str) -> None:
    click.echo(f"repsearch: error: {message}", err=True)
    sys.exit(2)


def user_errors(fn):
    """Turn a :class:`UserError` raised by a command into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    return wrapper


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(device: str) -> str:
    import torch

    from repsearch.spec import RecipeError

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise RecipeError(f"--device: '{device}' is not a torch device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"--device: '{device}' asked for but CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise RecipeError(f"--device: '{device}': only cpu and cuda are supported")
    return device


def _load(recipe_path: str, profile: Optional[str], sets: tuple[str, ...]):
    from repsearch.preflight import check_recipe
    from repsearch.spec import load_recipe

    recipe, resolved = load_recipe(recipe_path, profile, sets)
    check_recipe(recipe, recipe_path)
    return recipe, resolved


_common = [
    click.argument("recipe", type=click.Path(dir_okay=False)),
    click.option("--profile", "-p", default=None, help="A profile of the recipe (e.g. smoke)."),
    click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a dotted field (YAML value); repeatable, last wins."),
]


def common_options(fn):
    for deco in reversed(_common):
        fn = deco(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """repsearch: structural re-parameterization (DyRep, RepAn, RepOpt) as searchable experiments."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING if verbose == 0 else optuna.logging.INFO)
    except ImportError:  # pragma: no cover - optuna is a dependency
        pass


@main.command()
@common_options
@click.option("--data-root", default=None, help="Data root (> REPSEARCH_DATA > recipe data.root).")
@click.option("--runs-dir", default=None, help="Runs folder (MLflow + Optuna stores); default ./runs.")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (> MLFLOW_TRACKING_URI).")
@click.option("--storage", default=None, help="Optuna storage: sqlite:///..., postgresql://... or a journal file path.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--no-deps", is_flag=True, help="Refuse (one line, exit 2) instead of running an incomplete study this recipe depends on (e.g. RepOpt's Hyper-Search).")
@click.option("--workers", "-w", type=int, default=None, help="Worker processes running trials in parallel (> sweep.workers; default 1: in this process).")
@click.option("--devices", default=None, metavar="0,1,...", help="CUDA devices for the workers, round-robin (default: every visible GPU).")
@click.option("--no-resume", is_flag=True, help="Start every point from scratch, even where a failed or killed trial left a checkpoint.")
@click.option("--nproc-per-node", type=int, default=None, help="Train every trial with DDP on this many processes (torchrun; one per GPU, or gloo on CPU). train.batch_size is the global batch.")
@user_errors
def run(recipe, profile, sets, data_root, runs_dir, tracking_uri, storage, device, no_progress, no_deps, workers, devices, no_resume,
        nproc_per_node):
    """Run RECIPE: every sweep point (or the single configuration) not yet complete, then print the
    comparison table. With --workers N, N processes pop the study's trials in parallel (one per GPU
    on CUDA; on CPU the cores are shared out). With --nproc-per-node N every trial trains on N DDP
    processes (this command re-runs itself under torchrun; a recipe with train.distributed: ddp
    started by torchrun or srun does the same). A point whose trial failed or was killed resumes
    from the last checkpoint that trial left (--no-resume: from scratch)."""
    from repsearch import distributed

    rec, _ = _load(recipe, profile, sets)
    device = _check_device(device or _default_device())
    if nproc_per_node is not None and os.environ.get(distributed.FORCE_ENV) != "1":
        _launch_torchrun(rec, nproc_per_node, workers, device)  # exits with torchrun's status
    dist = None
    if distributed.wanted(rec.train.distributed):
        if (workers or rec.sweep.workers or 1) > 1:
            raise UserError("--workers N and DDP trials do not combine: run one DDP command per GPU group")
        try:
            dist = distributed.init(cuda=device.startswith("cuda"))
        except distributed.DistributedError as exc:
            raise UserError(str(exc)) from None
        device = dist.device(device)
        if not dist.is_main:  # a follower: trains what rank 0 broadcasts, talks to no store
            try:
                distributed.follow(dist, None, device)
                distributed.shutdown(barrier=True)
            finally:
                distributed.shutdown()
            return
    try:
        _run_main(rec, recipe, profile, data_root, runs_dir, tracking_uri, storage, device, no_progress, no_deps,
                  workers, devices, no_resume, dist)
    finally:
        distributed.stop_followers(dist)  # the followers then leave cleanly, whatever happened here
        distributed.shutdown(barrier=True)


def _launch_torchrun(rec, nproc: int, workers: Optional[int], device: str) -> None:
    """Re-run this command (``sys.argv``: the ``repsearch`` console script's own arguments) under
    torchrun with ``nproc`` processes (``--nproc-per-node`` removed, DDP forced on) and exit with its
    status.

    Raises:
        UserError: ``nproc`` < 1, more processes than visible GPUs on CUDA, ``--workers`` > 1, or a
            global batch that ``nproc`` does not divide.
    """
    import subprocess

    import torch

    from repsearch import distributed

    if nproc < 1:
        raise UserError(f"--nproc-per-node must be >= 1, got {nproc}")
    if device.startswith("cuda") and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc-per-node {nproc}: only {torch.cuda.device_count()} CUDA devices are visible (one process per GPU)")
    if (workers or rec.sweep.workers or 1) > 1:
        raise UserError("--workers N and --nproc-per-node do not combine: one DDP command per GPU group")
    if rec.train.batch_size % nproc:
        raise UserError(f"train.batch_size {rec.train.batch_size} (the global batch) is not divisible by --nproc-per-node {nproc}")
    argv = distributed.strip_option(sys.argv[1:], "--nproc-per-node")
    env = dict(os.environ, **{distributed.FORCE_ENV: "1"})
    sys.exit(subprocess.call(distributed.torchrun_argv(nproc, argv), env=env))


def _run_main(rec, recipe, profile, data_root, runs_dir, tracking_uri, storage, device, no_progress, no_deps, workers,
              devices, no_resume, dist) -> None:
    """``repsearch run`` in one process, or on rank 0 of a DDP group (``dist``)."""
    from rich.console import Console

    from repsearch import distributed
    from repsearch.data import find_layout, resolve_data_root
    from repsearch.dependencies import resolve_dependencies
    from repsearch.report import comparison_table
    from repsearch.sweep import run_study
    from repsearch.tracking import resolve_stores

    extra = {}
    if dist is not None:
        from repsearch.trial import run_trial

        extra["trial_fn"] = distributed.leader_trial_fn(run_trial, dist)
    root = resolve_data_root(data_root, rec.data.root)
    if not rec.data.download:
        find_layout(root, rec.data.dataset, rec.data.format)
    stores = resolve_stores(rec, recipe, runs_dir=runs_dir, tracking_uri=tracking_uri, storage=storage, profile=profile)
    console = Console(width=None if sys.stdout.isatty() else 240)
    # a study this recipe depends on (RepOpt target <- Hyper-Search scales) runs first, then its
    # artifact's content hash enters this study's name (repsearch.dependencies)
    rec = resolve_dependencies(
        rec, recipe, stores, run_missing=not no_deps,
        say=lambda line: console.print(line, markup=False, highlight=False),
        device=device, data_root=str(root), console=console, progress=not no_progress, resume=not no_resume, **extra,
    )
    summary = run_study(
        rec, recipe, profile, stores, device=device, data_root=str(root), console=console, progress=not no_progress,
        workers=workers, devices=_device_list(devices), resume=not no_resume, **extra,
    )
    if summary.rows:
        console.print(comparison_table(summary.rows, title=summary.study_name))
    for line in summary.warnings:  # trials that trained but did not learn (tag not_learning)
        console.print(line, style="yellow", markup=False, highlight=False)
    if summary.pareto:
        console.print(summary.pareto)
    console.print(
        f"runs folder: {stores.runs_dir}  (MLflow UI: repsearch ui --runs-dir {stores.runs_dir})"
    )
    if summary.failures:
        for point, seed, err in summary.failures:
            click.echo(f"repsearch: trial failed: {point} seed {seed}: {err}", err=True)
        sys.exit(1)


def _device_list(devices: Optional[str]) -> Optional[list[str]]:
    if devices is None:
        return None
    out = [d.strip() for d in devices.split(",") if d.strip()]
    if not out or not all(d.isdigit() for d in out):
        raise UserError(f"--devices: '{devices}': give CUDA device numbers separated by commas, e.g. 0,1")
    return out


@main.command()
@click.argument("study_name")
@click.option("--storage", required=True, help="The study's Optuna storage URL (postgresql://... across hosts).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available).")
@click.option("--data-root", default=None, help="Data root on this machine (> REPSEARCH_DATA > recipe data.root).")
@click.option("--runs-dir", default=None, help="Scratch folder for this worker's trials (default ./runs).")
@click.option("--tracking-uri", default=None, help="Override the study's recorded MLflow tracking URI.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's own).")
@click.option("--max-trials", type=int, default=None, help="Stop after this many trials.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--no-resume", is_flag=True, help="Start every trial from scratch, even where a failed or killed trial left a checkpoint.")
@user_errors
def worker(study_name, storage, device, data_root, runs_dir, tracking_uri, threads, max_trials, no_progress, no_resume):
    """Join study STUDY_NAME from any machine: pop its WAITING trials and run them until none is left
    and none runs elsewhere. The study (made by `repsearch run`) carries the recipe, the MLflow
    tracking URI and experiment, and the git commit; only --storage is needed."""
    from rich.console import Console

    from repsearch.data import resolve_data_root
    from repsearch.sweep import work
    from repsearch.sweep.worker import study_stores

    device = _check_device(device or _default_device())
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads))
    import yaml

    from repsearch.spec import Recipe

    stores, attrs = study_stores(study_name, storage, runs_dir=runs_dir, tracking_uri=tracking_uri)
    recipe_root = Recipe.model_validate(yaml.safe_load(attrs["recipe_yaml"])).data.root
    root = resolve_data_root(data_root, recipe_root)
    console = Console(width=None if sys.stdout.isatty() else 240)
    n = work(study_name, stores, device=device, data_root=str(root), console=console, progress=not no_progress,
             max_trials=max_trials, resume=not no_resume)
    console.print(f"worker done: {n} trial{'s' if n != 1 else ''} run here", markup=False, highlight=False)


@main.command()
@common_options
@user_errors
def validate(recipe, profile, sets):
    """Check RECIPE, print the resolved recipe, the number of trials and the study's cost estimate."""
    from rich.console import Console

    from repsearch.preflight import cost_estimate
    from repsearch.spec import recipe_yaml, study_name
    from repsearch.sweep import plan_points

    rec, _ = _load(recipe, profile, sets)
    console = Console()
    console.print(recipe_yaml(rec), markup=False, highlight=False)
    points = plan_points(rec)
    est = cost_estimate(rec, points)
    deps = rec.method.dependencies()
    if deps:  # the real name hashes the dependency's content, known once `run` resolves it
        for fld, artifact in deps.items():
            console.print(f"depends on: method.{fld} = {getattr(rec.method, fld)} ({artifact}; resolved by `repsearch run`)",
                          markup=False, highlight=False)
        console.print(f"study: {Path(recipe).stem}{'.' + profile if profile else ''}-<hash with the {', '.join(deps.values())} content>")
    else:
        console.print(f"study: {study_name(recipe, profile, rec)}")
    console.print(f"trials: {est['n_trials']} ({est['n_configurations']} configurations x {est['n_seeds']} seeds)")
    if est["n_train"] == 0:  # a folder dataset without train_subset: its size is known once read
        console.print(
            f"cost estimate: {rec.train.epochs} epochs x the folder's training images per trial "
            "(set data.train_subset for a figure; the folder is read by `repsearch run`)"
        )
        return
    console.print(
        f"cost estimate: {est['train_images']:,} training images ({est['train_images_per_trial']:,} per trial: "
        f"{rec.train.epochs} epochs x {est['n_train']:,} images), {est['eval_images']:,} evaluation images"
    )


@main.command()
@user_errors
def spaces():
    """List the operation spaces (spaces/*.yaml) and the branch types."""
    from rich.console import Console
    from rich.table import Table

    from repsearch.spaces import BRANCH_KINDS, list_spaces

    table = Table(title="operation spaces")
    table.add_column("space")
    table.add_column("branches")
    table.add_column("description")
    for name, (description, branches) in sorted(list_spaces().items()):
        table.add_row(name, ", ".join(branches), description)
    console = Console()
    console.print(table)
    console.print("branch types: " + ", ".join(BRANCH_KINDS))


@main.command()
@click.argument("run_id")
@click.option("--calib-batches", type=int, default=None, help="Training batches for calibration (default: the recipe's quantize.calib_batches).")
@click.option("--data-root", default=None, help="Data root (> REPSEARCH_DATA > recipe data.root).")
@click.option("--runs-dir", default=None, help="Runs folder (MLflow store); default ./runs.")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (> MLFLOW_TRACKING_URI).")
@user_errors
def quantize(run_id, calib_batches, data_root, runs_dir, tracking_uri):
    """INT8 PTQ (torchao, X86InductorQuantizer, CPU) of finished run RUN_ID's deployed.pt: prints fp32
    vs int8 val/test top-1 and the kernel std, and logs the int8 metrics onto the run."""
    from rich.console import Console

    from repsearch.quantize import quantize_run, quantize_table

    report = quantize_run(run_id, calib_batches=calib_batches, data_root=data_root, runs_dir=runs_dir, tracking_uri=tracking_uri)
    Console(width=None if sys.stdout.isatty() else 240).print(quantize_table(report))


@main.command()
@click.argument("name")
@click.option("--study", default=None, help="A study of experiment NAME (default: its latest).")
@click.option("--all", "all_studies", is_flag=True, help="Every study of experiment NAME.")
@click.option("--baseline", default=None, metavar="ROW", help="Row label for paired deltas matched by seed (e.g. origin).")
@click.option("--metric", "metrics", multiple=True, metavar="M", help="Extra final metric, e.g. int8/test_top1; repeatable.")
@click.option("--runs-dir", default=None, help="Runs folder (MLflow store); default ./runs.")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (> MLFLOW_TRACKING_URI).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "markdown"]), default="table", show_default=True)
@click.option("--no-plots", is_flag=True, help="Do not regenerate the plots.")
@user_errors
def compare(name, study, all_studies, baseline, metrics, runs_dir, tracking_uri, fmt, no_plots):
    """Compare the configurations of study NAME (or experiment NAME's latest study) from MLflow:
    val/test top-1 mean ± std and 95% t-interval over seeds, paired deltas to --baseline, avg FLOPs,
    params, device-hours, images/s; logs the table (CSV, Markdown) and plots on the study's parent run."""
    from rich.console import Console

    from repsearch.compare import compare as run_compare
    from repsearch.compare import rich_table, to_csv, to_markdown

    comparisons = run_compare(
        name, study=study, all_studies=all_studies, baseline=baseline, metrics=metrics, runs_dir=runs_dir,
        tracking_uri=tracking_uri, plots=not no_plots,
    )
    console = Console(width=None if sys.stdout.isatty() else 300)
    for cmp in comparisons:
        if fmt == "csv":
            click.echo(to_csv(cmp), nl=False)
        elif fmt == "markdown":
            click.echo(to_markdown(cmp), nl=False)
        else:
            console.print(rich_table(cmp))
            for line in cmp.warnings:
                console.print(line, style="yellow", markup=False, highlight=False)
            console.print(f"artifacts on parent run {cmp.parent_run_id}: {', '.join(cmp.artifacts)}", markup=False, highlight=False)


def _check_port(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot serve the MLflow UI on {host}:{port} ({exc.strerror or exc}); pass another --port") from None


@main.command()
@click.option("--runs-dir", default=None, help="Runs folder (default ./runs or mlflow.yaml).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (> MLFLOW_TRACKING_URI).")
@click.option("--host", default=None, help="Bind address (default 127.0.0.1).")
@click.option("--port", default=None, type=int, help="Port (default from mlflow.yaml, 5000).")
@user_errors
def ui(runs_dir, tracking_uri, host, port):
    """Open the MLflow UI on the runs folder (needs the `ui` extra: full mlflow). Binds 127.0.0.1.
    Prints the URL of the latest study's compare view first."""
    import importlib.util
    import shutil

    from repsearch.compare import latest_study_url
    from repsearch.tracking import UI_ENV, ui_command

    if importlib.util.find_spec("flask") is None or importlib.util.find_spec("mlflow.server") is None:
        # mlflow-skinny has the CLI but not the server
        raise UserError("the MLflow UI needs the full mlflow package (the ui extra): pip install -e '.[ui]' -c constraints.txt")
    cmd = ui_command(runs_dir=runs_dir, tracking_uri=tracking_uri, host=host, port=port)
    h, p = cmd[cmd.index("--host") + 1], int(cmd[cmd.index("--port") + 1])
    _check_port(h, p)
    url = latest_study_url(h, p, runs_dir=runs_dir, tracking_uri=tracking_uri)
    if url:
        click.echo(f"compare view of the latest study: {url}")
    beside = Path(sys.executable).parent / cmd[0]  # the venv's own mlflow, even when not on PATH
    if beside.exists():
        cmd[0] = str(beside)
    elif shutil.which(cmd[0]) is None:
        raise UserError(f"'{cmd[0]}' not found on PATH; install the ui extra: pip install -e '.[ui]' -c constraints.txt")
    os.environ.update(UI_ENV)
    click.echo(" ".join(cmd), err=True)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":  # pragma: no cover
    main()
