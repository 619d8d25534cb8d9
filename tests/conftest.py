"""Shared pytest fixtures.

- ``data_root``: the real data root (holding ``cifar10/``): env ``REPSEARCH_DATA``, else
  ``<repo>/../shared/data``. When it is missing the test fails if env ``CI`` is set (the contract:
  never skip in CI) and is skipped otherwise.
- ``tiny_data``: a session-wide :class:`repsearch.data.DataBundle` on real CIFAR-10 (200 train /
  100 val / 100 test images, batch 32, CPU). It uses the default decode cache
  (``$REPSEARCH_CACHE`` or ``~/.cache/repsearch``): the first session on a machine decodes all
  60,000 JPEG files once (about 10-20 s on 2 cores); later sessions load the cache (about 1 s).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _real_data_root() -> Path:
    env = os.environ.get("REPSEARCH_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Path of the real data root (it holds ``cifar10/{train,test}/<class>/*.jpg``)."""
    root = _real_data_root()
    if not (root / "cifar10").is_dir():
        reason = f"real data not found: {root / 'cifar10'} (set REPSEARCH_DATA to the folder holding cifar10/)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return root


@pytest.fixture(scope="session")
def tiny_data(data_root: Path):
    """Real CIFAR-10, stratified: 200 train / 100 val / 100 test images, batch 32, on CPU."""
    from repsearch.data import build_data

    return build_data(data_root, dataset="cifar10", train_subset=200, val_size=100, test_subset=100, batch_size=32)


#: The recipe of ``real_sweep``: 4 trials (1 grid point + 1 baseline, 2 seeds), study ``tiny_cmp-…``.
TINY_SWEEP = {
    "data": {"dataset": "cifar10", "train_subset": 64, "val_size": 32, "test_subset": 32},
    "model": {"name": "vgg16", "width": 0.0625},
    "method": {"name": "dyrep", "space": "dbb", "interval": 1, "grow_until": 1, "recal_batches": 1, "probe_batches": 1},
    "train": {"epochs": 1, "batch_size": 32, "eval_batch_size": 64, "lr": 0.05, "warmup_epochs": 0},
    "sweep": {"params": {"method.scoring": {"choices": ["synflow"]}}, "baselines": [{"method.name": "origin"}],
              "seeds": [0, 1], "sampler": "grid"},
}


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory, data_root):
    """A real tiny sweep (:data:`TINY_SWEEP`) with all 4 trials complete: ``(stores, summary)``."""
    from repsearch.spec import Recipe
    from repsearch.sweep import run_study
    from repsearch.tracking import resolve_stores

    tmp = tmp_path_factory.mktemp("sweep")
    recipe = Recipe.model_validate(TINY_SWEEP)
    stores = resolve_stores(recipe, "tiny_cmp.yaml", runs_dir=tmp / "runs")
    summary = run_study(recipe, "tiny_cmp.yaml", None, stores, device="cpu", data_root=str(data_root), progress=False)
    assert summary.n_complete == 4, summary.failures
    return stores, summary
