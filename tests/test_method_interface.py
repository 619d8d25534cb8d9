"""The method interface v2 through the real Trainer, trial and sweep on real data: a toy method
defined only here (not registered in the package) uses every hook; the TF32 flags follow
``train.tf32`` and ``Method.fp32_gradients`` and are restored after a trial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from repsearch.measures import MEASURES, register_measure, unregister_measure
from repsearch.methods import METHODS, EpochChanges, Method
from repsearch.methods.dyrep import DyRep
from repsearch.spec import trial_recipe, validate_dict
from repsearch.train import set_tf32, tf32_flags
from repsearch.trial import run_trial

TINY = {
    "data": {"val_size": 64, "train_subset": 128, "test_subset": 64},
    "model": {"name": "vgg16", "width": 0.0625},
    "train": {"epochs": 3, "batch_size": 32, "eval_batch_size": 64, "lr": 0.05, "warmup_epochs": 1},
}


def recipe(method: dict, **train):
    d = json.loads(json.dumps(TINY))
    d["method"] = method
    d["train"].update(train)
    return validate_dict(d, "test")


class Toy(Method):
    """Uses every hook of the interface: a measure, an artifact, an optimizer reset, state."""

    name = "toy"

    def __init__(self, spec, **kw):
        super().__init__(spec, **kw)
        self.started: list[int] = []
        self.seen_val: dict[int, float] = {}
        self.state_after_reset: int | None = None
        self.n_resets = 0

    def on_epoch_start(self, model, epoch):
        self.started.append(epoch)

    def on_epoch_end(self, model, epoch, loader, measures):
        self.seen_val[epoch] = measures["val/top1"]
        if epoch == 2:
            self.n_resets += 1
            self.events.append({"epoch": epoch, "kind": "reset"})
            return EpochChanges(reset_optimizer="all")
        return EpochChanges()

    def sync_optimizer(self, optimizer, model, changes):
        counts = super().sync_optimizer(optimizer, model, changes)
        self.state_after_reset = len(optimizer.state)
        return counts

    def epoch_measures(self, epoch):
        return {"toy/val_seen": self.seen_val[epoch]}

    def final_measures(self):
        return {"toy/n_resets": self.n_resets, "toy/note": "reset at epoch 2"}

    def artifacts(self, out_dir: Path):
        p = Path(out_dir) / "toy.json"
        p.write_text(json.dumps({"started": self.started}))
        return [p]

    def state_dict(self):
        return {**super().state_dict(), "n_resets": self.n_resets, "seen": torch.tensor(list(self.seen_val.values()))}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.n_resets = int(state["n_resets"])
        self.seen_val = {i + 1: float(v) for i, v in enumerate(state["seen"].tolist())}


@pytest.fixture
def toy_measures():
    register_measure("toy/val_seen", "%", "val/top1 as the toy method saw it", "epoch")
    register_measure("toy/n_resets", "count", "optimizer resets of the toy method", "final")
    yield
    unregister_measure("toy/val_seen")
    unregister_measure("toy/n_resets")


def test_toy_method_is_not_registered():
    assert "toy" not in METHODS and "toy/val_seen" not in MEASURES


def test_toy_method_through_trainer_trial_and_sweep_to_mlflow(tmp_path, data_root, toy_measures):
    from mlflow.tracking import MlflowClient

    from repsearch.sweep import run_study
    from repsearch.tracking import resolve_stores

    rec = recipe({"name": "origin"})
    toys: list[Toy] = []

    def trial_fn(r, **kw):
        toys.append(Toy(r.method, recipe=r, device=kw["device"]))
        return run_trial(r, method=toys[-1], **kw)

    stores = resolve_stores(rec, tmp_path / "toy.yaml", runs_dir=tmp_path / "runs")
    summary = run_study(rec, tmp_path / "toy.yaml", None, stores, device="cpu", data_root=str(data_root),
                        trial_fn=trial_fn, progress=False)
    assert summary.n_complete == 1
    (toy,) = toys
    assert toy.started == [1, 2, 3]
    assert sorted(toy.seen_val) == [1, 2, 3]
    assert toy.state_after_reset == 0  # every parameter's momentum dropped at the end of epoch 2

    client = MlflowClient(tracking_uri=stores.tracking_uri)
    exp = client.get_experiment_by_name(stores.experiment)
    (child,) = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    hist = client.get_metric_history(child.info.run_id, "toy/val_seen")
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [1, 2, 3]
    assert [m.value for m in sorted(hist, key=lambda m: m.step)] == pytest.approx([toy.seen_val[e] for e in (1, 2, 3)])
    val = sorted(client.get_metric_history(child.info.run_id, "val/top1"), key=lambda m: m.step)
    assert [m.value for m in val] == pytest.approx([toy.seen_val[e] for e in (1, 2, 3)])
    assert child.data.metrics["toy/n_resets"] == 1
    assert child.data.tags["toy/note"] == "reset at epoch 2"
    assert child.data.tags["precision"] == "fp32"  # CPU: no autocast, TF32 meaningless
    names = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"toy.json", "events.json", "deployed.pt"} <= names

    # the method's state round-trips through a weights_only checkpoint
    path = tmp_path / "state.pt"
    torch.save(toy.state_dict(), path)
    fresh = Toy(rec.method, recipe=rec)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.n_resets == 1 and fresh.events == toy.events
    assert fresh.seen_val == pytest.approx(toy.seen_val)


def test_unregistered_method_measure_is_refused(tmp_path, data_root):
    class Bad(Method):
        def epoch_measures(self, epoch):
            return {"not/registered": 1.0}

    rec = recipe({"name": "origin"}, epochs=2)
    with pytest.raises(KeyError, match="not/registered"):
        run_trial(rec, data_root=str(data_root), device="cpu", out_dir=tmp_path, progress=False,
                  method=Bad(rec.method, recipe=rec))


class FlagSpy:
    """Records the TF32 flags seen by every training step (after backward)."""

    def __init__(self):
        self.flags: dict[int, set] = {}

    def record(self, epoch):
        self.flags.setdefault(epoch, set()).add(tf32_flags())


def spying(cls):
    class Spy(cls):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.spy = FlagSpy()
            self.epoch = 0

        def on_epoch_start(self, model, epoch):
            super().on_epoch_start(model, epoch)
            self.epoch = epoch

        def after_backward(self, model, step):
            super().after_backward(model, step)
            self.spy.record(self.epoch)

    return Spy


def test_tf32_off_while_synflow_scores_and_restored_after(tmp_path, data_root):
    rec = recipe({"name": "dyrep", "scoring": "synflow", "interval": 1, "grow_until": 2, "recal_batches": 1,
                  "probe_batches": 1}, tf32=True)
    method = spying(DyRep)(rec.method, recipe=rec)
    assert [method.fp32_gradients(e) for e in (1, 2, 3)] == [True, True, False]
    set_tf32((True, False))  # a sentinel the trial must restore
    try:
        res = run_trial(rec, data_root=str(data_root), device="cpu", out_dir=tmp_path, progress=False, method=method)
        assert tf32_flags() == (True, False)
    finally:
        set_tf32(False)
    # scored epochs 1-2: exact fp32 whatever train.tf32 says; epoch 3 (no scoring left): TF32 on
    assert method.spy.flags == {1: {(False, False)}, 2: {(False, False)}, 3: {(True, True)}}
    assert res.final["fp32_epochs"] == 3  # CPU: no autocast in any epoch
    assert res.tags["precision.fp32_epochs"] == "1-3"


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_field_sets_flags_for_a_non_scoring_trial(tmp_path, data_root, tf32):
    from repsearch.methods.origin import Origin

    rec = recipe({"name": "origin"}, tf32=tf32, epochs=2)
    method = spying(Origin)(rec.method, recipe=rec)
    set_tf32(not tf32)
    try:
        run_trial(rec, data_root=str(data_root), device="cpu", out_dir=tmp_path, progress=False, method=method)
        assert tf32_flags() == (not tf32, not tf32)
    finally:
        set_tf32(False)
    assert method.spy.flags == {1: {(tf32, tf32)}, 2: {(tf32, tf32)}}


def test_precision_recorded_alike_on_every_arm_of_the_ablation():
    from repsearch.spec import load_recipe

    root = Path(__file__).resolve().parents[1]
    rec, _ = load_recipe(root / "recipes" / "ablation_scoring.yaml", "smoke")
    points = [{"method.scoring": s} for s in rec.sweep.params["method.scoring"].choices] + list(rec.sweep.baselines)
    trials = [trial_recipe(rec, p, 0) for p in points]
    assert len(trials) == 7
    assert {(t.train.amp, t.train.tf32) for t in trials} == {(False, False)}
