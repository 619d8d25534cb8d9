"""repsearch.plots: a study's PNG plots from a tiny MLflow store written with the real Tracker.

The store holds a parent run and four FINISHED child runs (origin and DyRep × seeds 0, 1) with
3-epoch metric histories; DyRep's ``events.json`` is hand-made in the shape of the real one, and a
separate test generates a real one with a 3-epoch DyRep trial on real CIFAR-10 and checks the map
against the trial's ``structure.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repsearch import plots
from repsearch.plots import aggregate_by_step, dyrep_structure_map, pareto_front, study_plots

CORE = ["val_top1_vs_epoch.png", "train_loss_vs_epoch.png", "val_top1_vs_flops.png", "flops_vs_epoch.png",
        "n_branches_vs_epoch.png"]

# shaped like DyRep's real events (repsearch.methods.dyrep): Rep of features.3 at epoch 1, Dep cuts
# two of its branches at epoch 2 while a nested block grows in its kxk branch, features.7 grows at 3
EVENTS = [
    {"epoch": 1, "kind": "rep", "path": "features.3", "depth": 0, "added": ["1x1", "1x1-kxk", "1x1-avg", "identity"],
     "skipped": {}, "metric": "synflow", "scores": {"features.3": 2.0, "features.7": 1.0}, "details": {},
     "compensation_max_err": 3e-8},
    {"epoch": 1, "kind": "dep_scan", "importances": {}, "cut": 0},
    {"epoch": 2, "kind": "rep", "path": "features.3.branches.kxk.conv", "depth": 1, "added": ["1x1", "kx1"],
     "skipped": {}, "metric": "synflow", "scores": {}, "details": {}, "compensation_max_err": 3e-8},
    {"epoch": 2, "kind": "dep", "path": "features.3",
     "importances": {"1x1": 0.5, "1x1-kxk": 0.02, "1x1-avg": 0.3, "identity": 0.01}, "mean": 0.2075, "std": 0.23,
     "threshold": 0.02, "floor": 0.1, "removed": ["1x1-kxk", "identity"], "collapsed": False},
    {"epoch": 2, "kind": "dep_scan",
     "importances": {"features.3": {"1x1": 0.5, "1x1-kxk": 0.02, "1x1-avg": 0.3, "identity": 0.01}}, "cut": 2},
    {"epoch": 3, "kind": "rep", "path": "features.7", "depth": 0, "added": ["1x1", "1xk"], "skipped": {},
     "metric": "synflow", "scores": {}, "details": {}, "compensation_max_err": 3e-8},
    {"epoch": 3, "kind": "dep_scan",
     "importances": {"features.3": {"1x1": 0.6, "1x1-avg": 0.35},
                     "features.3.branches.kxk.conv": {"1x1": 0.04, "kx1": 0.05}}, "cut": 0},
]


def _tracker(runs: Path, experiment: str):
    from repsearch.tracking import Stores, Tracker

    runs.mkdir(parents=True, exist_ok=True)
    return Tracker(Stores(runs_dir=runs, tracking_uri=f"sqlite:///{runs / 'mlflow.db'}",
                          storage=f"sqlite:///{runs / 'optuna.db'}", experiment=experiment,
                          artifact_location=str(runs / "artifacts")))


def _write_study(tracker, tmp: Path, study: str, sampler: str, configs: dict, events=None) -> dict:
    """Parent + FINISHED children (config × seeds 0, 1) with 3 epochs of metrics. Returns the runs."""
    parent = tracker.parent_run(study, tags={"sampler": sampler})
    labels = {}
    for ci, (label, method) in enumerate(configs.items()):
        for seed in (0, 1):
            rid = tracker.start_trial(parent, run_name=f"{label}-s{seed}", tags={"study_name": study})
            tracker.log_params(rid, {"seed": str(seed), "method.name": method, "train.epochs": "3"})
            flops = 10.0 + 3 * ci
            for epoch in (1, 2, 3):
                tracker.log_metrics(rid, {
                    "val/top1": 20.0 + 10 * epoch + 5 * ci + seed, "train/loss": 2.3 / epoch + 0.1 * seed,
                    "flops_m": flops + (epoch - 1) * ci, "n_branches": 13 + 4 * ci * (epoch - 1),
                    "avg_flops_m": flops + ci * (epoch - 1) / 2,
                }, step=epoch)
            tracker.log_metrics(rid, {"test/top1": 50.0 + ci}, step=3)
            if method == "dyrep" and events is not None and seed == 1:  # seed 0 has none: seed 1 is used
                folder = tmp / rid
                folder.mkdir()
                (folder / "events.json").write_text(json.dumps(events))
                tracker.log_artifacts(rid, [folder / "events.json"])
            tracker.finish_trial(rid)
            labels[rid] = label
    tracker.finish_parent(parent)
    client = tracker.client
    return {"parent": client.get_run(parent), "children": [client.get_run(r) for r in labels], "labels": labels}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plots_store")
    tracker = _tracker(tmp / "runs", "plots_test")
    grid = _write_study(tracker, tmp, "grid_study", "grid", {"origin": "origin", "dyrep scoring=synflow": "dyrep"},
                        events=EVENTS)
    single = _write_study(tracker, tmp, "single_study", "tpe", {"origin": "origin"})
    return tracker.client, grid, single


def _is_png(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
        return im.size


def test_every_core_plot_and_the_dyrep_map_are_valid_pngs(store, tmp_path):
    client, grid, _ = store
    out = study_plots(client, grid["parent"], grid["children"], grid["labels"], tmp_path / "out")
    names = [p.name for p in out]
    assert names == CORE + ["dyrep_structure_dyrep_scoring_synflow.png"]
    for p in out:
        assert p.parent == tmp_path / "out"
        w, h = _is_png(p)
        assert w >= 400 and h >= 250  # 8×5 in at 100 dpi, cut to the drawn area
    assert not any(n.startswith("optuna_") for n in names)  # no Optuna study given


def test_optional_plots_skipped_without_error(store, tmp_path, caplog):
    client, _, single = store
    caplog.set_level(logging.INFO, logger="repsearch.plots")
    out = study_plots(client, single["parent"], single["children"], single["labels"], tmp_path)
    assert [p.name for p in out] == CORE  # origin only: no DyRep map
    assert not list(tmp_path.glob("dyrep_*")) and not list(tmp_path.glob("optuna_*"))
    # no finished child at all: nothing to draw, no error
    assert study_plots(client, single["parent"], [], {}, tmp_path / "empty") == []
    assert any("skipped" in r.getMessage() for r in caplog.records)


def test_dyrep_trial_without_events_is_skipped(store, tmp_path, caplog):
    client, grid, _ = store
    caplog.set_level(logging.INFO, logger="repsearch.plots")
    seed0 = [r for r in grid["children"] if r.data.params["method.name"] == "dyrep" and r.data.params["seed"] == "0"]
    out = study_plots(client, grid["parent"], seed0, grid["labels"], tmp_path)
    assert [p.name for p in out] == CORE
    assert any("events.json" in r.getMessage() for r in caplog.records)


def _optuna_study(n_obj: int, n_trials: int = 6):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["maximize"] + ["minimize"] * (n_obj - 1)
    study = optuna.create_study(study_name="s", directions=directions,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    if n_obj > 1:
        study.set_metric_names(["val/top1", "avg_flops_m"][:n_obj])

    def objective(trial):
        g = trial.suggest_float("method.gamma_init", 1e-3, 10, log=True)
        t = trial.suggest_categorical("method.interval", [5, 10])
        v = 90 - abs(np.log10(g) + 2) - 0.1 * t
        return (v, 10 + t) if n_obj > 1 else v

    study.optimize(objective, n_trials=n_trials)
    return study


def test_optuna_plots_for_a_multi_objective_tpe_study(store, tmp_path):
    client, _, single = store  # parent tagged sampler=tpe
    out = study_plots(client, single["parent"], single["children"], single["labels"], tmp_path,
                      optuna_study=_optuna_study(2))
    names = {p.name for p in out}
    assert {"optuna_pareto_front.png", "optuna_param_importances_val_top1.png", "optuna_slice_val_top1.png",
            "optuna_param_importances_avg_flops_m.png", "optuna_slice_avg_flops_m.png"} <= names
    for p in out:
        _is_png(p)


def test_optuna_plots_grid_single_objective_and_failures(store, tmp_path, monkeypatch, caplog):
    import optuna.visualization.matplotlib as ovm

    client, grid, single = store
    # grid study, one objective: neither a Pareto front nor importance/slice plots
    out = study_plots(client, grid["parent"], grid["children"][:2], grid["labels"], tmp_path / "g",
                      optuna_study=_optuna_study(1))
    assert not [p for p in out if p.name.startswith("optuna_")]
    # non-grid, one objective: importance and slice; a failing plot is skipped with a log line
    caplog.set_level(logging.INFO, logger="repsearch.plots")

    def boom(*a, **k):
        raise RuntimeError("slice plot failed on purpose")

    monkeypatch.setattr(ovm, "plot_slice", boom)
    out = study_plots(client, single["parent"], single["children"], single["labels"], tmp_path / "t",
                      optuna_study=_optuna_study(1))
    names = [p.name for p in out]
    assert "optuna_param_importances.png" in names and "optuna_slice.png" not in names
    assert not (tmp_path / "t" / "optuna_slice.png").exists()
    assert any("optuna_slice.png skipped" in r.getMessage() for r in caplog.records)
    # a study without a COMPLETE trial: skipped
    import optuna

    empty = optuna.create_study()
    out = study_plots(client, single["parent"], single["children"], single["labels"], tmp_path / "e", optuna_study=empty)
    assert [p.name for p in out] == CORE


def test_pareto_front_hand_made():
    # (avg FLOPs in M MACs, val top-1 in %)
    pts = [(1, 70), (2, 75), (2, 74), (3, 75), (0.5, 60), (4, 80), (1, 70), (5, 79), (float("nan"), 99)]
    assert pareto_front(pts) == [4, 0, 6, 1, 5]
    assert pareto_front([]) == []
    assert pareto_front([(3, 50)]) == [0]
    assert pareto_front([(1, 1), (2, 2), (3, 3)]) == [0, 1, 2]  # each trades FLOPs for accuracy
    assert pareto_front([(1, 3), (2, 2), (3, 1)]) == [0]


def test_aggregate_by_step_aligns_epochs():
    steps, mean, std, n = aggregate_by_step([([1, 2, 3], [10.0, 20.0, 30.0]), ([2, 1], [24.0, 12.0])])
    assert steps.tolist() == [1, 2, 3]
    assert mean.tolist() == [11.0, 22.0, 30.0]
    assert np.allclose(std, [np.sqrt(2), np.sqrt(8), 0.0])
    assert n.tolist() == [2, 2, 1]


def test_structure_map_of_hand_made_events():
    smap = dyrep_structure_map(EVENTS, n_epochs=4)
    assert smap.n_epochs == 4
    rows = {k: i for i, k in enumerate(smap.rows)}
    assert list(rows)[:4] == [("features.3", b) for b in ("1x1", "1x1-kxk", "1x1-avg", "identity")]
    alive = {k: smap.alive[i].tolist() for k, i in rows.items()}
    assert alive[("features.3", "1x1")] == [True] * 4
    assert alive[("features.3", "identity")] == [True, True, False, False]  # cut at the end of epoch 2
    assert alive[("features.3.branches.kxk.conv", "kx1")] == [False, True, True, True]
    assert alive[("features.7", "1xk")] == [False, False, True, True]
    imp = {k: smap.importance[i] for k, i in rows.items()}
    assert np.isnan(imp[("features.3", "1x1")][0])  # grown at epoch 1, first scanned at epoch 2
    assert imp[("features.3", "1x1")][1:].tolist() == [0.5, 0.6, 0.6]  # forward-filled after the scan
    assert imp[("features.3", "1x1-kxk")][1] == 0.02 and np.isnan(imp[("features.3", "1x1-kxk")][2])
    assert np.isnan(imp[("features.7", "1x1")]).all()  # never scanned
    assert (rows[("features.3", "identity")], 2) in smap.deps and (rows[("features.7", "1x1")], 3) in smap.reps
    assert smap.surviving() == {"features.3": ["1x1", "1x1-avg"], "features.3.branches.kxk.conv": ["1x1", "kx1"],
                                "features.7": ["1x1", "1xk"]}


def test_structure_map_collapse_removes_nested_blocks_and_regrowth():
    events = [
        {"epoch": 1, "kind": "rep", "path": "f.0", "added": ["1x1"]},
        {"epoch": 2, "kind": "rep", "path": "f.0.branches.kxk.conv", "added": ["1x1"]},
        {"epoch": 3, "kind": "dep", "path": "f.0", "importances": {"1x1": 0.01}, "removed": ["1x1"], "collapsed": True},
        {"epoch": 4, "kind": "rep", "path": "f.0", "added": ["1x1"]},
    ]
    smap = dyrep_structure_map(events)
    assert smap.rows == [("f.0", "1x1"), ("f.0.branches.kxk.conv", "1x1")]
    assert smap.alive.tolist() == [[True, True, True, True], [False, True, True, False]]
    assert smap.deps == [(0, 3), (1, 3)] and smap.reps == [(0, 1), (1, 2), (0, 4)]
    assert smap.importance[0, 2] == 0.01 and np.isnan(smap.importance[0, 3])  # a new life, not scanned
    assert smap.surviving() == {"f.0": ["1x1"]}
    with pytest.raises(ValueError, match="integer epoch"):
        dyrep_structure_map([{"kind": "rep", "path": "x"}])


def _flatten_structure(structure: dict, prefix: str = "") -> dict[str, list[str]]:
    out = {}
    for path, node in structure.items():
        full = f"{prefix}{path}"
        if node.get("type") == "RepBlock":
            out[full] = sorted(b for b in node["branches"] if b != "kxk")
            out.update(_flatten_structure(node.get("nested", {}), full + "."))
    return out


def test_real_dyrep_events_map_matches_structure_and_plots(tmp_path, data_root):
    from repsearch.spec import validate_dict
    from repsearch.trial import run_trial

    rec = validate_dict({
        "data": {"val_size": 64, "train_subset": 128, "test_subset": 64},
        "model": {"name": "vgg16", "width": 0.0625},
        "train": {"epochs": 3, "batch_size": 32, "eval_batch_size": 64, "lr": 0.05, "warmup_epochs": 1},
        # λ = 0 and a high floor: Dep cuts at every adjustment, so the map has Rep, Dep and nesting
        "method": {"name": "dyrep", "scoring": "grad_norm", "interval": 1, "grow_until": 3, "recal_batches": 1,
                   "probe_batches": 1, "dep_threshold": 0.0, "dep_floor": 10.0},
    }, "plots")
    res = run_trial(rec, data_root=str(data_root), device="cpu", out_dir=tmp_path / "trial", progress=False)
    events = json.loads((tmp_path / "trial" / "events.json").read_text())
    structure = json.loads((tmp_path / "trial" / "structure.json").read_text())
    smap = dyrep_structure_map(events, rec.train.epochs)
    assert {p: sorted(b) for p, b in smap.surviving().items()} == {
        p: b for p, b in _flatten_structure(structure).items() if b}
    assert len(smap.reps) >= 1 and len(smap.deps) == res.final["n_branches_cut"]
    path = plots.plot_dyrep_structure(smap, tmp_path / "map.png", "real", "dyrep scoring=grad_norm", 0)
    _is_png(path)


def test_optuna_plots_leave_the_process_matplotlib_style_alone(store, tmp_path):
    import matplotlib

    client, _, single = store
    before = dict(matplotlib.rcParams)
    study_plots(client, single["parent"], single["children"], single["labels"], tmp_path, optuna_study=_optuna_study(1))
    after = dict(matplotlib.rcParams)
    assert {k: after[k] for k in before if before[k] != after[k]} == {}  # Optuna's ggplot style not leaked
