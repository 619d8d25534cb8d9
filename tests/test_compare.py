"""``repsearch compare`` from MLflow alone, row labels, CSV/Markdown artifacts, ``repsearch ui``'s
compare URL and errors, and the Optuna study as a user opens it.

The statistics are checked on a store written with :class:`repsearch.tracking.Tracker` directly
(exact, known values; hand-computed mean, std, t-interval and paired deltas); the end-to-end path on
a real sweep (``run_study`` with real tiny training on CIFAR-10) checks that ``repsearch run`` and
``repsearch compare`` label the rows alike and that Optuna's own ``load_study`` reads every trial.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import socket
import statistics
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from repsearch.cli import main
from repsearch.compare import compare, compare_url, latest_study_url, t_interval
from repsearch.report import config_label, rows_from_trials
from repsearch.tracking import Stores, Tracker

#: t_{0.975, df} (tables of the Student-t distribution): df 1 and 2.
T975 = {1: 12.706204736174694, 2: 4.302652729749462}

#: point -> (method.name, {seed: (val, test)}); test is best for origin, val best for dyrep.
TRIALS = {
    "default": ("dyrep", {0: (91.0, 88.0), 1: (92.0, 88.5), 2: (93.5, 89.0)}),
    "baseline:method.name=origin": ("origin", {0: (90.0, 90.0), 1: (90.5, 90.1), 2: (90.2, 90.3)}),
    "baseline:method.name=static, method.space=dbb": ("static", {0: (90.8, 89.0), 1: (91.1, 89.2)}),
}


def _stores(runs: Path, experiment: str = "compare_dbb") -> Stores:
    runs.mkdir(parents=True, exist_ok=True)
    return Stores(runs_dir=runs, tracking_uri=f"sqlite:///{runs / 'mlflow.db'}", storage=f"sqlite:///{runs / 'optuna.db'}",
                  experiment=experiment, artifact_location=str(runs / "artifacts"))


def write_study(runs: Path, study: str = "compare_dbb.smoke-0000abcd", trials=TRIALS, extra=()) -> tuple[Tracker, str]:
    """A study as the sweep writes it: parent run, FINISHED child runs with final metrics and 3
    epochs of ``train_images_per_s``; ``extra`` = (point, seed, status, tags) of further runs."""
    tr = Tracker(_stores(runs))
    parent = tr.parent_run(study, tags={"sampler": "grid"})
    number = 0
    for point, (method, seeds) in trials.items():
        for seed, (val, test) in seeds.items():
            rid = tr.start_trial(parent, run_name=f"{point} seed={seed}", tags={
                "study_name": study, "optuna.trial_number": number, "point": point, "seed": seed})
            number += 1
            tr.log_params(rid, {"method.name": method, "seed": str(seed)})
            for e in (1, 2, 3):
                tr.log_metrics(rid, {"val/top1": val * e / 3, "train_images_per_s": 100.0 * e}, step=e)
            tr.log_metrics(rid, {"val/top1": val, "test/top1": test, "avg_flops_m": 10.0 + seed, "avg_params_m": 1.5,
                                 "cost_gpu_hours": 0.25, "int8/test_top1": test - 1.0}, step=3)
            tr.finish_trial(rid, status="FINISHED")
    for point, seed, status, tags in extra:
        rid = tr.start_trial(parent, run_name=f"{point} seed={seed}", tags={
            "study_name": study, "optuna.trial_number": number, "point": point, "seed": seed})
        number += 1
        tr.log_params(rid, {"method.name": trials.get(point, ("dyrep",))[0]})
        tr.finish_trial(rid, status=status, tags=tags)
    tr.finish_parent(parent)
    return tr, parent


EXTRA = [("default", 3, "FAILED", {"error": "boom"}), ("default", 4, "FINISHED", {"pruned": "true"}),
         ("baseline:method.name=origin", 3, "KILLED", {})]


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    runs = tmp_path_factory.mktemp("store") / "runs"
    tr, parent = write_study(runs, extra=EXTRA)
    return runs, tr, parent


@pytest.fixture
def store(shared_store, tmp_path, monkeypatch):
    """The study of :data:`TRIALS` (+ :data:`EXTRA`), written once per module; tests may add
    artifacts to it but no runs (a test that adds a study writes its own store)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return shared_store


