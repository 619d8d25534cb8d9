"""``repsearch compare``: the comparison of a study's configurations, read from MLflow alone.

The rows come from the MLflow store (DESIGN.md stores contract), never from the Optuna store, so a
tracking server alone is enough: a study is a parent run tagged ``repsearch.role=study`` with its
``study_name``; its trials are the child runs (tag ``mlflow.parentRunId``) with the tags ``point``
(the configuration's id, :func:`repsearch.sweep.point_id`), ``seed`` and ``optuna.trial_number``,
the param ``method.name`` and the final metric values (the latest value of each metric). A child
run counts as

- finished: status FINISHED without the tag ``pruned`` (only these are summarised);
- pruned: status FINISHED with ``pruned=true`` (``repsearch.sweep._run_one``);
- failed: status FAILED or KILLED;

per seed of a configuration, as :func:`repsearch.report.rows_from_trials` counts Optuna trials: a
seed with a finished run is finished, else pruned if one of its runs was pruned, else failed.

Statistics over the seeds of a configuration (DyRep Table 2 / RepOpt Table 3 report mean ± std):
sample mean and standard deviation (ddof = 1) and the 95 % Student-t interval
``mean ± t_{0.975, n-1} · std / √n`` (``scipy.stats.t``); paired deltas to a baseline row use the
per-seed differences of the seeds both rows finished, with the same statistics. Units: top-1 in
percent, FLOPs as multiply-accumulates of one forward pass on one image in millions (``avg_flops_m``,
the epoch-weighted mean over training), parameters in millions (``avg_params_m``), device-hours
(``cost_gpu_hours``, summed over a configuration's finished runs) and training images per second
(``train_images_per_s``, the mean over epochs of each run, then over runs).

Selection uses validation only: the best row is the one with the highest mean ``val/top1``; test
top-1 is reported, never used to choose. The table is written as CSV and Markdown (artifacts
``compare/<study>.csv`` and ``compare/<study>.md`` on the study's parent run) and, when
``repsearch.plots`` is available, the study's plots (artifacts under ``plots/``).

``mlflow`` and ``scipy`` are imported lazily.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional, Sequence

from rich.table import Table
from rich.text import Text

from repsearch.errors import UserError
from repsearch.report import config_label, unique_labels
from repsearch.tracking import ROLE_TAG, read_mlflow_yaml

log = logging.getLogger(__name__)

VAL = "val/top1"
TEST = "test/top1"
#: Confidence level of the intervals (two-sided).
CONFIDENCE = 0.95
#: The explanation printed under the table and written above the Markdown table.
NOTE = (
    "val = validation split (held out of the training set; the best row, marked *, is chosen on it); "
    "test = test split (reported only, never used to choose). mean ± std (ddof 1) over seeds, "
    "[low, high] = 95% t-interval; FLOPs = M MACs per image (epoch-weighted mean over training); "
    "device-hours summed over the finished runs."
)


class CompareError(UserError):
    """A comparison that cannot be made as asked: unknown experiment or study, a study with no
    finished trial, a ``--baseline`` that is not a row, a ``--metric`` no run records."""


class Interval(NamedTuple):
    """Mean, sample std (ddof = 1) and the 95 % Student-t interval of ``n`` values.

    ``std``, ``low`` and ``high`` are None when n < 2; ``mean`` is None when n = 0.
    """

    mean: Optional[float]
    std: Optional[float]
    n: int
    low: Optional[float]
    high: Optional[float]


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """:class:`Interval` of the finite values: ``mean ± t_{(1+c)/2, n-1} · std / √n``.

    Source: the Student-t confidence interval of a mean (``scipy.stats.t.ppf``); n = 2 gives
    t = 12.706, n = 3 gives 4.303 (so a 2-seed interval is wide, as it should be).
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(None, None, 0, None, None)
    mean = sum(xs) / n
    if n < 2:
        return Interval(mean, None, 1, None, None)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    from scipy.stats import t

    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, std, n, mean - half, mean + half)


