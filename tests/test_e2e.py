"""End to end through the real CLI on real CIFAR-10 (tiny overrides of the smoke profile): the
whole ablation sweep, the stores it leaves, re-running, and sweeps killed with SIGKILL: mid-trial,
and in the windows around creating a trial's MLflow child run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from repsearch.models import build_model

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "ablation_scoring.yaml")
#: Tiny overrides of the smoke profile; everything a test below relies on is set here (the profile's
#: own values may change: e.g. ``method.interval=1`` gives a Rep step at every epoch up to grow_until).
TINY = [
    "data.train_subset=64", "data.val_size=32", "data.test_subset=32", "model.width=0.0625",
    "train.batch_size=32", "train.eval_batch_size=64", "method.recal_batches=1", "method.probe_batches=1",
    "method.interval=1",
]


def cli(runs: Path, data_root: Path, epochs: int = 2, extra=()):
    args = [sys.executable, "-m", "repsearch", "run", RECIPE, "--profile", "smoke", "--runs-dir", str(runs),
            "--data-root", str(data_root), "--device", "cpu", "--no-progress"]
    for s in TINY + [f"train.epochs={epochs}", f"method.grow_until={epochs}"] + list(extra):
        args += ["--set", s]
    return args


def study_of(runs: Path) -> optuna.Study:
    storage = f"sqlite:///{runs / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def mlflow_runs(runs: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    exps = [e for e in client.search_experiments() if e.name != "Default"]
    assert len(exps) == 1 and Path(exps[0].artifact_location.replace("file://", "")) == runs / "artifacts"
    found = client.search_runs([exps[0].experiment_id], max_results=1000)
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("e2e")
    runs = tmp / "runs"
    proc = subprocess.run(cli(runs, data_root), capture_output=True, text=True, cwd=tmp, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, runs, proc


def test_sweep_creates_one_parent_and_seven_finished_children(finished_sweep):
    tmp, runs, proc = finished_sweep
    assert not (tmp / "mlruns").exists()
    study = study_of(runs)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 7
    points = sorted(t.user_attrs["point"] for t in trials)
    assert len(set(points)) == 7
    client, parents, children = mlflow_runs(runs)
    assert len(parents) == 1 and len(children) == 7
    assert {c.info.status for c in children} == {"FINISHED"}
    by_id = {c.info.run_id: c for c in children}
    for t in trials:  # the trial's non-numeric facts (TrialResult.tags): Optuna user attribute and run tags
        tags = t.user_attrs["tags"]
        assert isinstance(tags, dict)
        assert {k: by_id[t.user_attrs["mlflow_run_id"]].data.tags.get(k) for k in tags} == tags
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        for key in ("val/top1", "train/loss", "flops_m", "avg_flops_m", "n_branches", "cost_gpu_hours", "mem_peak_mb"):
            assert len(client.get_metric_history(c.info.run_id, key)) == 2, key
        assert c.data.metrics["deploy/rel_err"] <= 1e-5
        assert c.data.metrics["deploy/val_top1"] == pytest.approx(c.data.metrics["train_model/val_top1"])
        assert "test/top1" in c.data.metrics
        names = {a.path for a in client.list_artifacts(c.info.run_id)}
        assert {"recipe.yaml", "events.json", "structure.json", "deployed.pt"} <= names
    # the table: 7 configurations with val and test top-1
    for label in ("random", "grad_norm", "snip", "grasp", "synflow", "vote", "origin"):
        assert label in proc.stdout


def test_dyrep_trials_rep_and_deploy_loads_strictly(finished_sweep):
    tmp, runs, _ = finished_sweep
    client, _, children = mlflow_runs(runs)
    for c in children:
        scoring = c.data.params.get("method.scoring")
        local = Path(client.download_artifacts(c.info.run_id, "deployed.pt", str(tmp / c.info.run_id)))
        ckpt = torch.load(local, weights_only=True)
        model = build_model(ckpt["model"], **ckpt["kwargs"])
        model.load_state_dict(ckpt["state_dict"], strict=True)
        if c.data.params["method.name"] == "dyrep":
            events = json.loads(Path(client.download_artifacts(c.info.run_id, "events.json", str(tmp / c.info.run_id))).read_text())
            reps = [e for e in events if e["kind"] == "rep"]
            assert [e["epoch"] for e in reps] == [1, 2], scoring
            assert all(e["metric"] == scoring for e in reps)
            assert c.data.metrics["n_rep"] == 2
            assert all("importances" in e for e in events if e["kind"] == "dep_scan")


def test_rerun_adds_nothing(finished_sweep, data_root):
    tmp, runs, _ = finished_sweep
    proc = subprocess.run(cli(runs, data_root), capture_output=True, text=True, cwd=tmp, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "7/7 trials complete, nothing to run" in proc.stdout
    assert len(study_of(runs).get_trials(deepcopy=False)) == 7
    _, parents, children = mlflow_runs(runs)
    assert len(parents) == 1 and len(children) == 7


def _running_trial_with_a_logged_epoch(runs: Path, handles: dict):
    """The RUNNING trial (from the third on) whose MLflow child run exists and has logged its first
    epoch (``val/top1``), or None. Reads both SQLite stores without creating or writing anything;
    a store that is absent, half created or locked right now reads as "not yet"."""
    from mlflow.tracking import MlflowClient

    try:
        if "storage" not in handles:
            if not (runs / "optuna.db").is_file():
                return None
            handles["storage"] = optuna.storages.RDBStorage(
                f"sqlite:///{runs / 'optuna.db'}", skip_table_creation=True, skip_compatibility_check=True)
        storage = handles["storage"]
        (study,) = storage.get_all_studies()
        trials = storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.RUNNING,))
        running = [t for t in trials if t.number >= 2 and t.user_attrs.get("mlflow_run_id")]
        if not running:
            return None
        if "mlflow" not in handles:  # the child run exists, so the MLflow store is fully created
            handles["mlflow"] = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
        if not handles["mlflow"].get_metric_history(running[0].user_attrs["mlflow_run_id"], "val/top1"):
            return None
        return running[0]
    except Exception:  # absent, half created or locked: try again
        return None


def test_sigkill_mid_trial_then_rerun_runs_the_killed_point_only(tmp_path, data_root):
    runs = tmp_path / "runs"
    epochs = 6  # several epochs per trial: the kill lands after the first one, long before the trial ends
    proc = subprocess.Popen(cli(runs, data_root, epochs=epochs), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed = None
    handles: dict = {}
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
            # kill only once the RUNNING trial's child run exists and has logged an epoch: killing
            # as soon as a trial is RUNNING can land before its child run is created (another window,
            # tested below), and then no run is KILLED
            killed = _running_trial_with_a_logged_epoch(runs, handles)
            if killed is not None:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert killed is not None, "never saw a trial from the third on running with a logged epoch"
    k = killed.number
    before = {t.number: t.state for t in study_of(runs).get_trials(deepcopy=False)}
    assert all(before[i] == TrialState.COMPLETE for i in range(k)) and before[k] == TrialState.RUNNING
    done = subprocess.run(cli(runs, data_root, epochs=epochs), capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = study_of(runs).get_trials(deepcopy=False)
    states = {t.number: t.state for t in trials}
    assert states[k] == TrialState.FAIL
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 7 and len({t.user_attrs["point"] for t in complete}) == 7
    assert len(trials) == 8  # the killed point ran again, nothing else twice
    again = [t for t in complete if t.user_attrs["point"] == killed.user_attrs["point"]]
    assert len(again) == 1 and again[0].number > k
    _, parents, children = mlflow_runs(runs)
    assert len(parents) == 1
    statuses = sorted(c.info.status for c in children)
    assert statuses.count("KILLED") == 1 and statuses.count("FINISHED") == 7


#: Runs the real CLI in a worker that SIGKILLs itself at the third call of Tracker.start_trial (the
#: third trial's MLflow child run): "before" creating the run (the trial is RUNNING in Optuna, no run
#: exists) or right "after" it (the run is RUNNING, its id not yet recorded in the trial).
WINDOW_KILL = """
import os, signal, sys
from repsearch.tracking import Tracker
from repsearch.cli import main

