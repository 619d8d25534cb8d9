"""The recipe contract: pydantic models, YAML loading, profiles and ``--set`` overrides.

Flow (DESIGN.md, "Recipes and overrides — contract")::

    load (yaml.safe_load) -> profiles[NAME] -> --set a.b=c (in order, last wins) -> Recipe.model_validate

Every model forbids unknown keys. A user mistake raises :class:`RecipeError` whose one-line message
names the file, the dotted field path as the user wrote it (the discriminated union's tag stripped:
``method.dyrep.scoring`` is reported as ``method.scoring``), what is wrong and what is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Discriminator,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from repsearch.errors import UserError
from repsearch.measures import objective_metrics
from repsearch.methods import method_specs
from repsearch.schema import MethodSpecModel, SpecModel

SAMPLERS = ("grid", "tpe", "random", "cmaes", "nsga2")
PRUNERS = ("none", "median", "hyperband")


class RecipeError(UserError):
    """A malformed recipe, profile or ``--set``: one line, exit status 2 (DESIGN.md recipes contract)."""


_Spec = SpecModel


# ----------------------------------------------------------------------------------------- data
class DataSpec(_Spec):
    """Dataset, split and augmentation (DESIGN.md data contract).

    ``val_size`` images are held out of the training set, stratified, drawn with ``split_seed``
    (independent of the trial seed). ``train_subset`` / ``test_subset`` are stratified subsets (in
    images) for smoke runs. ``cutout`` is the side in pixels of the Cutout square (0 = off).
    ``image_size``: side in pixels of the images the model sees (``folder`` datasets; default
    ``None`` = 32, CIFAR's own size, the only one CIFAR allows). ``augment``: ``cifar`` (default:
    4-pixel pad + random crop + flip at ``image_size``) or ``imagenet`` (``folder`` only, needs
    ``image_size``: images held at ``round(image_size / 0.875)`` px, RandomResizedCrop + flip for
    training, Resize + CenterCrop for val/test; see :mod:`repsearch.data`).
    """

    dataset: Literal["cifar10", "cifar100", "folder"] = "cifar10"
    root: Optional[str] = None
    format: Literal["auto", "torchvision", "imagefolder"] = "auto"
    download: bool = False
    val_size: PositiveInt = 5000
    split_seed: int = 0
    train_subset: Optional[PositiveInt] = None
    test_subset: Optional[PositiveInt] = None
    cutout: NonNegativeInt = 0
    # -- data.image_size / data.augment (issue 14) --
    image_size: Optional[PositiveInt] = None
    augment: Literal["cifar", "imagenet"] = "cifar"

    @model_validator(mode="after")
    def _size_and_augment(self) -> "DataSpec":
        if self.dataset != "folder" and self.image_size not in (None, 32):
            raise ValueError(f"image_size {self.image_size} needs dataset folder; {self.dataset} images are 32 px (leave it unset or 32)")
        if self.augment == "imagenet" and self.dataset != "folder":
            raise ValueError(f"augment 'imagenet' needs dataset folder, not {self.dataset}; allowed for {self.dataset}: cifar")
        if self.augment == "imagenet" and self.image_size is None:
            raise ValueError("augment 'imagenet' needs image_size (e.g. 224)")
        return self
    # -- end data.image_size / data.augment --


# ---------------------------------------------------------------------------------------- model
class ModelSpec(_Spec):
    """The plain conv-BN model (DESIGN.md models contract).

    ``width`` multiplies every conv width. Any other key is a keyword argument of the model's
    constructor that changes the architecture (e.g. a stem stride), checked against the
    constructor's signature and annotations; ``num_classes`` comes from the dataset. Every
    constructor argument is stored in ``deployed.pt`` (:func:`repsearch.models.model_kwargs`).
    ``init_from``: start from a finished run's weights — a repsearch ``deployed.pt`` path or an
    MLflow run id (RepAn's official code starts from a pre-trained checkpoint); the stored model
    must be this very architecture (name and every constructor argument).
    """

    model_config = ConfigDict(extra="allow", validate_default=True)

    name: str = "vgg16"
    width: PositiveFloat = 1.0
    # -- model.init_from (RepAn issue) --
    init_from: Optional[str] = None

    @field_validator("init_from")
    @classmethod
    def _init_from_exists(cls, v: Optional[str]) -> Optional[str]:
        from repsearch.deployed import check_deployed_ref

        return v if v is None else check_deployed_ref(v)
    # -- end model.init_from --

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from repsearch.models import model_names

        names = model_names()
        if v not in names:
            raise ValueError(f"'{v}' is not one of {', '.join(names)}")
        return v

    @model_validator(mode="after")
    def _constructor_options(self) -> "ModelSpec":
        from repsearch.models import check_model_options

        extra = dict(self.model_extra or {})
        if extra:
            for key, value in check_model_options(self.name, extra).items():
                setattr(self, key, value)
        return self

    @property
    def options(self) -> dict[str, Any]:
        """The constructor options beyond ``name`` and ``width`` (validated values)."""
        return dict(self.model_extra or {})

    def non_default_options(self) -> dict[str, Any]:
        """The options whose value differs from the constructor's default (what the study hash sees)."""
        import inspect

        from repsearch.models import MODELS

        params = inspect.signature(MODELS[self.name]).parameters
        return {k: v for k, v in self.options.items() if k not in params or params[k].default != v}


# --------------------------------------------------------------------------------------- method
#: ``method.name`` -> recipe section class, from the methods' registry (``repsearch/methods/``).
METHOD_SPECS: dict[str, type[MethodSpecModel]] = method_specs()
METHOD_NAMES = tuple(METHOD_SPECS)
MethodSpec = Annotated[Union[tuple(METHOD_SPECS.values())], Field(discriminator="name")]  # type: ignore[misc]


# ---------------------------------------------------------------------------------------- train
class TrainSpec(_Spec):
    """Optimizer, LR schedule, precision (DyRep §5.1; the method interface v2).

    Units: ``epochs``/``warmup_epochs`` in epochs (the LR warm-up is linear over warmup_epochs ×
    steps per epoch optimizer steps), ``batch_size`` in images. ``optimizer``: ``sgd`` (``momentum``,
    ``nesterov``) or ``adamw`` (``betas``, ``eps``). ``grad_clip``: the maximum global L2 norm of the
    gradients (null = off; clipped after the method's ``after_backward``, before the step).
    ``wd_on_norm``: weight decay on BN and bias parameters too (true in DyRep's CIFAR recipe).

    Precision (DESIGN.md conventions: record it, every arm of an ablation alike): ``amp`` = bf16
    autocast on CUDA; ``tf32`` = TF32 convolutions and matmuls on CUDA (default false: exact fp32,
    as the papers' V100 runs); a method that scores fp32 gradients (``fp32_gradients``) turns both
    off for those epochs whatever these fields say. ``channels_last`` applies on CUDA only.

    ``distributed``: ``ddp`` = when started by torchrun or srun (2+ processes), the trial trains
    on all of them with DDP (:mod:`repsearch.distributed`); ``batch_size`` and ``eval_batch_size``
    are then the global batches, split evenly over the ranks. Out of the study hash.

    ``compile`` (a speed option, out of the study hash): ``off`` (eager) or a ``torch.compile`` mode
    (``default``, ``reduce-overhead`` = CUDA graphs on CUDA, ``max-autotune``) for the training
    forward only, rebuilt after every structure change; evaluation stays eager
    (:mod:`repsearch.compile`; measures ``compile_count``, ``compile_s``, ``compile_recompiles``).
    """

    epochs: PositiveInt = 600
    batch_size: PositiveInt = 128
    eval_batch_size: PositiveInt = 1000
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 0.1
    momentum: NonNegativeFloat = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: PositiveFloat = 1.0e-8
    weight_decay: NonNegativeFloat = 1.0e-4
    wd_on_norm: bool = True
    min_lr: NonNegativeFloat = 1.0e-6
    warmup_epochs: NonNegativeInt = 0
    grad_clip: Optional[PositiveFloat] = None
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    amp: bool = True
    tf32: bool = False
    channels_last: bool = True
    deterministic: bool = False
    checkpoint_every: Optional[NonNegativeInt] = None
    distributed: Literal["none", "ddp"] = "none"
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"

    @model_validator(mode="after")
    def _check(self) -> "TrainSpec":
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr:g}) must not exceed lr ({self.lr:g}): the cosine schedule decays from lr to min_lr")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas {list(self.betas)} must each lie in [0, 1)")
        return self


