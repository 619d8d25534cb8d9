"""The sweep runner on real stores: Optuna RDB/journal storage and MLflow SQLite in tmp_path.

A fake trial function replaces training (deterministic measures from the trial recipe, one tiny
artifact), so these tests check the study mechanics: enqueueing, resume, failures, a real SIGKILL,
non-grid samplers, pruning, multi-objective, and the MLflow run layout.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from rich.console import Console

from repsearch.spec import Recipe, study_name
from repsearch.sweep import (
    Point, SweepError, load_report, make_pruner, make_sampler, open_storage, plan_points, run_study, work,
)
from repsearch.tracking import ROLE_TAG, resolve_stores

RECIPE_PATH = "exp.yaml"
SCORES = {"random": 80.0, "grad_norm": 81.0, "snip": 90.0, "grasp": 91.0, "synflow": 92.0, "vote": 93.0}
FLOPS = {"snip": 10.0, "grasp": 20.0, "synflow": 30.0}


@dataclass
class FakeResult:
    final: dict
    history: list
    artifacts: list = field(default_factory=list)


@dataclass
class TaggedResult(FakeResult):
    tags: dict = field(default_factory=dict)


def _key(recipe: Recipe) -> tuple:
    return (recipe.method.name, getattr(recipe.method, "scoring", None), recipe.seed)


class FakeTrial:
    """Deterministic stand-in for repsearch.trial.run_trial: val/top1 ramps to a per-scoring score."""

    def __init__(self, epochs: int = 3, fail_on=None, bad_on=None, flops=None, tags_of=None):
        self.calls: list[tuple] = []
        self.recipes: list[Recipe] = []
        self.epochs_run: dict[tuple, int] = {}
        self.epochs, self.fail_on, self.bad_on, self.flops = epochs, fail_on, bad_on, flops or {}
        self.tags_of = tags_of  # key -> the TrialResult.tags (None: a result without the field)

    def __call__(self, recipe, *, data_root, device, out_dir, on_epoch=None, progress=True):
        key = _key(recipe)
        self.calls.append(key)
        self.recipes.append(recipe)
        scoring = key[1]
        score = SCORES.get(scoring, 85.0) + 0.5 * recipe.seed
        history = []
        for e in range(1, self.epochs + 1):
            val = 5.0 if self.bad_on is not None and self.bad_on(key) else score * e / self.epochs
            m = {"val/top1": val, "train/loss": 1.0 / e, "lr": 0.1, "flops_m": 12.0}
            self.epochs_run[key] = e
            if on_epoch is not None:
                on_epoch(e, m)
            history.append(m)
        if self.fail_on is not None and self.fail_on(key):
            raise RuntimeError("boom: loss is nan")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        art = Path(out_dir) / "recipe.yaml"
        art.write_text(f"seed: {recipe.seed}\n")
        final = dict(history[-1])
        final.update({"test/top1": score - 1.0, "avg_flops_m": self.flops.get(scoring, 11.0), "avg_params_m": 1.5,
                      "cost_gpu_hours": 0.01})
        if self.tags_of is not None:
            return TaggedResult(final=final, history=history, artifacts=[art], tags=self.tags_of(key))
        return FakeResult(final=final, history=history, artifacts=[art])


def grid_recipe(**sweep) -> Recipe:
    sw = {
        "params": {"method.scoring": {"choices": ["snip", "grasp", "synflow"]}},
        "baselines": [{"method.name": "origin"}],
        "seeds": [0, 1],
    }
    sw.update(sweep)
    return Recipe.model_validate({"method": {"name": "dyrep"}, "train": {"epochs": 3}, "sweep": sw})


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("REPSEARCH_STORAGE", raising=False)
    return tmp_path


def _console():
    buf = io.StringIO()
    return Console(file=buf, width=200), buf


def _run(recipe, fake, **kw):
    stores = kw.pop("stores", None) or resolve_stores(recipe, RECIPE_PATH)
    console, buf = _console()
    summary = run_study(recipe, RECIPE_PATH, None, stores, device="cpu", data_root=None, trial_fn=fake,
                        console=console, progress=False, **kw)
    return summary, stores, buf.getvalue()


def _study(recipe, stores):
    return optuna.load_study(study_name=study_name(RECIPE_PATH, None, recipe), storage=open_storage(stores.storage))


def _runs(stores):
    client = MlflowClient(tracking_uri=stores.tracking_uri)
    exp = client.get_experiment_by_name(stores.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "study"]
    children = [r for r in runs if r.data.tags.get(ROLE_TAG) != "study"]
    return client, exp, parents, children


# ------------------------------------------------------------------------------------- tests
def test_plan_points_grid_baselines_seeds():
    pts = plan_points(grid_recipe())
    assert len(pts) == 8
    assert pts[0] == Point("method.scoring=snip", {"method.scoring": "snip"}, 0)
    assert pts[3] == Point("baseline:method.name=origin", {"method.name": "origin"}, 0)
    assert [p.seed for p in pts] == [0] * 4 + [1] * 4
    two = grid_recipe(params={"method.scoring": {"choices": ["snip", "grasp"]}, "train.lr": {"choices": [0.1, 0.05]}},
                      baselines=[], seeds=[3])
    assert [p.point_id for p in plan_points(two)] == [
        "method.scoring=snip, train.lr=0.1", "method.scoring=snip, train.lr=0.05",
        "method.scoring=grasp, train.lr=0.1", "method.scoring=grasp, train.lr=0.05"]
    single = Recipe.model_validate({"seed": 7})
    assert plan_points(single) == [Point("default", {}, 7)]
    for sampler, cls in (("tpe", "TPESampler"), ("random", "RandomSampler"), ("cmaes", "CmaEsSampler"), ("nsga2", "NSGAIISampler")):
        r = grid_recipe(params={"train.lr": {"low": 0.01, "high": 0.1}}, sampler=sampler, n_trials=2)
        assert type(make_sampler(r)).__name__ == cls
    assert type(make_sampler(grid_recipe())).__name__ == "RandomSampler"  # never chooses: every param is fixed
    assert isinstance(make_pruner(grid_recipe(pruner="hyperband")), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner(grid_recipe(pruner="median")), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner(grid_recipe()), optuna.pruners.NopPruner)
    dup = grid_recipe(baselines=[{"method.name": "origin"}, {"method.name": "origin"}])
    with pytest.raises(SweepError, match="twice"):
        plan_points(dup)


def test_grid_runs_every_point_once_and_rerun_adds_nothing(cwd):
    recipe = grid_recipe()
    fake = FakeTrial()
    summary, stores, out = _run(recipe, fake)
    assert (summary.n_total, summary.n_complete, summary.ran_now, summary.failures) == (8, 8, 8, [])
    assert sorted(fake.calls) == sorted(
        [("dyrep", s, seed) for s in ("snip", "grasp", "synflow") for seed in (0, 1)] + [("origin", None, 0), ("origin", None, 1)])

    study = _study(recipe, stores)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    assert sorted((t.user_attrs["point"], t.user_attrs["seed"]) for t in trials) == sorted((p.point_id, p.seed) for p in plan_points(recipe))
    t0 = trials[0]
    assert t0.params == {"point": "method.scoring=snip", "method.scoring": "snip", "seed": 0}
    assert t0.user_attrs["final"]["test/top1"] == 89.0 and t0.values == [90.0]
    assert t0.intermediate_values == {1: 30.0, 2: 60.0, 3: 90.0}
    assert study.user_attrs["recipe_hash"] and "method.scoring" in study.user_attrs["recipe_yaml"]

    client, exp, parents, children = _runs(stores)
    assert exp.artifact_location == str(cwd / "runs" / "artifacts")
    assert len(parents) == 1 and len(children) == 8
    parent = parents[0]
    assert parent.data.tags["study_name"] == summary.study_name and parent.info.status == "FINISHED"
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.artifact_uri.startswith(str(cwd / "runs" / "artifacts"))
        for tag in ("point", "seed", "recipe_hash", "git_commit", "versions.torch", "versions.optuna", "device", "optuna.trial_number"):
            assert run.data.tags.get(tag), tag
        assert run.data.params["train.epochs"] == "3" and run.data.params["seed"] == run.data.tags["seed"]
        assert run.data.metrics["test/top1"] == run.data.metrics["val/top1"] - 1.0
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["recipe.yaml"]
    snip0 = next(r for r in children if r.data.tags["point"] == "method.scoring=snip" and r.data.tags["seed"] == "0")
    assert snip0.data.params["method.scoring"] == "snip"
    hist = client.get_metric_history(snip0.info.run_id, "val/top1")
    assert sorted((m.step, m.value) for m in hist) == [(1, 30.0), (2, 60.0), (3, 90.0)]
    assert not (cwd / "mlruns").exists()

    # re-running: nothing to run, no trial, no parent run
    again, _, out2 = _run(recipe, fake)
    assert again.nothing_to_run and again.ran_now == 0 and len(fake.calls) == 8
    assert f"study {summary.study_name}: 8/8 trials complete, nothing to run" in out2
    assert len(_study(recipe, stores).get_trials()) == 8
    _, _, parents2, children2 = _runs(stores)
    assert len(parents2) == 1 and len(children2) == 8
    assert [r.configuration for r in again.rows] == [p.point_id for p in plan_points(recipe)[:4]]
    assert again.rows[0].stat("val/top1").mean == pytest.approx(90.25)
    rows, pareto = load_report(summary.study_name, stores)
    assert rows == again.rows and pareto is None


def test_failed_point_is_recorded_and_rerun(cwd):
    recipe = grid_recipe()
    bad = FakeTrial(fail_on=lambda k: k == ("dyrep", "grasp", 0))
    summary, stores, out = _run(recipe, bad)
    assert summary.n_complete == 7 and summary.n_failed == 1 and summary.ran_now == 8
    assert summary.failures == [("method.scoring=grasp", 0, "RuntimeError: boom: loss is nan")]
    assert "FAILED" in out
    study = _study(recipe, stores)
    failed = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["error"] == "RuntimeError: boom: loss is nan"
    client, _, parents, children = _runs(stores)
    bad_run = client.get_run(failed[0].user_attrs["mlflow_run_id"])
    assert bad_run.info.status == "FAILED" and bad_run.data.tags["error"] == "RuntimeError: boom: loss is nan"
    assert "error.txt" in [a.path for a in client.list_artifacts(bad_run.info.run_id)]
    assert sorted(r.info.status for r in children) == ["FAILED"] + ["FINISHED"] * 7

    good = FakeTrial()
    again, _, _ = _run(recipe, good)
    assert good.calls == [("dyrep", "grasp", 0)]
    assert again.n_complete == 8 and again.failures == [] and not again.nothing_to_run
    states = [t.state for t in _study(recipe, stores).get_trials()]
    assert states.count(TrialState.COMPLETE) == 8 and states.count(TrialState.FAIL) == 1
    _, _, parents2, children2 = _runs(stores)
    assert len(parents2) == 1 and len(children2) == 9


KILL_SCRIPT = """
import json, sys, time
from dataclasses import dataclass
from pathlib import Path
from repsearch.spec import Recipe
from repsearch.sweep import run_study
from repsearch.tracking import resolve_stores

