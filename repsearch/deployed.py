"""The deployed-model artifact ``deployed.pt`` (DESIGN.md "Models — contract"): ``{"model": name,
"kwargs": every constructor argument, "state_dict": ...}``, written by every trial; and fetching a
run's artifacts from MLflow by run id.

Used by ``model.init_from`` (start from a finished run's weights), RepAn's distillation teacher
(``method.kd.teacher``), study dependencies (:mod:`repsearch.dependencies`) and
``repsearch quantize``.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from repsearch.errors import UserError

#: An MLflow run id: 32 lowercase hex digits.
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def fetch_run_artifact(run_id: str, artifact: str, recipe: Any, stores: Any = None, dst_dir: Optional[Path] = None) -> Path:
    """Download ``artifact`` (a file name such as ``scales.pt`` or ``deployed.pt``) of MLflow run
    ``run_id``, by default into ``<runs>/deps/<run_id>/`` (kept: a second call reuses the file).

    Args:
        recipe: the recipe that needs it (its ``tracking`` section locates the stores when ``stores``
            is None: ``MLFLOW_TRACKING_URI`` > ``tracking:`` > ``mlflow.yaml`` > ``./runs``; a sweep's
            stores are not passed to its trials, so a run kept under another ``--runs-dir`` must be
            given by path).
        stores: a :class:`repsearch.tracking.Stores` (default: resolved from the recipe).
        dst_dir: where to put it (default ``<runs>/deps/<run_id>``).

    Raises:
        repsearch.tracking.TrackingError: no such run or artifact (one line).
    """
    from repsearch.tracking import download_run_artifact, resolve_stores

    if stores is None:
        stores = resolve_stores(recipe, "dependency", create=False)
    dst = Path(dst_dir) if dst_dir is not None else Path(stores.runs_dir) / "deps" / run_id
    local = dst / artifact
    if dst_dir is None and local.is_file():
        return local
    if dst_dir is None and not Path(stores.runs_dir).is_dir():
        from repsearch.tracking import TrackingError

        raise TrackingError(f"no runs folder {stores.runs_dir} to look up run {run_id} in (pass --runs-dir)")
    return download_run_artifact(stores.tracking_uri, run_id, artifact, dst)


def resolve_deployed(ref: str, recipe: Any, dst_dir: Path) -> Path:
    """The local path of a ``deployed.pt`` given as a file path or an MLflow run id.

    A run id (32 hex digits, not an existing file) is looked up with
    :meth:`repsearch.tracking.Tracker.download_artifact` in the tracking store that
    :func:`repsearch.tracking.resolve_stores` finds for ``recipe`` without CLI flags
    (``MLFLOW_TRACKING_URI`` > the recipe's ``tracking:`` > ``mlflow.yaml`` > ``./runs``): the stores
    of a sweep are not passed to its trials, so a run kept under another ``--runs-dir`` must be
    given by its ``deployed.pt`` path.

    Raises:
        UserError: neither an existing file nor a run id; the run or its artifact is missing.
    """
    p = Path(ref).expanduser()
    if p.is_file():
        return p
    if not RUN_ID.match(ref):
        raise UserError(f"{ref!r} is neither an existing deployed.pt file nor an MLflow run id (32 hex digits)")
    return fetch_run_artifact(ref, "deployed.pt", recipe, dst_dir=dst_dir)


def load_deployed(path: Path, device: str | torch.device = "cpu", num_classes: Optional[int] = None) -> tuple[nn.Module, dict]:
    """Build the plain model stored in a repsearch ``deployed.pt`` (``{"model", "kwargs",
    "state_dict"}``, ``weights_only=True``) and load its weights strictly.

    Args:
        path: the file.
        device: where the model goes.
        num_classes: when given, the model must output this many logits.

    Returns:
        ``(model, checkpoint)``; the model in eval mode.

    Raises:
        UserError: unreadable file, not a repsearch deployed model, unknown model name, another
            number of classes, or weights that do not load strictly (one line each).
    """
    from repsearch.models import MODELS, build_model

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # pickle / zip errors of many types
        raise UserError(f"{path}: cannot read as a repsearch deployed.pt ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "kwargs", "state_dict"} <= set(ckpt):
        raise UserError(f"{path}: not a repsearch deployed.pt (needs the keys model, kwargs, state_dict)")
    name, kwargs = ckpt["model"], dict(ckpt["kwargs"])
    if name not in MODELS:
        raise UserError(f"{path}: model {name!r} is not one of {', '.join(sorted(MODELS))}")
    if num_classes is not None and kwargs.get("num_classes") != num_classes:
        raise UserError(f"{path}: {name} has {kwargs.get('num_classes')} classes; this dataset has {num_classes}")
    model = build_model(name, **kwargs)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not fit {name}: {' '.join(str(exc).split())[:300]}") from None
    return model.to(device).eval(), ckpt


def check_deployed_ref(ref: str) -> str:
    """Recipe-time check of a ``deployed.pt`` reference (``method.kd.teacher``, ``model.init_from``):
    an existing file or an MLflow run id (32 hex digits; looked up when the trial starts, since the
    stores are not known at validation). Returns ``ref``.

    Raises:
        ValueError: neither an existing file nor a run id.
    """
    if Path(ref).expanduser().is_file() or RUN_ID.match(ref):
        return ref
    raise ValueError(f"no such file {ref!r} (give a deployed.pt path or an MLflow run id)")


def load_init_from(model: nn.Module, ref: str, recipe: Any, name: str, kwargs: dict) -> None:
    """``model.init_from``: load the weights of a finished run's ``deployed.pt`` into ``model`` (the
    plain model just built), strictly.

    Args:
        model: the freshly built plain model, modified in place.
        ref: a ``deployed.pt`` path or an MLflow run id (:func:`resolve_deployed`).
        recipe: the trial's recipe (for the stores of a run id).
        name, kwargs: the model name and every constructor argument of ``model``.

    Raises:
        UserError: a missing run or file, or a stored model of another architecture (name or
            constructor arguments differ; the message names the first difference).
    """
    with tempfile.TemporaryDirectory(prefix="repsearch-init-") as tmp:
        path = resolve_deployed(ref, recipe, Path(tmp))
        stored, ckpt = load_deployed(path, "cpu")
    if ckpt["model"] != name:
        raise UserError(f"model.init_from: {ref} holds a {ckpt['model']}, not a {name}")
    diff = [k for k in sorted(set(kwargs) | set(ckpt["kwargs"])) if kwargs.get(k) != ckpt["kwargs"].get(k)]
    if diff:
        k = diff[0]
        raise UserError(f"model.init_from: {ref} has {k}={ckpt['kwargs'].get(k)!r}; this recipe builds {k}={kwargs.get(k)!r}")
    model.load_state_dict(stored.state_dict(), strict=True)
