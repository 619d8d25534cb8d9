"""Optuna storages for a study: opening them safely under races, the study lock, sampler, pruner.

DESIGN.md "Stores — contract" and "Sweeps — contract". Several processes (``--workers N``, a job
array, ``repsearch worker`` on other nodes) open one storage at once; three races are closed here:

- **creation**: two processes that both create a fresh database (SQLite ``runs/optuna.db``, or the
  tables of a fresh PostgreSQL database) collide on ``alembic_version``. Opening is serialised by a
  lock file next to the SQLite file (``filelock``) or by a PostgreSQL advisory lock.
- **popping** on SQLite: Optuna's WAITING -> RUNNING update reads with ``SELECT … FOR UPDATE``, which
  SQLite ignores, and pysqlite begins the transaction only at the UPDATE, so two workers can both
  take the same trial (measured: 23 double pops in 200 with 4 workers). Every SQLite transaction of
  the storage's engine starts with ``BEGIN IMMEDIATE`` (SQLAlchemy's documented pysqlite recipe:
  ``isolation_level=None`` on connect, ``BEGIN IMMEDIATE`` on begin), which takes the write lock
  at the read (measured: 0). PostgreSQL honours ``FOR UPDATE``; the journal storage serialises
  appends itself.
- **the parent's read-then-write steps** (fail stale trials, enqueue missing points, find-or-create
  the MLflow parent run): :func:`study_lock`, one lock per study — a lock file for SQLite and the
  journal storage (one machine), ``pg_advisory_lock`` for PostgreSQL (any number of hosts).
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import optuna

from repsearch.spec import Recipe
from repsearch.sweep.plan import SweepError, _objectives
from repsearch.tracking import Stores

#: RDBStorage heartbeat: every 30 s; a RUNNING trial without one for 90 s is failed by the next run.
HEARTBEAT_INTERVAL_S = 30
GRACE_PERIOD_S = 90
#: Median pruner: no pruning before this many trials completed (Optuna's default).
MEDIAN_STARTUP_TRIALS = 5
#: How long a process waits for a store's creation lock or a study lock (seconds).
LOCK_TIMEOUT_S = 600


def storage_kind(url: str) -> str:
    """``sqlite``, ``postgresql``, ``mysql`` or ``journal`` (a file path) for a storage URL.

    Raises:
        SweepError: an unsupported URL scheme.
    """
    if "://" not in url:
        return "journal"
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme in ("postgresql", "postgres"):
        return "postgresql"
    if scheme in ("sqlite", "mysql"):
        return scheme
    raise SweepError(f"storage '{url}': expected sqlite:///..., postgresql://..., mysql://... or a journal file path")


def sqlite_path(url: str) -> Optional[Path]:
    """The database file of an ``sqlite:///…`` URL (None for ``:memory:`` or another kind)."""
    if storage_kind(url) != "sqlite":
        return None
    db = url.split("://", 1)[1][1:].split("?", 1)[0]  # sqlite:///rel.db, sqlite:////abs.db
    return Path(db).expanduser().resolve() if db and db != ":memory:" else None


def _lock_file(path: Path, suffix: str):
    from filelock import FileLock

    return FileLock(str(path) + suffix, timeout=LOCK_TIMEOUT_S)


def _pg_key(text: str) -> int:
    """A signed 64-bit advisory-lock key from a name (``pg_advisory_lock`` takes a bigint)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def _pg_advisory_lock(engine: Any, name: str) -> Iterator[None]:
    """Hold PostgreSQL's session-level advisory lock for ``name`` on a dedicated connection."""
    import sqlalchemy

    key = _pg_key(name)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