# ---------------------------------------------------------------------------------------- sweep
class Choices(_Spec):
    """A categorical distribution: ``{choices: [...]}``."""

    choices: list[Any] = Field(min_length=1)


class Range(_Spec):
    """A continuous (or integer, ``int: true``) range ``{low, high, log, step}`` for TPE/random/CMA-ES/NSGA-II."""

    low: float
    high: float
    log: bool = False
    step: Optional[PositiveFloat] = None
    int: bool = False

    @model_validator(mode="after")
    def _check(self) -> "Range":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be smaller than high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


def _distribution_kind(v: Any) -> Optional[str]:
    if isinstance(v, Choices):
        return "choices"
    if isinstance(v, Range):
        return "range"
    if isinstance(v, dict):
        if "choices" in v:
            return "choices"
        if "low" in v or "high" in v:
            return "range"
    return None


Distribution = Annotated[
    Union[Annotated[Choices, Tag("choices")], Annotated[Range, Tag("range")]],
    Discriminator(
        _distribution_kind,
        custom_error_type="distribution",
        custom_error_message="expected {choices: [...]} or {low: ..., high: ..., log: false, step: null, int: false}",
    ),
]


class Objective(_Spec):
    """A final-epoch metric to optimise (selection uses the validation split only)."""

    metric: str = "val/top1"
    direction: Literal["maximize", "minimize"] = "maximize"

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v.startswith("test/"):
            raise ValueError(f"'{v}': test accuracy is reported, never optimised; use a val/ metric")
        names = objective_metrics()
        if v not in names:
            raise ValueError(f"'{v}' is not one of {', '.join(names)}")
        return v


