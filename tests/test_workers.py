"""Parallel workers on one study (issue "Scale-out"): races on SQLite, two parents, dead workers, the pool.

Every test here starts real processes that race on one real store. Fake trials (no torch) keep them
fast; each call is appended to ``<data_root>/calls.log`` (one line per call, O_APPEND), so the test
counts what every process really ran.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console

from repsearch.spec import Recipe
from repsearch.sweep import SweepError, open_storage, run_study, work
from repsearch.sweep.queue import _Ctx, _pop_waiting
from repsearch.sweep.study import prepare_study
from repsearch.sweep.worker import check_worker_host
from repsearch.tracking import ROLE_TAG, Stores, resolve_stores
from pgserver import PostgresServer, find_bin

RECIPE_PATH = "race.yaml"
FORK = mp.get_context("fork")
KINDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def pg():
    """A PostgreSQL server for the session (tests/pgserver.py); skipped only without the binaries
    or the driver, and never when ``CI`` is set (``.ci/run`` installs Debian's postgresql)."""
    reason = None
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        reason = "psycopg2 is missing (pip install -e '.[postgres]' -c constraints.txt)"
    bindir = find_bin()
    if bindir is None:
        reason = "no PostgreSQL server binaries (apt-get install postgresql)"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the PostgreSQL tests cannot run: {reason}")
        pytest.skip(reason)
    server = PostgresServer(bindir).start()
    yield server
    server.stop()


def storage_url(kind: str, request) -> str | None:
    """None (the runs folder's SQLite default) or a fresh PostgreSQL database's URL."""
    return request.getfixturevalue("pg").new_database() if kind == "postgresql" else None


@dataclass
class Result:
    final: dict
    history: list
    artifacts: list = field(default_factory=list)


def quick_trial(recipe, *, data_root, device, out_dir, on_epoch=None, progress=True):
    """A trial that takes a few ms, logs its call and returns val/top1 from its configuration."""
    key = f"{recipe.method.name}:{getattr(recipe.method, 'scoring', None)}:{recipe.seed}"
    root = Path(data_root)
    if (root / "block").is_file() and key == (root / "block").read_text().strip():
        (root / "started").write_text(str(os.getpid()))
        time.sleep(600)
    if (root / "sleep").is_file():  # long enough that every worker of a pool gets trials
        time.sleep(float((root / "sleep").read_text()))
    with open(root / "calls.log", "a") as fh:
        fh.write(f"{os.getpid()} {key}\n")
    history = []
    for e in (1, 2):
        m = {"val/top1": 10.0 * e + recipe.seed, "train/loss": 1.0 / e}
        if on_epoch is not None:
            on_epoch(e, m)
        history.append(m)
    return Result(final={**history[-1], "test/top1": 20.0}, history=history)


def grid(n_choices: int = 6, seeds=(0,), workers: int = 1) -> Recipe:
    choices = ["random", "grad_norm", "snip", "grasp", "synflow", "vote"][:n_choices]
    return Recipe.model_validate({
        "method": {"name": "dyrep"}, "train": {"epochs": 2},
        "sweep": {"params": {"method.scoring": {"choices": choices}}, "baselines": [{"method.name": "origin"}],
                  "seeds": list(seeds), "workers": workers},
    })


def calls(root: Path) -> list[tuple[int, str]]:
    p = root / "calls.log"
    if not p.is_file():
        return []
    return [(int(a), b) for a, b in (line.split(" ", 1) for line in p.read_text().split("\n") if line)]


def _stores(folder: Path, recipe: Recipe, storage: str | None = None) -> Stores:
    return resolve_stores(recipe, RECIPE_PATH, runs_dir=folder / "runs", storage=storage, environ={})


def _work_child(go, name: str, stores: Stores, root: str) -> None:
    go.wait(30)
    try:
        work(name, stores, device="cpu", data_root=root, trial_fn=quick_trial, progress=False, poll_s=0.2)
    except BaseException as exc:  # report in the calls log: the parent asserts on it
        with open(Path(root) / "errors.log", "a") as fh:
            fh.write(f"{os.getpid()} {type(exc).__name__}: {exc}\n")
        raise


def _parent_child(go, recipe: Recipe, stores: Stores, root: str, run: bool) -> None:
    go.wait(30)
    try:
        if run:
            run_study(recipe, RECIPE_PATH, None, stores, device="cpu", data_root=root, trial_fn=quick_trial, progress=False)
        else:
            prepare_study(recipe, RECIPE_PATH, None, stores, device="cpu", data_root=root, trial_fn=quick_trial, progress=False)
    except BaseException as exc:
        with open(Path(root) / "errors.log", "a") as fh:
            fh.write(f"{os.getpid()} {type(exc).__name__}: {exc}\n")
        raise


def _start(target, args_list) -> list:
    """Fork one process per args (each waits for the shared event), release them at once, join."""
    go = FORK.Event()
    procs = [FORK.Process(target=target, args=(go, *args)) for args in args_list]
    for p in procs:
        p.start()
    time.sleep(0.05)
    go.set()
    for p in procs:
        p.join(120)
    return procs


def _trials(stores: Stores, name: str):
    return optuna.load_study(study_name=name, storage=open_storage(stores.storage)).get_trials()


def _slot(t) -> tuple:
    return (t.user_attrs.get("point"), t.user_attrs.get("seed"))


def _assert_each_slot_complete_once(stores: Stores, name: str, root: Path, n_slots: int) -> None:
    trials = _trials(stores, name)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n_slots and len({_slot(t) for t in complete}) == n_slots, [(t.number, _slot(t), t.state) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]
    ran = calls(root)
    assert len(ran) == n_slots and len({k for _, k in ran}) == n_slots, ran  # no trial ran twice (no double pop)


def _parent_runs(stores: Stores, study: str | None = None):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stores.tracking_uri)
    exp = client.get_experiment_by_name(stores.experiment)
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000) if study is None or r.data.tags.get("study_name") == study]
    return [r for r in runs if r.data.tags.get(ROLE_TAG) == "study"], [r for r in runs if r.data.tags.get(ROLE_TAG) != "study"]