window = sys.argv[1]
original = Tracker.start_trial
calls = []

def start_trial(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        if window == "after":
            original(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)

Tracker.start_trial = start_trial
main(sys.argv[2:])
"""


@pytest.mark.parametrize("window", ["before", "after"])
def test_sigkill_around_creating_the_child_run_then_rerun_leaves_no_orphan_run(tmp_path, data_root, window):
    runs = tmp_path / "runs"
    args = cli(runs, data_root)
    assert args[1:3] == ["-m", "repsearch"]
    proc = subprocess.run([sys.executable, "-c", WINDOW_KILL, window] + args[3:], capture_output=True, text=True,
                          cwd=tmp_path, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    trials = study_of(runs).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.RUNNING] + [TrialState.WAITING] * 4
    killed = trials[2]
    assert "mlflow_run_id" not in killed.user_attrs
    _, parents, children = mlflow_runs(runs)
    assert len(parents) == 1
    assert sorted(c.info.status for c in children) == ["FINISHED"] * 2 + ["RUNNING"] * (window == "after")

    done = subprocess.run(cli(runs, data_root), capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = study_of(runs).get_trials(deepcopy=False)
    assert trials[2].state == TrialState.FAIL and "is gone" in trials[2].user_attrs["error"]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 7 and len({t.user_attrs["point"] for t in complete}) == 7
    assert len(trials) == 8  # the killed point ran again, nothing else twice
    again = [t for t in complete if t.user_attrs["point"] == killed.user_attrs["point"]]
    assert len(again) == 1 and again[0].number > killed.number
    client, parents, children = mlflow_runs(runs)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    statuses = sorted(c.info.status for c in children)
    assert "RUNNING" not in statuses  # no orphan run that nobody finishes
    assert statuses.count("FINISHED") == 7
    assert {c.data.tags["point"] for c in children if c.info.status == "FINISHED"} == {t.user_attrs["point"] for t in complete}
    if window == "after":  # the run created before the kill was found by its tags and marked KILLED
        assert statuses == ["FINISHED"] * 7 + ["KILLED"]
        (orphan,) = [c for c in children if c.info.status == "KILLED"]
        assert orphan.data.tags["optuna.trial_number"] == str(killed.number)
        assert orphan.data.tags["point"] == killed.user_attrs["point"] and "orphan" in orphan.data.tags["killed"]
    else:
        assert statuses == ["FINISHED"] * 7


def test_cli_two_workers_ctrl_c_keeps_finished_trials_and_rerun_completes(tmp_path, data_root):
    """`repsearch run --workers 2` on real data, interrupted like Ctrl-C in a terminal (SIGINT to the
    whole process group) once a trial has finished and both workers are mid-trial: the finished
    trials stay COMPLETE, the interrupted ones are FAIL with KILLED MLflow runs, the parent run is
    KILLED; the same command then runs only what is missing, on 2 workers, with one parent run."""
    runs = tmp_path / "runs"
    args = cli(runs, data_root, epochs=4, extra=["sweep.seeds=[0]"]) + ["--workers", "2"]
    # as a terminal's shell starts it: SIGINT at its default even when this test itself runs with
    # SIGINT ignored (a script's background job, nohup)
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    interrupted = False
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if not (runs / "optuna.db").is_file():
                continue
            try:
                trials = study_of(runs).get_trials(deepcopy=False)
            except Exception:  # the study is being created
                continue
            states = [t.state for t in trials]
            running = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("mlflow_run_id")]
            if TrialState.COMPLETE in states and len(running) == 2:
                os.killpg(proc.pid, signal.SIGINT)
                interrupted = True
                break
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert interrupted, "never saw a finished trial and two running ones"
    assert proc.returncode != 0 and "started 2 workers" in out, out[-3000:]
    trials = study_of(runs).get_trials(deepcopy=False)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    done_before = {t.number for t in trials if t.state == TrialState.COMPLETE}
    # both workers were mid-trial (one may have just finished when the signal landed)
    assert 1 <= len(failed) <= 2 and all("KeyboardInterrupt" in t.user_attrs.get("error", "") for t in failed), [t.user_attrs for t in failed]
    assert done_before and proc.pid not in {t.user_attrs.get("worker_pid") for t in trials}  # the parent ran none
    _, parents, children = mlflow_runs(runs)
    assert [p.info.status for p in parents] == ["KILLED"]
    by_trial = {int(c.data.tags["optuna.trial_number"]): c.info.status for c in children}
    assert all(by_trial[t.number] == "KILLED" for t in failed)
    again = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    trials = study_of(runs).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 7 and len({t.user_attrs["point"] for t in complete}) == 7
    assert done_before <= {t.number for t in complete}  # nothing finished was lost or run again
    assert len({t.user_attrs["worker_pid"] for t in complete}) >= 2  # trials ran in more than one worker process
    _, parents, children = mlflow_runs(runs)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.info.status for c in children) == ["FINISHED"] * 7 + ["KILLED"] * len(failed)


#: Runs the real CLI and SIGKILLs itself right after the checkpoint of epoch argv[1] is written (the
#: file is complete: the kill lands after the atomic rename), as a kill -9 at that moment would.
CHECKPOINT_KILL = """
import os, signal, sys
from repsearch.checkpoint import Checkpointer
from repsearch.cli import main

target = int(sys.argv[1])
original = Checkpointer.save

def save(self, epoch, state):
    path = original(self, epoch, state)
    if epoch == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return path

Checkpointer.save = save
main(sys.argv[2:])
"""

#: Measures that time the run (wall clock, throughput, memory, device-hours): a resumed trial differs
#: there by construction, so the equality below leaves them out.
TIMING = {"epoch_time_s", "train_images_per_s", "mem_peak_mb", "cost_gpu_hours", "trial_time_s"}


def test_sigkill_after_the_third_adjustment_then_rerun_resumes_bit_for_bit(tmp_path, data_root):
    """DESIGN.md "Checkpoints and resume": a deterministic DyRep smoke trial (one point, CPU) killed with
    SIGKILL once the checkpoint after its 3rd adjustment exists; the same command resumes it from that
    checkpoint and ends with the deployed weights, events and per-epoch and final metrics of an
    uninterrupted run of the same command in another folder (timing measures aside)."""
    # adjustments (Rep, Dep) at the ends of epochs 1-5 and a checkpoint at every epoch end (the default
    # period for 6 epochs): killed right after the 3rd adjustment's checkpoint, the resumed run makes
    # the 4th and 5th (new branches drawn from the restored RNG, chosen from the restored scores)
    epochs = 6
    one = ["train.deterministic=true", "method.grow_until=5",
           "sweep.params={method.scoring: {choices: [synflow]}}", "sweep.baselines=[]"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    args = cli(a / "runs", data_root, epochs=epochs, extra=one)
    killed = subprocess.run([sys.executable, "-c", CHECKPOINT_KILL, "3"] + args[3:], capture_output=True, text=True,
                            cwd=a, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (study,) = [p.name for p in (a / "runs" / "trials").iterdir()]
    folder = a / "runs" / "trials" / study / "0000" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_0002.pt", "epoch_0003.pt"]  # the last 2
    ckpt = torch.load(folder / "epoch_0003.pt", weights_only=True)
    assert [e["epoch"] for e in ckpt["method"]["events"] if e["kind"] == "rep"] == [1, 2, 3]

    resumed = subprocess.run(args, capture_output=True, text=True, cwd=a, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from trial 0 epoch 3" in resumed.stdout
    straight = subprocess.run(cli(b / "runs", data_root, epochs=epochs, extra=one), capture_output=True, text=True,
                              cwd=b, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "resumed" not in straight.stdout

    t0, t1 = study_of(a / "runs").get_trials(deepcopy=False)
    assert (t0.state, t1.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert t1.user_attrs["resumed_from"] == "trial 0 epoch 3"
    assert not (a / "runs" / "trials").exists()  # the slot is done: its checkpoints are gone
    client_a, _, runs_a = mlflow_runs(a / "runs")
    client_b, _, runs_b = mlflow_runs(b / "runs")
    (old,) = [r for r in runs_a if r.info.status == "KILLED"]
    (new,) = [r for r in runs_a if r.info.status == "FINISHED"]
    (ref,) = runs_b
    assert len(runs_a) == 2 and ref.info.status == "FINISHED"
    assert new.data.tags["resumed_from"] == "trial 0 epoch 3" and new.data.tags["resumed_from_run"] == old.info.run_id

    def artifact(client, run, name, where):
        return Path(client.download_artifacts(run.info.run_id, name, str(tmp_path / where)))

    dep_a = torch.load(artifact(client_a, new, "deployed.pt", "da"), weights_only=True)["state_dict"]
    dep_b = torch.load(artifact(client_b, ref, "deployed.pt", "db"), weights_only=True)["state_dict"]
    assert list(dep_a) == list(dep_b) and all(torch.equal(dep_a[k], dep_b[k]) for k in dep_b)
    ev_a = json.loads(artifact(client_a, new, "events.json", "ea").read_text())
    ev_b = json.loads(artifact(client_b, ref, "events.json", "eb").read_text())
    assert [e["epoch"] for e in ev_a if e["kind"] == "resume"] == [3]
    assert [e for e in ev_a if e["kind"] != "resume"] == ev_b
    assert [e["epoch"] for e in ev_b if e["kind"] == "rep"] == [1, 2, 3, 4, 5]
    assert artifact(client_a, new, "structure.json", "sa").read_text() == artifact(client_b, ref, "structure.json", "sb").read_text()
    # every metric: the whole per-epoch history (epochs 1-3 replayed from the checkpoint) and the final value
    assert set(new.data.metrics) == set(ref.data.metrics)
    for key in sorted(set(ref.data.metrics) - TIMING):
        ha = sorted((m.step, m.value) for m in client_a.get_metric_history(new.info.run_id, key))
        hb = sorted((m.step, m.value) for m in client_b.get_metric_history(ref.info.run_id, key))
        assert ha == hb, key
    assert [s for s, _ in sorted((m.step, m.value) for m in client_a.get_metric_history(new.info.run_id, "val/top1"))] \
        == list(range(1, epochs + 1))
