"""Comparison tables: one row per configuration, mean ± std over seeds (as the papers report).

The rows come from the Optuna study alone: every COMPLETE trial stores its final measures
(``TrialResult.final``) in the user attribute ``final``, its configuration in ``point`` and its seed
in ``seed`` and its non-numeric facts in ``tags`` (repsearch.sweep), so no MLflow query is needed.
A COMPLETE trial tagged ``not_learning`` (its training collapsed; the value says why) is counted in
its row and marked in the ``n`` column; :func:`not_learning_warnings` gives one line per such trial
for the caller to print below the table. Accuracies are in percent, FLOPs are
multiply-accumulates of one forward pass on one image in millions (DESIGN.md measures contract),
parameters in millions, cost in device-hours (summed over the configuration's trials).

Standard deviations are sample standard deviations (ddof = 1) over the seeds of a configuration;
with a single seed there is none and the table shows the mean alone (the ``n`` column says why).
``optuna`` is imported lazily.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple, Optional, Sequence

from rich.table import Table
from rich.text import Text

#: (column title, final-measure key, kind) of the comparison table; kind "stat" = mean ± std,
#: "mean" = mean over seeds, "mean_g" = the same with 4 significant digits, "sum" = summed.
COLUMNS = (
    ("val top-1 (%)", "val/top1", "stat"),
    ("test top-1 (%)", "test/top1", "stat"),
    ("avg FLOPs (M MACs)", "avg_flops_m", "mean"),
    ("avg params (M)", "avg_params_m", "mean"),
    ("cost (GPU h)", "cost_gpu_hours", "sum"),
)
#: Columns shown only when at least one row has the measure, inserted after ``test top-1``: INT8
#: PTQ top-1 (``quantize.mode: ptq``) and the deployed kernels' std (RepOptimizers Tables 8, 10).
OPTIONAL_COLUMNS = (
    ("int8 val top-1 (%)", "int8/val_top1", "stat"),
    ("int8 test top-1 (%)", "int8/test_top1", "stat"),
    ("kernel std", "int8/kernel_std_mean", "mean_g"),
)


#: ``key=`` at the start of a point id or after ``", "`` (values hold ", " only inside brackets).
_KEY_RE = re.compile(r"(?:^|, )([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)=")


def config_label(point: str, method: Optional[str]) -> str:
    """Readable row label of a configuration: the method name plus the overrides of its point.

    ``method.`` is left off the override keys and ``method.name`` is the leading word, so
    ``method.scoring=synflow`` (method dyrep) -> ``dyrep scoring=synflow``,
    ``baseline:method.name=static, method.space=dbb`` -> ``static space=dbb``,
    ``baseline:method.name=origin`` -> ``origin``, ``default`` (no overrides) -> ``dyrep``, a sampled
    configuration ``#3 method.gamma_init=0.01`` -> ``dyrep #3 gamma_init=0.01``. Keys outside
    ``method`` keep their dotted path (``train.lr=0.05``). Never ``default``.

    Args:
        point: the point id (``repsearch.sweep.point_id``; the ``point`` tag / user attribute).
        method: the trial recipe's ``method.name``; None (unknown) returns ``point`` unchanged.
    """
    if method is None:
        return point
    rest = point[len("baseline:"):] if point.startswith("baseline:") else point
    prefix = ""
    m = re.match(r"#\d+ ", rest)
    if m:
        prefix, rest = m.group(0).strip(), rest[m.end():]
    if rest == "default":
        rest = ""
    starts = list(_KEY_RE.finditer(rest))
    parts = []
    for i, km in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(rest)
        key, value = km.group(1), rest[km.end():end]
        if key == "method.name":
            continue
        parts.append(f"{key[len('method.'):] if key.startswith('method.') else key}={value}")
    if rest and not starts:  # not a key=value id: keep it whole
        parts = [rest]
    return " ".join([method] + ([prefix] if prefix else []) + parts)


def unique_labels(labels: dict[str, str]) -> dict[str, str]:
    """``point -> label`` with clashing labels made unique by appending the point id in brackets."""
    counts: dict[str, int] = {}
    for lab in labels.values():
        counts[lab] = counts.get(lab, 0) + 1
    return {p: (lab if counts[lab] == 1 else f"{lab} [{p}]") for p, lab in labels.items()}


class Stat(NamedTuple):
    """Mean and sample standard deviation (ddof = 1) of ``n`` values; ``std`` is None when n < 2,
    ``mean`` is None when n = 0."""

    mean: Optional[float]
    std: Optional[float]
    n: int


def mean_std(values: Iterable[float]) -> Stat:
    """:class:`Stat` of the finite values in ``values`` (NaN/inf are left out)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Stat(None, None, 0)
    m = sum(xs) / n
    if n < 2:
        return Stat(m, None, 1)
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return Stat(m, math.sqrt(var), n)


