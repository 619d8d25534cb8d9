"""Comparison rows: mean ± sample std over seeds, grouping, counting, the rich tables."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
from optuna.trial import TrialState
from rich.console import Console

from repsearch.report import (
    ParetoEntry,
    ParetoFront,
    Stat,
    comparison_table,
    format_stat,
    mean_std,
    not_learning_warnings,
    rows_from_trials,
)


def _trial(number, point, seed, state=TrialState.COMPLETE, tags=None, **final):
    attrs = {"point": point, "seed": seed}
    if final:
        attrs["final"] = final
    if tags is not None:
        attrs["tags"] = tags
    return SimpleNamespace(number=number, state=state, user_attrs=attrs)


def _render(renderable) -> str:
    buf = io.StringIO()
    Console(file=buf, width=220).print(renderable)
    return buf.getvalue()


def test_mean_std_is_the_sample_std():
    s = mean_std([93.1, 93.5, 92.9])
    assert s.n == 3 and s.mean == pytest.approx(93.1666666667)
    assert s.std == pytest.approx(math.sqrt(((93.1 - s.mean) ** 2 + (93.5 - s.mean) ** 2 + (92.9 - s.mean) ** 2) / 2))
    assert mean_std([90.0]) == Stat(90.0, None, 1)
    assert mean_std([]) == Stat(None, None, 0)
    assert mean_std([1.0, float("nan"), 3.0]) == Stat(2.0, math.sqrt(2.0), 2)
    assert format_stat(Stat(91.0, math.sqrt(2.0), 2)) == "91.00 ± 1.41"
    assert format_stat(Stat(90.0, None, 1)) == "90.00"
    assert format_stat(Stat(None, None, 0)) == "—"


def test_rows_group_by_configuration_over_seeds():
    m = dict(avg_flops_m=313.5, avg_params_m=14.99)
    trials = [
        _trial(0, "method.scoring=snip", 0, **{"val/top1": 90.0, "test/top1": 89.0, "cost_gpu_hours": 0.5}, **m),
        _trial(1, "baseline:method.name=origin", 0, **{"val/top1": 85.0, "test/top1": 84.0, "cost_gpu_hours": 0.25}, **m),
        _trial(2, "method.scoring=snip", 1, **{"val/top1": 92.0, "test/top1": 90.0, "cost_gpu_hours": 0.5}, **m),
        _trial(3, "method.scoring=snip", 2, state=TrialState.FAIL),  # failed, then re-run:
        _trial(4, "method.scoring=snip", 2, **{"val/top1": 94.0, "test/top1": 91.0, "cost_gpu_hours": 1.0}, **m),
        _trial(5, "baseline:method.name=origin", 1, state=TrialState.PRUNED),
        _trial(6, "baseline:method.name=origin", 2, state=TrialState.FAIL),
        _trial(7, "method.scoring=grasp", 0, state=TrialState.RUNNING),
        SimpleNamespace(number=8, state=TrialState.COMPLETE, user_attrs={}),  # not a repsearch trial
    ]
    rows = rows_from_trials(trials, order=["method.scoring=snip", "method.scoring=grasp", "baseline:method.name=origin"])
    assert [r.configuration for r in rows] == ["method.scoring=snip", "method.scoring=grasp", "baseline:method.name=origin"]
    snip, grasp, origin = rows
    assert (snip.n, snip.n_pruned, snip.n_failed, snip.seeds) == (3, 0, 0, [0, 1, 2])
    assert snip.stat("val/top1").mean == pytest.approx(92.0) and snip.stat("val/top1").std == pytest.approx(2.0)
    assert snip.stat("test/top1").mean == pytest.approx(90.0) and snip.stat("test/top1").std == pytest.approx(1.0)
    assert snip.cost_gpu_hours == pytest.approx(2.0) and snip.stat("avg_flops_m").mean == pytest.approx(313.5)
    assert (grasp.n, grasp.n_failed) == (0, 0) and grasp.stat("val/top1").mean is None
    assert (origin.n, origin.n_pruned, origin.n_failed) == (1, 1, 1) and origin.stat("val/top1") == Stat(85.0, None, 1)

    text = _render(comparison_table(rows, title="study-x"))
    assert "study-x" in text and "configuration" in text and "avg FLOPs (M MACs)" in text
    snip_line = next(line for line in text.splitlines() if "method.scoring=snip" in line)
    assert "92.00 ± 2.00" in snip_line and "90.00 ± 1.00" in snip_line and "313.5" in snip_line and "14.99" in snip_line
    origin_line = next(line for line in text.splitlines() if "origin" in line)
    assert "85.00" in origin_line and "±" not in origin_line and "1 pruned, 1 failed" in origin_line


def test_best_row_by_validation_and_pareto_table():
    rows = rows_from_trials([
        _trial(0, "a", 0, **{"val/top1": 80.0, "test/top1": 99.0}),
        _trial(1, "b", 0, **{"val/top1": 90.0, "test/top1": 10.0}),
    ])
    table = comparison_table(rows)
    assert [r.style for r in table.rows] == [None, "bold"]  # selection by val, never test
    front = ParetoFront([ParetoEntry(3, "method.scoring=snip", 0, {"val/top1": 90.0, "avg_flops_m": 10.0})])
    text = _render(front)
    assert "Pareto front" in text and "avg_flops_m" in text and "method.scoring=snip" in text and "90" in text


def test_not_learning_trials_are_marked_and_warned_about():
    reason = "train/loss within 1% of ln(10) for epochs 2-4"
    trials = [
        _trial(0, "method.scoring=snip", 0, tags={"precision": "fp32", "not_learning": reason}, **{"val/top1": 10.0}),
        _trial(1, "method.scoring=snip", 1, tags={"precision": "fp32"}, **{"val/top1": 90.0}),
        _trial(2, "method.scoring=snip", 2, tags={"not_learning": "stale"}, state=TrialState.FAIL),  # failed, then re-run:
        _trial(3, "method.scoring=snip", 2, tags={"not_learning": "val/top1 at chance"}, **{"val/top1": 10.5}),
        _trial(4, "method.space=[kxk, 1x1]", 0, tags={}, **{"val/top1": 80.0}),
        _trial(5, "baseline:method.name=origin", 0, **{"val/top1": 85.0}),  # no tags recorded (older study)
        _trial(6, "baseline:method.name=origin", 1, state=TrialState.PRUNED, tags={"not_learning": "pruned anyway"}),
    ]
    snip, space, origin = rows_from_trials(trials)
    assert snip.n == 3 and snip.not_learning == [(0, reason), (2, "val/top1 at chance")]
    assert space.not_learning == [] and origin.not_learning == [] and origin.n_pruned == 1
    assert not_learning_warnings([snip, space, origin]) == [
        f"warning: method.scoring=snip seed 0: not learning ({reason})",
        "warning: method.scoring=snip seed 2: not learning (val/top1 at chance)",
    ]
    assert not_learning_warnings([space, origin]) == []

    table = comparison_table([snip, space, origin])
    n_cells = list(table.columns[-1].cells)
    assert str(n_cells[0]) == "3 (2 not learning)" and n_cells[0].style == "yellow"
    assert n_cells[1] == "1" and n_cells[2] == "1 (1 pruned)"
    text = _render(table)
    snip_line = next(line for line in text.splitlines() if "method.scoring=snip" in line)
    assert "3 (2 not learning)" in snip_line
    assert "method.space=[kxk, 1x1]" in text  # configuration ids are not read as rich markup
    origin_line = next(line for line in text.splitlines() if "origin" in line)
    assert "not learning" not in origin_line