@dataclass
class CompareRow:
    """One configuration of a study, summarised over its seeds.

    Attributes:
        label: the row label (:func:`repsearch.report.config_label`, e.g. ``dyrep scoring=synflow``).
        point: the configuration's point id (tag ``point``).
        method: ``method.name`` of its runs.
        n_finished, n_failed, n_pruned: seeds finished / failed (FAILED or KILLED) / pruned.
        values: metric -> {seed: final value} of the finished runs.
        images_per_s: seed -> mean over epochs of ``train_images_per_s``.
        run_ids: the finished runs (seed order).
        deltas: metric -> :class:`Interval` of the per-seed differences to the baseline row.
        best: the best row by validation top-1.
        not_learning: (seed, reason) of finished runs tagged ``not_learning``.
    """

    label: str
    point: str
    method: Optional[str]
    n_finished: int = 0
    n_failed: int = 0
    n_pruned: int = 0
    values: dict[str, dict[int, float]] = field(default_factory=dict)
    images_per_s: dict[int, float] = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)
    deltas: dict[str, Interval] = field(default_factory=dict)
    best: bool = False
    not_learning: list[tuple[int, str]] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        """The seeds of the finished runs."""
        return sorted(self.values.get(VAL, {}))

    def stat(self, metric: str) -> Interval:
        """:func:`t_interval` of ``metric`` over the finished seeds."""
        return t_interval(self.values.get(metric, {}).values())

    def mean(self, metric: str) -> Optional[float]:
        return self.stat(metric).mean

    def device_hours(self) -> Optional[float]:
        """``cost_gpu_hours`` summed over the finished runs (None when none recorded it)."""
        v = list(self.values.get("cost_gpu_hours", {}).values())
        return sum(v) if v else None

    def mean_images_per_s(self) -> Optional[float]:
        v = list(self.images_per_s.values())
        return sum(v) / len(v) if v else None


@dataclass
class Comparison:
    """A study's comparison: its rows and where it lives in MLflow."""

    study_name: str
    experiment: str
    parent_run_id: str
    rows: list[CompareRow]
    baseline: Optional[str] = None
    metrics: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return (f"{self.study_name}: val top-1 (validation split) and test top-1 (test split), "
                "mean ± std over seeds")


# --------------------------------------------------------------------------------- the store
def tracking_uri_for(runs_dir: Optional[str | Path] = None, tracking_uri: Optional[str] = None) -> str:
    """The MLflow store to read: ``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > ``mlflow.yaml``
    ``tracking_uri`` > ``sqlite:///<runs>/mlflow.db`` (runs: ``--runs-dir`` > ``mlflow.yaml`` > ./runs),
    as :func:`repsearch.tracking.resolve_stores` without a recipe.

    Raises:
        CompareError: a local SQLite store that does not exist (a lookup never creates one).
    """
    cfg = read_mlflow_yaml()
    uri = next((str(u) for u in (tracking_uri, os.environ.get("MLFLOW_TRACKING_URI"), cfg.get("tracking_uri")) if u), None)
    if uri is None:
        runs = Path(str(runs_dir) if runs_dir is not None else (cfg.get("runs_dir") or "runs")).expanduser().resolve()
        uri = f"sqlite:///{runs / 'mlflow.db'}"
    elif ":" not in uri.split("/", 1)[0] and uri.endswith(".db"):
        uri = f"sqlite:///{Path(uri).expanduser().resolve()}"
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise CompareError(f"no MLflow store at {uri}; pass --runs-dir or --tracking-uri")
    return uri


def _parents(client: Any, experiment_ids: list[str]) -> list[Any]:
    from mlflow.entities import ViewType

    if not experiment_ids:
        return []
    runs = client.search_runs(
        experiment_ids, filter_string=f"tags.`{ROLE_TAG}` = 'study'", run_view_type=ViewType.ACTIVE_ONLY,
        max_results=5000, order_by=["attributes.start_time ASC"],
    )
    return [r for r in runs if r.data.tags.get(ROLE_TAG) == "study"]


