"""The plan of a study: its points (configuration × seed), slots and their Optuna params.

DESIGN.md "Sweeps — contract". Pure functions of the recipe (and of the trials already in the study,
for sampled configurations); nothing here opens a storage.

Grid studies: the points are the product of ``sweep.params`` choices plus ``baselines``, × seeds.
Their Optuna params (for optuna-dashboard) are ``point`` (categorical over the point ids), each
swept key (categorical; lists are JSON strings) and ``seed`` (int); the sampler never chooses.
Other samplers: configuration k (k < ``n_trials``) is a "propose" slot for ``seeds[0]``, whose worker
asks the sampler, then enqueues the same configuration for the other seeds ("pending" slots until
then). Baselines are fixed slots without Optuna params.

A slot is identified by its key: ``("point", point id, seed)`` or ``("config", k, seed)``, stored in
the trial's user attributes (``point``/``config`` and ``seed``).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

from optuna.trial import FrozenTrial, TrialState

from repsearch.errors import UserError
from repsearch.spec import Objective, Range, Recipe

DEFAULT_POINT = "default"
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_ACTIVE = (TrialState.WAITING, TrialState.RUNNING)


class SweepError(UserError):
    """A sweep that cannot run as asked: bad storage, parallel workers, a malformed range."""


class Point(NamedTuple):
    """One configuration × seed of a study.

    Attributes:
        point_id: stable readable id without the seed: ``method.scoring=snip``,
            ``baseline:method.name=origin``, ``default`` (a recipe without sweep params).
        overrides: dotted path -> value applied to the recipe (:func:`repsearch.spec.trial_recipe`).
        seed: the trial's seed.
    """

    point_id: str
    overrides: dict
    seed: int


# ------------------------------------------------------------------------------------- points
def _fmt_value(v: Any, short: bool = False) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float) and short:
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_value(x, short) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt_value(x, short)}" for k, x in v.items()) + "}"
    return str(v)


def point_id(overrides: dict, short: bool = False) -> str:
    """Readable id of a configuration: ``"k1=v1, k2=v2"`` (``default`` when empty)."""
    if not overrides:
        return DEFAULT_POINT
    return ", ".join(f"{k}={_fmt_value(v, short)}" for k, v in overrides.items())


def _configurations(recipe: Recipe) -> list[tuple[str, dict, str]]:
    """(point id, overrides, kind) of the fixed configurations: grid points (grid only) and baselines."""
    sw = recipe.sweep
    if sw is None:
        return [(DEFAULT_POINT, {}, "grid")]
    out: list[tuple[str, dict, str]] = []
    if sw.sampler == "grid":
        keys = list(sw.params)
        for values in itertools.product(*(sw.params[k].choices for k in keys)):
            ov = dict(zip(keys, values))
            out.append((point_id(ov), ov, "grid"))
    for b in sw.baselines:
        out.append(("baseline:" + point_id(dict(b)), dict(b), "baseline"))
    seen: set[str] = set()
    for pid, _, _ in out:
        if pid in seen:
            raise SweepError(f"sweep: the point '{pid}' appears twice (sweep.params choices or sweep.baselines repeat)")
        seen.add(pid)
    return out


def _seeds(recipe: Recipe) -> list[int]:
    return [recipe.seed] if recipe.sweep is None else list(recipe.sweep.seeds)


def plan_points(recipe: Recipe) -> list[Point]:
    """The fixed points of a study, seed-major (every configuration for ``seeds[0]`` first).

    Grid: product of ``sweep.params`` choices (in the recipe's key order) plus ``baselines``, × seeds.
    Other samplers: only the baselines × seeds (the sampler proposes the rest while the study runs).
    A recipe without ``sweep`` is one point ``default`` (no overrides, seed = ``recipe.seed``).

    Raises:
        SweepError: two identical points.
    """
    configs = _configurations(recipe)
    return [Point(pid, ov, s) for s in _seeds(recipe) for pid, ov, _ in configs]


def _objectives(recipe: Recipe) -> list[Objective]:
    return recipe.sweep.objectives if recipe.sweep is not None else [Objective()]


def _check_sweep(recipe: Recipe) -> None:
    sw = recipe.sweep
    if sw is None:
        return
    for key, dist in sw.params.items():
        if key in ("seed", "point"):
            raise SweepError(f"sweep.params.{key}: not a swept field; list seeds in sweep.seeds")
        if isinstance(dist, Range):
            if dist.log and dist.step is not None:
                raise SweepError(f"sweep.params.{key}: a log range cannot have a step (Optuna samples log ranges continuously)")
            if dist.int and (dist.low != int(dist.low) or dist.high != int(dist.high) or (dist.step or 1) != int(dist.step or 1)):
                raise SweepError(f"sweep.params.{key}: an int range needs integer low, high and step")


def _encode(v: Any) -> Any:
    """A value Optuna's CategoricalDistribution accepts (lists/dicts as JSON strings)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return json.dumps(v, sort_keys=True)


# ---------------------------------------------------------------------------------- the study
@dataclass
class _Slot:
    key: tuple
    point: Optional[str]
    overrides: Optional[dict]
    seed: int
    kind: str  # grid | baseline | sampled | propose
    config: Optional[int] = None


def _slot_key(attrs: dict) -> Optional[tuple]:
    if "seed" not in attrs:
        return None
    if attrs.get("config") is not None:
        return ("config", int(attrs["config"]), int(attrs["seed"]))
    if attrs.get("point") is not None:
        return ("point", attrs["point"], int(attrs["seed"]))
    return None


def _wanted(recipe: Recipe, trials: list[FrozenTrial]) -> list[_Slot]:
    """Every slot the study must hold (propose slots for sampled configurations not yet known)."""
    seeds = _seeds(recipe)
    slots: list[_Slot] = []
    fixed = _configurations(recipe)
    if is_grid(recipe):
        for s in seeds:
            for pid, ov, kind in fixed:
                slots.append(_Slot(("point", pid, s), pid, ov, s, kind))
        return slots
    for s in seeds:
        for pid, ov, kind in fixed:  # baselines
            slots.append(_Slot(("point", pid, s), pid, ov, s, kind))
    known: dict[int, tuple[str, dict]] = {}
    for t in trials:
        a = t.user_attrs
        if a.get("config") is not None and a.get("overrides") is not None and a.get("point") is not None:
            known.setdefault(int(a["config"]), (a["point"], json.loads(a["overrides"])))
    configs = {int(t.user_attrs["config"]) for t in trials if t.user_attrs.get("config") is not None}
    n_configs = max([recipe.sweep.n_trials or 0] + [c + 1 for c in configs])
    for s_i, s in enumerate(seeds):
        for k in range(n_configs):
            if k in known:
                pid, ov = known[k]
                slots.append(_Slot(("config", k, s), pid, ov, s, "sampled", k))
            elif s_i == 0:
                slots.append(_Slot(("config", k, s), None, None, s, "propose", k))
            else:  # enqueued by the propose trial once the sampler chose; counted here
                slots.append(_Slot(("config", k, s), None, None, s, "pending", k))
    return slots


def _grid_params(recipe: Recipe, slot: _Slot) -> dict[str, Any]:
    if not is_grid(recipe):
        if slot.kind == "sampled" and slot.overrides is not None:
            return {k: _encode(v) for k, v in slot.overrides.items() if k in recipe.sweep.params}
        return {}
    params: dict[str, Any] = {"point": slot.point}
    if slot.kind == "grid":
        params.update({k: _encode(v) for k, v in slot.overrides.items()})
    params["seed"] = slot.seed
    return params


def _slot_states(trials: list[FrozenTrial]) -> dict[tuple, set]:
    states: dict[tuple, set] = {}
    for t in trials:
        key = _slot_key(t.user_attrs)
        if key is not None:
            states.setdefault(key, set()).add(t.state)
    return states


def is_grid(recipe: Recipe) -> bool:
    """Whether the study's slots are all fixed (no sweep, or ``sampler: grid``)."""
    return recipe.sweep is None or recipe.sweep.sampler == "grid"
