"""Every recipe's smoke profile must learn on any machine (DESIGN.md conventions): the origin arm of
the smoke profile, run exactly as the profile says for its first epochs on real CIFAR-10, drives the
training loss well below ln(10) (the loss of a uniform prediction) for seeds 0, 1 and 2; and a dead
run is detected by :func:`repsearch.trial.learning_check`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from repsearch.data import build_data
from repsearch.methods import build_method
from repsearch.models import build_model, model_kwargs
from repsearch.spec import load_recipe, trial_recipe
from repsearch.train import Trainer, seed_everything
from repsearch.trial import learning_check

ROOT = Path(__file__).resolve().parents[1]
FIRST_EPOCHS = 3


@pytest.fixture(scope="module")
def smoke_data(data_root):
    rec, _ = load_recipe(ROOT / "recipes" / "ablation_scoring.yaml", "smoke")
    d = rec.data
    return rec, {
        "root": data_root, "val_size": d.val_size, "split_seed": d.split_seed, "train_subset": d.train_subset,
        "test_subset": 32, "cutout": d.cutout, "batch_size": rec.train.batch_size, "eval_batch_size": rec.train.eval_batch_size,
    }


@pytest.mark.parametrize("recipe_name", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_every_smoke_profile_warms_up_and_stays_off_the_edge(recipe_name):
    rec, _ = load_recipe(ROOT / "recipes" / recipe_name, "smoke")
    assert rec.train.warmup_epochs >= 1 and rec.train.lr <= 0.1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_origin_arm_of_the_smoke_profile_learns(smoke_data, seed):
    rec, kw = smoke_data
    r = trial_recipe(rec, {"method.name": "origin"}, seed)
    seed_everything(seed, False)
    data = build_data(kw["root"], dataset="cifar10", val_size=kw["val_size"], split_seed=kw["split_seed"],
                      train_subset=kw["train_subset"], test_subset=kw["test_subset"], cutout=kw["cutout"],
                      batch_size=kw["batch_size"], eval_batch_size=kw["eval_batch_size"], seed=seed)
    model = build_model(r.model.name, **model_kwargs(r.model.name, 10, r.model.width, **r.model.options))
    method = build_method(r, "cpu")
    trainer = Trainer(method.prepare(model, data.train), method, data.train, data.val, r.train, torch.device("cpu"))
    history = trainer.fit(stop_after=FIRST_EPOCHS)
    losses = [m["train/loss"] for m in history]
    assert len(losses) == FIRST_EPOCHS
    assert losses[-1] < math.log(10) - 0.1, losses
    assert history[-1]["val/top1"] > 15.0, [m["val/top1"] for m in history]


def test_learning_check_flags_dead_runs_only():
    ln10 = math.log(10)
    dead = [{"train/loss": 2.291, "val/top1": 10.2}] + [{"train/loss": ln10 + 0.001, "val/top1": 10.16}] * 9
    assert "train/loss within 1% of ln(10)" in learning_check(dead, 10, 256)
    alive = [{"train/loss": 2.2 - 0.1 * i, "val/top1": 15.0 + 3 * i} for i in range(10)]
    assert learning_check(alive, 10, 256) is None
    # loss still near ln(10) for only 2 epochs, then learning: not flagged
    slow = [{"train/loss": ln10, "val/top1": 10.0}] * 3 + alive[3:]
    assert learning_check(slow, 10, 256) is None
    # collapsed for epochs 2-4, then recovered: not flagged either
    recovered = [{"train/loss": ln10, "val/top1": 10.0}] * 4 + [{"train/loss": 1.5, "val/top1": 60.0 + i} for i in range(6)]
    assert learning_check(recovered, 10, 256) is None
    # loss moving but val/top1 stuck at chance in every epoch
    stuck = [{"train/loss": 2.0 - 0.1 * i, "val/top1": 11.0} for i in range(10)]
    assert "val/top1 at chance" in learning_check(stuck, 10, 256)