def find_studies(client: Any, name: str, study: Optional[str] = None, all_studies: bool = False) -> list[Any]:
    """The parent runs to compare: NAME is an experiment (its latest study, ``study`` by name, or
    every study with ``all_studies``) or else a study name (tag ``study_name``) in any experiment.

    Raises:
        CompareError: no experiment or study of that name; ``study`` not in the experiment.
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage != "deleted":
        parents = _parents(client, [exp.experiment_id])
        if study is not None:
            chosen = [p for p in parents if p.data.tags.get("study_name") == study]
            if not chosen:
                names = sorted({p.data.tags.get("study_name", "?") for p in parents}) or ["none"]
                raise CompareError(f"experiment '{name}' has no study '{study}'; its studies: {', '.join(names)}")
            return chosen[-1:]
        if not parents:
            raise CompareError(f"experiment '{name}' has no study (no parent run tagged {ROLE_TAG}=study)")
        return parents if all_studies else [max(parents, key=lambda r: r.info.start_time or 0)]
    exps = [e for e in client.search_experiments() if e.lifecycle_stage != "deleted"]
    parents = [p for p in _parents(client, [e.experiment_id for e in exps]) if p.data.tags.get("study_name") == name]
    if parents:
        return parents[-1:]
    known = sorted(e.name for e in exps if e.name != "Default") or ["none"]
    raise CompareError(f"no experiment or study named '{name}'; experiments: {', '.join(known)}")


def child_runs(client: Any, parent: Any) -> list[Any]:
    """Every child run of a study's parent run (tag ``mlflow.parentRunId``), oldest first."""
    from mlflow.entities import ViewType

    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        run_view_type=ViewType.ACTIVE_ONLY, max_results=50000, order_by=["attributes.start_time ASC"],
    )
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def _outcome(run: Any) -> Optional[str]:
    status = run.info.status
    if status == "FINISHED":
        return "pruned" if run.data.tags.get("pruned") == "true" else "finished"
    if status in ("FAILED", "KILLED"):
        return "failed"
    return None  # RUNNING / SCHEDULED: not counted


def _int(v: Any, default: int) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def build_rows(client: Any, runs: Sequence[Any], metrics: Sequence[str] = ()) -> list[CompareRow]:
    """Group child runs by configuration (tag ``point``) and seed (tag ``seed``) into rows, in the
    study's configuration order (smallest ``optuna.trial_number`` first).

    Reads ``train_images_per_s`` per epoch (``client.get_metric_history``) of every finished run.
    """
    groups: dict[str, list[Any]] = {}
    for r in runs:
        point = r.data.tags.get("point")
        if point is not None:
            groups.setdefault(point, []).append(r)
    order = sorted(groups, key=lambda p: min(_int(r.data.tags.get("optuna.trial_number"), 1 << 30) for r in groups[p]))
    methods = {p: next((r.data.params.get("method.name") for r in groups[p] if r.data.params.get("method.name")), None) for p in order}
    labels = unique_labels({p: config_label(p, methods[p]) for p in order})
    wanted = [VAL, TEST, "avg_flops_m", "avg_params_m", "cost_gpu_hours"] + [m for m in metrics if m not in (VAL, TEST)]
    rows = []
    for p in order:
        row = CompareRow(label=labels[p], point=p, method=methods[p])
        by_seed: dict[int, list[Any]] = {}
        for r in groups[p]:
            by_seed.setdefault(_int(r.data.tags.get("seed"), -1), []).append(r)
        for seed in sorted(by_seed):
            outcomes = {_outcome(r): r for r in by_seed[seed]}  # the latest run of each outcome wins
            if "finished" in outcomes:
                run = outcomes["finished"]
                row.n_finished += 1
                row.run_ids.append(run.info.run_id)
                for m in wanted:
                    v = run.data.metrics.get(m)
                    if v is not None and math.isfinite(v):
                        row.values.setdefault(m, {})[seed] = float(v)
                hist = [h.value for h in client.get_metric_history(run.info.run_id, "train_images_per_s")]
                if hist:
                    row.images_per_s[seed] = sum(hist) / len(hist)
                if "not_learning" in run.data.tags:
                    row.not_learning.append((seed, run.data.tags["not_learning"]))
            elif "pruned" in outcomes:
                row.n_pruned += 1
            elif "failed" in outcomes:
                row.n_failed += 1
        rows.append(row)
    return rows


def find_row(rows: Sequence[CompareRow], name: str) -> CompareRow:
    """The row labelled ``name`` (or whose point id is ``name``).

    Raises:
        CompareError: no such row (the message lists the rows).
    """
    for r in rows:
        if name in (r.label, r.point):
            return r
    raise CompareError(f"--baseline '{name}' is not a row; rows: {', '.join(repr(r.label) for r in rows)}")


def paired_delta(row: CompareRow, base: CompareRow, metric: str) -> Interval:
    """:func:`t_interval` of ``row − base`` over the seeds both finished (matched by seed)."""
    a, b = row.values.get(metric, {}), base.values.get(metric, {})
    return t_interval(a[s] - b[s] for s in sorted(set(a) & set(b)))


