"""BN re-calibration shared by the methods that add branches during training (DyRep's Rep, RepAn's
re-expansion): re-estimate new BNs' running statistics on training batches before they are used in
eval mode (DyRep §4.1 and its official code: 20 batches)."""

from __future__ import annotations

import itertools
from typing import Iterable

import torch
from torch import nn


def recalibrate_bn(model: nn.Module, bns: list[nn.BatchNorm2d], loader: Iterable, n_batches: int) -> int:
    """Re-estimate the running statistics of ``bns`` on ``n_batches`` batches of ``loader``.

    Cumulative average (``momentum=None``) after ``reset_running_stats``; every other module stays
    in eval mode; no gradients (DyRep §4.1 / official code: 20 batches). Restores train/eval modes
    and momenta.

    Args:
        model: maps images ``(B, C, H, W)`` to logits; ``bns`` are modules inside it.
        bns: the BatchNorm2d layers to re-estimate.
        loader: yields ``(images, labels)`` batches on the model's device.
        n_batches: how many batches to use (0: nothing is done).

    Returns:
        the number of batches used (fewer than ``n_batches`` when the loader is shorter).
    """
    if n_batches <= 0 or not bns:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    used = 0
    with torch.no_grad():
        for images, _ in itertools.islice(iter(loader), n_batches):
            model(images)
            used += 1
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    model.train(was_training)
    return used