class SweepSpec(_Spec):
    """The sweep contract (DESIGN.md): a grid or a sampler over dotted recipe paths, plus fixed
    ``baselines``, each configuration run once per seed in ``seeds``."""

    params: dict[str, Distribution] = Field(default_factory=dict)
    baselines: list[dict[str, Any]] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    sampler: Literal["grid", "tpe", "random", "cmaes", "nsga2"] = "grid"
    workers: PositiveInt = 1
    n_trials: Optional[PositiveInt] = None
    objective: Union[Objective, list[Objective]] = Field(default_factory=Objective)
    pruner: Literal["none", "median", "hyperband"] = "none"

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @property
    def objectives(self) -> list[Objective]:
        """The objectives as a list (one element for a single-objective sweep)."""
        return self.objective if isinstance(self.objective, list) else [self.objective]


# ------------------------------------------------------------------------------------- tracking
class TrackingSpec(_Spec):
    """Stores (DESIGN.md stores contract); CLI flags and environment take precedence."""

    runs_dir: Optional[str] = None
    tracking_uri: Optional[str] = None
    storage: Optional[str] = None
    experiment: Optional[str] = None


# ------------------------------------------------------------------------------------ quantize
class QuantizeSpec(_Spec):
    """INT8 post-training quantization of the deployed model at the end of a trial
    (:mod:`repsearch.quantize`; RepOptimizers §4.4, Tables 8 and 10).

    ``mode``: ``none`` (default) or ``ptq``: torchao PT2E with ``X86InductorQuantizer`` (static, BN
    folded, per-channel int8 weights), calibrated on ``calib_batches`` non-augmented training
    batches (of ``train.batch_size`` images), evaluated on val and test (``int8/val_top1``,
    ``int8/test_top1``). PTQ runs on CPU: the trial moves a copy of the deployed model there, so the
    deployed model must run on CPU (and be capturable by ``torch.export``). The kernel std
    (``int8/kernel_std_*``) is recorded for every trial, whatever the mode.
    """

    mode: Literal["none", "ptq"] = "none"
    calib_batches: PositiveInt = 32


# --------------------------------------------------------------------------------------- recipe
class Recipe(_Spec):
    """A whole experiment: one training configuration, optionally swept (``sweep``)."""

    description: str = ""
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    method: MethodSpec = Field(default_factory=METHOD_SPECS["origin"])
    train: TrainSpec = Field(default_factory=TrainSpec)
    quantize: QuantizeSpec = Field(default_factory=QuantizeSpec)
    sweep: Optional[SweepSpec] = None
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    seed: int = 0

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        check = getattr(self.method, "check_recipe", None)
        if check is not None:
            check(self)  # a method's checks that need other sections (ValueError, one line)
        return self


# ------------------------------------------------------------------------------- dotted helpers
_MISSING = object()