def compare_runs(
    client: Any, parent: Any, runs: Sequence[Any], *, baseline: Optional[str] = None, metrics: Sequence[str] = (),
    experiment: str = "",
) -> Comparison:
    """The :class:`Comparison` of one study (its parent run and child runs).

    Raises:
        CompareError: no finished child run; ``baseline`` not a row; a ``metrics`` entry that no
            finished run records.
    """
    study = parent.data.tags.get("study_name", parent.info.run_name or parent.info.run_id)
    rows = build_rows(client, runs, metrics)
    if not any(r.n_finished for r in rows):
        counts = ", ".join(f"{k} {sum(getattr(r, 'n_' + k) for r in rows)}" for k in ("failed", "pruned"))
        raise CompareError(f"study '{study}' has no finished trial ({counts}); run it first")
    rows = [r for r in rows if r.n_finished or r.n_failed or r.n_pruned]
    for m in metrics:
        if not any(r.values.get(m) for r in rows):
            recorded = sorted({k for r in runs if _outcome(r) == "finished" for k in r.data.metrics})
            raise CompareError(f"--metric '{m}': no finished run of study '{study}' records it; recorded: {', '.join(recorded)}")
    if baseline is not None:
        base = find_row(rows, baseline)
        baseline = base.label
        for r in rows:
            if r is not base:
                r.deltas = {m: paired_delta(r, base, m) for m in (VAL, TEST, *metrics)}
    means = [(r.mean(VAL), i) for i, r in enumerate(rows) if r.mean(VAL) is not None]
    if means:  # ties: the first row
        rows[max(means, key=lambda p: (p[0], -p[1]))[1]].best = True
    warnings = [f"warning: {r.label} seed {s}: not learning ({why})" for r in rows for s, why in r.not_learning]
    return Comparison(study, experiment, parent.info.run_id, rows, baseline, list(metrics), warnings)