def test_labels_name_the_method_and_its_overrides_never_default():
    assert config_label("default", "dyrep") == "dyrep"
    assert config_label("baseline:method.name=origin", "origin") == "origin"
    assert config_label("baseline:method.name=static, method.space=dbb", "static") == "static space=dbb"
    assert config_label("method.scoring=synflow", "dyrep") == "dyrep scoring=synflow"
    assert config_label("method.space=[kxk, 1x1], train.lr=0.05", "static") == "static space=[kxk, 1x1] train.lr=0.05"
    assert config_label("#3 method.gamma_init=0.01", "dyrep") == "dyrep #3 gamma_init=0.01"
    assert config_label("method.scoring=snip", None) == "method.scoring=snip"  # method unknown: the id


def test_t_interval_matches_the_hand_computation():
    xs = [91.0, 92.0, 93.5]
    m, s = sum(xs) / 3, statistics.stdev(xs)
    got = t_interval(xs)
    half = T975[2] * s / math.sqrt(3)
    assert got.n == 3 and got.mean == pytest.approx(m) and got.std == pytest.approx(s)
    assert (got.low, got.high) == pytest.approx((m - half, m + half))
    assert t_interval([5.0]) == (5.0, None, 1, None, None)
    assert t_interval([]).mean is None


def test_compare_statistics_deltas_best_row_and_counts(store):
    runs, tr, parent = store
    (cmp,) = compare("compare_dbb", baseline="origin", metrics=["int8/test_top1"], runs_dir=runs, plots=False)
    by = {r.label: r for r in cmp.rows}
    assert [r.label for r in cmp.rows] == ["dyrep", "origin", "static space=dbb"]
    dy, og, st = by["dyrep"], by["origin"], by["static space=dbb"]
    # counts per seed: dyrep seeds 0-2 finished, 3 failed, 4 pruned; origin seed 3 killed = failed
    assert (dy.n_finished, dy.n_failed, dy.n_pruned) == (3, 1, 1)
    assert (og.n_finished, og.n_failed, og.n_pruned) == (3, 1, 0)
    assert (st.n_finished, st.n_failed, st.n_pruned) == (2, 0, 0)
    for row, point in ((dy, "default"), (og, "baseline:method.name=origin"), (st, "baseline:method.name=static, method.space=dbb")):
        vals = [v for v, _ in TRIALS[point][1].values()]
        n = len(vals)
        m, s = sum(vals) / n, statistics.stdev(vals)
        half = T975[n - 1] * s / math.sqrt(n)
        got = row.stat("val/top1")
        assert (got.mean, got.std, got.low, got.high) == pytest.approx((m, s, m - half, m + half))
    # paired deltas matched by seed: dyrep - origin over seeds 0, 1, 2; static - origin over seeds 0, 1
    d = [TRIALS["default"][1][k][0] - TRIALS["baseline:method.name=origin"][1][k][0] for k in (0, 1, 2)]
    half = T975[2] * statistics.stdev(d) / math.sqrt(3)
    got = dy.deltas["val/top1"]
    assert (got.mean, got.std, got.low, got.high) == pytest.approx((statistics.mean(d), statistics.stdev(d),
                                                                    statistics.mean(d) - half, statistics.mean(d) + half))
    d2 = [TRIALS["baseline:method.name=static, method.space=dbb"][1][k][1] - TRIALS["baseline:method.name=origin"][1][k][1] for k in (0, 1)]
    assert st.deltas["test/top1"].mean == pytest.approx(statistics.mean(d2)) and st.deltas["test/top1"].n == 2
    assert og.deltas == {}
    # the best row is chosen on validation (dyrep), although origin has the best test top-1
    assert [r.label for r in cmp.rows if r.best] == ["dyrep"]
    assert max(cmp.rows, key=lambda r: r.mean("test/top1")).label == "origin"
    assert dy.mean("avg_flops_m") == pytest.approx(11.0) and dy.device_hours() == pytest.approx(0.75)
    assert dy.mean_images_per_s() == pytest.approx(200.0)  # mean over epochs 100, 200, 300
    assert dy.mean("int8/test_top1") == pytest.approx(statistics.mean([87.0, 87.5, 88.0]))