@dataclass
class ReportRow:
    """One configuration of a study (a grid point, a baseline or a sampled configuration).

    Attributes:
        configuration: the point id (e.g. ``method.scoring=snip``, ``baseline:method.name=origin``).
        label: the row label shown in tables (:func:`config_label`, e.g. ``dyrep scoring=snip``,
            ``origin``); equal to ``configuration`` when the method is unknown.
        n: COMPLETE trials (seeds) summarised; ``n_pruned`` / ``n_failed``: seeds pruned / failed
            (failed = no COMPLETE or PRUNED trial for that seed and at least one FAIL).
        seeds: the seeds of the COMPLETE trials.
        stats: final-measure key -> :class:`Stat` over the COMPLETE trials (``val/top1``,
            ``test/top1``, ``avg_flops_m``, ``avg_params_m``, the objectives, ...).
        cost_gpu_hours: device-hours summed over the COMPLETE trials (None if not recorded).
        not_learning: (seed, reason) of the COMPLETE trials tagged ``not_learning`` (user attribute
            ``tags``), e.g. ``(0, "train/loss within 1% of ln(10) for epochs 2-4")``.
    """

    configuration: str
    n: int = 0
    n_pruned: int = 0
    n_failed: int = 0
    seeds: list[int] = field(default_factory=list)
    stats: dict[str, Stat] = field(default_factory=dict)
    cost_gpu_hours: Optional[float] = None
    not_learning: list[tuple[Any, str]] = field(default_factory=list)
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            self.label = self.configuration

    def stat(self, key: str) -> Stat:
        """The :class:`Stat` of a final measure (empty if it was never recorded)."""
        return self.stats.get(key, Stat(None, None, 0))


class ParetoEntry(NamedTuple):
    """One trial of a multi-objective study's Pareto front: objective metric -> value."""

    number: int
    configuration: str
    seed: Optional[int]
    values: dict[str, float]


class ParetoFront(list):
    """The Pareto-optimal trials (a list of :class:`ParetoEntry`); ``rich`` prints it as a table."""

    title: str = "Pareto front"

    def __rich__(self) -> Table:
        return pareto_table(self, title=self.title)


def _state_name(trial: Any) -> str:
    state = getattr(trial, "state", None)
    return getattr(state, "name", str(state))


def _trial_method(t: Any, method: Optional[str]) -> Optional[str]:
    try:
        overrides = json.loads((getattr(t, "user_attrs", None) or {}).get("overrides") or "{}")
    except (TypeError, ValueError):
        overrides = {}
    name = overrides.get("method.name") if isinstance(overrides, dict) else None
    return str(name) if name is not None else method


