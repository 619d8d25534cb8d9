"""The method interface: the training-loop hooks every method implements (DESIGN.md).

Methods never own the loop: :class:`repsearch.train.Trainer` calls these hooks. When
:meth:`Method.on_epoch_end` reports a structure change, the trainer (not the method) updates the
optimizer's param groups in place.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from repsearch import optim
from repsearch.rep import deploy as rep_deploy
from repsearch.rep import structure as rep_structure


class Method:
    """Base class: the plain training of the origin model; subclasses override what they change.

    Attributes:
        spec: the recipe's ``method`` section (a pydantic model).
        label_smoothing: ε of the cross-entropy loss (from ``train.label_smoothing``).
        events: structural events (dicts: ``epoch``, ``kind`` ('rep', 'dep', 'expand', ...),
            ``path``, ...), written to ``events.json``.
    """

    name = "base"

    def __init__(self, spec: Any, label_smoothing: float = 0.0, seed: int = 0):
        self.spec = spec
        self.label_smoothing = float(label_smoothing)
        self.seed = int(seed)
        self.events: list[dict] = []

    # -- structure -------------------------------------------------------------------------
    def prepare(self, model: nn.Module, loader: Iterable) -> nn.Module:
        """Return the training-time model built from the plain ``model`` (default: unchanged)."""
        return model

    def on_epoch_end(self, model: nn.Module, epoch: int, loader: Iterable) -> bool:
        """Change the structure at the end of ``epoch`` (counted from 1); True if it changed."""
        return False

    def deploy(self, model: nn.Module) -> nn.Module:
        """The inference model: every block fused, exactly the origin architecture (DESIGN.md)."""
        return rep_deploy(model)

    def structure(self, model: nn.Module) -> dict:
        """JSON-able description of the training-time structure (``structure.json``)."""
        return rep_structure(model)

    # -- optimisation ----------------------------------------------------------------------
    def optimizer(self, model: nn.Module, train_spec) -> torch.optim.Optimizer:
        """Default: SGD with ``decay``/``no_decay`` groups (:func:`repsearch.optim.build_sgd`)."""
        return optim.build_sgd(model, train_spec)

    def scheduler(self, optimizer: torch.optim.Optimizer, train_spec, steps_per_epoch: int):
        """Default: per-step cosine with linear warm-up (:func:`repsearch.optim.cosine_warmup`)."""
        return optim.cosine_warmup(optimizer, train_spec, steps_per_epoch)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with label smoothing. Shapes: logits (B, classes), target (B,) int64; returns a 0-dim tensor."""
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def fp32_gradients(self, epoch: int) -> bool:
        """True when the training step of ``epoch`` (from 1) must run without bf16 autocast because
        the method reads gradients whose signal is below bf16 precision (default False)."""
        return False

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Called after ``loss.backward()`` and before ``optimizer.step()`` (step counts from 0)."""

    def describe(self) -> dict:
        """Method-level summary for the trial's final measures (e.g. counts of Rep/Dep events)."""
        return {}