@dataclass
class R:
    final: dict
    history: list
    artifacts: list

marker = Path(sys.argv[2])

def fake(recipe, *, data_root, device, out_dir, on_epoch=None, progress=True):
    if recipe.method.name == "origin":
        on_epoch(1, {"val/top1": 1.0})
        marker.write_text("running")
        time.sleep(60)
    m = {"val/top1": 90.0}
    on_epoch(1, m)
    return R(dict(m, **{"test/top1": 89.0}), [m], [])

recipe = Recipe.model_validate(json.loads(sys.argv[1]))
run_study(recipe, "exp.yaml", None, resolve_stores(recipe, "exp.yaml"), device="cpu", data_root=None,
          trial_fn=fake, progress=False)
"""


def test_sigkilled_worker_resumes_at_once(cwd):
    sweep = {"seeds": [0]}
    recipe = grid_recipe(**sweep)
    raw = {"method": {"name": "dyrep"}, "train": {"epochs": 1}, "sweep": dict(recipe.sweep.model_dump(mode="json"))}
    recipe = Recipe.model_validate(raw)
    (cwd / "kill.py").write_text(KILL_SCRIPT)
    marker = cwd / "marker"
    with open(cwd / "kill.err", "wb") as err:
        proc = subprocess.Popen([sys.executable, str(cwd / "kill.py"), json.dumps(raw), str(marker)], cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, (cwd / "kill.err").read_text()[-2000:]
            assert time.monotonic() < deadline, "the worker never reached the sleeping point"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    stores = resolve_stores(recipe, RECIPE_PATH)
    study = _study(recipe, stores)
    running = [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert [t.user_attrs["point"] for t in running] == ["baseline:method.name=origin"]
    assert running[0].user_attrs["worker_pid"] == proc.pid

    fake = FakeTrial(epochs=1)
    summary, _, out = _run(recipe, fake, stores=stores)
    assert fake.calls == [("origin", None, 0)]  # the killed point ran again and nothing else did
    assert summary.n_complete == 4 and summary.failures == []
    trials = _study(recipe, stores).get_trials()
    killed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(killed) == 1 and killed[0].number == running[0].number and "is gone" in killed[0].user_attrs["error"]
    complete = [(t.user_attrs["point"], t.user_attrs["seed"]) for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == sorted((p.point_id, p.seed) for p in plan_points(recipe))
    client, _, parents, children = _runs(stores)
    assert len(parents) == 1
    assert client.get_run(killed[0].user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert sorted(r.info.status for r in children) == ["FINISHED"] * 4 + ["KILLED"]


WINDOW_SCRIPT = """
import json, os, signal, sys
from dataclasses import dataclass
from repsearch.spec import Recipe
from repsearch.sweep import run_study
from repsearch.tracking import Tracker, resolve_stores

