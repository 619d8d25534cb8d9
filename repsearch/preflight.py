"""Checks and estimates that need more than the recipe's schema: whether an operation space leaves
any branch beyond ``kxk`` on the model's candidate convs (DESIGN.md operation spaces contract), and
the study's cost in training images (``repsearch validate``)."""

from __future__ import annotations

from pathlib import Path

import torch

from repsearch.data import NUM_CLASSES
from repsearch.spec import Recipe, RecipeError, trial_recipe

#: training-set sizes before the validation split (images)
TRAIN_SIZES = {"cifar10": 50000, "cifar100": 50000}
TEST_SIZES = {"cifar10": 10000, "cifar100": 10000}


def _space_of(method) -> object | None:
    return getattr(method, "space", None)


def check_space_fits(recipe: Recipe, source: str, where: str = "method.space") -> None:
    """Raise :class:`RecipeError` when the method's space leaves no branch beyond ``kxk`` on every
    candidate conv of the model (built on the ``meta`` device: no memory, no compute)."""
    from repsearch.models import build_model
    from repsearch.rep import candidate_convs, eligible_branches
    from repsearch.spaces import resolve_space

    space = _space_of(recipe.method)
    if space is None:
        return
    kinds = resolve_space(space)
    if not [k for k in kinds if k != "kxk"]:
        raise RecipeError(f"{source}: {where}: {space!r} has no branch beyond kxk; add one of 1x1, 1x1-kxk, 1x1-avg, 1xk, kx1, identity")
    with torch.device("meta"):
        model = build_model(recipe.model.name, num_classes=NUM_CLASSES.get(recipe.data.dataset, 10), width=recipe.model.width)
    convs = candidate_convs(model, max_depth=1)
    if not convs:
        raise RecipeError(f"{source}: model.name: '{recipe.model.name}' has no square K > 1 conv to re-parameterize")
    for conv in convs.values():
        kept, _ = eligible_branches(conv, kinds)
        if any(k != "kxk" for k in kept):
            return
    raise RecipeError(
        f"{source}: {where}: {space!r} leaves no branch beyond kxk on any conv of {recipe.model.name} "
        "(identity needs C_in = C_out and stride 1; 1x1/1xk/kx1 need padding K//2)"
    )


def check_batches(recipe: Recipe, source: str) -> None:
    """Raise :class:`RecipeError` when the training split (after ``val_size`` and ``train_subset``)
    holds fewer images than one batch, or ``val_size`` leaves no training image (CIFAR sizes)."""
    d = recipe.data
    total = TRAIN_SIZES.get(d.dataset)
    if total is None:
        return
    if d.val_size >= total:
        raise RecipeError(f"{source}: data.val_size: {d.val_size} leaves no training image ({d.dataset} has {total})")
    n_train = min(d.train_subset or total, total - d.val_size)
    if n_train < recipe.train.batch_size:
        raise RecipeError(
            f"{source}: data.train_subset: {n_train} training images are fewer than one batch "
            f"(train.batch_size {recipe.train.batch_size})"
        )


def check_recipe(recipe: Recipe, recipe_path: str | Path) -> None:
    """Model-level checks of the recipe and of every sweep point and baseline.

    Raises:
        RecipeError: a space that leaves no branch beyond kxk (names the dotted path); a training
            split smaller than one batch.
    """
    from repsearch.sweep import plan_points

    source = str(recipe_path)
    check_space_fits(recipe, source)
    check_batches(recipe, source)
    if recipe.sweep is None:
        return
    seen = set()
    for point in plan_points(recipe):
        key = repr(sorted(point.overrides.items()))
        if key in seen:
            continue
        seen.add(key)
        trial = trial_recipe(recipe, point.overrides, point.seed)
        check_space_fits(trial, source, where=f"sweep ({point.point_id}): method.space")
        check_batches(trial, source)


def cost_estimate(recipe: Recipe, points) -> dict:
    """The study's cost in images: ``n_train`` (after the validation split and subset) × epochs per
    trial, summed over trials; evaluation images = (val per epoch + val + test at the end) per trial."""
    d = recipe.data
    total = TRAIN_SIZES.get(d.dataset)
    n_trials = len(points) if recipe.sweep is None or recipe.sweep.sampler == "grid" else (
        recipe.sweep.n_trials * len(recipe.sweep.seeds) + len(recipe.sweep.baselines) * len(recipe.sweep.seeds)
    )
    n_seeds = 1 if recipe.sweep is None else len(recipe.sweep.seeds)
    if total is None:
        n_train = d.train_subset or 0
    else:
        n_train = min(d.train_subset or total, total - d.val_size)
    n_test = TEST_SIZES.get(d.dataset, d.test_subset or 0)
    if d.test_subset:
        n_test = min(n_test, d.test_subset)
    per_trial = n_train * recipe.train.epochs
    eval_per_trial = d.val_size * (recipe.train.epochs + 2) + n_test
    return {
        "n_trials": n_trials,
        "n_seeds": n_seeds,
        "n_configurations": n_trials // max(1, n_seeds),
        "n_train": n_train,
        "train_images_per_trial": per_trial,
        "train_images": per_trial * n_trials,
        "eval_images": eval_per_trial * n_trials,
    }
