"""A study's plots as PNG files (issue 14): what ``repsearch compare`` logs on the study's parent run.

:func:`study_plots` reads the study's FINISHED child runs from MLflow (per-epoch metric histories,
step = epoch, and DyRep's ``events.json``; DESIGN.md "Stores — contract", run layout in
:mod:`repsearch.tracking`) and writes, in ``out_dir``:

- ``val_top1_vs_epoch.png``, ``train_loss_vs_epoch.png``: a thin line per trial and a mean ± std band
  per configuration (trials aligned by epoch);
- ``val_top1_vs_flops.png``: final ``val/top1`` (%) vs ``avg_flops_m`` (M MACs, the papers'
  Avg. FLOPs, DyRep Table 2) per configuration, std over seeds as error bars, and the Pareto front
  (max val top-1, min FLOPs) over the configurations' means;
- ``flops_vs_epoch.png``, ``n_branches_vs_epoch.png``: per-configuration mean (± std band);
- ``dyrep_structure_<label>.png`` for every DyRep configuration: a (layer, branch) × epoch map of one
  trial's structure from its ``events.json`` (Rep and Dep marked, surviving branches coloured by
  their importance s_j, DyRep Eq. 9), as DyRep Fig. 6;
- from an Optuna study, when given: ``optuna_pareto_front.png`` (multi-objective studies) and
  ``optuna_param_importances*.png`` / ``optuna_slice*.png`` (non-grid studies: the parent run's tag
  ``sampler`` is neither ``grid`` nor ``none``), drawn by ``optuna.visualization.matplotlib``.

Validation numbers only: test accuracy is never plotted here (it never drives a choice). Figures use
the object API (:class:`matplotlib.figure.Figure`, Agg canvas: no pyplot state); only Optuna's
plotting functions need pyplot, which is then imported with the Agg backend unless the process has
already chosen one. A plot that cannot be made (no data, no DyRep event, an Optuna plot that fails)
is skipped with a log line, never an error.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

log = logging.getLogger(__name__)

#: Resolution of every PNG (dots per inch); 8×5 inches at 100 dpi = 800×500 px.
DPI = 100
FIGSIZE = (8.0, 5.0)
#: Per-epoch metrics read from MLflow: name -> (y-axis label with unit, file stem, lines per trial).
EPOCH_PLOTS = {
    "val/top1": ("validation top-1 (%)", "val_top1_vs_epoch", True),
    "train/loss": ("training loss (cross-entropy, nats)", "train_loss_vs_epoch", True),
    "flops_m": ("FLOPs of the training-time model (M MACs)", "flops_vs_epoch", False),
    "n_branches": ("branches + plain convs (count)", "n_branches_vs_epoch", False),
}
_TITLES = {
    "val/top1": "validation top-1 vs epoch",
    "train/loss": "training loss vs epoch",
    "flops_m": "training-time FLOPs vs epoch",
    "n_branches": "number of branches vs epoch",
}


# ------------------------------------------------------------------------------------- data
@dataclass
class TrialSeries:
    """One child run as the plots read it.

    Attributes:
        run_id: MLflow run id.
        label: its configuration label (e.g. ``dyrep scoring=synflow``).
        seed: the trial's seed (param ``seed``), or None.
        method: param ``method.name`` (``dyrep``, ``origin``, ...), or None.
        pruned: tag ``pruned=true`` (its final values are those of an unfinished schedule).
        final: the run's latest metric values (``run.data.metrics``).
        history: metric -> (steps = epochs, values), sorted by step, one value per step (the last
            logged).
        epochs: param ``train.epochs``, or None.
        start_time: run start (ms since the epoch), to order trials of equal seed.
    """

    run_id: str
    label: str
    seed: Optional[int]
    method: Optional[str]
    pruned: bool
    final: dict[str, float]
    history: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    epochs: Optional[int] = None
    start_time: int = 0


def _int_or_none(text: Any) -> Optional[int]:
    try:
        return int(json.loads(text)) if isinstance(text, str) else int(text)
    except (TypeError, ValueError):
        return None


def _method_name(text: Optional[str]) -> Optional[str]:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    return str(value)


def _history(client, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``key``, sorted by step; of several values at one step the last logged."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        prev = by_step.get(int(m.step))
        if prev is None or m.timestamp >= prev[0]:
            by_step[int(m.step)] = (m.timestamp, float(m.value))
    steps = np.array(sorted(by_step), dtype=float)
    values = np.array([by_step[int(s)][1] for s in steps], dtype=float)
    return steps, values


def read_trials(client, child_runs: Sequence, labels: Mapping[str, str], metrics: Sequence[str] = tuple(EPOCH_PLOTS)) -> list[TrialSeries]:
    """Read the child runs' params, final metrics and per-epoch histories of ``metrics``.

    Args:
        client: an ``mlflow.tracking.MlflowClient`` on the study's store.
        child_runs: ``mlflow.entities.Run`` objects (the study's FINISHED children).
        labels: run id -> configuration label; a run without one is labelled by its run name.

    Returns one :class:`TrialSeries` per run, in the given order. Issues one
    ``get_metric_history`` call per run and metric.
    """
    out = []
    for run in child_runs:
        rid = run.info.run_id
        params, tags = run.data.params, run.data.tags
        t = TrialSeries(
            run_id=rid,
            label=labels.get(rid) or run.info.run_name or rid[:8],
            seed=_int_or_none(params.get("seed")),
            method=_method_name(params.get("method.name")),
            pruned=str(tags.get("pruned", "")).lower() == "true",
            final={k: float(v) for k, v in run.data.metrics.items()},
            epochs=_int_or_none(params.get("train.epochs")),
            start_time=int(run.info.start_time or 0),
        )
        for key in metrics:
            steps, values = _history(client, rid, key)
            if len(steps):
                t.history[key] = (steps, values)
        out.append(t)
    return out


def aggregate_by_step(series: Sequence[tuple[Sequence[float], Sequence[float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Align several (steps, values) series by step (epoch) and average them.

    Args:
        series: (steps, values) pairs; a series may miss steps (a pruned or shorter trial).

    Returns:
        ``(steps, mean, std, n)``, arrays of shape (S,) over the union of the steps, sorted: the mean
        and the sample std (ddof = 1; 0 where a single series has the step) over the series that
        have each step, and their number.
    """
    values: dict[float, list[float]] = {}
    for steps, vals in series:
        for s, v in zip(steps, vals):
            if math.isfinite(float(v)):
                values.setdefault(float(s), []).append(float(v))
    steps = np.array(sorted(values), dtype=float)
    mean = np.array([np.mean(values[s]) for s in steps], dtype=float)
    std = np.array([np.std(values[s], ddof=1) if len(values[s]) > 1 else 0.0 for s in steps], dtype=float)
    n = np.array([len(values[s]) for s in steps], dtype=int)
    return steps, mean, std, n


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when x is minimised and y maximised (e.g. x = avg FLOPs
    in M MACs, y = val top-1 in %).

    Point j dominates point i when ``x_j <= x_i`` and ``y_j >= y_i`` with one inequality strict;
    equal points dominate neither (both stay on the front). Points with a non-finite coordinate are
    never on the front.

    Returns the indices sorted by increasing x (then decreasing y).
    """
    pts = [(float(x), float(y)) for x, y in points]
    ok = [i for i, (x, y) in enumerate(pts) if math.isfinite(x) and math.isfinite(y)]
    front = []
    for i in ok:
        xi, yi = pts[i]
        dominated = any(
            pts[j][0] <= xi and pts[j][1] >= yi and (pts[j][0] < xi or pts[j][1] > yi) for j in ok if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (pts[i][0], -pts[i][1], i))


# --------------------------------------------------------------------------- DyRep structure
@dataclass
class StructureMap:
    """DyRep's structure over training as a (layer, branch) × epoch map (DyRep Fig. 6).

    Rows are the non-kxk branches of every block Rep ever grew, grouped by block path in the order
    of the Rep events (a block grown twice, after a collapse, keeps its rows); columns are epochs
    1..E. Column e is the structure at the end of epoch e, after that epoch's adjustment.

    Attributes:
        rows: ``(block path, branch kind)`` per row.
        alive: bool array (R, E): the branch exists at the end of epoch e (a branch cut at epoch e
            counts as alive there: its importance was measured before the cut).
        importance: float array (R, E): the branch's importance s_j = mean|γ_j| / mean|γ_kxk|
            (DyRep Eq. 9) from the last Dep scan at or before e while alive; NaN before its first
            scan or when dead.
        reps: ``(row, epoch)`` of every branch added by Rep.
        deps: ``(row, epoch)`` of every branch removed (by Dep, by the collapse of its block, or
            with the branch or block that contained it).
        n_epochs: E.
    """

    rows: list[tuple[str, str]]
    alive: np.ndarray
    importance: np.ndarray
    reps: list[tuple[int, int]]
    deps: list[tuple[int, int]]
    n_epochs: int

    def surviving(self) -> dict[str, list[str]]:
        """``{block path: [branch kinds]}`` alive after the last epoch (kxk not listed)."""
        out: dict[str, list[str]] = {}
        for r, (path, kind) in enumerate(self.rows):
            if self.n_epochs and self.alive[r, -1] and (r, self.n_epochs) not in self.deps:
                out.setdefault(path, []).append(kind)
        return out


def dyrep_structure_map(events: Sequence[Mapping[str, Any]], n_epochs: Optional[int] = None) -> StructureMap:
    """Build the :class:`StructureMap` of one DyRep trial from its ``events.json``.

    Args:
        events: DyRep's events (:class:`repsearch.methods.dyrep.DyRep`): ``rep`` (``epoch``,
            ``path``, ``added``), ``dep`` (``epoch``, ``path``, ``importances``, ``removed``,
            ``collapsed``), ``dep_scan`` (``epoch``, ``importances``: path -> {kind: s_j}); other
            kinds are ignored. Epochs count from 1.
        n_epochs: number of epoch columns (the trial's ``train.epochs``); at least the last event's
            epoch.

    Raises:
        ValueError: an event without an integer ``epoch`` or a ``rep``/``dep`` without ``path``.
    """
    evs = []
    for ev in events:
        try:
            epoch = int(ev["epoch"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"DyRep event without an integer epoch: {str(ev)[:200]}") from None
        kind = ev.get("kind")
        if kind in ("rep", "dep") and not ev.get("path"):
            raise ValueError(f"DyRep {kind} event at epoch {epoch} has no path")
        evs.append((epoch, kind, ev))
    last = max([e for e, _, _ in evs], default=0)
    E = max(int(n_epochs or 0), last)
    rows: list[tuple[str, str]] = []
    index: dict[tuple[str, str], int] = {}
    born: dict[int, int] = {}  # row -> epoch of its current life's start
    spans: list[tuple[int, int, int]] = []  # (row, first epoch, last epoch)
    scans: list[tuple[int, str, str, float]] = []
    reps: list[tuple[int, int]] = []
    deps: list[tuple[int, int]] = []

    def end(row: int, epoch: int) -> None:
        spans.append((row, born.pop(row), epoch))
        deps.append((row, epoch))

    for epoch, kind, ev in evs:  # events are in order; within an epoch Rep comes before Dep
        if kind == "rep":
            path = ev["path"]
            for b in ev.get("added", []):
                if b == "kxk":
                    continue
                key = (path, b)
                if key not in index:
                    index[key] = len(rows)
                    rows.append(key)
                r = index[key]
                if r not in born:
                    born[r] = epoch
                    reps.append((r, epoch))
        elif kind in ("dep", "dep_scan"):
            imps = {ev["path"]: ev.get("importances", {})} if kind == "dep" else ev.get("importances", {})
            for path, per_branch in (imps or {}).items():
                for b, s in (per_branch or {}).items():
                    scans.append((epoch, path, b, float(s)))
            if kind == "dep":
                path = ev["path"]
                removed = list(ev.get("removed", []))
                prefixes = [f"{path}.branches.{b}." for b in removed]
                if ev.get("collapsed"):
                    prefixes.append(f"{path}.")  # folded into a plain conv: nested blocks go too
                for r in list(born):
                    p, b = rows[r]
                    if (p == path and b in removed) or any(p.startswith(x) for x in prefixes):
                        end(r, epoch)
    for r in list(born):
        spans.append((r, born.pop(r), E))
    R = len(rows)
    alive = np.zeros((R, E), dtype=bool)
    for r, a, b in spans:
        alive[r, a - 1 : b] = True
    importance = np.full((R, E), np.nan)
    measured: dict[int, dict[int, float]] = {}  # row -> {epoch: s_j}
    for epoch, path, b, s in scans:
        r = index.get((path, b))
        if r is not None and math.isfinite(s):
            measured.setdefault(r, {})[epoch] = s
    for r, a, b in spans:  # forward-fill each life of a branch from its first scan on
        current = math.nan
        for e in range(a, b + 1):
            current = measured.get(r, {}).get(e, current)
            importance[r, e - 1] = current
    return StructureMap(rows=rows, alive=alive, importance=importance, reps=reps, deps=deps, n_epochs=E)


# ---------------------------------------------------------------------------------- drawing
def _figure(figsize=FIGSIZE) -> Figure:
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _colours(labels: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}


def _by_label(trials: Sequence[TrialSeries]) -> dict[str, list[TrialSeries]]:
    groups: dict[str, list[TrialSeries]] = {}
    for t in trials:
        groups.setdefault(t.label, []).append(t)
    return groups


def plot_epoch_metric(trials: Sequence[TrialSeries], metric: str, path: Path, study: str) -> Optional[Path]:
    """Draw ``metric`` vs epoch: a thin line per trial (dashed when pruned) when
    :data:`EPOCH_PLOTS` asks for it, and per configuration the mean over its non-pruned trials with
    a ± std band (epochs aligned by :func:`aggregate_by_step`). Returns ``path``, or None (nothing
    written) when no trial logged ``metric``."""
    ylabel, _, per_trial = EPOCH_PLOTS[metric]
    groups = _by_label([t for t in trials if metric in t.history])
    if not groups:
        log.info("plot %s skipped: no trial logged %s", path.name, metric)
        return None
    colours = _colours(list(groups))
    fig = _figure()
    ax = fig.add_subplot()
    for label, group in groups.items():
        c = colours[label]
        if per_trial:
            for t in group:
                steps, vals = t.history[metric]
                ax.plot(steps, vals, color=c, lw=0.7, alpha=0.45, ls="--" if t.pruned else "-")
        full = [t.history[metric] for t in group if not t.pruned] or [t.history[metric] for t in group]
        steps, mean, std, n = aggregate_by_step(full)
        ax.plot(steps, mean, color=c, lw=2.0, label=f"{label} (n={max(n)})")
        if max(n) > 1:
            ax.fill_between(steps, mean - std, mean + std, color=c, alpha=0.2, lw=0)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    what = "thin: one trial each; thick: mean ± std over seeds" if per_trial else "mean ± std over seeds"
    ax.set_title(f"{study}: {_TITLES[metric]}\n({what})", fontsize=10)
    ax.grid(alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_val_vs_flops(trials: Sequence[TrialSeries], path: Path, study: str) -> Optional[Path]:
    """Final validation top-1 (%) vs ``avg_flops_m`` (M MACs) per configuration: each trial a faint
    dot, the mean over seeds with std error bars on both axes, and the Pareto front of the means
    (:func:`pareto_front`: max val top-1, min FLOPs) as a dashed staircase with ringed points. Pruned
    trials are left out. Returns ``path``, or None when no trial has both final values."""
    ok = [t for t in trials if not t.pruned and "val/top1" in t.final and "avg_flops_m" in t.final]
    groups = _by_label(ok)
    if not groups:
        log.info("plot %s skipped: no finished trial with final val/top1 and avg_flops_m", path.name)
        return None
    colours = _colours(list(groups))
    fig = _figure()
    ax = fig.add_subplot()
    labels, means = [], []
    for label, group in groups.items():
        x = np.array([t.final["avg_flops_m"] for t in group])
        y = np.array([t.final["val/top1"] for t in group])
        c = colours[label]
        ax.scatter(x, y, color=c, s=12, alpha=0.35, lw=0)
        sx = float(np.std(x, ddof=1)) if len(x) > 1 else 0.0
        sy = float(np.std(y, ddof=1)) if len(y) > 1 else 0.0
        ax.errorbar(x.mean(), y.mean(), xerr=sx, yerr=sy, fmt="o", color=c, ms=7, capsize=4,
                    label=f"{label} (n={len(group)})")
        labels.append(label)
        means.append((float(x.mean()), float(y.mean())))
    front = pareto_front(means)
    fx = [means[i][0] for i in front]
    fy = [means[i][1] for i in front]
    ax.plot(fx, fy, ls="--", color="black", lw=1.0, drawstyle="steps-post",
            label="Pareto front (max val top-1, min FLOPs)")
    ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="black", lw=1.2)
    ax.set_xlabel("avg FLOPs over training (M MACs, one 1-image forward pass)")
    ax.set_ylabel("final validation top-1 (%)")
    ax.set_title(f"{study}: validation top-1 vs avg FLOPs\n(mean ± std over seeds; faint dots: one trial each)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_dyrep_structure(smap: StructureMap, path: Path, study: str, label: str, seed: Optional[int]) -> Optional[Path]:
    """Draw a :class:`StructureMap` (DyRep Fig. 6): one row per (block, branch), one column per
    epoch; a cell coloured by the branch's importance s_j (log scale when it spans over a decade), light grey while the branch
    lives but has not been scanned yet, white when it does not exist; ▶ marks Rep (branch added),
    × marks Dep (branch removed). Returns ``path``, or None when the trial never grew a block."""
    R, E = smap.alive.shape if smap.rows else (0, smap.n_epochs)
    if R == 0 or E == 0:
        log.info("plot %s skipped: the DyRep trial has no Rep event", path.name)
        return None
    height = min(40.0, max(4.0, 0.22 * R + 2.0))
    fig = _figure((max(8.0, min(16.0, 4.0 + 0.08 * E)), height))
    ax = fig.add_subplot()
    extent = (0.5, E + 0.5, R - 0.5, -0.5)
    alive_only = np.where(smap.alive & np.isnan(smap.importance), 1.0, np.nan)
    ax.imshow(alive_only, aspect="auto", interpolation="nearest", extent=extent,
              cmap=ListedColormap(["#d0d0d0"]), vmin=0, vmax=1)
    imp = np.where(smap.alive, smap.importance, np.nan)
    finite = imp[np.isfinite(imp) & (imp > 0)]
    if finite.size and finite.max() > 10 * finite.min():  # over a decade: log scale
        norm = LogNorm(vmin=float(finite.min()), vmax=float(finite.max()))
    elif finite.size and finite.max() > finite.min():
        norm = Normalize(vmin=float(finite.min()), vmax=float(finite.max()))
    else:
        v = float(finite[0]) if finite.size else 1.0
        norm = Normalize(vmin=v * 0.5, vmax=v * 1.5)
    im = ax.imshow(np.where(imp > 0, imp, np.nan), aspect="auto", interpolation="nearest", extent=extent,
                   cmap="viridis", norm=norm)
    cb = fig.colorbar(im, ax=ax, pad=0.01)
    cb.set_label("importance s_j = mean|γ_j| / mean|γ_kxk| (Eq. 9)", fontsize=8)
    if smap.reps:
        ax.scatter([e for _, e in smap.reps], [r for r, _ in smap.reps], marker=">", s=28, color="black", zorder=3)
    if smap.deps:
        ax.scatter([e for _, e in smap.deps], [r for r, _ in smap.deps], marker="x", s=36, color="red", lw=1.5, zorder=3)
    prev = None
    for r, (p, _) in enumerate(smap.rows):
        if prev is not None and p != prev:
            ax.axhline(r - 0.5, color="black", lw=0.6)
        prev = p
    ax.set_yticks(range(R))
    ax.set_yticklabels([f"{p} · {b}" for p, b in smap.rows], fontsize=7 if R > 20 else 8)
    ax.set_xlim(0.5, E + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (structure at the end of the epoch, after its Rep/Dep)")
    ax.set_ylabel("layer (block path) · branch")
    seed_txt = f", seed {seed}" if seed is not None else ""
    ax.set_title(f"{study}: DyRep structure over training, {label}{seed_txt}\n(as DyRep Fig. 6)", fontsize=10)
    fig.legend(
        handles=[
            Line2D([], [], marker=">", ls="", color="black", label="Rep: branch added"),
            Line2D([], [], marker="x", ls="", color="red", label="Dep: branch removed"),
            Patch(color="#d0d0d0", label="alive, s_j not measured yet"),
        ],
        fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False,
    )
    return _save(fig, path)


def _safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "config"


def _events(client, run_id: str, tmp: Path) -> Optional[list]:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        local = client.download_artifacts(run_id, "events.json", str(tmp))
        return json.loads(Path(local).read_text())
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable artifact only skips this trial
        log.info("run %s: no readable events.json (%s)", run_id, " ".join(str(exc).split())[:200])
        return None


def _dyrep_plots(client, trials: Sequence[TrialSeries], out_dir: Path, study: str) -> list[Path]:
    written: list[Path] = []
    used: set[str] = set()
    groups = _by_label([t for t in trials if t.method == "dyrep"])
    with tempfile.TemporaryDirectory(prefix="repsearch-plots-") as tmp:
        for i, (label, group) in enumerate(groups.items()):
            name = _safe_name(label)
            if name in used:
                name = f"{name}_{i}"
            used.add(name)
            path = out_dir / f"dyrep_structure_{name}.png"
            order = sorted(group, key=lambda t: (t.pruned, t.seed if t.seed is not None else sys.maxsize, t.start_time))
            for t in order:  # the first trial (lowest seed) that has its events.json
                events = _events(client, t.run_id, Path(tmp) / t.run_id)
                if events is None:
                    continue
                try:
                    smap = dyrep_structure_map(events, t.epochs)
                    p = plot_dyrep_structure(smap, path, study, label, t.seed)
                except Exception as exc:  # noqa: BLE001 - optional plot: skipped, never an error
                    log.warning("plot %s skipped: %s", path.name, " ".join(str(exc).split())[:300])
                    p = None
                if p is not None:
                    written.append(p)
                break
            else:
                log.info("plot %s skipped: no trial of %r has an events.json", path.name, label)
    return written


# ------------------------------------------------------------------------------------ Optuna
def _pyplot():
    """pyplot for Optuna's plotting functions, with the Agg backend unless pyplot is already in use."""
    if "matplotlib.pyplot" not in sys.modules:
        import matplotlib

        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_optuna(draw, path: Path, title: str) -> Optional[Path]:
    """Call ``draw()`` (an ``optuna.visualization.matplotlib`` function returning Axes or an array of
    Axes), title its figure and save it; any failure is logged and skipped."""
    import matplotlib

    plt = _pyplot()
    fig = None
    try:
        # Optuna's functions call plt.style.use("ggplot"): rc_context restores the process's rcParams
        with matplotlib.rc_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning of optuna.visualization.matplotlib
            ax = draw()
            first = np.asarray(ax, dtype=object).flat[0]
            fig = first.figure
            fig.suptitle(title, fontsize=10)
            fig.savefig(path, dpi=DPI, bbox_inches="tight")
        return path
    except Exception as exc:  # noqa: BLE001 - optional plot: skipped, never an error
        log.warning("plot %s skipped: %s", path.name, " ".join(str(exc).split())[:300])
        return None
    finally:
        if fig is not None:
            plt.close(fig)


def _with_unit(metric: str) -> str:
    """``val/top1 (%)`` for a registered measure (:mod:`repsearch.measures`), else the name as is."""
    from repsearch.measures import MEASURES

    m = MEASURES.get(metric)
    return f"{metric} ({m.unit})" if m is not None and m.unit not in ("1", "") else metric


def _optuna_plots(optuna_study, parent_run, out_dir: Path, study: str) -> list[Path]:
    from optuna.trial import TrialState

    try:
        import optuna.visualization.matplotlib as ovm
    except ImportError as exc:
        log.info("Optuna plots skipped: %s", exc)
        return []
    complete = optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        log.info("Optuna plots skipped: study %s has no COMPLETE trial", optuna_study.study_name)
        return []
    n_obj = len(optuna_study.directions)
    names = list(getattr(optuna_study, "metric_names", None) or [f"objective {i}" for i in range(n_obj)])
    axis_names = [_with_unit(n) for n in names]
    written: list[Path] = []
    if n_obj > 1:
        p = _save_optuna(
            lambda: ovm.plot_pareto_front(optuna_study, target_names=axis_names if n_obj in (2, 3) else None),
            out_dir / "optuna_pareto_front.png", f"{study}: Optuna Pareto front ({' vs '.join(names)})",
        )
        written += [p] if p else []
    sampler = str(parent_run.data.tags.get("sampler", "")).lower()
    if sampler in ("", "grid", "none"):
        log.info("Optuna importance and slice plots skipped: sampler %r (a grid study)", sampler or "unknown")
        return written
    for i in range(n_obj):
        suffix = "" if n_obj == 1 else f"_{_safe_name(names[i])}"
        target = None if n_obj == 1 else (lambda t, i=i: t.values[i])
        for kind, fn in (("param_importances", ovm.plot_param_importances), ("slice", ovm.plot_slice)):
            what = "hyperparameter importance (fANOVA)" if kind == "param_importances" else "objective vs each parameter"
            p = _save_optuna(
                lambda fn=fn, target=target, i=i: fn(optuna_study, target=target, target_name=axis_names[i]),
                out_dir / f"optuna_{kind}{suffix}.png", f"{study}: Optuna {what}, {names[i]}",
            )
            written += [p] if p else []
    return written


# ------------------------------------------------------------------------------- entry point
def study_plots(
    client,
    parent_run,
    child_runs: list,
    labels: dict[str, str],
    out_dir: Path,
    *,
    optuna_study=None,
    title: str | None = None,
) -> list[Path]:
    """Write a study's plots as PNG files (module docstring lists them) and return their paths.

    Args:
        client: ``mlflow.tracking.MlflowClient`` on the study's tracking store.
        parent_run: the study's parent ``mlflow.entities.Run`` (tag ``repsearch.role=study``; its tag
            ``sampler`` tells grid from other studies, its tag ``study_name`` names the plots).
        child_runs: the FINISHED child ``Run`` objects (a pruned trial, tag ``pruned=true``, is drawn
            dashed and left out of means and of the FLOPs plot).
        labels: run id -> configuration label (e.g. ``dyrep scoring=synflow``).
        out_dir: folder for the PNG files (created).
        optuna_study: the study's ``optuna.Study`` for Optuna's own plots (None: none drawn).
        title: the name shown in every title (default: the parent run's ``study_name`` tag, else its
            run name).

    Returns:
        The PNG files written, in the order listed in the module docstring. Plots without data and
        optional plots that fail are skipped with a log line; nothing is raised for them.

    Raises:
        mlflow.exceptions.MlflowException: the tracking store cannot be read (metric histories).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = title or parent_run.data.tags.get("study_name") or parent_run.info.run_name or parent_run.info.run_id
    trials = read_trials(client, child_runs, labels)
    written: list[Path] = []
    if not trials:
        log.info("no finished trial in study %s: no plots", study)
    for metric in ("val/top1", "train/loss"):
        p = plot_epoch_metric(trials, metric, out_dir / f"{EPOCH_PLOTS[metric][1]}.png", study)
        written += [p] if p else []
    p = plot_val_vs_flops(trials, out_dir / "val_top1_vs_flops.png", study)
    written += [p] if p else []
    for metric in ("flops_m", "n_branches"):
        p = plot_epoch_metric(trials, metric, out_dir / f"{EPOCH_PLOTS[metric][1]}.png", study)
        written += [p] if p else []
    written += _dyrep_plots(client, trials, out_dir, study)
    if optuna_study is not None:
        try:
            written += _optuna_plots(optuna_study, parent_run, out_dir, study)
        except Exception as exc:  # noqa: BLE001 - optional plots: skipped, never an error
            log.warning("Optuna plots skipped: %s", " ".join(str(exc).split())[:300])
    return written