# ----------------------------------------------------------------------------------------- SQLite
@pytest.mark.parametrize("kind", KINDS)
def test_pop_is_atomic_under_four_racing_processes(tmp_path, kind, request):
    """200 WAITING trials, 4 processes popping at once through the storage repsearch opens: every
    trial is popped exactly once (Optuna's own SQLite path double-popped 14-23 of 200 here)."""
    url = storage_url(kind, request) or f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="pop", storage=open_storage(url))
    for i in range(200):
        study.enqueue_trial({}, user_attrs={"i": i})
    out = tmp_path / "popped"
    out.mkdir()

    def popper(go, k):
        storage = open_storage(url)
        st = optuna.load_study(study_name="pop", storage=storage)
        ctx = _Ctx(recipe=grid(), stores=None, name="pop", storage=storage, study=st, study_id=storage.get_study_id_from_name("pop"),
                   tracker=None, parent_run_id=None, device="cpu", data_root=None, trial_fn=None, console=None, progress=False,
                   rhash="")
        go.wait(30)
        got = []
        while (tid := _pop_waiting(ctx)) is not None:
            got.append(tid)
        (out / f"{k}.json").write_text(json.dumps(got))

    procs = _start(popper, [(k,) for k in range(4)])
    assert all(p.exitcode == 0 for p in procs)
    popped = [tid for k in range(4) for tid in json.loads((out / f"{k}.json").read_text())]
    assert len(popped) == 200 and len(set(popped)) == 200
    assert sum(1 for f in out.iterdir() if json.loads(f.read_text())) >= 2  # the processes really raced


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_workers", [2, 4])
def test_workers_finish_a_grid_each_point_once_over_repeated_racy_starts(tmp_path, n_workers, kind, request):
    """A 7-point grid, 2 or 4 worker processes released at once, 6 repetitions each (12 racy starts
    per storage): every point COMPLETE exactly once, no trial run twice, one FINISHED MLflow run each."""
    recipe = grid()
    stores = _stores(tmp_path, recipe, storage_url(kind, request))  # one store, a new study per repetition
    for rep in range(6):
        folder = tmp_path / f"rep{rep}"
        folder.mkdir()
        recipe = recipe.model_copy(update={"seed": 1000 + rep})  # the seed is part of the study's name
        ctx, acc, to_run = prepare_study(recipe, RECIPE_PATH, None, stores, device="cpu", data_root=str(folder),
                                         trial_fn=quick_trial, progress=False)
        assert to_run == 7 and acc["waiting"] == 7
        procs = _start(_work_child, [(ctx.name, stores, str(folder))] * n_workers)
        assert [p.exitcode for p in procs] == [0] * n_workers, (folder / "errors.log").read_text() if (folder / "errors.log").exists() else ""
        _assert_each_slot_complete_once(stores, ctx.name, folder, 7)
        parents, children = _parent_runs(stores, ctx.name)
        assert len(parents) == 1 and sorted(r.info.status for r in children) == ["FINISHED"] * 7


