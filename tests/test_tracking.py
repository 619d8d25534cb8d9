"""Stores precedence (flag > env > recipe > mlflow.yaml > defaults) and the MLflow run layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from repsearch.spec import Recipe
from repsearch.tracking import (
    ROLE_TAG,
    Tracker,
    TrackingError,
    flatten_params,
    read_mlflow_yaml,
    repo_root,
    resolve_stores,
    ui_command,
)


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("REPSEARCH_STORAGE", raising=False)
    return tmp_path


def _recipe(**tracking) -> Recipe:
    return Recipe.model_validate({"tracking": tracking})


def test_defaults_come_from_the_repo_mlflow_yaml(cwd):
    cfg = read_mlflow_yaml(repo_root() / "mlflow.yaml")
    assert cfg["runs_dir"] == "runs" and cfg["tracking_uri"] is None and cfg["experiment"] == "{stem}"
    assert cfg["ui"] == {"host": "127.0.0.1", "port": 5000}
    s = resolve_stores(_recipe(), "recipes/dyrep_cifar10.yaml", environ={})
    runs = cwd / "runs"
    assert s.runs_dir == runs and runs.is_dir()
    assert s.tracking_uri == f"sqlite:///{runs / 'mlflow.db'}"
    assert s.storage == f"sqlite:///{runs / 'optuna.db'}"
    assert s.experiment == "dyrep_cifar10"
    assert s.artifact_location == str(runs / "artifacts")


def test_precedence_flag_env_recipe_yaml(cwd):
    (cwd / "mlflow.yaml").write_text(yaml.safe_dump({
        "runs_dir": "yaml_runs", "tracking_uri": "sqlite:///yaml.db", "storage": "yaml.journal", "experiment": "x-{stem}{profile}",
    }))
    env = {"MLFLOW_TRACKING_URI": "sqlite:///env.db", "REPSEARCH_STORAGE": "sqlite:///env_optuna.db"}
    # mlflow.yaml only
    s = resolve_stores(_recipe(), "a/b.yaml", environ={}, profile="smoke")
    assert (s.runs_dir, s.tracking_uri, s.storage, s.experiment) == (
        cwd / "yaml_runs", "sqlite:///yaml.db", str(cwd / "yaml.journal"), "x-bsmoke")
    # recipe > mlflow.yaml
    rec = _recipe(runs_dir="rec_runs", tracking_uri="sqlite:///rec.db", storage="sqlite:///rec_optuna.db", experiment="rec")
    s = resolve_stores(rec, "a/b.yaml", environ={})
    assert (s.runs_dir, s.tracking_uri, s.storage, s.experiment) == (cwd / "rec_runs", "sqlite:///rec.db", "sqlite:///rec_optuna.db", "rec")
    # env > recipe
    s = resolve_stores(rec, "a/b.yaml", environ=env)
    assert (s.tracking_uri, s.storage) == ("sqlite:///env.db", "sqlite:///env_optuna.db")
    # flag > env
    s = resolve_stores(rec, "a/b.yaml", environ=env, runs_dir="flag_runs", tracking_uri="sqlite:///flag.db", storage="flag.journal")
    assert (s.runs_dir, s.tracking_uri, s.storage) == (cwd / "flag_runs", "sqlite:///flag.db", str(cwd / "flag.journal"))
    assert resolve_stores(rec, "a/b.yaml", environ={}, tracking_uri="sub/m.db").tracking_uri == f"sqlite:///{cwd / 'sub' / 'm.db'}"
    # a remote tracking server chooses its own artifact location
    assert resolve_stores(rec, "a/b.yaml", environ={}, tracking_uri="http://127.0.0.1:5000").artifact_location is None


def test_mlflow_yaml_mistakes_are_user_errors(cwd):
    (cwd / "mlflow.yaml").write_text("runs_dir: r\nexperimnet: x\n")
    with pytest.raises(TrackingError, match="unknown key 'experimnet'"):
        resolve_stores(_recipe(), "a.yaml", environ={})
    (cwd / "mlflow.yaml").write_text("runs_dir: [\n")
    with pytest.raises(TrackingError, match="invalid YAML"):
        read_mlflow_yaml()
    (cwd / "mlflow.yaml").write_text("experiment: '{nope}'\n")
    with pytest.raises(TrackingError, match="template"):
        resolve_stores(_recipe(), "a.yaml", environ={})


def test_ui_command(cwd):
    s = resolve_stores(_recipe(), "exp.yaml", environ={})
    assert ui_command(s) == ["mlflow", "ui", "--backend-store-uri", s.tracking_uri, "--default-artifact-root",
                             s.artifact_location, "--host", "127.0.0.1", "--port", "5000", "--workers", "1"]
    cmd = ui_command(runs_dir="other", port=5123, host="0.0.0.0")
    assert cmd[3] == f"sqlite:///{cwd / 'other' / 'mlflow.db'}" and cmd[-6:-2] == ["--host", "0.0.0.0", "--port", "5123"]


def test_flatten_params():
    flat = flatten_params({"method": {"name": "dyrep", "space": ["kxk", "1x1"]}, "train": {"lr": 0.1, "amp": True}, "seed": 3,
                           "data": {"root": None}, "profiles": {}})
    assert flat == {"method.name": "dyrep", "method.space": '["kxk", "1x1"]', "train.lr": "0.1", "train.amp": "true",
                    "seed": "3", "data.root": "null", "profiles": "{}"}


def test_tracker_layout_parent_reattached_and_artifacts_under_runs(cwd):
    s = resolve_stores(_recipe(), "exp.yaml", environ={})
    tr = Tracker(s)
    exp = tr.client.get_experiment(tr.experiment_id)
    assert exp.name == "exp" and exp.artifact_location == str(cwd / "runs" / "artifacts")
    parent = tr.parent_run("exp-0123abcd", tags={"recipe_hash": "h"}, recipe_text="seed: 0\n")
    tr.finish_parent(parent)
    tr2 = Tracker(s)  # a second process: same experiment, same parent
    assert tr2.experiment_id == tr.experiment_id
    assert tr2.parent_run("exp-0123abcd") == parent
    assert tr2.client.get_run(parent).info.status == "RUNNING"
    assert tr2.find_parent("exp-other") is None
    child = tr2.start_trial(parent, run_name="p seed=0", tags={"point": "p", "seed": 0})
    tr2.log_params(child, {f"k{i}": str(i) for i in range(150)})  # > 100: two batches
    tr2.log_metrics(child, {"val/top1": 50.0, "note": "text", "n": 3}, step=1)
    tr2.log_metrics(child, {"val/top1": 60.0}, step=2)
    art = cwd / "structure.json"
    art.write_text("{}")
    tr2.log_artifacts(child, [art])
    tr2.kill_run(child, "worker gone")
    run = tr2.client.get_run(child)
    assert run.info.status == "KILLED" and run.data.tags["killed"] == "worker gone"
    assert run.data.tags["mlflow.parentRunId"] == parent and ROLE_TAG not in run.data.tags
    assert run.data.tags["git_commit"] and run.data.tags["versions.mlflow"]
    assert len(run.data.params) == 150 and run.data.metrics == {"val/top1": 60.0, "n": 3.0}
    assert [m.step for m in tr2.client.get_metric_history(child, "val/top1")] == [1, 2]
    assert Path(run.info.artifact_uri, "structure.json").is_file()
    assert Path(run.info.artifact_uri).is_relative_to(cwd / "runs" / "artifacts")
    assert Path(tr2.client.get_run(parent).info.artifact_uri, "recipe.yaml").read_text() == "seed: 0\n"
    assert not (cwd / "mlruns").exists()


def test_running_trial_runs_lists_the_studys_unfinished_child_runs(cwd):
    s = resolve_stores(_recipe(), "exp.yaml", environ={})
    tr = Tracker(s)
    study, other = "exp-0123abcd", "exp-other"
    parent = tr.parent_run(study)  # RUNNING, tagged study_name, but not a trial's run
    runs = {}
    for name, n in ((study, 0), (study, 1), (study, 2), (other, 0)):
        runs[name, n] = tr.start_trial(parent, run_name=f"t{n}", tags={"study_name": name, "optuna.trial_number": n})
    tr.finish_trial(runs[study, 0], tags={"precision": "fp32", "long": "x" * 9000})
    tr.kill_run(runs[study, 2], "worker gone")
    assert tr.running_trial_runs(study) == [(runs[study, 1], 1)]
    assert tr.running_trial_runs(other) == [(runs[other, 0], 0)]
    assert tr.running_trial_runs("exp-none") == []
    assert tr.run_status(runs[study, 2]) == "KILLED" and tr.run_status("0" * 32) is None
    tags = tr.client.get_run(runs[study, 0]).data.tags
    assert tags["precision"] == "fp32" and len(tags["long"]) == 8000  # cut to MLflow's limit on a tag value