def get_dotted(d: dict, path: str, default: Any = _MISSING) -> Any:
    """Value at dotted ``path`` of a nested dict; ``default`` (or KeyError) when absent."""
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            if default is _MISSING:
                raise KeyError(path)
            return default
        cur = cur[part]
    return cur


def set_dotted(d: dict, path: str, value: Any) -> None:
    """Set dotted ``path`` in a nested dict, creating intermediate dicts.

    Raises:
        RecipeError: when a prefix of the path holds a non-mapping value.
    """
    parts = path.split(".")
    if not all(parts):
        raise RecipeError(f"'{path}' is not a dotted field path")
    cur = d
    for i, part in enumerate(parts[:-1]):
        nxt = cur.get(part)
        if nxt is None:
            nxt = cur[part] = {}
        elif not isinstance(nxt, dict):
            raise RecipeError(f"{'.'.join(parts[: i + 1])}: is a value ({nxt!r}), cannot set '{path}' inside it")
        cur = nxt
    cur[parts[-1]] = value


def apply_overrides(d: dict, overrides: dict[str, Any]) -> dict:
    """Return a copy of recipe dict ``d`` with dotted ``overrides`` applied in order.

    A ``method.name`` that switches to another method starts from THAT method's defaults plus the
    overrides' own ``method.*`` fields (DESIGN.md: fields the other method lacks are dropped).
    """
    out = copy.deepcopy(d)
    new_name = overrides.get("method.name")
    switched = new_name is not None and new_name != (out.get("method") or {}).get("name", "origin")
    if switched:
        out["method"] = {"name": new_name}
    for key, value in overrides.items():
        set_dotted(out, key, copy.deepcopy(value))
    target = METHOD_SPECS.get(new_name) if switched else None
    if target is not None and isinstance(out.get("method"), dict):
        # a grid over method.name x method.scoring gives e.g. origin + scoring: the other methods'
        # fields are dropped for the target method; unknown keys (typos) are still rejected
        foreign = {f for spec in METHOD_SPECS.values() for f in spec.model_fields} - set(target.model_fields)
        out["method"] = {k: v for k, v in out["method"].items() if k not in foreign}
    return out