@pytest.mark.parametrize("kind", KINDS)
def test_two_parents_started_together_make_one_parent_run_and_one_trial_per_point(tmp_path, kind, request):
    """Two `repsearch run` of one recipe started together on fresh stores (store creation, enqueue
    and parent-run creation all race): one MLflow parent run, each point enqueued and run once."""
    recipe = grid()
    for rep in range(4):
        folder = tmp_path / f"rep{rep}"
        folder.mkdir()
        stores = _stores(folder, recipe, storage_url(kind, request))
        procs = _start(_parent_child, [(recipe, stores, str(folder), True)] * 2)
        errors = (folder / "errors.log").read_text() if (folder / "errors.log").exists() else ""
        assert [p.exitcode for p in procs] == [0, 0], errors
        name = next(iter(optuna.get_all_study_names(open_storage(stores.storage))))
        trials = _trials(stores, name)
        assert len(trials) == 7 and len({_slot(t) for t in trials}) == 7  # enqueued once
        _assert_each_slot_complete_once(stores, name, folder, 7)
        parents, children = _parent_runs(stores)
        assert len(parents) == 1 and len(children) == 7
        assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}


def test_a_sigkilled_worker_leaves_a_trial_that_another_worker_reruns(tmp_path):
    """Worker A is SIGKILLed in the middle of a trial; worker B, started while A's trial still shows
    RUNNING, runs the rest, finds A's trial stale (its process is gone), fails it, re-enqueues the
    point and runs it: every point COMPLETE once, A's trial FAIL (stale) with its MLflow run KILLED."""
    recipe = grid(n_choices=3)
    stores = _stores(tmp_path, recipe)
    ctx, _, _ = prepare_study(recipe, RECIPE_PATH, None, stores, device="cpu", data_root=str(tmp_path), trial_fn=quick_trial, progress=False)
    (tmp_path / "block").write_text("dyrep:random:0")  # the first point popped
    go = FORK.Event()
    a = FORK.Process(target=_work_child, args=(go, ctx.name, stores, str(tmp_path)))
    a.start()
    go.set()
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "started").is_file()
    os.kill(a.pid, signal.SIGKILL)
    a.join()
    (tmp_path / "block").unlink()
    procs = _start(_work_child, [(ctx.name, stores, str(tmp_path))])
    assert procs[0].exitcode == 0
    trials = _trials(stores, ctx.name)
    killed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(killed) == 1 and killed[0].user_attrs["error"].startswith("stale: worker")
    assert sorted(_slot(t) for t in trials if t.state == TrialState.COMPLETE) == sorted(
        [("method.scoring=random", 0), ("method.scoring=grad_norm", 0), ("method.scoring=snip", 0), ("baseline:method.name=origin", 0)]
    )
    _, children = _parent_runs(stores)
    status = {r.data.tags["optuna.trial_number"]: r.info.status for r in children}
    assert status[str(killed[0].number)] == "KILLED" and sorted(status.values()) == ["FINISHED"] * 4 + ["KILLED"]


def test_a_popped_duplicate_is_failed_not_run(tmp_path):
    """A point enqueued twice (two parents before the study lock existed): the later copy is failed
    as a duplicate when popped, and the point runs once."""
    recipe = grid(n_choices=1)
    stores = _stores(tmp_path, recipe)
    ctx, _, _ = prepare_study(recipe, RECIPE_PATH, None, stores, device="cpu", data_root=str(tmp_path), trial_fn=quick_trial, progress=False)
    first = ctx.study.get_trials()[0]
    ctx.study.enqueue_trial(params={}, user_attrs=dict(first.user_attrs))
    assert work(ctx.name, stores, device="cpu", data_root=str(tmp_path), trial_fn=quick_trial, progress=False) == 2
    trials = _trials(stores, ctx.name)
    dup = [t for t in trials if t.state == TrialState.FAIL]
    assert len(dup) == 1 and dup[0].user_attrs["duplicate_of"] == first.number
    assert len(calls(tmp_path)) == 2  # the two distinct points, nothing twice


def test_pool_of_two_spawned_workers_runs_the_study(tmp_path):
    """`run --workers 2` path: two spawned processes (1 CPU thread each on 2 cores), one progress
    line per worker, every point once, the parent run FINISHED with its counts."""
    recipe = grid(n_choices=3, seeds=(0, 1))
    stores = _stores(tmp_path, recipe)
    (tmp_path / "sleep").write_text("1.5")
    buf = io.StringIO()
    summary = run_study(recipe, RECIPE_PATH, None, stores, device="cpu", data_root=str(tmp_path), trial_fn=quick_trial,
                        console=Console(file=buf, width=200), progress=True, workers=2)
    out = buf.getvalue()
    assert summary.n_complete == 8 and summary.ran_now == 8 and not summary.failures
    assert "started 2 workers" in out and "[w0]" in out and "[w1]" in out
    pids = {pid for pid, _ in calls(tmp_path)}
    assert len(pids) == 2 and os.getpid() not in pids  # both workers ran trials, the parent none
    _assert_each_slot_complete_once(stores, summary.study_name, tmp_path, 8)
    parents, _ = _parent_runs(stores)
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["n_complete"] == "8"
    again = run_study(recipe, RECIPE_PATH, None, stores, device="cpu", data_root=str(tmp_path), trial_fn=quick_trial,
                      progress=False, workers=2)
    assert again.nothing_to_run and again.ran_now == 0