@dataclass
class R:
    final: dict
    history: list
    artifacts: list

def fake(recipe, *, data_root, device, out_dir, on_epoch=None, progress=True):
    m = {"val/top1": 90.0}
    on_epoch(1, m)
    return R(dict(m, **{"test/top1": 89.0}), [m], [])

mode = sys.argv[2]
original = Tracker.start_trial
calls = []

def start_trial(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:  # the third trial: killed just before / just after creating its child run
        if mode == "after":
            original(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)

Tracker.start_trial = start_trial
recipe = Recipe.model_validate(json.loads(sys.argv[1]))
run_study(recipe, "exp.yaml", None, resolve_stores(recipe, "exp.yaml"), device="cpu", data_root=None,
          trial_fn=fake, progress=False)
"""


@pytest.mark.parametrize("window", ["before", "after"])
def test_worker_killed_around_creating_the_child_run_leaves_no_orphan_run(cwd, window):
    """SIGKILL after popping a trial and before (``before``) or right after (``after``) creating its
    MLflow child run, so the trial never records ``mlflow_run_id``: the re-run fails the trial, marks
    the orphan run KILLED (found by its study_name / optuna.trial_number tags) and runs the point once."""
    raw = {"method": {"name": "dyrep"}, "train": {"epochs": 1}, "sweep": grid_recipe(seeds=[0]).sweep.model_dump(mode="json")}
    recipe = Recipe.model_validate(raw)
    (cwd / "window.py").write_text(WINDOW_SCRIPT)
    proc = subprocess.run([sys.executable, str(cwd / "window.py"), json.dumps(raw), window], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    stores = resolve_stores(recipe, RECIPE_PATH)
    trials = _study(recipe, stores).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.RUNNING, TrialState.WAITING]
    killed = trials[2]
    assert "mlflow_run_id" not in killed.user_attrs
    _, _, _, children = _runs(stores)
    orphans = [r for r in children if r.info.status == "RUNNING"]
    assert len(orphans) == (window == "after") and len(children) == 2 + (window == "after")

    fake = FakeTrial(epochs=1)
    summary, _, _ = _run(recipe, fake, stores=stores)
    point = killed.user_attrs["point"]
    assert summary.n_complete == 4 and summary.failures == []
    assert [(k[0], k[1]) for k in fake.calls].count(("origin", None) if "origin" in point else ("dyrep", point.split("=")[1])) == 1
    assert len(fake.calls) == 2  # the killed point and the one never started
    after = _study(recipe, stores).get_trials()
    assert after[2].state == TrialState.FAIL and "is gone" in after[2].user_attrs["error"]
    assert [t.user_attrs["point"] for t in after if t.state == TrialState.COMPLETE].count(point) == 1
    client, _, parents, children = _runs(stores)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    statuses = sorted(r.info.status for r in children)
    if window == "after":
        assert statuses == ["FINISHED"] * 4 + ["KILLED"]
        orphan = client.get_run(orphans[0].info.run_id)
        assert orphan.info.status == "KILLED" and orphan.data.tags["optuna.trial_number"] == str(killed.number)
        assert "orphan run of trial 2" in orphan.data.tags["killed"] and "is gone" in orphan.data.tags["killed"]
    else:
        assert statuses == ["FINISHED"] * 4


def test_trial_tags_go_to_optuna_and_mlflow_and_not_learning_warnings(cwd):
    reason = "train/loss within 1% of ln(10) for epochs 2-4"

    def tags_of(key):
        return {"precision": "fp32", **({"not_learning": reason} if key[1] == "grasp" else {})}

    recipe = grid_recipe(seeds=[0])
    summary, stores, _ = _run(recipe, FakeTrial(tags_of=tags_of))
    assert summary.n_complete == 4
    assert summary.warnings == [f"warning: method.scoring=grasp seed 0: not learning ({reason})"]
    grasp = next(r for r in summary.rows if r.configuration == "method.scoring=grasp")
    assert grasp.not_learning == [(0, reason)] and all(not r.not_learning for r in summary.rows if r is not grasp)
    trials = _study(recipe, stores).get_trials()
    client, _, _, children = _runs(stores)
    for t in trials:
        expected = tags_of(("dyrep", t.user_attrs["point"].split("=")[-1], 0))
        assert t.user_attrs["tags"] == expected
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert {k: run.data.tags.get(k) for k in expected} == expected
    assert sum("not_learning" in r.data.tags for r in children) == 1
    again, _, _ = _run(recipe, FakeTrial())
    assert again.nothing_to_run and again.warnings == summary.warnings  # read back from Optuna
    rows, _ = load_report(summary.study_name, stores)
    assert rows == again.rows

    # a trial function whose result has no ``tags`` field: an empty dict is recorded
    plain = Recipe.model_validate({"seed": 3, "train": {"epochs": 1}})
    other = resolve_stores(plain, RECIPE_PATH, runs_dir=cwd / "plain")
    _run(plain, FakeTrial(epochs=1), stores=other)
    assert [t.user_attrs["tags"] for t in _study(plain, other).get_trials()] == [{}]


def test_random_sampler_same_configuration_for_every_seed(cwd):
    recipe = grid_recipe(
        params={"method.scoring": {"choices": ["snip", "grasp", "synflow"]}, "train.lr": {"low": 0.01, "high": 0.2, "log": True}},
        sampler="random", n_trials=3, seeds=[0, 1],
    )
    fake = FakeTrial()
    summary, stores, _ = _run(recipe, fake)
    assert (summary.n_total, summary.n_complete, summary.ran_now) == (8, 8, 8)
    trials = _study(recipe, stores).get_trials()
    sampled = [t for t in trials if t.user_attrs.get("config") is not None]
    assert len(sampled) == 6
    by_config: dict[int, list] = {}
    for t in sampled:
        by_config.setdefault(t.user_attrs["config"], []).append(t)
    assert sorted(by_config) == [0, 1, 2]
    lrs = set()
    for ts in by_config.values():
        assert sorted(t.user_attrs["seed"] for t in ts) == [0, 1]
        assert ts[0].params == ts[1].params and set(ts[0].params) == {"method.scoring", "train.lr"}
        assert len({t.user_attrs["point"] for t in ts}) == 1
        lrs.add(ts[0].params["train.lr"])
    assert len(lrs) == 3 and all(0.01 <= lr <= 0.2 for lr in lrs)
    ran_lrs = sorted(r.train.lr for r in fake.recipes if r.method.name == "dyrep")
    assert ran_lrs == sorted([lr for lr in lrs for _ in (0, 1)])
    assert sorted(t.user_attrs["point"] for t in trials if t.user_attrs.get("config") is None) == ["baseline:method.name=origin"] * 2
    again, _, out = _run(recipe, fake)
    assert again.nothing_to_run and len(fake.calls) == 8 and "8/8 trials complete, nothing to run" in out


def test_median_pruner_prunes_a_clearly_bad_trial(cwd):
    scorings = ["random", "grad_norm", "snip", "grasp", "synflow", "vote"]
    recipe = grid_recipe(params={"method.scoring": {"choices": scorings}}, baselines=[], seeds=[0], pruner="median")
    fake = FakeTrial(epochs=3, bad_on=lambda k: k[1] == "vote")
    summary, stores, out = _run(recipe, fake)
    assert summary.n_complete == 5 and summary.n_pruned == 1 and summary.failures == []
    assert fake.epochs_run[("dyrep", "vote", 0)] == 1  # stopped after its first epoch
    pruned = [t for t in _study(recipe, stores).get_trials() if t.state == TrialState.PRUNED]
    assert [t.user_attrs["point"] for t in pruned] == ["method.scoring=vote"]
    client, _, _, _ = _runs(stores)
    run = client.get_run(pruned[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["pruned"] == "true"
    again, _, out2 = _run(recipe, fake)
    assert again.nothing_to_run and "6/6 trials complete, nothing to run" in out2


def test_multi_objective_pareto_front(cwd):
    recipe = grid_recipe(
        baselines=[], seeds=[0],
        objective=[{"metric": "val/top1", "direction": "maximize"}, {"metric": "avg_flops_m", "direction": "minimize"}],
    )
    # (val, flops): snip (90, 10), grasp (91, 20), synflow (92, 30): all Pareto-optimal; make synflow dominated
    fake = FakeTrial(flops={"snip": 10.0, "grasp": 20.0, "synflow": 30.0}, bad_on=lambda k: k[1] == "synflow")
    summary, stores, _ = _run(recipe, fake)
    study = _study(recipe, stores)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert summary.n_complete == 3
    assert sorted(e.configuration for e in summary.pareto) == ["method.scoring=grasp", "method.scoring=snip"]
    grasp = next(e for e in summary.pareto if e.configuration == "method.scoring=grasp")
    assert grasp.values == {"val/top1": 91.0, "avg_flops_m": 20.0}
    console, buf = _console()
    console.print(summary.pareto)
    assert "Pareto front" in buf.getvalue() and "method.scoring=grasp" in buf.getvalue()


def test_single_recipe_on_journal_storage_and_workers(cwd):
    recipe = Recipe.model_validate({"seed": 7, "train": {"epochs": 2}})
    stores = resolve_stores(recipe, RECIPE_PATH, storage=str(cwd / "study.journal"))
    fake = FakeTrial(epochs=2)
    summary, _, _ = _run(recipe, fake, stores=stores)
    assert (summary.n_total, summary.n_complete) == (1, 1) and fake.calls == [("origin", None, 7)]
    trials = _study(recipe, stores).get_trials()
    assert [(t.user_attrs["point"], t.user_attrs["seed"], t.state) for t in trials] == [("default", 7, TrialState.COMPLETE)]
    assert (cwd / "study.journal").is_file()
    with pytest.raises(SweepError, match="--workers: 0"):
        _run(grid_recipe(), fake, workers=0)
    with pytest.raises(SweepError, match="sqlite:///"):
        resolve = resolve_stores(recipe, RECIPE_PATH, storage=str(cwd / "runs" / "mlflow.db"))
        _run(recipe, fake, stores=resolve)


def test_expired_heartbeat_is_failed_and_its_point_rerun(cwd, monkeypatch):
    import repsearch.sweep.storage as storage_mod

    monkeypatch.setattr(storage_mod, "GRACE_PERIOD_S", 1)
    recipe = grid_recipe(seeds=[0])
    summary, stores, _ = _run(recipe, FakeTrial())
    assert summary.n_complete == 4
    # a worker on another machine took a new seed's point, then went silent
    storage = open_storage(stores.storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    study.enqueue_trial(params={}, user_attrs={"point": "method.scoring=snip", "seed": 5, "kind": "grid",
                                               "overrides": json.dumps({"method.scoring": "snip"})})
    trial = study.get_trials()[-1]
    tid = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(summary.study_name), trial.number)
    storage.set_trial_state_values(tid, state=TrialState.RUNNING)
    storage.set_trial_user_attr(tid, "worker_host", "another-machine")
    storage.set_trial_user_attr(tid, "worker_pid", 1)
    storage.record_heartbeat(tid)
    # another worker popped a trial and died before recording itself (no attrs, no heartbeat)
    study.enqueue_trial(params={}, user_attrs={"point": "method.scoring=grasp", "seed": 5, "kind": "grid",
                                               "overrides": json.dumps({"method.scoring": "grasp"})})
    mute = study.get_trials()[-1]
    mute_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(summary.study_name), mute.number)
    storage.set_trial_state_values(mute_id, state=TrialState.RUNNING)
    time.sleep(2.2)
    fake = FakeTrial()
    recipe5 = grid_recipe(seeds=[0, 5])
    again, _, _ = _run(recipe5, fake, stores=stores)
    assert again.study_name == summary.study_name  # seeds are not part of the study's identity
    after = _study(recipe, stores).get_trials()
    assert after[trial.number].state == TrialState.FAIL and after[mute.number].state == TrialState.FAIL
    assert "never recorded" in after[mute.number].user_attrs["error"]
    assert sorted(fake.calls) == sorted([("dyrep", s, 5) for s in ("snip", "grasp", "synflow")] + [("origin", None, 5)])
    assert again.n_complete == 8


def test_keyboard_interrupt_fails_the_trial_and_kills_its_run(cwd):
    def interrupted(recipe, **kw):
        raise KeyboardInterrupt

    recipe = grid_recipe(seeds=[0])
    with pytest.raises(KeyboardInterrupt):
        _run(recipe, interrupted)
    stores = resolve_stores(recipe, RECIPE_PATH)
    trials = _study(recipe, stores).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.WAITING] * 3
    client, _, parents, children = _runs(stores)
    assert [r.info.status for r in children] == ["KILLED"] and [r.info.status for r in parents] == ["KILLED"]
    # a separate worker only pops WAITING trials (recipe read back from the study); it enqueues nothing
    fake = FakeTrial()
    assert work(study_name(RECIPE_PATH, None, recipe), stores, device="cpu", data_root=None, trial_fn=fake, progress=False) == 3
    assert sorted(fake.calls) == [("dyrep", "grasp", 0), ("dyrep", "synflow", 0), ("origin", None, 0)]
    summary, _, _ = _run(recipe, fake, stores=stores)  # the parent re-enqueues the failed point
    assert summary.n_complete == 4 and fake.calls[3:] == [("dyrep", "snip", 0)]
    _, _, parents2, children2 = _runs(stores)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children2)
    assert [r.info.run_id for r in parents2] == [r.info.run_id for r in parents]