# ------------------------------------------------------------------------------------ output
def _f(v: Optional[float], spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def fmt_stat(s: Interval, signed: bool = False) -> str:
    """``"93.21 ± 0.15"`` (the mean alone when n = 1, ``"—"`` when n = 0)."""
    spec = "+.2f" if signed else ".2f"
    if s.mean is None:
        return "—"
    return _f(s.mean, spec) if s.std is None else f"{s.mean:{spec}} ± {s.std:.2f}"


def fmt_ci(s: Interval) -> str:
    """``"[92.84, 93.58]"``; ``"—"`` with fewer than 2 values."""
    return "—" if s.low is None else f"[{s.low:.2f}, {s.high:.2f}]"


def _n(r: CompareRow) -> str:
    return f"{r.n_finished}/{r.n_failed}/{r.n_pruned}"


def columns(cmp: Comparison) -> list[str]:
    """Titles of the table's columns (Markdown and terminal), the split named in each title."""
    cols = ["configuration", "val top-1 (%)", "val 95% CI", "test top-1 (%)", "test 95% CI"]
    if cmp.baseline:
        cols += [f"Δ val vs {cmp.baseline}", "Δ val 95% CI", f"Δ test vs {cmp.baseline}"]
    cols += ["avg FLOPs (M MACs)", "avg params (M)", "device-hours", "train images/s", "n finished/failed/pruned"]
    for m in cmp.metrics:
        cols += [m] + ([f"Δ {m}"] if cmp.baseline else [])
    return cols


def cells(cmp: Comparison, r: CompareRow) -> list[str]:
    """The formatted cells of a row, in :func:`columns` order (best row's label ends in ``*``)."""
    out = [r.label + (" *" if r.best else ""), fmt_stat(r.stat(VAL)), fmt_ci(r.stat(VAL)),
           fmt_stat(r.stat(TEST)), fmt_ci(r.stat(TEST))]
    if cmp.baseline:
        if r.label == cmp.baseline:
            out += ["(baseline)", "", "(baseline)"]
        else:
            dv, dt = r.deltas.get(VAL, Interval(None, None, 0, None, None)), r.deltas.get(TEST, Interval(None, None, 0, None, None))
            out += [fmt_stat(dv, signed=True), fmt_ci(dv), fmt_stat(dt, signed=True)]
    out += [_f(r.mean("avg_flops_m"), ".1f"), _f(r.mean("avg_params_m"), ".3f"), _f(r.device_hours(), ".4f"),
            _f(r.mean_images_per_s(), ".0f"), _n(r)]
    for m in cmp.metrics:
        out.append(fmt_stat(r.stat(m)))
        if cmp.baseline:
            out.append("(baseline)" if r.label == cmp.baseline else fmt_stat(r.deltas.get(m, Interval(None, None, 0, None, None)), signed=True))
    return out


def rich_table(cmp: Comparison) -> Table:
    """The comparison as a ``rich`` table; the best row (validation) in bold."""
    table = Table(title=cmp.title, caption=Text(NOTE), caption_justify="left")  # not markup: "[low, high]"
    for i, c in enumerate(columns(cmp)):
        table.add_column(c, justify="left" if i == 0 else "right", overflow="fold")
    for r in cmp.rows:
        table.add_row(*[Text(c) for c in cells(cmp, r)], style="bold" if r.best else None)
    return table


def to_markdown(cmp: Comparison) -> str:
    """The comparison as a Markdown document: title, the note on splits, the table."""
    cols = columns(cmp)
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = [f"## {cmp.title}", "", NOTE, "", "| " + " | ".join(cols) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for r in cmp.rows:
        cs = [esc(c) for c in cells(cmp, r)]
        if r.best:
            cs[0] = f"**{cs[0]}**"
        lines.append("| " + " | ".join(cs) + " |")
    lines += [""] + cmp.warnings
    return "\n".join(lines).rstrip() + "\n"


def _num(v: Optional[float]) -> str:
    return "" if v is None else repr(float(v))


def to_csv(cmp: Comparison) -> str:
    """The comparison as CSV: one line per row, numbers unformatted, the split in every column name
    (``val_top1_*`` validation, ``test_top1_*`` test); ``best`` marks the best row by validation."""
    def stat_cols(prefix: str) -> list[str]:
        return [f"{prefix}_mean", f"{prefix}_std", f"{prefix}_ci95_low", f"{prefix}_ci95_high", f"{prefix}_n"]

    def stat_vals(s: Interval) -> list[str]:
        return [_num(s.mean), _num(s.std), _num(s.low), _num(s.high), str(s.n)]

    keys = [(VAL, "val_top1"), (TEST, "test_top1")] + [(m, m.replace("/", "_")) for m in cmp.metrics]
    header = ["study", "configuration", "point", "method", "best"]
    for _, name in keys:
        header += stat_cols(name)
    if cmp.baseline:
        header.append("baseline")
        for _, name in keys:
            header += stat_cols(f"delta_{name}")
    header += ["avg_flops_m", "avg_params_m", "device_hours", "train_images_per_s", "seeds", "n_finished", "n_failed", "n_pruned"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in cmp.rows:
        line = [cmp.study_name, r.label, r.point, r.method or "", str(r.best).lower()]
        for m, _ in keys:
            line += stat_vals(r.stat(m))
        if cmp.baseline:
            line.append(cmp.baseline)
            for m, _ in keys:
                line += stat_vals(r.deltas.get(m, Interval(None, None, 0, None, None)))
        line += [_num(r.mean("avg_flops_m")), _num(r.mean("avg_params_m")), _num(r.device_hours()),
                 _num(r.mean_images_per_s()), " ".join(map(str, r.seeds)), str(r.n_finished), str(r.n_failed), str(r.n_pruned)]
        w.writerow(line)
    return buf.getvalue()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _optuna_study(parent: Any) -> Any:
    """The study's ``optuna.Study`` for Optuna's own plots (Pareto front, importances), from the
    storage named by the parent run's tag ``optuna.storage``; None when it cannot be opened (a
    tracking server alone). The table never reads it."""
    storage = parent.data.tags.get("optuna.storage")
    name = parent.data.tags.get("study_name")
    if not storage or not name:
        return None
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).is_file():
        return None  # opening would create an empty store
    if "://" not in storage and not Path(storage).is_file():
        return None  # a journal file that is gone
    try:
        import optuna

        from repsearch.sweep import open_storage

        return optuna.load_study(study_name=name, storage=open_storage(storage))
    except Exception as exc:  # only the optional plots need it
        log.info("Optuna study %s not opened for plots: %s", name, exc)
        return None


def log_artifacts(client: Any, cmp: Comparison, parent: Any, runs: Sequence[Any], *, plots: bool = True) -> list[str]:
    """Write ``compare/<study>.csv`` and ``.md`` (and the plots under ``plots/`` when
    ``repsearch.plots`` exists) and log them on the study's parent run. Returns the artifact paths.
    A plot module that raises is logged as one warning line; the table artifacts are still logged."""
    done = []
    with tempfile.TemporaryDirectory(prefix="repsearch-compare-") as tmp:
        folder = Path(tmp) / "compare"
        folder.mkdir()
        for ext, text in (("csv", to_csv(cmp)), ("md", to_markdown(cmp))):
            p = folder / f"{_safe(cmp.study_name)}.{ext}"
            p.write_text(text)
            client.log_artifact(cmp.parent_run_id, str(p), artifact_path="compare")
            done.append(f"compare/{p.name}")
        if plots and importlib.util.find_spec("repsearch.plots") is not None:
            finished = [r for r in runs if _outcome(r) == "finished"]
            labels = {rid: row.label for row in cmp.rows for rid in row.run_ids}
            try:
                from repsearch.plots import study_plots

                pngs = study_plots(client, parent, finished, labels, Path(tmp) / "plots",
                                   optuna_study=_optuna_study(parent), title=cmp.study_name)
            except Exception as exc:  # a plot must never cost the table
                log.warning("plots of study %s not made: %s: %s", cmp.study_name, type(exc).__name__, exc)
                pngs = []
            for png in pngs:
                client.log_artifact(cmp.parent_run_id, str(png), artifact_path="plots")
                done.append(f"plots/{Path(png).name}")
    cmp.artifacts = done
    return done


def compare(
    name: str, *, study: Optional[str] = None, all_studies: bool = False, baseline: Optional[str] = None,
    metrics: Sequence[str] = (), runs_dir: Optional[str | Path] = None, tracking_uri: Optional[str] = None,
    artifacts: bool = True, plots: bool = True,
) -> list[Comparison]:
    """Compare the configurations of one study (or every study of an experiment) from MLflow.

    Args:
        name: an MLflow experiment (recipe stem; its latest study) or a study name.
        study: a study of experiment ``name``; all_studies: every study of the experiment.
        baseline: a row label (or point id) for the paired deltas.
        metrics: extra final metrics (e.g. ``int8/test_top1``), mean ± std and delta.
        runs_dir, tracking_uri: the store (:func:`tracking_uri_for`).
        artifacts: log the CSV/Markdown (and plots) on each parent run; plots: make the plots.

    Returns:
        One :class:`Comparison` per study (studies without a finished trial are left out with
        ``all_studies``; at least one remains).

    Raises:
        CompareError: unknown experiment or study, no finished trial, a baseline not a row, an
            unrecorded metric (one line each).
    """
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = MlflowClient(tracking_uri=tracking_uri_for(runs_dir, tracking_uri))
    parents = find_studies(client, name, study, all_studies)
    out: list[Comparison] = []
    errors: list[str] = []
    for parent in parents:
        runs = child_runs(client, parent)
        experiment = client.get_experiment(parent.info.experiment_id).name
        try:
            cmp = compare_runs(client, parent, runs, baseline=baseline, metrics=metrics, experiment=experiment)
        except CompareError as exc:
            if len(parents) == 1 or "no finished trial" not in str(exc):
                raise
            errors.append(str(exc))
            continue
        if artifacts:
            log_artifacts(client, cmp, parent, runs, plots=plots)
        out.append(cmp)
    if not out:
        raise CompareError(errors[0] if errors else f"'{name}': nothing to compare")
    return out


def compare_url(host: str, port: int, run_ids: Sequence[str], experiment_ids: Sequence[str]) -> str:
    """The MLflow UI's compare view of ``run_ids``:
    ``http://HOST:PORT/#/compare-runs?runs=["id1","id2"]&experiments=["1"]`` (JSON lists of quoted
    ids, as the UI's own "Compare" button writes them)."""
    import json

    runs = json.dumps(list(run_ids), separators=(",", ":"))
    exps = json.dumps(sorted(set(experiment_ids)), separators=(",", ":"))
    return f"http://{host}:{port}/#/compare-runs?runs={runs}&experiments={exps}"


def latest_study_url(host: str, port: int, runs_dir: Optional[str | Path] = None, tracking_uri: Optional[str] = None) -> Optional[str]:
    """:func:`compare_url` of the most recent study in the store (its finished child runs), or None
    when the store, or a study with a finished run, does not exist."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=tracking_uri_for(runs_dir, tracking_uri))
    except CompareError:
        return None
    exps = [e.experiment_id for e in client.search_experiments() if e.lifecycle_stage != "deleted"]
    parents = sorted(_parents(client, exps), key=lambda r: r.info.start_time or 0, reverse=True)
    for parent in parents:
        ids = [r.info.run_id for r in child_runs(client, parent) if _outcome(r) == "finished"]
        if ids:
            return compare_url(host, port, ids, [parent.info.experiment_id])
    return None
