"""Optimizer and LR schedule shared by the methods: SGD or AdamW with weight-decay groups, cosine with
linear warm-up, and the in-place param-group update after a structure change (DESIGN.md method
interface).
"""

from __future__ import annotations

import math

import torch
from torch import nn

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def split_decay(model: nn.Module, wd_on_norm: bool) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split the trainable parameters into (decay, no_decay).

    With ``wd_on_norm`` (DyRep's CIFAR recipe) everything decays; otherwise BN/GroupNorm/LayerNorm
    parameters and every bias go to ``no_decay`` (DyRep's ImageNet recipe). Order is the model's
    ``named_modules`` order, each parameter once.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if not wd_on_norm and (isinstance(module, _NORM_TYPES) or pname == "bias" or p.ndim <= 1):
                no_decay.append(p)
            else:
                decay.append(p)
    return decay, no_decay


def build_sgd(model: nn.Module, train_spec) -> torch.optim.SGD:
    """SGD (momentum, optional Nesterov) with two groups: ``decay`` (``train.weight_decay``) and
    ``no_decay`` (0). Both groups always exist so schedulers keep one base LR per group."""
    decay, no_decay = split_decay(model, train_spec.wd_on_norm)
    groups = [
        {"params": decay, "weight_decay": train_spec.weight_decay, "name": "decay", "wd_on_norm": train_spec.wd_on_norm},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay", "wd_on_norm": train_spec.wd_on_norm},
    ]
    return torch.optim.SGD(
        groups, lr=train_spec.lr, momentum=train_spec.momentum, nesterov=train_spec.nesterov
    )


def build_adamw(model: nn.Module, train_spec) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019: decoupled weight decay) with ``betas``/``eps`` from the recipe
    and the same ``decay``/``no_decay`` groups as :func:`build_sgd`."""
    decay, no_decay = split_decay(model, train_spec.wd_on_norm)
    groups = [
        {"params": decay, "weight_decay": train_spec.weight_decay, "name": "decay", "wd_on_norm": train_spec.wd_on_norm},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay", "wd_on_norm": train_spec.wd_on_norm},
    ]
    return torch.optim.AdamW(groups, lr=train_spec.lr, betas=tuple(train_spec.betas), eps=train_spec.eps)


#: ``train.optimizer`` -> builder ``(model, train_spec) -> Optimizer``.
OPTIMIZERS = {"sgd": build_sgd, "adamw": build_adamw}


def build_optimizer(model: nn.Module, train_spec) -> torch.optim.Optimizer:
    """The optimizer named by ``train_spec.optimizer`` (default ``sgd``).

    Raises:
        ValueError: an unknown optimizer name (the recipe validation normally rejects it first).
    """
    name = getattr(train_spec, "optimizer", "sgd")
    try:
        return OPTIMIZERS[name](model, train_spec)
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; one of {', '.join(OPTIMIZERS)}") from None


def reset_state(optimizer: torch.optim.Optimizer, policy: str, changed=()) -> int:
    """Forget optimizer state (momentum, Adam moments and step counts): ``none``, ``changed`` (the
    state of the parameters in ``changed``) or ``all``. Returns the number of parameters reset.

    Raises:
        ValueError: an unknown policy.
    """
    if policy == "none":
        return 0
    if policy == "all":
        n = len(optimizer.state)
        optimizer.state.clear()
        return n
    if policy == "changed":
        n = 0
        for p in changed:
            if p in optimizer.state:
                del optimizer.state[p]
                n += 1
        return n
    raise ValueError(f"unknown optimizer reset policy {policy!r}; one of none, changed, all")


def sync_param_groups(optimizer: torch.optim.Optimizer, model: nn.Module, wd_on_norm: bool) -> dict:
    """Update ``optimizer``'s param groups in place after a structure change (DESIGN.md; as DyRep's
    official code): groups keep their lr/weight decay/momentum settings, surviving parameters keep
    their state (momentum buffers), removed parameters lose it, new parameters start with no state.

    Expects the two groups made by :func:`build_sgd` / :func:`build_adamw` (``decay``, ``no_decay``).

    Returns:
        ``{"added": n, "removed": n}`` parameter counts (tensors, not elements).

    Raises:
        ValueError: when the optimizer's groups are not the ``decay``/``no_decay`` pair.
    """
    names = [g.get("name") for g in optimizer.param_groups]
    if names != ["decay", "no_decay"]:
        raise ValueError(f"sync_param_groups expects groups ['decay', 'no_decay'], got {names}")
    decay, no_decay = split_decay(model, wd_on_norm)
    old = {id(p) for g in optimizer.param_groups for p in g["params"]}
    new = {id(p) for p in decay + no_decay}
    for p in [p for p in list(optimizer.state.keys()) if id(p) not in new]:
        del optimizer.state[p]
    optimizer.param_groups[0]["params"] = decay
    optimizer.param_groups[1]["params"] = no_decay
    return {"added": len(new - old), "removed": len(old - new)}


def cosine_warmup(optimizer: torch.optim.Optimizer, train_spec, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LR: linear warm-up over ``warmup_epochs`` to ``lr``, then cosine from ``lr`` to
    ``min_lr`` at the last step (SGDR without restarts, Loshchilov & Hutter 2017; DyRep §5.1).

    Units: ``steps_per_epoch`` in optimizer steps; the schedule is stepped once per training step.
    """
    total = max(1, train_spec.epochs * steps_per_epoch)
    warm = train_spec.warmup_epochs * steps_per_epoch
    floor = train_spec.min_lr / train_spec.lr

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