def parse_set(item: str) -> tuple[str, Any]:
    """Parse one ``--set a.b=c``; the value is read as a YAML scalar or flow collection.

    Raises:
        RecipeError: no ``=``, an empty key, or a value that is not valid YAML.
    """
    if "=" not in item:
        raise RecipeError(f"--set '{item}': expected KEY=VALUE with a dotted KEY, e.g. --set train.lr=0.05")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or not all(key.split(".")):
        raise RecipeError(f"--set '{item}': '{key}' is not a dotted field path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        line = str(exc).splitlines()[0]
        raise RecipeError(f"--set '{item}': value is not valid YAML ({line})") from None
    return key, value


# ---------------------------------------------------------------------------- error formatting
def _unwrap(annotation: Any) -> list[type]:
    """The BaseModel classes inside an annotation (Optional, Union, Annotated, list, dict values)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _unwrap(get_args(annotation)[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type] = []
    for arg in get_args(annotation):
        out.extend(_unwrap(arg))
    return out


def _walk_loc(loc: tuple) -> tuple[list[str], Optional[type]]:
    """Turn a pydantic ``loc`` into the user's dotted path and the model class at the end.

    Strips discriminated-union tags (``method.dyrep.scoring`` -> ``method.scoring``) and pydantic's
    union member names (``sweep.params.x.Choices.choices`` -> ``sweep.params.x.choices``).
    """
    path: list[str] = []
    cls: Optional[type] = Recipe
    i = 0
    while i < len(loc):
        part = loc[i]
        if cls is not None and isinstance(part, str) and part in cls.model_fields:
            path.append(part)
            ann = cls.model_fields[part].annotation
            models = _unwrap(ann)
            if get_origin(ann) is dict or (get_origin(ann) is Union and dict in [get_origin(a) for a in get_args(ann)]):
                # dict-valued field (sweep.params, profiles): next loc part is a user key
                if i + 1 < len(loc):
                    path.append(str(loc[i + 1]))
                    i += 1
            if len(models) == 1:
                cls = models[0]
            elif len(models) > 1 and i + 1 < len(loc):
                tag = loc[i + 1]
                chosen = None
                for m in models:
                    name_field = m.model_fields.get("name")
                    if name_field is not None and name_field.default == tag:
                        chosen = m
                    elif isinstance(tag, str) and m.__name__.lower() == tag.lower():
                        chosen = m
                if chosen is not None:
                    cls = chosen
                    i += 1
                else:
                    cls = None
            else:
                cls = None
        elif isinstance(part, int):
            path[-1:] = [f"{path[-1]}[{part}]"] if path else [f"[{part}]"]
        elif isinstance(part, str) and part in ("Choices", "Range", "Objective", "list[Objective]"):
            pass
        else:
            path.append(str(part))
            cls = None
        i += 1
    return path, cls


def _format_error(err: dict) -> str:
    path, cls = _walk_loc(tuple(err["loc"]))
    etype = err["type"]
    value = err.get("input")
    ctx = err.get("ctx") or {}
    where = ".".join(path) if path else "(top level)"
    if etype == "extra_forbidden":
        parent_path, parent_cls = _walk_loc(tuple(err["loc"][:-1]))
        allowed = ", ".join(parent_cls.model_fields) if parent_cls is not None else "?"
        return f"{where}: unknown key '{path[-1]}'; allowed keys: {allowed}"
    if etype == "literal_error":
        expected = ctx.get("expected", "")
        expected = expected.replace("'", "").replace(" or ", ", ")
        return f"{where}: {value!r} is not one of {expected}"
    if etype == "union_tag_invalid":
        tag = ctx.get("tag")
        expected = ctx.get("expected_tags", "").replace("'", "")
        return f"{where}.name: {tag!r} is not one of {expected}"
    if etype == "union_tag_not_found":
        return f"{where}: missing 'name'; one of {', '.join(METHOD_NAMES)}"
    if etype == "distribution":
        return f"{where}: {err['msg']}"
    if etype == "value_error":
        msg = str(ctx.get("error", err.get("msg", "")))
        return f"{where}: {msg}"
    if etype == "missing":
        return f"{where}: required field is missing"
    msg = err.get("msg", etype)
    if isinstance(value, (dict, list)):
        shown = type(value).__name__
    else:
        shown = repr(value)
    return f"{where}: {shown} is not allowed: {msg[0].lower() + msg[1:] if msg else msg}"


def format_validation_error(exc: ValidationError, source: str, prefix: str = "") -> str:
    """One line for the first error of ``exc``: ``<source>: <dotted path>: <what> <allowed>``."""
    errors = exc.errors(include_url=False)
    # Prefer a tag error over the noise of the other union members.
    err = errors[0]
    line = _format_error(err)
    if prefix:
        line = f"{prefix}{line}" if line.startswith("(top level)") is False else prefix.rstrip(": .") + line[11:]
    extra = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {line}{extra}"


# ------------------------------------------------------------------------------------- loading
def read_recipe_file(path: str | Path) -> dict:
    """Read a recipe YAML file with ``yaml.safe_load``.

    Raises:
        RecipeError: missing file, unreadable file, invalid YAML, or a top level that is not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}: invalid YAML{where}: {problem}") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read: {exc.strerror}") from None
    if data is None or data == {}:
        raise RecipeError(f"{path}: the recipe is empty; a recipe is a mapping of sections (data, model, method, train, sweep, ...)")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (data, model, method, train, sweep, ...)")
    return data


def resolve_dict(raw: dict, source: str, profile: Optional[str] = None, sets: tuple[str, ...] = ()) -> dict:
    """Apply ``profiles[profile]`` and then ``--set`` items to a raw recipe dict; drops ``profiles``.

    Raises:
        RecipeError: unknown profile, a profile that is not a mapping of dotted paths, bad ``--set``.
    """
    d = copy.deepcopy(raw)
    profiles = d.pop("profiles", None) or {}
    if not isinstance(profiles, dict):
        raise RecipeError(f"{source}: profiles: must be a mapping of profile name -> dotted overrides")
    if profile is not None:
        if profile not in profiles:
            avail = ", ".join(sorted(profiles)) or "none defined"
            raise RecipeError(f"{source}: unknown profile '{profile}'; available: {avail}")
        overrides = profiles[profile]
        if not isinstance(overrides, dict):
            raise RecipeError(f"{source}: profiles.{profile}: must be a mapping of dotted path -> value")
        try:
            d = apply_overrides(d, overrides)
        except RecipeError as exc:
            raise RecipeError(f"{source}: profiles.{profile}: {exc}") from None
    for item in sets:
        key, value = parse_set(item)
        try:
            d = apply_overrides(d, {key: value})
        except RecipeError as exc:
            raise RecipeError(f"{source}: --set: {exc}") from None
    return d


