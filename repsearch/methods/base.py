"""The method interface, version 2: the training-loop hooks every method implements (DESIGN.md
"The method interface").

Methods never own the loop: :class:`repsearch.train.Trainer` calls these hooks, in this order::

    model = method.prepare(model, loader)                  # once, before the optimizer exists
    optimizer = method.optimizer(model, train_spec)
    scheduler = method.scheduler(optimizer, train_spec, steps_per_epoch)
    for epoch in 1..E:
        method.on_epoch_start(model, epoch)                # e.g. RepAn's attach rate λ
        for each step:
            loss = method.loss(logits, target, images)
            loss.backward(); method.after_backward(model, step)   # saliency scores, Grad Mult
            clip (train.grad_clip); optimizer.step(); scheduler.step()
        measures = validation + the epoch's cost measures
        method.distributed_sync(model, epoch)              # DDP only: e.g. all-reduce the scores
        changes = method.on_epoch_end(model, epoch, loader, measures)   # Rep / Dep / re-expand
        method.sync_optimizer(optimizer, model, changes)   # only when something changed
        measures |= method.epoch_measures(epoch)           # names from repsearch.measures
    deployed = method.deploy(model); method.artifacts(out_dir); method.final_measures()

``state_dict()`` / ``load_state_dict()`` carry the method's own state (not the model's) for
checkpoints: plain tensors and JSON-able values only, so that ``torch.load(weights_only=True)``
reads them back. Resuming a checkpoint (:mod:`repsearch.checkpoint`) runs, on the plain model::

    model = method.prepare(model, loader)                  # the method's own set-up
    model = method.restore_structure(model, structure)     # the recorded structure (``structure()``)
    model.load_state_dict(saved, strict=True); method.load_state_dict(saved_method_state)

A method is registered with :func:`register_method` in its own module under ``repsearch/methods/``
together with its recipe section (a :class:`repsearch.schema.MethodSpecModel` subclass): adding a
method touches that one file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from repsearch import optim
from repsearch.rep import apply_structure, restore_attach_rates, structure_shape
from repsearch.rep import deploy as rep_deploy
from repsearch.rep import structure as rep_structure

log = logging.getLogger(__name__)

#: What ``on_epoch_end`` may ask the optimizer to forget: nothing, the state of the parameters it
#: changed in place (``EpochChanges.changed``), or every parameter's state.
ResetPolicy = Literal["none", "changed", "all"]


@dataclass
class EpochChanges:
    """What a method changed at the end of an epoch (returned by :meth:`Method.on_epoch_end`).

    Attributes:
        structure_changed: modules were added, removed or replaced (Rep, Dep, re-expansion): the
            optimizer's param groups must be rebuilt and the cost measures recounted.
        reset_optimizer: ``none`` (surviving parameters keep their state, e.g. momentum; DyRep's
            official code), ``changed`` (forget the state of ``changed``), ``all`` (forget every
            parameter's state, as a new optimizer would: RepAn's official code every cycle).
        changed: parameters whose values the method rewrote in place (e.g. a fused kernel kept in
            the conv's own Parameter); only read when ``reset_optimizer == "changed"``.
    """

    structure_changed: bool = False
    reset_optimizer: ResetPolicy = "none"
    changed: list[nn.Parameter] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.structure_changed or self.reset_optimizer != "none"


#: Name -> method class; filled by :func:`register_method` when ``repsearch.methods`` is imported.
METHODS: dict[str, type["Method"]] = {}


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: register a method under ``cls.Spec``'s ``name`` literal.

    The class must define ``Spec``, a :class:`repsearch.schema.MethodSpecModel` subclass whose
    ``name`` field defaults to the method's name (the ``method.name`` of recipes).

    Raises:
        TypeError: no ``Spec`` or a ``Spec`` without a default ``name``.
        ValueError: the name is already registered by another class.
    """
    spec = getattr(cls, "Spec", None)
    name = getattr(spec, "model_fields", {}).get("name")
    if spec is None or name is None or not isinstance(name.default, str):
        raise TypeError(f"{cls.__name__}: a method needs a Spec class with a default name")
    key = name.default
    if key in METHODS and METHODS[key] is not cls:
        raise ValueError(f"method {key!r} is already registered by {METHODS[key].__name__}")
    cls.name = key
    METHODS[key] = cls
    return cls


class Method:
    """Base class: the plain training of the origin model; subclasses override what they change.

    Args:
        spec: the recipe's ``method`` section (a pydantic model, ``cls.Spec``).
        recipe: the trial's whole :class:`repsearch.spec.Recipe` (None in unit tests).
        device: where the model trains (``cpu``, ``cuda``, ``cuda:N``).
        label_smoothing: ε of the cross-entropy; default ``recipe.train.label_smoothing`` or 0.
        seed: the trial's seed; default ``recipe.seed`` or 0.

    Attributes:
        events: structural events (dicts: ``epoch`` (from 1; 0 = before training), ``kind``
            ('rep', 'dep', 'expand', ...), ``path``, ...), written to ``events.json``.
    """

    name = "base"
    Spec: type = None  # type: ignore[assignment]

    def __init__(
        self,
        spec: Any,
        *,
        recipe: Any = None,
        device: str | torch.device = "cpu",
        label_smoothing: Optional[float] = None,
        seed: Optional[int] = None,
    ):
        self.spec = spec
        self.recipe = recipe
        self.device = torch.device(device)
        if label_smoothing is None:
            label_smoothing = recipe.train.label_smoothing if recipe is not None else 0.0
        if seed is None:
            seed = recipe.seed if recipe is not None else 0
        self.label_smoothing = float(label_smoothing)
        self.seed = int(seed)
        self.events: list[dict] = []
        #: the trial's DDP process group (:class:`repsearch.distributed.DistContext`), set by the
        #: Trainer; None when the trial trains in one process.
        self.dist: Any = None

    # -- structure -------------------------------------------------------------------------
    def prepare(self, model: nn.Module, loader: Iterable) -> nn.Module:
        """Return the training-time model built from the plain ``model`` (default: unchanged)."""
        return model

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Called before the first step of ``epoch`` (from 1); e.g. set a per-epoch attach rate."""

    def on_epoch_end(self, model: nn.Module, epoch: int, loader: Iterable, measures: dict[str, float]) -> EpochChanges:
        """Called after ``epoch``'s validation with that epoch's measures (``val/top1`` included);
        may change the structure or the weights. Returns what changed (default: nothing)."""
        return EpochChanges()

    def deploy(self, model: nn.Module) -> nn.Module:
        """The inference model: every block fused, exactly the origin architecture (DESIGN.md)."""
        return rep_deploy(model)

    def structure(self, model: nn.Module) -> dict:
        """JSON-able description of the training-time structure (``structure.json``, checkpoints)."""
        return rep_structure(model)

    def restore_structure(self, model: nn.Module, structure: dict) -> nn.Module:
        """Give ``model`` — the plain model after :meth:`prepare` — the structure recorded by
        :meth:`structure` in a checkpoint, before its state_dict is loaded (weights are irrelevant
        here: they are overwritten). Default: nothing when :meth:`prepare` built that structure
        already (static, RepAn, RepOpt: λ values aside); RepBlocks grown on a model that
        :meth:`prepare` left without blocks (DyRep) are rebuilt with
        :func:`repsearch.rep.apply_structure` (branch kinds, nesting, ``origin_bias``); then every
        recorded attach rate λ is set (:func:`repsearch.rep.restore_attach_rates`). Returns the model.

        Raises:
            ValueError: :meth:`prepare` built blocks that differ from the recorded ones (a method
                whose structure changes otherwise overrides this hook), or the recorded RepBlocks
                cannot be rebuilt on this model.
        """
        current = rep_structure(model)
        if structure_shape(current) != structure_shape(structure):
            if current:
                raise ValueError(
                    f"method {self.name}: prepare() built {len(current)} blocks that differ from the "
                    f"{len(structure)} recorded ones"
                )
            apply_structure(model, structure, gamma_init=1.0)
        restore_attach_rates(model, structure)
        return model

    # -- optimisation ----------------------------------------------------------------------
    def optimizer(self, model: nn.Module, train_spec) -> torch.optim.Optimizer:
        """Default: ``train.optimizer`` (SGD or AdamW) with ``decay``/``no_decay`` groups
        (:func:`repsearch.optim.build_optimizer`)."""
        return optim.build_optimizer(model, train_spec)

    def scheduler(self, optimizer: torch.optim.Optimizer, train_spec, steps_per_epoch: int):
        """Default: per-step cosine with linear warm-up (:func:`repsearch.optim.cosine_warmup`)."""
        return optim.cosine_warmup(optimizer, train_spec, steps_per_epoch)

    def sync_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module, changes: EpochChanges) -> dict:
        """Bring ``optimizer`` in step with ``model`` after ``changes`` (called only when something
        changed). Default: the ``decay``/``no_decay`` groups are updated in place
        (:func:`repsearch.optim.sync_param_groups`: surviving parameters keep their state, removed
        ones lose it, new ones start empty, the LR schedule continues), then the state asked by
        ``changes.reset_optimizer`` is dropped. Returns counts for the log.

        Raises:
            ValueError: the optimizer's groups are not ``decay``/``no_decay`` (a method with other
                groups overrides this hook).
        """
        counts = {"added": 0, "removed": 0, "reset": 0}
        if changes.structure_changed:
            # the split rule the groups were built with (repsearch.optim stores it in each group)
            wd_on_norm = optimizer.param_groups[0].get("wd_on_norm")
            if wd_on_norm is None:
                wd_on_norm = self.recipe.train.wd_on_norm if self.recipe is not None else True
            counts.update(optim.sync_param_groups(optimizer, model, wd_on_norm))
        counts["reset"] = optim.reset_state(optimizer, changes.reset_optimizer, changes.changed)
        return counts

    def loss(self, logits: torch.Tensor, target: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with label smoothing. Shapes: logits (B, classes), target (B,) int64; returns a 0-dim tensor."""
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def fp32_gradients(self, epoch: int) -> bool:
        """True when the training steps of ``epoch`` (from 1) must run in exact fp32 (no bf16
        autocast, no TF32) because the method reads gradients whose signal is below those
        precisions (default False)."""
        return False

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Called after ``loss.backward()`` and before gradient clipping and ``optimizer.step()``
        (step counts from 0 over the whole run). Must not synchronise with the host."""

    # -- DDP (repsearch.distributed) ---------------------------------------------------------
    def distributed_sync(self, model: nn.Module, epoch: int) -> None:
        """Called on every rank of a DDP trial right before :meth:`on_epoch_end` of ``epoch``: make
        the state a decision reads the same on every rank, with as few collectives as possible
        (DyRep: its saliency sums, all-reduced once per adjustment). Default: nothing (a method
        whose decisions read only parameters, identical on every rank under DDP)."""

    def agree(self, decision: Any) -> Any:
        """Rank 0's ``decision`` (any picklable value) on every rank of a DDP trial, so that every
        rank applies the same structure change; ``decision`` itself in one process. Every rank must
        call it at the same point (a collective; a rank that does not blocks the others until the
        group's timeout, :data:`repsearch.distributed.TIMEOUT_S`)."""
        from repsearch.distributed import broadcast_object

        return broadcast_object(decision, self.dist)

    # -- measures, artifacts, state -------------------------------------------------------------
    def epoch_measures(self, epoch: int) -> dict[str, float]:
        """Method measures of ``epoch`` merged into the per-epoch metrics; every name must be
        registered in :mod:`repsearch.measures` (default: none)."""
        return {}

    def final_measures(self) -> dict[str, Any]:
        """Method-level results at the end of the trial: numbers become metrics (registered names),
        anything else becomes a tag (default: none)."""
        return {}

    def artifacts(self, out_dir: Path) -> list[Path]:
        """Write method-specific files into ``out_dir`` and return their paths (default: none);
        ``events.json`` and ``structure.json`` are written by the trial for every method."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """The method's own state for a checkpoint (plain tensors and JSON-able values only)."""
        return {"events": list(self.events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; call it after :meth:`prepare` and
        :meth:`restore_structure` on the restored model (its weights loaded)."""
        self.events = list(state.get("events", []))