def _sqlite_begin_immediate(engine: Any) -> None:
    """Make every transaction of an SQLite engine start with ``BEGIN IMMEDIATE`` (see module doc)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_pysqlite_begin(dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.isolation_level = None  # pysqlite must not emit its own (deferred) BEGIN

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections pooled before the hooks were attached are dropped


def rdb_backend(storage: Any) -> Optional[Any]:
    """The ``RDBStorage`` behind a storage returned by :func:`open_storage` (None for a journal)."""
    from optuna.storages import RDBStorage

    inner = getattr(storage, "_backend", storage)
    return inner if isinstance(inner, RDBStorage) else None


def open_storage(url: str):
    """Open an Optuna storage (wrapped as the study will use it), safe when several processes open
    (and create) it at once.

    ``sqlite:///…``, ``postgresql://…``, ``mysql://…``: ``RDBStorage`` with ``heartbeat_interval``
    :data:`HEARTBEAT_INTERVAL_S` and ``grace_period`` :data:`GRACE_PERIOD_S`. SQLite waits up to 60 s
    for a lock and starts every transaction with ``BEGIN IMMEDIATE``; its creation is serialised by
    the lock file ``<db>.lock``, PostgreSQL's by an advisory lock. Anything else is a journal file
    path: ``JournalStorage(JournalFileBackend(path))`` (no heartbeats: only the dead-process check
    applies, so it serves workers of one host only).

    Raises:
        SweepError: an unsupported URL scheme, a missing database driver, a database that cannot be
            opened, a folder or an SQLite database given as a journal path.
    """
    from optuna.storages import JournalStorage, RDBStorage, get_storage
    from optuna.storages.journal import JournalFileBackend

    kind = storage_kind(url)
    if kind != "journal":
        creation: Any = contextlib.nullcontext()
        if kind == "sqlite":
            db = sqlite_path(url)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
                creation = _lock_file(db, ".lock")
            kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
        else:
            kwargs = {"pool_pre_ping": True}
        try:
            if kind == "postgresql":
                import sqlalchemy

                probe = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
                creation = _pg_advisory_lock(probe, "repsearch:create")
            with creation, warnings.catch_warnings():  # heartbeat_interval is "experimental" in Optuna 5.0
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                rdb = RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=GRACE_PERIOD_S)
        except ImportError as exc:
            raise SweepError(f"storage '{url}': database driver missing ({exc}); pip install -e '.[postgres]'") from None
        except Exception as exc:  # sqlalchemy errors: unreachable server, bad credentials, bad path
            if type(exc).__module__.startswith("sqlalchemy"):
                raise SweepError(f"storage '{url}': cannot open: {str(exc).splitlines()[0]}") from None
            if type(exc).__name__ == "Timeout" and type(exc).__module__.startswith("filelock"):
                raise SweepError(f"storage '{url}': its creation lock is held for {LOCK_TIMEOUT_S}+ s ({exc})") from None
            raise
        if kind == "sqlite":
            _sqlite_begin_immediate(rdb.engine)
        return get_storage(rdb)
    path = Path(url).expanduser()
    if path.is_dir():
        raise SweepError(f"storage '{url}': is a folder; give a journal file path or a sqlite:///... URL")
    if path.is_file():
        with open(path, "rb") as fh:
            if fh.read(16) == b"SQLite format 3\x00":
                raise SweepError(f"storage '{url}': is an SQLite database; pass it as sqlite:///{path.resolve()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


@contextlib.contextmanager
def study_lock(url: str, storage: Any, study_name: str) -> Iterator[None]:
    """Hold the study's lock: one process at a time fails stale trials, enqueues missing slots and
    finds or creates the MLflow parent run (DESIGN.md sweeps contract).

    SQLite and journal storages: the lock file ``<db or journal>.<8 hex of the study name>.lock``
    (processes of one host, or hosts sharing a file system with working ``flock``). PostgreSQL:
    ``pg_advisory_lock`` on the storage's own database (every host). MySQL: none (Optuna's
    ``FOR UPDATE`` holds there; a duplicate enqueue is dropped when popped).

    Raises:
        SweepError: the lock is held for more than :data:`LOCK_TIMEOUT_S` seconds.
    """
    kind = storage_kind(url)
    tag = hashlib.sha256(study_name.encode()).hexdigest()[:8]
    if kind == "postgresql":
        rdb = rdb_backend(storage)
        with _pg_advisory_lock(rdb.engine, f"repsearch:study:{study_name}"):
            yield
        return
    if kind == "mysql":
        yield
        return
    base = sqlite_path(url) if kind == "sqlite" else Path(url).expanduser().resolve()
    if base is None:  # sqlite in memory: one process by construction
        yield
        return
    from filelock import Timeout

    try:
        lock = _lock_file(base, f".{tag}.lock")
        lock.acquire()
    except Timeout:
        raise SweepError(f"study '{study_name}': its lock {base}.{tag}.lock is held for {LOCK_TIMEOUT_S}+ s") from None
    try:
        yield
    finally:
        lock.release()


def make_sampler(recipe: Recipe, n_existing: int = 0, salt: int = 0) -> "optuna.samplers.BaseSampler":
    """The study's sampler, seeded with ``recipe.seed`` mixed with the number of trials already in
    the study (a resumed study continues the sequence instead of replaying it) and ``salt`` (extra
    workers pass their pid so that two of them never propose in lockstep). A grid study gets a
    RandomSampler, which never chooses anything since every param is fixed by its point."""
    name = recipe.sweep.sampler if recipe.sweep is not None else "grid"
    seed = (recipe.seed * 1_000_003 + n_existing + salt * 7919) % (2**32)
    s = optuna.samplers
    if name == "tpe":
        # constant_liar: running trials count as bad, so parallel workers do not all propose
        # the same configuration (Optuna 5's default too; stated here because the sweep relies on it)
        return s.TPESampler(seed=seed, constant_liar=True)
    if name == "cmaes":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return s.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "nsga2":
        return s.NSGAIISampler(seed=seed)
    return s.RandomSampler(seed=seed)


def make_pruner(recipe: Recipe) -> "optuna.pruners.BasePruner":
    """``none`` -> NopPruner; ``median`` -> MedianPruner(5 startup trials, warm-up max(1, epochs // 10)
    epochs); ``hyperband`` -> HyperbandPruner(min 1, max ``train.epochs`` epochs, reduction factor 3)."""
    name = recipe.sweep.pruner if recipe.sweep is not None else "none"
    epochs = recipe.train.epochs
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=max(1, epochs // 10))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs), reduction_factor=3)
    return optuna.pruners.NopPruner()


# ------------------------------------------------------------------------------------ opening
def _open_study(recipe: Recipe, name: str, stores: Stores, create: bool, salt: int = 0) -> tuple[Any, "optuna.Study", int]:
    storage = open_storage(stores.storage)
    directions = [o.direction for o in _objectives(recipe)]
    if create:
        study = optuna.create_study(
            study_name=name, storage=storage, directions=directions, load_if_exists=True,
            sampler=optuna.samplers.RandomSampler(), pruner=make_pruner(recipe),
        )
    else:
        try:
            study = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(), pruner=make_pruner(recipe))
        except KeyError:
            raise SweepError(f"study '{name}' does not exist in {stores.storage}; run the recipe first") from None
    if [d.name.lower() for d in study.directions] != directions:
        raise SweepError(f"study '{name}' in {stores.storage} has directions {[d.name.lower() for d in study.directions]}, the recipe {directions}")
    study.sampler = make_sampler(recipe, len(study.get_trials(deepcopy=False)), salt)
    study_id = storage.get_study_id_from_name(name)
    return storage, study, study_id
