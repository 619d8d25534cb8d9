"""The DyRep papers' tables as recipes (issue 14): compare_dbb (Table 2), ablation_dep (Table 6),
ablation_gamma (Fig. 4), ablation_opspace (supp. Table 8), ablation_interval (supp. Table 9).

Each must keep the paper's full schedule (600 epochs, t = 15 unless swept, γ 0.01, λ 0.02, 3 seeds),
sweep what its table varies, carry the reported figures in its header comment, and have a ``smoke``
profile with at least 2 seeds (so mean ± std is defined) and a ``short`` one. Whether the smoke
profiles learn is checked by tests/test_smoke_profile.py and by the runs reported in issue 14."""

from __future__ import annotations

from pathlib import Path

import pytest

from repsearch.spec import Choices, Range, hashed_recipe, load_recipe, read_recipe_file, trial_recipe
from repsearch.sweep import plan_points

ROOT = Path(__file__).resolve().parents[1] / "recipes"

#: recipe -> (swept key, its full-schedule values or range, figures its header must quote)
TABLES = {
    "compare_dbb": ("method.name", ["dyrep"], ["94.68", "94.97", "95.22", "313", "728", "597"]),
    "ablation_dep": ("method.dep", [True, False], ["94.68", "95.22", "95.03", "658", "29.3"]),
    "ablation_gamma": ("method.gamma_init", (0.001, 10.0), ["0.01", "95.22", "94.68"]),
    "ablation_opspace": ("method.space", ["dbb", "dyrep"], ["76.14", "76.71", "76.98", "76.87", "77.08"]),
    "ablation_interval": ("method.interval", [5, 10, 15, 30, 50], ["95.39", "95.33", "95.22", "94.91", "94.82"]),
}


def header(name: str) -> str:
    lines = (ROOT / f"{name}.yaml").read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, l in enumerate(lines) if not l.startswith("#"))])


@pytest.mark.parametrize("name", sorted(TABLES))
def test_full_schedule_sweeps_the_table_and_quotes_its_figures(name):
    key, values, figures = TABLES[name]
    r, _ = load_recipe(ROOT / f"{name}.yaml")
    assert r.train.epochs == 600 and r.train.batch_size == 128 and r.train.lr == 0.1 and r.train.warmup_epochs == 0
    assert r.model.name == "vgg16" and r.data.dataset == "cifar10" and r.sweep.seeds == [0, 1, 2]
    m = r.method
    assert (m.name, m.scoring, m.interval, m.grow_until, m.gamma_init, m.dep_threshold, m.dep_floor) == (
        "dyrep", "synflow", 15, 500, 0.01, 0.02, 0.1)
    dist = r.sweep.params[key]
    if isinstance(values, tuple):
        assert isinstance(dist, Range) and (dist.low, dist.high, dist.log) == (*values, True)
        assert r.sweep.sampler == "tpe" and r.sweep.n_trials >= 5
    else:
        assert isinstance(dist, Choices) and dist.choices == values and r.sweep.sampler == "grid"
    text = header(name)
    missing = [f for f in figures if f not in text]
    assert not missing, f"{name}: header lacks the reported figures {missing}"
    # origin is always a row (the paper's reference line), and no test split drives selection
    assert {"method.name": "origin"} in [dict(b) for b in r.sweep.baselines]
    assert r.sweep.objective.metric.startswith("val/")


@pytest.mark.parametrize("name", sorted(TABLES))
def test_smoke_has_two_seeds_and_short_exists(name):
    assert {"smoke", "short"} <= set(read_recipe_file(ROOT / f"{name}.yaml")["profiles"])
    smoke, _ = load_recipe(ROOT / f"{name}.yaml", "smoke")
    assert len(smoke.sweep.seeds) >= 2 and smoke.train.epochs <= 10 and smoke.data.train_subset <= 6000
    # every DyRep arm adjusts at least once within the smoke schedule
    assert smoke.method.grow_until >= smoke.method.interval and smoke.method.grow_until < smoke.train.epochs
    short, _ = load_recipe(ROOT / f"{name}.yaml", "short")
    assert short.train.epochs < 600 and short.sweep.seeds == [0, 1, 2]


def test_arms_are_the_methods_the_tables_name():
    r, _ = load_recipe(ROOT / "compare_dbb.yaml")
    methods = {p.point_id: trial_recipe(r, p.overrides, p.seed).method for p in plan_points(r) if p.seed == 0}
    assert sorted(m.name for m in methods.values()) == ["dyrep", "origin", "static"]
    static = next(m for m in methods.values() if m.name == "static")
    assert static.space == "dbb" and static.gamma_init == 1.0  # DBB: its 4 ops from the start
    r, _ = load_recipe(ROOT / "ablation_dep.yaml", "smoke")
    off = trial_recipe(r, {"method.dep": False}, 0).method
    assert off.name == "dyrep" and off.dep is False
    r, _ = load_recipe(ROOT / "ablation_opspace.yaml")
    spaces = {(m.name, m.space) for m in (trial_recipe(r, p.overrides, 0).method for p in plan_points(r) if p.seed == 0)
              if m.name != "origin"}
    assert spaces == {("dyrep", "dbb"), ("dyrep", "dyrep"), ("static", "dbb"), ("static", "dyrep")}


@pytest.mark.parametrize("path", sorted(ROOT.glob("*.yaml")), ids=lambda p: p.name)
def test_dep_switch_enters_the_hash_only_where_a_recipe_turns_it_off(path):
    """``method.dep`` defaults to true and the hash drops defaults: no shipped recipe's study name
    changes unless it sets ``dep: false`` (only ablation_dep's arm does)."""
    for profile in [None, *read_recipe_file(path).get("profiles", {})]:
        r, _ = load_recipe(path, profile)
        for p in plan_points(r) or []:
            method = hashed_recipe(trial_recipe(r, p.overrides, p.seed)).get("method", {})
            assert method.get("dep", False) is False, (path.name, profile, p.point_id)
            assert ("dep" in method) == (p.overrides.get("method.dep") is False)