def validate_dict(d: dict, source: str) -> Recipe:
    """Validate a resolved recipe dict into a :class:`Recipe`, then validate every sweep point.

    Raises:
        RecipeError: the first validation error, as one line (file, dotted path, allowed values).
    """
    try:
        recipe = Recipe.model_validate(d)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from None
    if recipe.sweep is not None:
        _validate_sweep(recipe, d, source)
    return recipe


def _validate_sweep(recipe: Recipe, d: dict, source: str) -> None:
    sweep = recipe.sweep
    assert sweep is not None
    if sweep.sampler == "grid":
        for key, dist in sweep.params.items():
            if isinstance(dist, Range):
                raise RecipeError(
                    f"{source}: sweep.params.{key}: a grid needs {{choices: [...]}}, got a range "
                    f"{{low: {dist.low:g}, high: {dist.high:g}}}; use sampler tpe, random, cmaes or nsga2"
                )
    elif sweep.n_trials is None:
        raise RecipeError(f"{source}: sweep.n_trials: required with sampler '{sweep.sampler}' (only grid enumerates its points)")
    if sweep.sampler == "cmaes" and any(isinstance(v, Choices) for v in sweep.params.values()):
        pass  # Optuna's CMA-ES falls back to independent sampling for categorical params.
    if len(sweep.objectives) > 1 and sweep.pruner != "none":
        raise RecipeError(
            f"{source}: sweep.pruner: '{sweep.pruner}' needs a single objective; this sweep has "
            f"{len(sweep.objectives)} (use pruner: none)"
        )
    if len(sweep.objectives) > 1 and sweep.sampler in ("cmaes",):
        raise RecipeError(f"{source}: sweep.sampler: 'cmaes' is single-objective; use nsga2, tpe or random")
    for key in sweep.params:
        if key.startswith("sweep") or key == "profiles" or key.startswith("tracking"):
            raise RecipeError(f"{source}: sweep.params.{key}: cannot sweep over '{key.split('.')[0]}'")
    base = {k: v for k, v in d.items() if k != "sweep"}
    # the pruner stays visible to a point's method checks (RepAn rejects pruners)
    base["sweep"] = {"pruner": sweep.pruner}
    # every choice and every baseline must give a valid recipe
    for key, dist in sweep.params.items():
        values = dist.choices if isinstance(dist, Choices) else [dist.low, dist.high]
        for value in values:
            _validate_point(base, {key: value}, source, f"sweep.params.{key}")
    if sweep.sampler == "grid" and sweep.params:
        keys = list(sweep.params)
        n_points = 1
        for k in keys:
            n_points *= len(sweep.params[k].choices)
        if n_points > 100_000:
            raise RecipeError(f"{source}: sweep.params: the grid has {n_points:,} points; at most 100,000")
        for values in itertools.product(*(sweep.params[k].choices for k in keys)):
            point = dict(zip(keys, values))
            _validate_point(base, point, source, "sweep.params (point " + ", ".join(f"{k}={v}" for k, v in point.items()) + ")")
    for i, baseline in enumerate(sweep.baselines):
        for key in baseline:
            if not all(str(key).split(".")):
                raise RecipeError(f"{source}: sweep.baselines[{i}]: '{key}' is not a dotted field path")
        _validate_point(base, baseline, source, f"sweep.baselines[{i}]")


def _validate_point(base: dict, overrides: dict, source: str, where: str) -> None:
    try:
        Recipe.model_validate(apply_overrides(base, overrides))
    except RecipeError as exc:
        raise RecipeError(f"{source}: {where}: {exc}") from None
    except ValidationError as exc:
        detail = format_validation_error(exc, source)[len(source) + 2 :]
        key = where.split(".", 2)[-1] if where.startswith("sweep.params.") else None
        if key is not None and detail.startswith(key + ": "):
            detail = detail[len(key) + 2 :]
        raise RecipeError(f"{source}: {where}: {detail}") from None


