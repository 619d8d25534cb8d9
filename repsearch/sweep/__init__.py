"""Recipe.sweep -> an Optuna study: points enqueued once by the parent, workers pop them.

DESIGN.md "Sweeps — contract". The package, one concept per module:

- :mod:`~repsearch.sweep.plan`: the study's points (configuration × seed) and slots, pure functions of
  the recipe;
- :mod:`~repsearch.sweep.storage`: Optuna storages opened safely by many processes (creation lock,
  SQLite ``BEGIN IMMEDIATE``), the study lock, sampler and pruner;
- :mod:`~repsearch.sweep.queue`: enqueue missing slots, pop (atomic, duplicates dropped), fail stale
  trials, count;
- :mod:`~repsearch.sweep.worker`: run a popped trial end to end; the worker loop;
  ``repsearch worker``;
- :mod:`~repsearch.sweep.pool`: ``repsearch run --workers N``: N worker processes on one study;
- :mod:`~repsearch.sweep.study`: the parent (:func:`run_study`) and read-only views of a study.

``optuna`` is imported at module top (this package is all Optuna); ``repsearch.trial`` (torch) and
``mlflow`` are imported only when a study runs.
"""

from repsearch.sweep.plan import DEFAULT_POINT, Point, SweepError, plan_points, point_id
from repsearch.sweep.queue import process_alive, process_start_id
from repsearch.sweep.storage import (
    GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S, MEDIAN_STARTUP_TRIALS, make_pruner, make_sampler, open_storage, study_lock,
)
from repsearch.sweep.study import StudySummary, load_report, run_study, study_state
from repsearch.sweep.worker import work

__all__ = [
    "DEFAULT_POINT", "GRACE_PERIOD_S", "HEARTBEAT_INTERVAL_S", "MEDIAN_STARTUP_TRIALS", "Point", "StudySummary",
    "SweepError", "load_report", "make_pruner", "make_sampler", "open_storage", "plan_points", "point_id",
    "process_alive", "process_start_id", "run_study", "study_lock", "study_state", "work",
]
