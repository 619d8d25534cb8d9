"""Stores and MLflow tracking: where a study's runs go, and how each run is laid out.

DESIGN.md "Stores — contract". One runs folder (default ``./runs``) holds ``mlflow.db`` (MLflow
backend, ``sqlite:///<absolute path>``), ``optuna.db`` (the Optuna storage) and ``artifacts/`` (the
MLflow experiment's artifact location, set when the experiment is created so nothing lands in
``./mlruns``). Precedence for every store: CLI flag > environment (``MLFLOW_TRACKING_URI``,
``REPSEARCH_STORAGE``) > the recipe's ``tracking:`` section > ``mlflow.yaml`` > defaults.

Run layout: one parent run per study (tag ``study_name``; found again by that tag on resume, never a
second one) and one child run per trial (tag ``mlflow.parentRunId``), with the resolved trial
recipe as dotted params, per-epoch metrics (step = epoch, one ``log_batch`` per epoch), the final
measures, the trial's artifacts, and the status FINISHED / FAILED (tag ``error``, ``error.txt``) /
KILLED (a trial whose worker died, marked when the next run finds it). A pruned trial is a FINISHED
run with the tag ``pruned=true``.

``mlflow`` is imported lazily (only :class:`Tracker` needs it), so resolving stores or building the
UI command works without it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import yaml

from repsearch.errors import UserError

log = logging.getLogger(__name__)

#: Keys allowed in ``mlflow.yaml``.
MLFLOW_YAML_KEYS = ("runs_dir", "tracking_uri", "storage", "experiment", "ui")
#: Environment the MLflow server needs to start quickly (INSTALL.md: one worker, no job execution).
UI_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
#: Distributions whose versions every child run records as ``versions.<name>`` tags.
VERSION_PACKAGES = {"torch": "torch", "torchvision": "torchvision", "optuna": "optuna", "repsearch": "repsearch"}
#: Tag marking a study's parent run.
ROLE_TAG = "repsearch.role"

_MLFLOW_PARAM_MAX = 6000  # MLflow's limit on a param value (characters)
_MLFLOW_TAG_MAX = 8000  # MLflow's limit on a tag value (characters)
_BATCH_PARAMS = 100  # MLflow's limit on params per log_batch
_BATCH_METRICS = 1000


class TrackingError(UserError):
    """A store that cannot be used: a malformed ``mlflow.yaml``, a deleted MLflow experiment."""


@dataclass
class Stores:
    """The resolved stores of one study.

    Attributes:
        runs_dir: absolute runs folder (created).
        tracking_uri: MLflow tracking URI (default ``sqlite:///<runs_dir>/mlflow.db``).
        storage: Optuna storage: an RDB URL (``sqlite:///…``, ``postgresql://…``) or a journal file path.
        experiment: MLflow experiment name.
        artifact_location: the experiment's artifact location (``<runs_dir>/artifacts``), or None for
            a remote tracking server, which chooses its own.
    """

    runs_dir: Path
    tracking_uri: str
    storage: str
    experiment: str
    artifact_location: Optional[str] = None


def repo_root() -> Path:
    """The repository root (the folder holding the ``repsearch`` package)."""
    import repsearch

    return Path(repsearch.__file__).resolve().parents[1]


def find_mlflow_yaml(cwd: Optional[Path] = None) -> Optional[Path]:
    """``mlflow.yaml`` of the working directory if present, else the repository root's, else None."""
    for folder in (Path(cwd or Path.cwd()), repo_root()):
        p = folder / "mlflow.yaml"
        if p.is_file():
            return p
    return None


def read_mlflow_yaml(path: Optional[Path] = None) -> dict[str, Any]:
    """Read the tracking settings file (``mlflow.yaml``); ``{}`` when there is none.

    Raises:
        TrackingError: invalid YAML, a top level that is not a mapping, or an unknown key.
    """
    p = path if path is not None else find_mlflow_yaml()
    if p is None:
        return {}
    try:
        data = yaml.safe_load(Path(p).read_text())
    except yaml.YAMLError as exc:
        raise TrackingError(f"{p}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrackingError(f"{p}: expected a mapping with keys {', '.join(MLFLOW_YAML_KEYS)}")
    unknown = [k for k in data if k not in MLFLOW_YAML_KEYS]
    if unknown:
        raise TrackingError(f"{p}: unknown key '{unknown[0]}'; allowed keys: {', '.join(MLFLOW_YAML_KEYS)}")
    ui = data.get("ui")
    if ui is not None and not isinstance(ui, dict):
        raise TrackingError(f"{p}: ui: expected a mapping {{host: ..., port: ...}}")
    return data


def _first(*values: Optional[str]) -> Optional[str]:
    for v in values:
        if v is not None and str(v).strip() != "":
            return str(v)
    return None


def _is_local_tracking(uri: str) -> bool:
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    return scheme in ("sqlite", "postgresql", "postgres", "mysql", "mssql", "file", "")


def _normalise_storage(storage: str) -> str:
    if "://" in storage:
        return storage
    return str(Path(storage).expanduser().resolve())


def resolve_stores(
    recipe,
    recipe_path: str | Path,
    *,
    runs_dir: Optional[str | Path] = None,
    tracking_uri: Optional[str] = None,
    storage: Optional[str] = None,
    profile: Optional[str] = None,
    environ: Optional[Mapping[str, str]] = None,
    create: bool = True,
) -> Stores:
    """Resolve the stores of a recipe (DESIGN.md stores contract) and create the runs folder.

    Precedence: the keyword arguments (CLI flags) > environment (``MLFLOW_TRACKING_URI``,
    ``REPSEARCH_STORAGE``) > ``recipe.tracking`` > ``mlflow.yaml`` (working directory, else the
    repository root) > defaults (``./runs``, ``sqlite:///<abs runs>/mlflow.db``,
    ``sqlite:///<abs runs>/optuna.db``, experiment = recipe stem). Relative runs folders and journal
    paths resolve against the working directory. The experiment template may use ``{stem}`` and
    ``{profile}``.

    Args:
        recipe: the validated :class:`repsearch.spec.Recipe`.
        recipe_path: the recipe file (its stem names the experiment).
        environ: the environment to read (default ``os.environ``; tests pass a dict).
        create: create the runs folder (False for a lookup that must leave nothing behind).

    Raises:
        TrackingError: a malformed ``mlflow.yaml`` or experiment template.
    """
    env = os.environ if environ is None else environ
    cfg = read_mlflow_yaml()
    tr = recipe.tracking
    runs = Path(_first(None if runs_dir is None else str(runs_dir), tr.runs_dir, cfg.get("runs_dir")) or "runs")
    runs = runs.expanduser().resolve()
    if create:
        runs.mkdir(parents=True, exist_ok=True)
    uri = _first(tracking_uri, env.get("MLFLOW_TRACKING_URI"), tr.tracking_uri, cfg.get("tracking_uri"))
    uri = uri or f"sqlite:///{runs / 'mlflow.db'}"
    if ":" not in uri.split("/", 1)[0] and uri.endswith(".db"):  # a bare path to an SQLite file
        uri = f"sqlite:///{Path(uri).expanduser().resolve()}"
    sto = _first(storage, env.get("REPSEARCH_STORAGE"), tr.storage, cfg.get("storage"))
    sto = _normalise_storage(sto) if sto else f"sqlite:///{runs / 'optuna.db'}"
    template = _first(tr.experiment, cfg.get("experiment")) or "{stem}"
    stem = Path(recipe_path).stem
    try:
        experiment = template.format(stem=stem, profile=profile or "").strip()
    except (KeyError, IndexError, ValueError) as exc:
        raise TrackingError(f"experiment template {template!r}: {exc!r}; use {{stem}} and {{profile}}") from None
    if not experiment:
        raise TrackingError(f"experiment template {template!r} gives an empty name")
    artifacts = str(runs / "artifacts") if _is_local_tracking(uri) else None
    return Stores(runs_dir=runs, tracking_uri=uri, storage=sto, experiment=experiment, artifact_location=artifacts)


def ui_command(
    stores: Optional[Stores] = None,
    *,
    runs_dir: Optional[str | Path] = None,
    tracking_uri: Optional[str] = None,
    host: Optional[str] = None,
    port: Optional[int] = None,
) -> list[str]:
    """The command that serves the MLflow UI on the study's tracking store.

    ``mlflow ui --backend-store-uri <uri> [--default-artifact-root <runs>/artifacts] --host H --port P --workers 1``
    (host/port: arguments > ``mlflow.yaml`` ``ui:`` > 127.0.0.1:5000). Without ``stores`` the runs
    folder and tracking URI follow the same precedence as :func:`resolve_stores` (no recipe). Run it
    with :data:`UI_ENV` in the environment. Needs the full ``mlflow`` package (the ``ui`` extra).
    """
    cfg = read_mlflow_yaml()
    if stores is None:
        runs = Path(_first(None if runs_dir is None else str(runs_dir), cfg.get("runs_dir")) or "runs").expanduser().resolve()
        uri = _first(tracking_uri, os.environ.get("MLFLOW_TRACKING_URI"), cfg.get("tracking_uri"))
        uri = uri or f"sqlite:///{runs / 'mlflow.db'}"
        artifacts = str(runs / "artifacts") if _is_local_tracking(uri) else None
    else:
        uri, artifacts = stores.tracking_uri, stores.artifact_location
    ui = cfg.get("ui") or {}
    h = host or ui.get("host") or "127.0.0.1"
    p = int(port or ui.get("port") or 5000)
    cmd = ["mlflow", "ui", "--backend-store-uri", uri]
    if artifacts:
        cmd += ["--default-artifact-root", artifacts]
    # one server worker: starts in ~4 s instead of four (INSTALL.md)
    return cmd + ["--host", str(h), "--port", str(p), "--workers", "1"]


# ------------------------------------------------------------------------------- run metadata
def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested recipe dict to dotted names (``{"train": {"lr": 0.1}}`` -> ``{"train.lr": "0.1"}``).

    Strings stay as they are; other leaves (numbers, booleans, null, lists) are written as JSON.
    Values are cut to MLflow's limit of 6000 characters.
    """
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
            out[name] = text[:_MLFLOW_PARAM_MAX]
    return out


def git_info(root: Optional[Path] = None) -> dict[str, str]:
    """``{"git_commit": <HEAD sha or "unknown">, "git_dirty": "true"/"false"/"unknown"}`` of the repository."""
    root = root or repo_root()
    info = {"git_commit": "unknown", "git_dirty": "unknown"}
    if not (root / ".git").exists():
        return info
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if sha.returncode == 0 and sha.stdout.strip():
            info["git_commit"] = sha.stdout.strip()
        st = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if st.returncode == 0:
            info["git_dirty"] = "true" if st.stdout.strip() else "false"
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def package_versions() -> dict[str, str]:
    """``{"versions.<pkg>": version}`` for torch, torchvision, optuna, mlflow and repsearch (no imports)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    names = dict(VERSION_PACKAGES)
    for key, dist in names.items():
        try:
            out[f"versions.{key}"] = version(dist)
        except PackageNotFoundError:
            out[f"versions.{key}"] = "absent"
    for dist in ("mlflow", "mlflow-skinny"):
        try:
            out["versions.mlflow"] = version(dist) + ("" if dist == "mlflow" else " (skinny)")
            break
        except PackageNotFoundError:
            out["versions.mlflow"] = "absent"
    return out


def _now_ms() -> int:
    return int(time.time() * 1000)


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _creation_lock(tracking_uri: str):
    """A lock file next to an SQLite MLflow store (``<mlflow.db>.lock``), held while the store and the
    experiment are created or opened: two processes that both create a fresh database collide on
    ``alembic_version`` (INSTALL.md). Other stores need none (a server serialises creation)."""
    import contextlib

    if not tracking_uri.lower().startswith("sqlite:///"):
        return contextlib.nullcontext()
    db = tracking_uri.split("://", 1)[1][1:].split("?", 1)[0]
    if not db or db == ":memory:":
        return contextlib.nullcontext()
    from filelock import FileLock

    path = Path(db).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=600)


# ------------------------------------------------------------------------------------ tracker
class Tracker:
    """MLflow client bound to one experiment: parent run per study, child run per trial.

    Every call uses explicit run ids through ``MlflowClient`` (no active-run state). The experiment
    is created once (by the parent process) with ``artifact_location = stores.artifact_location``.

    Raises:
        TrackingError: the experiment exists but is deleted.
    """

    def __init__(self, stores: Stores):
        from mlflow.tracking import MlflowClient

        self.stores = stores
        with _creation_lock(stores.tracking_uri):  # two processes creating one fresh mlflow.db collide
            self.client = MlflowClient(tracking_uri=stores.tracking_uri)
            self.experiment_id = self._ensure_experiment(stores.experiment, stores.artifact_location)
        self._static_tags: Optional[dict[str, str]] = None

    # -- experiment ----------------------------------------------------------------------------
    def _ensure_experiment(self, name: str, artifact_location: Optional[str]) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            if artifact_location:
                Path(artifact_location).mkdir(parents=True, exist_ok=True)
            try:
                return self.client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException:
                exp = self.client.get_experiment_by_name(name)  # created meanwhile by another process
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment '{name}' is deleted in {self.stores.tracking_uri}; restore it "
                "(mlflow experiments restore) or choose another name (tracking.experiment)"
            )
        if artifact_location and exp.artifact_location.rstrip("/") not in (
            artifact_location.rstrip("/"),
            Path(artifact_location).as_uri(),
        ):
            log.warning(
                "MLflow experiment %s keeps its artifact location %s (not %s)", name, exp.artifact_location, artifact_location
            )
        return exp.experiment_id

    def static_tags(self) -> dict[str, str]:
        """Tags every child run carries: git commit (and dirty flag) and package versions."""
        if self._static_tags is None:
            tags = git_info()
            tags["mlflow.source.git.commit"] = tags["git_commit"]
            tags.update(package_versions())
            self._static_tags = tags
        return dict(self._static_tags)

    # -- parent run ------------------------------------------------------------------------------
    def find_parent(self, study_name: str) -> Optional[str]:
        """The run id of the study's parent run (tag ``study_name``), or None."""
        from mlflow.entities import ViewType

        safe = "'" not in study_name and "\\" not in study_name
        filt = f"tags.`{ROLE_TAG}` = 'study'" + (f" and tags.study_name = '{study_name}'" if safe else "")
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=filt, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
            order_by=["attributes.start_time ASC"],
        )
        for run in runs:
            if run.data.tags.get("study_name") == study_name:
                return run.info.run_id
        return None

    def parent_run(self, study_name: str, *, tags: Optional[dict[str, str]] = None, recipe_text: Optional[str] = None) -> str:
        """Re-attach to the study's parent run (status set back to RUNNING) or create it.

        A new parent run gets ``tags`` and the resolved recipe as the artifact ``recipe.yaml``.
        Returns the run id.
        """
        run_id = self.find_parent(study_name)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        all_tags = {ROLE_TAG: "study", "study_name": study_name}
        all_tags.update(self.static_tags())
        all_tags.update(tags or {})
        run = self.client.create_run(self.experiment_id, run_name=study_name, tags=all_tags)
        if recipe_text is not None:
            self.client.log_text(run.info.run_id, recipe_text, "recipe.yaml")
        return run.info.run_id

    def finish_parent(self, run_id: str, status: str = "FINISHED", tags: Optional[dict[str, Any]] = None) -> None:
        """Set summary tags on the parent run and terminate it with ``status``."""
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.client.set_terminated(run_id, status)

    # -- child runs ------------------------------------------------------------------------------
    def running_trial_runs(self, study_name: str) -> list[tuple[str, int]]:
        """(run id, Optuna trial number) of the study's child runs that are still RUNNING: runs with
        the tags ``study_name`` and ``optuna.trial_number`` (the parent run has no trial number)."""
        from mlflow.entities import ViewType

        safe = "'" not in study_name and "\\" not in study_name
        filt = "attributes.status = 'RUNNING'" + (f" and tags.study_name = '{study_name}'" if safe else "")
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=filt, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
            order_by=["attributes.start_time ASC"],
        )
        out: list[tuple[str, int]] = []
        for run in runs:
            tags = run.data.tags
            if tags.get("study_name") != study_name or tags.get(ROLE_TAG) == "study" or run.info.status != "RUNNING":
                continue
            try:
                out.append((run.info.run_id, int(tags["optuna.trial_number"])))
            except (KeyError, ValueError):
                continue
        return out

    def run_status(self, run_id: str) -> Optional[str]:
        """The run's status (RUNNING, FINISHED, FAILED, KILLED, SCHEDULED), or None if it is gone."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.status
        except MlflowException:
            return None

    def start_trial(self, parent_run_id: Optional[str], *, run_name: str, tags: dict[str, Any]) -> str:
        """Create a trial's child run (nested under ``parent_run_id``) with ``tags`` plus the static tags."""
        all_tags = self.static_tags()
        all_tags.update({k: str(v) for k, v in tags.items()})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        """Log params (already flattened) in batches of 100."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MLFLOW_PARAM_MAX]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH_PARAMS):
            self.client.log_batch(run_id, params=items[i : i + _BATCH_PARAMS])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """Log the numeric entries of ``metrics`` at ``step`` in one ``log_batch`` call (per 1000)."""
        from mlflow.entities import Metric

        ts = _now_ms()
        items = []
        for k, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                try:
                    v = float(v)  # numpy / torch scalars
                except (TypeError, ValueError):
                    continue
            items.append(Metric(k, float(v), ts, int(step)))
        for i in range(0, len(items), _BATCH_METRICS):
            self.client.log_batch(run_id, metrics=items[i : i + _BATCH_METRICS])

    def log_artifacts(self, run_id: str, paths: Iterable[Path]) -> None:
        """Log files (and folders) as artifacts of the run; missing paths are skipped with a warning."""
        for p in paths:
            p = Path(p)
            if p.is_dir():
                self.client.log_artifacts(run_id, str(p), artifact_path=p.name)
            elif p.is_file():
                self.client.log_artifact(run_id, str(p))
            else:
                log.warning("artifact %s does not exist; not logged", p)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set several tags in one call."""
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:_MLFLOW_TAG_MAX]) for k, v in tags.items()])

    def finish_trial(self, run_id: str, *, status: str = "FINISHED", tags: Optional[Mapping[str, Any]] = None) -> None:
        """Terminate a trial's run with ``status`` (FINISHED, FAILED, KILLED) after setting ``tags``."""
        self.set_tags(run_id, tags or {})
        self.client.set_terminated(run_id, status)

    def fail_trial(self, run_id: str, error: str, traceback_text: str) -> None:
        """Mark a trial's run FAILED: tag ``error`` (one line) and the artifact ``error.txt`` (traceback)."""
        self.set_tags(run_id, {"error": _one_line(error, 5000)})
        self.client.log_text(run_id, traceback_text, "error.txt")
        self.client.set_terminated(run_id, "FAILED")

    def kill_run(self, run_id: str, reason: str) -> None:
        """Mark a run KILLED (its worker died) with the tag ``killed``; a missing run is only logged."""
        from mlflow.exceptions import MlflowException

        try:
            self.set_tags(run_id, {"killed": _one_line(reason)})
            self.client.set_terminated(run_id, "KILLED")
        except MlflowException as exc:
            log.warning("could not mark MLflow run %s KILLED: %s", run_id, _one_line(str(exc)))

    def download_artifact(self, run_id: str, artifact: str, dst_dir: Path) -> Path:
        """:func:`download_run_artifact` with this tracker's store."""
        return download_run_artifact(self.stores.tracking_uri, run_id, artifact, dst_dir)

    def run_info(self, run_id: str) -> Optional[dict[str, Any]]:
        """``{"status", "tags", "params", "metrics", "study_name"}`` of run ``run_id``, or None if it
        does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        return {
            "status": run.info.status,
            "tags": dict(run.data.tags),
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
            "study_name": run.data.tags.get("study_name"),
        }


def download_run_artifact(tracking_uri: str, run_id: str, artifact: str, dst_dir: Path) -> Path:
    """Download one artifact (a file name such as ``deployed.pt`` or ``scales.pt``) of run ``run_id``
    in the MLflow store ``tracking_uri`` into ``dst_dir`` and return its local path. Creates no
    experiment (unlike :class:`Tracker`).

    Raises:
        TrackingError: no run with that id, or the run has no such artifact (one line).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bar in the CLI's output
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        # a lookup must not create an empty store
        raise TrackingError(f"no MLflow store at {tracking_uri} (run {run_id} cannot be there; pass --runs-dir or --tracking-uri)")
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"no MLflow run with id {run_id!r} in {tracking_uri}") from None
    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    try:
        local = client.download_artifacts(run.info.run_id, artifact, str(dst_dir))
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"run {run_id} has no artifact {artifact!r} ({_one_line(str(exc), 200)})") from None
    return Path(local)