def rows_from_trials(
    trials: Sequence[Any], order: Optional[Sequence[str]] = None, keys: Optional[Sequence[str]] = None,
    method: Optional[str] = None,
) -> list[ReportRow]:
    """Group a study's trials by configuration (user attribute ``point``) and summarise them.

    Args:
        trials: ``optuna.trial.FrozenTrial`` objects (anything with ``state``, ``user_attrs``).
        order: configuration ids in the wanted row order; others follow in order of first trial.
        keys: final-measure keys to summarise besides the table's columns (e.g. the objectives).
        method: the recipe's ``method.name``; with it every row gets its :func:`config_label`
            (a point's own ``method.name`` override, user attribute ``overrides``, wins). Without
            it the label is the point id.

    Returns:
        One :class:`ReportRow` per configuration.
    """
    groups: dict[str, list[Any]] = {}
    for t in trials:
        point = (getattr(t, "user_attrs", None) or {}).get("point")
        if point is None:
            continue
        groups.setdefault(point, []).append(t)
    rank = {p: i for i, p in enumerate(order or [])}
    names = sorted(groups, key=lambda p: (rank.get(p, len(rank)), min(t.number for t in groups[p])))
    known = [c[1] for c in COLUMNS + OPTIONAL_COLUMNS]
    wanted_keys = known + [k for k in (keys or []) if k not in known]
    labels = unique_labels({p: config_label(p, _trial_method(groups[p][0], method) if method else None) for p in names})
    rows = []
    for name in names:
        by_seed: dict[Any, list[Any]] = {}
        for t in groups[name]:
            by_seed.setdefault(t.user_attrs.get("seed"), []).append(t)
        complete, n_pruned, n_failed = [], 0, 0
        for seed, ts in by_seed.items():
            states = [_state_name(t) for t in ts]
            done = [t for t in ts if _state_name(t) == "COMPLETE"]
            if done:
                complete.append(max(done, key=lambda t: t.number))
            elif "PRUNED" in states:
                n_pruned += 1
            elif "FAIL" in states and not ({"RUNNING", "WAITING"} & set(states)):
                n_failed += 1
        finals = [dict(t.user_attrs.get("final") or {}) for t in complete]
        stats = {k: mean_std(f.get(k) for f in finals) for k in wanted_keys}
        costs = [f["cost_gpu_hours"] for f in finals if f.get("cost_gpu_hours") is not None]
        not_learning = []
        for t in complete:
            tags = t.user_attrs.get("tags") or {}
            if isinstance(tags, dict) and "not_learning" in tags:
                not_learning.append((t.user_attrs.get("seed"), str(tags["not_learning"])))
        not_learning.sort(key=lambda p: (p[0] is None, p[0] if isinstance(p[0], (int, float)) else str(p[0])))
        rows.append(
            ReportRow(
                configuration=name,
                n=len(complete),
                n_pruned=n_pruned,
                n_failed=n_failed,
                seeds=sorted(t.user_attrs.get("seed") for t in complete if t.user_attrs.get("seed") is not None),
                stats=stats,
                cost_gpu_hours=sum(costs) if costs else None,
                not_learning=not_learning,
                label=labels[name],
            )
        )
    return rows


def not_learning_warnings(rows: Sequence[ReportRow]) -> list[str]:
    """One line per COMPLETE trial whose training collapsed, for printing below the table:
    ``warning: method.scoring=snip seed 0: not learning (train/loss within 1% of ln(10) for epochs 2-4)``."""
    return [
        f"warning: {r.configuration} seed {seed}: not learning ({reason})"
        for r in rows
        for seed, reason in r.not_learning
    ]


def format_stat(s: Stat, digits: int = 2) -> str:
    """``"93.21 ± 0.15"``; the mean alone when n = 1; ``"—"`` when n = 0."""
    if s.mean is None:
        return "—"
    if s.std is None:
        return f"{s.mean:.{digits}f}"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def _fmt(v: Optional[float], spec: str) -> str:
    return "—" if v is None else format(v, spec)


def table_columns(rows: Sequence[ReportRow]) -> list[tuple[str, str, str]]:
    """The comparison table's (title, final-measure key, kind) columns for ``rows``: :data:`COLUMNS`
    with the :data:`OPTIONAL_COLUMNS` that at least one row has inserted after ``test top-1``."""
    present = [c for c in OPTIONAL_COLUMNS if any(r.stat(c[1]).n for r in rows)]
    cut = next(i for i, c in enumerate(COLUMNS) if c[1] == "test/top1") + 1
    return list(COLUMNS[:cut]) + present + list(COLUMNS[cut:])