def test_csv_and_markdown_artifacts_on_the_parent_run(store, tmp_path):
    runs, tr, parent = store
    (cmp,) = compare("compare_dbb.smoke-0000abcd", baseline="origin", runs_dir=runs, plots=False)  # by study name
    client = MlflowClient(tracking_uri=tr.stores.tracking_uri)
    names = {a.path for a in client.list_artifacts(parent, "compare")}
    assert names == {"compare/compare_dbb.smoke-0000abcd.csv", "compare/compare_dbb.smoke-0000abcd.md"}
    local = Path(client.download_artifacts(parent, "compare", str(tmp_path / "dl")))
    rows = list(csv.DictReader(io.StringIO((local / "compare_dbb.smoke-0000abcd.csv").read_text())))
    assert [r["configuration"] for r in rows] == ["dyrep", "origin", "static space=dbb"]
    assert [r["best"] for r in rows] == ["true", "false", "false"]
    assert float(rows[0]["val_top1_mean"]) == pytest.approx(statistics.mean([91.0, 92.0, 93.5]))
    assert float(rows[0]["delta_val_top1_mean"]) == pytest.approx(statistics.mean([1.0, 1.5, 3.3]))
    assert rows[1]["delta_val_top1_mean"] == ""  # the baseline itself
    md = (local / "compare_dbb.smoke-0000abcd.md").read_text()
    assert "| **dyrep *** |" in md and "validation split" in md and "test split" in md and "Δ val vs origin" in md
    assert "default" not in md.replace("compare_dbb", "")


def test_a_failing_plot_module_costs_no_table(store, monkeypatch, caplog):
    runs, tr, parent = store
    if importlib.util.find_spec("repsearch.plots") is None:
        pytest.skip("repsearch.plots not present")
    import repsearch.plots

    def boom(*a, **k):
        raise RuntimeError("no figure")

    monkeypatch.setattr(repsearch.plots, "study_plots", boom)
    (cmp,) = compare("compare_dbb", runs_dir=runs)
    assert cmp.artifacts == ["compare/compare_dbb.smoke-0000abcd.csv", "compare/compare_dbb.smoke-0000abcd.md"]
    assert any("plots of study compare_dbb.smoke-0000abcd not made: RuntimeError: no figure" in r.message for r in caplog.records)


def test_cli_compare_formats(store):
    runs, _, _ = store
    r = CliRunner().invoke(main, ["compare", "compare_dbb", "--runs-dir", str(runs), "--baseline", "origin",
                                  "--format", "csv", "--no-plots"])
    assert r.exit_code == 0, r.output
    assert [row["configuration"] for row in csv.DictReader(io.StringIO(r.output))] == ["dyrep", "origin", "static space=dbb"]
    r = CliRunner().invoke(main, ["compare", "compare_dbb", "--runs-dir", str(runs), "--no-plots"])
    assert r.exit_code == 0, r.output
    assert "static space=dbb" in r.output and "val top-1 (%)" in r.output and "3/1/1" in r.output
    assert "[low, high] = 95% t-interval" in " ".join(r.output.split())  # the note, not read as markup


def _one_line_exit_2(result, *words):
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("repsearch: error: "), result.output
    for w in words:
        assert w in lines[0]


def test_cli_errors_are_one_line(store, tmp_path):
    runs = tmp_path / "own"
    write_study(runs, extra=EXTRA)
    base = ["--runs-dir", str(runs), "--no-plots"]
    runner = CliRunner()
    _one_line_exit_2(runner.invoke(main, ["compare", "nope", *base]), "'nope'", "compare_dbb")
    _one_line_exit_2(runner.invoke(main, ["compare", "compare_dbb", "--baseline", "vgg", *base]), "'vgg'", "'origin'")
    _one_line_exit_2(runner.invoke(main, ["compare", "compare_dbb", "--metric", "int9/x", *base]), "int9/x")
    _one_line_exit_2(runner.invoke(main, ["compare", "compare_dbb", "--study", "other", *base]), "'other'")
    _one_line_exit_2(runner.invoke(main, ["compare", "x", "--runs-dir", str(tmp_path / "none")]), "no MLflow store")
    # a study whose only trial failed
    failed = {"default": ("dyrep", {})}
    write_study(runs, study="compare_dbb.smoke-ffff0000", trials=failed, extra=[("default", 0, "FAILED", {"error": "x"})])
    _one_line_exit_2(runner.invoke(main, ["compare", "compare_dbb.smoke-ffff0000", *base]), "no finished trial")
    # the experiment's latest study is now the failed one; --all skips it and compares the other
    _one_line_exit_2(runner.invoke(main, ["compare", "compare_dbb", *base]), "no finished trial")
    r = runner.invoke(main, ["compare", "compare_dbb", "--all", "--format", "csv", *base])
    assert r.exit_code == 0 and {row["study"] for row in csv.DictReader(io.StringIO(r.output))} == {"compare_dbb.smoke-0000abcd"}