def test_worker_placement_on_cpu_and_cuda():
    """CPU: the cores are shared out (threads add up to the cores); CUDA: round-robin pinning."""
    from repsearch.sweep.pool import worker_plan

    cpu = worker_plan(2, "cpu", cores=2)
    assert [w["threads"] for w in cpu] == [1, 1] and cpu[0]["env"]["OMP_NUM_THREADS"] == "1"
    assert [w["threads"] for w in worker_plan(3, "cpu", cores=16)] == [5, 5, 5]
    gpu = worker_plan(3, "cuda", ["0", "1"], cores=16)
    assert [w["env"]["CUDA_VISIBLE_DEVICES"] for w in gpu] == ["0", "1", "0"] and {w["device"] for w in gpu} == {"cuda"}
    assert [w["env"]["CUDA_VISIBLE_DEVICES"] for w in worker_plan(2, "cuda:1", cores=2)] == ["1", "1"]
    with pytest.raises(SweepError, match="--devices"):
        worker_plan(2, "cpu", ["0"])


def test_worker_refuses_another_commit_and_one_machine_stores_from_another_host(tmp_path):
    """`repsearch worker` checks what the study recorded: its git commit, and that a worker on
    another host uses PostgreSQL and a tracking server (one line each)."""
    from repsearch.tracking import git_info

    commit = git_info()["git_commit"]
    attrs = {"git_commit": commit, "host": "node-a"}
    sqlite = Stores(tmp_path, f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db", "e")
    journal = Stores(tmp_path, "http://tracker:5000", str(tmp_path / "j.log"), "e")
    pg_local = Stores(tmp_path, f"sqlite:///{tmp_path}/mlflow.db", "postgresql://u@db/x", "e")
    pg_server = Stores(tmp_path, "http://tracker:5000", "postgresql://u@db/x", "e")
    check_worker_host("s", sqlite, attrs, host="node-a")  # same host: anything goes
    check_worker_host("s", pg_server, attrs, host="node-b")
    with pytest.raises(SweepError, match="SQLite serves one machine"):
        check_worker_host("s", sqlite, attrs, host="node-b")
    with pytest.raises(SweepError, match="no heartbeats"):
        check_worker_host("s", journal, attrs, host="node-b")
    with pytest.raises(SweepError, match="tracking server"):
        check_worker_host("s", pg_local, attrs, host="node-b")
    if commit != "unknown":
        with pytest.raises(SweepError, match="check out 0123456789ab"):
            check_worker_host("s", sqlite, {"git_commit": "0123456789abcdef", "host": "node-a"}, host="node-a")


def test_worker_reads_its_stores_from_the_study(tmp_path, monkeypatch):
    """A worker given only the storage URL finds the study's MLflow store, experiment and parent run."""
    recipe = grid(n_choices=1)
    stores = _stores(tmp_path, recipe)
    ctx, _, _ = prepare_study(recipe, RECIPE_PATH, None, stores, device="cpu", data_root=str(tmp_path), trial_fn=quick_trial, progress=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert work(ctx.name, storage=stores.storage, device="cpu", data_root=str(tmp_path), trial_fn=quick_trial, progress=False) == 2
    parents, children = _parent_runs(stores)
    assert len(children) == 2 and {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert not (elsewhere / "runs" / "mlflow.db").exists()
    with pytest.raises(SweepError, match="does not exist"):
        work("no-such-study", storage=stores.storage, device="cpu", data_root=None, trial_fn=quick_trial)


def test_cli_worker_and_placement_errors_are_one_line(tmp_path, data_root):
    """`repsearch worker` on a missing study and `run --devices` on the CPU: one line, exit 2, and the
    placement error comes before any store is written."""
    from click.testing import CliRunner

    from repsearch.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["worker", "nosuch", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--device", "cpu"])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0 and "study 'nosuch' does not exist" in res.output
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "ablation_scoring.yaml")
    for extra, words in ((["--workers", "2", "--devices", "0"], "this run is on the CPU"), (["--devices", "0"], "with one worker use"),
                         (["--devices", "a,b"], "give CUDA device numbers")):
        runs = tmp_path / f"runs{len(extra)}"
        res = runner.invoke(main, ["run", recipe, "-p", "smoke", "--device", "cpu", "--runs-dir", str(runs), "--data-root", str(data_root), *extra])
        assert res.exit_code == 2 and words in res.output and res.output.strip().count("\n") == 0, res.output
        assert not (runs / "optuna.db").exists()