def comparison_table(
    rows: Sequence[ReportRow], title: Optional[str] = None, best_key: str = "val/top1", maximize: bool = True
) -> Table:
    """The paper-style table: configuration, val/test top-1 (mean ± std over seeds), avg FLOPs
    (M MACs), avg params (M), cost (device-hours, summed), n (complete seeds; pruned/failed noted).
    When some row has them (:func:`table_columns`), INT8 PTQ val/test top-1 (mean ± std) and the
    kernel std (mean over seeds of ``int8/kernel_std_mean``, RepOpt Table 8) follow the test column.

    The configuration with the best mean ``best_key`` (validation only: selection never looks at
    test accuracy) is shown in bold. A row with trials tagged ``not_learning`` says so in yellow in
    the ``n`` column (``2 (1 not learning)``); print :func:`not_learning_warnings` below the table.
    """
    table = Table(title=title)
    width = max([len("configuration")] + [len(r.label) for r in rows])
    table.add_column("configuration", overflow="fold", min_width=min(width, 60))
    columns = table_columns(rows)
    for col_title, _, _ in columns:
        table.add_column(col_title, justify="right")
    table.add_column("n", justify="right")
    means = [(r.stat(best_key).mean, i) for i, r in enumerate(rows) if r.stat(best_key).mean is not None]
    best = (max(means) if maximize else min(means))[1] if means else None
    for i, r in enumerate(rows):
        cells: list[Any] = [Text(r.label)]  # not markup: ids hold brackets (method.space=[kxk, 1x1])
        for _, key, kind in columns:
            if kind == "stat":
                cells.append(format_stat(r.stat(key)))
            elif kind == "mean_g":  # mean over seeds, 4 significant digits
                cells.append(_fmt(r.stat(key).mean, ".4g"))
            elif kind == "sum":
                cells.append(_fmt(r.cost_gpu_hours, ".4f"))
            else:
                cells.append(_fmt(r.stat(key).mean, ".1f" if "flops" in key else ".2f"))
        n = str(r.n)
        extra = [f"{r.n_pruned} pruned"] * bool(r.n_pruned) + [f"{r.n_failed} failed"] * bool(r.n_failed)
        extra += [f"{len(r.not_learning)} not learning"] * bool(r.not_learning)
        if extra:
            n += f" ({', '.join(extra)})"
        cells.append(Text(n, style="yellow") if r.not_learning else n)
        table.add_row(*cells, style="bold" if i == best else None)
    return table


def pareto_front(study: Any, metrics: Sequence[str]) -> ParetoFront:
    """The Pareto front of a multi-objective study (``study.best_trials``), objective values named
    by ``metrics`` (in the study's objective order), sorted by the first objective."""
    front = ParetoFront()
    for t in study.best_trials:
        values = dict(zip(metrics, t.values or []))
        front.append(ParetoEntry(t.number, t.user_attrs.get("point", "?"), t.user_attrs.get("seed"), values))
    front.sort(key=lambda e: (list(e.values.values()) or [0])[0])
    return front


def pareto_table(front: Sequence[ParetoEntry], title: str = "Pareto front") -> Table:
    """A table of the Pareto-optimal trials: trial number, configuration, seed, objective values."""
    table = Table(title=title)
    table.add_column("trial", justify="right")
    table.add_column("configuration", overflow="fold")
    table.add_column("seed", justify="right")
    metrics: list[str] = []
    for e in front:
        for k in e.values:
            if k not in metrics:
                metrics.append(k)
    for m in metrics:
        table.add_column(m, justify="right")
    for e in front:
        table.add_row(
            str(e.number), Text(e.configuration), "—" if e.seed is None else str(e.seed),
            *[_fmt(e.values.get(m), ".4g") for m in metrics],
        )
    return table