def load_recipe(path: str | Path, profile: Optional[str] = None, sets: tuple[str, ...] = ()) -> tuple[Recipe, dict]:
    """Load, resolve (profile, ``--set``) and validate a recipe file.

    Returns:
        ``(recipe, resolved)``: the validated :class:`Recipe` and the resolved dict (no ``profiles``)
        as the user wrote it after overrides — what ``recipe.yaml`` artifacts store.

    Raises:
        RecipeError: any user mistake, as one line naming the file and the dotted field path.
    """
    source = str(path)
    raw = read_recipe_file(path)
    resolved = resolve_dict(raw, source, profile, tuple(sets))
    return validate_dict(resolved, source), resolved


def trial_recipe(recipe: Recipe, overrides: dict[str, Any], seed: int) -> Recipe:
    """The recipe of one sweep trial: ``overrides`` (a point or a baseline) applied, ``seed`` set,
    no ``sweep`` section (DESIGN.md sweeps contract)."""
    base = recipe.model_dump(mode="json", exclude={"sweep", "profiles"})
    d = apply_overrides(base, dict(overrides))
    d["seed"] = seed
    try:
        return Recipe.model_validate(d)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, f"sweep point {overrides}")) from None


_HASH_EXCLUDE = (
    "sweep.n_trials", "sweep.seeds", "sweep.workers", "tracking", "data.root", "profiles", "description",
    "train.checkpoint_every", "train.distributed", "train.compile",
)


def _field_default(info) -> Any:
    from pydantic_core import PydanticUndefined

    if info.default_factory is not None:
        return info.default_factory()
    return None if info.default is PydanticUndefined else info.default


def _non_defaults(value: Any) -> Any:
    """JSON-able dump of ``value`` without fields equal to their defaults, at every depth.

    A pydantic model keeps its ``name`` (the discriminator of the method union: two methods with
    default fields must not hash alike) and every field whose value differs from its default, itself
    reduced the same way, except the fields a method declares irrelevant in its configuration
    (``MethodSpecModel.hash_ignored``, e.g. DyRep's ``voters`` unless it scores by vote); model
    constructor options are kept unless equal to the constructor's default. Lists and dicts are
    reduced element by element.

    The price of this rule: changing a default in a later release keeps the old study names although
    results may change; such a release must say so (and may rename studies on purpose).
    """
    if isinstance(value, BaseModel):
        out: dict[str, Any] = {}
        ignored = value.hash_ignored() if isinstance(value, MethodSpecModel) else set()
        for key, info in type(value).model_fields.items():
            v = getattr(value, key)
            if key in ignored or (key != "name" and v == _field_default(info)):
                continue
            out[key] = _non_defaults(v)
        extra = value.non_default_options() if isinstance(value, ModelSpec) else (value.model_extra or {})
        for key, v in extra.items():
            out[key] = _non_defaults(v)
        return out
    if isinstance(value, dict):
        return {str(k): _non_defaults(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_non_defaults(v) for v in value]
    return value


def hashed_recipe(recipe: Recipe) -> dict:
    """What the study hash covers: the resolved recipe without the fields equal to their defaults
    (so a release that adds a field with a default renames no study) and without what does not
    change results (:data:`_HASH_EXCLUDE`: n_trials, seeds, workers, tracking, data.root, profiles,
    description, train.checkpoint_every, train.distributed (``batch_size`` is the global batch on any
    number of ranks), train.compile). DESIGN.md "Sweeps — contract"."""
    d = _non_defaults(recipe)
    for path in _HASH_EXCLUDE:
        parts = path.split(".")
        cur = d
        for p in parts[:-1]:
            cur = cur.get(p) if isinstance(cur, dict) else None
        if isinstance(cur, dict):
            cur.pop(parts[-1], None)
    return {k: v for k, v in d.items() if v != {}}


def recipe_hash(recipe: Recipe) -> str:
    """SHA-256 (hex) of :func:`hashed_recipe` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(hashed_recipe(recipe), sort_keys=True, default=str).encode()).hexdigest()


def study_name(recipe_path: str | Path, profile: Optional[str], recipe: Recipe) -> str:
    """``<recipe stem>[.<profile>]-<8 hex of recipe_hash>`` (DESIGN.md sweeps contract)."""
    stem = Path(recipe_path).stem
    mid = f"{stem}.{profile}" if profile else stem
    return f"{mid}-{recipe_hash(recipe)[:8]}"


def recipe_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (the ``recipe.yaml`` artifact; loads back with :func:`load_recipe`)."""
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude={"profiles"}), sort_keys=False)