def test_compare_url_and_latest_study(store):
    runs, tr, parent = store
    url = latest_study_url("127.0.0.1", 5123, runs_dir=runs)
    prefix = "http://127.0.0.1:5123/#/compare-runs?runs="
    assert url.startswith(prefix)
    ids, exps = url[len(prefix):].split("&experiments=")
    children = MlflowClient(tracking_uri=tr.stores.tracking_uri).search_runs(
        [tr.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'FINISHED'")
    finished = {r.info.run_id for r in children if r.data.tags.get("pruned") != "true"}
    assert set(json.loads(ids)) == finished and len(finished) == 8
    assert json.loads(exps) == [tr.experiment_id]
    assert compare_url("h", 1, ["a", "b"], ["3"]) == 'http://h:1/#/compare-runs?runs=["a","b"]&experiments=["3"]'


def _pretend_ui_extra(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *a, **k):
        return object() if name in ("flask", "mlflow.server") else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_ui_fails_with_one_line_without_the_extra_or_on_a_taken_port(store, monkeypatch):
    runs, _, _ = store
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "flask" else real(name, *a, **k))
    _one_line_exit_2(CliRunner().invoke(main, ["ui", "--runs-dir", str(runs)]), "ui extra")
    _pretend_ui_extra(monkeypatch)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        _one_line_exit_2(CliRunner().invoke(main, ["ui", "--runs-dir", str(runs), "--port", str(port)]), str(port), "--port")


def test_ui_prints_the_compare_url_before_starting(store, monkeypatch):
    import os

    runs, _, _ = store
    _pretend_ui_extra(monkeypatch)
    started = []
    monkeypatch.setattr(os, "execvp", lambda prog, cmd: started.append(cmd))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(main, ["ui", "--runs-dir", str(runs), "--port", str(port)])
    assert r.exit_code == 0, r.output
    assert f"http://127.0.0.1:{port}/#/compare-runs?runs=[" in r.stdout and started and str(port) in started[0]


# ------------------------------------------------------------- a real tiny sweep, end to end
# (the ``real_sweep`` fixture lives in conftest.py: tests/test_browser.py opens the same store)


def test_real_sweep_compare_agrees_with_the_run_table(real_sweep):
    stores, summary = real_sweep
    (cmp,) = compare("tiny_cmp", baseline="origin", runs_dir=stores.runs_dir)
    client = MlflowClient(tracking_uri=stores.tracking_uri)
    logged = {a.path for a in client.list_artifacts(summary.parent_run_id, "compare")}
    assert logged == {f"compare/{summary.study_name}.csv", f"compare/{summary.study_name}.md"}
    if importlib.util.find_spec("repsearch.plots") is not None:  # the plots, regenerated by compare
        pngs = {a.path for a in client.list_artifacts(summary.parent_run_id, "plots")}
        assert "plots/val_top1_vs_epoch.png" in pngs and set(cmp.artifacts) >= pngs
    assert [r.label for r in summary.rows] == ["dyrep scoring=synflow", "origin"]
    assert [r.label for r in cmp.rows] == [r.label for r in summary.rows]
    for ours, theirs in zip(cmp.rows, summary.rows):  # MLflow and Optuna hold the same final values
        assert ours.n_finished == theirs.n == 2
        assert ours.stat("val/top1").mean == pytest.approx(theirs.stat("val/top1").mean)
        assert ours.stat("test/top1").std == pytest.approx(theirs.stat("test/top1").std)
        assert ours.mean("avg_flops_m") == pytest.approx(theirs.stat("avg_flops_m").mean)
        assert ours.mean_images_per_s() > 0
    assert cmp.rows[0].deltas["val/top1"].n == 2 and cmp.rows[1].deltas == {}


def test_optuna_load_study_reads_every_trials_params_and_value(real_sweep):
    stores, summary = real_sweep
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{stores.runs_dir / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for t in trials:
        assert t.value == pytest.approx(t.user_attrs["final"]["val/top1"])
        assert {"point", "seed"} <= set(t.params) and t.params["seed"] in (0, 1)
        if t.user_attrs["kind"] == "grid":  # the swept dotted recipe param, as Optuna's plots read it
            assert t.params["method.scoring"] == "synflow"
            assert t.params["point"] == f"method.scoring={t.params['method.scoring']}"
        else:
            assert t.params["point"] == "baseline:method.name=origin"
