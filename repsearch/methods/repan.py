"""RepAn (Fei et al., CVPR 2024): re-parameterization annealing — training as cycles of cyclic cosine
annealing (SGDR) where every cycle boundary fuses the multi-branch model into its plain convs and
re-expands it with fresh branches; the attach rate λ weighs the fresh branches.

Algorithm (RepAn supplementary §1.1, §1.2, §2.1 and Eq. 1, 5; METHODS.md "RepAn" and "What the
official implementations do → RepAn" for what xfey/RepAn's code does):

- ``train.epochs = cycles × epochs_per_cycle`` (a mismatch is a recipe error). Each cycle has its own
  cosine LR schedule from ``train.lr × cycle_lr_decay^(c(c+1)/2)`` (cycle c counted from 0: the
  official code multiplies its base LR by ``decay^c`` at the start of cycle c, compounding) down to
  ``train.min_lr`` (scaled alike); the LR warm-up ``train.warmup_epochs`` runs in the first cycle only.
- Start (``prepare``): every square K > 1 conv of the model becomes a :class:`~repsearch.rep.RepBlock`
  with the eligible branches of ``space`` (RepVGG's {kxk, 1x1, identity} by default), λ on.
- Block form — a known difference from the official RepVGG code: repsearch keeps the model's own BN
  AFTER the sum of the branches, ``BN(kxk + λ·Σ others)`` (the DBB/DyRep form; each branch has its
  own BN inside too), where xfey/RepAn's ``net/repvgg_cifar.py`` block is ``ReLU(x3 + λ(x1 + x0))``
  with no BN after the sum (the inherited BN ``bn_3`` sits inside the 3x3 branch). Both fuse
  losslessly into one conv, but during training the model BN here also normalises the λ-weighted
  branches (and freezing it, below, also freezes their output scale). The static baseline's
  ``post_bn: absorb`` (:mod:`repsearch.methods.static`) trains the official form; RepAn does not.
- Every epoch start: λ of every block from ``attach_schedule`` with ``w = attach_warmup`` epochs and
  ``e`` the 0-based epoch within the cycle:
  ``paper`` λ = min((e+1)/(w+1), 1) (supplementary Eq. 5 prints max; min is the only reading that
  "restores λ to 1.0"); ``official_cifar`` λ = 1 at e = 0, then min((e+1)/w, 1) — this follows the
  official code, xfey/RepAn ``tools/cycle/cycle_repvgg_cifar.py`` (``if cur_epoch > 0:
  set_attach_rate(min((cur_epoch + 1) / WARMUP, 1))``, λ left at 1 in epoch 0), not the min(e/w, 1)
  of the issue text, because this option exists to reproduce the official code's training;
  ``constant`` λ ≡ 1 (``tools/cycle/cycle_repvgg_img.py``, where the ramp is commented out).
- Cycle end: with ``carry: best_val`` the cycle's best validation-top-1 weights are restored,
  TOGETHER with the λ they were validated with (λ is a non-persistent buffer, not in
  ``state_dict()``: it is kept with the snapshot and set on every block), so that what is fused or
  deployed is the validated model (the official code carries the best checkpoint of a cycle chosen
  on the TEST set; repsearch chooses on the validation split, never on test). In the last cycle the
  restored epoch's ``val/top1`` and ``val/loss`` become the trial's final ones
  (:meth:`RepAn.final_measures`), as deploy, test and INT8 measure the restored weights.
- Cycle boundary (end of every cycle but the last), after the restore: every block is fused
  losslessly into its conv (the conv's own ``Parameter`` is kept; the fused bias goes into the
  following BN's running mean) and re-expanded with freshly initialised branches:

  * ``function_preserving`` (default): new branches' last-BN γ = 0, β = 0, so the re-expanded model's
    eval output equals the fused model's whatever λ (tested), and its train-mode output too up to
    BN's ε (the ``kxk`` branch's reset BN is followed by the model's own BN);
  * ``official``: new convs U(±0.1/√C_out), every new BN γ = 1, β = 0, BN running statistics carried
    over from the same kind of branch of the previous cycle — not function-preserving (as the
    official code, whose first-epoch λ is 1: use ``attach_schedule: official_cifar`` for that too).
    Difference kept: the inherited ``kxk`` branch restarts with an identity BN (γ = 1), where the
    official RepVGG code keeps its trained γ and statistics and divides the kernel by γ/σ.

  The probe batch of the boundary's error measures is the first batch of the loader's current epoch
  taken with ``loader.batches()`` (:class:`repsearch.data.DeviceLoader`: no epoch counter advanced).
  The optimizer's state is dropped at every boundary (the official code builds a new optimizer every
  cycle): ``EpochChanges(structure_changed=True, reset_optimizer="all")``.
- ``freeze_inherited_during_warmup`` (official ``cycle_repvgg_cifar.py``: ``freeze_conv3_grad()``
  while ``cur_epoch < WARMUP``, which zeroes the gradients of ``conv_3`` and ``bn_3``, the inherited
  conv and its BN): during the first ``attach_warmup`` epochs of every cycle that starts from trained
  weights (cycles 2, 3, ...; cycle 1 too with ``model.init_from``) the gradients of each block's
  ``kxk`` conv, of its (reset) BN and of the model BN that follows the block (the inherited BN in
  repsearch's layout; found with :func:`repsearch.rep.conv_bn_pairs` once per structure change) are
  dropped (``grad = None``: no step, no weight decay, as ``zero_grad()`` in the official code). The
  running statistics of those BNs still update in train mode, as in the official code.
- Knowledge distillation (``kd``, default off; the official code always distils): loss
  ``α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y)`` (``runner/criterion.py``); the teacher is
  a repsearch ``deployed.pt`` (path or MLflow run id), run in eval mode under ``no_grad``: its forward
  is inside the training steps, so it is counted in ``cost_gpu_hours``, but it is not part of the
  model, so not in ``flops_m``.
- Pruning is rejected (``sweep.pruner`` must be ``none``): ``val/top1`` drops at every LR restart and
  repsearch's sweep reports every epoch to the pruner, which would prune RepAn trials at their
  restarts.

Measures: per epoch ``attach_rate`` and ``cycle``; at every cycle end ``repan/cycle_val_top1``
(validation top-1 of the weights the cycle carries); at every boundary ``repan/fuse_max_abs_err``
(fused vs multi-branch model, eval-mode logits on one training batch) and
``repan/expand_max_abs_err`` (re-expanded vs fused); at the end ``repan/carried_epoch`` (the epoch
whose weights are deployed) and, when the last cycle restored a snapshot, that epoch's ``val/top1``
and ``val/loss`` in place of the last epoch's.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator
from torch import nn

from repsearch.deployed import check_deployed_ref, load_deployed, resolve_deployed
from repsearch.errors import UserError
from repsearch.measures import register_measure
from repsearch.methods.base import EpochChanges, Method, register_method
from repsearch.rep.block import RepBlock, eligible_branches
from repsearch.rep.surgery import candidate_convs, collapse, conv_bn_pairs, expand, repblocks
from repsearch.schema import MethodSpecModel, SpecModel, check_space
from repsearch.spaces import resolve_space

log = logging.getLogger(__name__)

register_measure("attach_rate", "1", "RepAn: attach rate λ of the epoch (weight of the re-expanded branches)", "epoch", False)
register_measure("cycle", "count", "RepAn: cycle of the epoch (from 1)", "epoch", False)
register_measure(
    "repan/cycle_val_top1", "%", "RepAn: validation top-1 of the weights a cycle carries, at the cycle's end", "epoch", True
)
register_measure(
    "repan/fuse_max_abs_err", "logit", "RepAn: max |fused - multi-branch| eval logits at a cycle boundary", "epoch", False
)
register_measure(
    "repan/expand_max_abs_err", "logit", "RepAn: max |re-expanded - fused| eval logits at a cycle boundary", "epoch", False
)
register_measure(
    "repan/carried_epoch", "epoch", "RepAn: epoch (from 1) whose weights the last cycle carries to deploy", "final", False
)


AttachSchedule = Literal["paper", "official_cifar", "constant"]


# ------------------------------------------------------------------------------------ schedules
def attach_rate(schedule: str, epoch_in_cycle: int, warmup: int) -> float:
    """λ of one epoch (RepAn supplementary Eq. 5; official xfey/RepAn ``tools/cycle/cycle_*_cifar.py``).

    Args:
        schedule: ``paper`` — min((e+1)/(w+1), 1) (Eq. 5 read with min); ``official_cifar`` — 1 at
            e = 0, then min((e+1)/w, 1): what the official ``tools/cycle/cycle_repvgg_cifar.py``
            does (``if cur_epoch > 0: set_attach_rate(min((cur_epoch + 1) / WARMUP, 1))``), followed
            rather than the min(e/w, 1) of the issue text because this option reproduces the
            official code; ``constant`` — 1 (``tools/cycle/cycle_repvgg_img.py``).
        epoch_in_cycle: e, the 0-based epoch within the cycle.
        warmup: w, ``method.attach_warmup`` in epochs (0: λ ≡ 1).

    Returns:
        λ in (0, 1] (dimensionless).

    Raises:
        ValueError: unknown schedule or a negative epoch/warm-up.
    """
    e, w = int(epoch_in_cycle), int(warmup)
    if e < 0 or w < 0:
        raise ValueError(f"epoch_in_cycle ({e}) and warmup ({w}) must be >= 0")
    if schedule == "constant" or w == 0:
        if schedule not in ("paper", "official_cifar", "constant"):
            raise ValueError(f"unknown attach schedule {schedule!r}; one of paper, official_cifar, constant")
        return 1.0
    if schedule == "paper":
        return min((e + 1) / (w + 1), 1.0)
    if schedule == "official_cifar":
        return 1.0 if e == 0 else min((e + 1) / w, 1.0)
    raise ValueError(f"unknown attach schedule {schedule!r}; one of paper, official_cifar, constant")


def cycle_lr_factor(cycle: int, decay: float) -> float:
    """Peak-LR factor (dimensionless) of cycle ``cycle`` (a count from 0): ``decay^(c(c+1)/2)``.

    Source: official ``tools/cycle/cycle_repvgg_cifar.py`` sets ``BASE_LR *= LR_DECAY**c`` at the
    start of cycle c, compounding. Raises nothing (``decay`` is validated by :class:`RepAnSpec`).
    """
    return float(decay) ** (cycle * (cycle + 1) / 2)


def official_uniform(conv: nn.Conv2d) -> None:
    """RepAn's init of re-expanded branch convs (a :data:`repsearch.rep.ConvInit`): ``W ~ U(±0.1/√n)``
    with n = C_out (``conv.weight.size(0)``; weight shape ``(C_out, C_in/groups, K, K)``), in place,
    from the global RNG. Raises nothing.

    Source: official ``init_branch_weights`` of the RepVGG, DBB and ACB blocks (xfey/RepAn ``net/``).
    """
    bound = 0.1 / math.sqrt(conv.weight.shape[0])
    nn.init.uniform_(conv.weight, -bound, bound)


# ---------------------------------------------------------------------------------- recipe section
class KDSpec(SpecModel):
    """Knowledge distillation of RepAn's official code (``runner/criterion.py``: α·T²·KL + (1−α)·CE;
    RepVGG on CIFAR: α 0.9, T 10). ``teacher``: a repsearch ``deployed.pt`` path or the MLflow run
    id of a finished repsearch trial (train the teacher with repsearch first); ``alpha`` in [0, 1]
    (dimensionless), ``temperature`` T > 0 (dimensionless).

    Raises:
        pydantic.ValidationError (a one-line recipe error): an empty or malformed ``teacher``
            reference, ``alpha`` outside [0, 1], ``temperature`` <= 0.
    """

    teacher: str
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    temperature: PositiveFloat = 10.0

    _teacher = field_validator("teacher")(classmethod(lambda cls, v: check_deployed_ref(v)))


class RepAnSpec(MethodSpecModel):
    """RepAn (CVPR 2024) as the module docstring describes it.

    Units: ``epochs_per_cycle`` and ``attach_warmup`` in epochs (``attach_warmup`` is λ's warm-up,
    not ``train.warmup_epochs``, the LR warm-up); ``cycles`` a count (``train.epochs`` must equal
    ``cycles × epochs_per_cycle``). ``cycle_lr_decay`` multiplies the peak LR per cycle, compounding
    (1 = off). Defaults: the supplementary's CIFAR setting (30 epochs per cycle, up to 5 cycles,
    λ warm-up 5 epochs, RepVGG branches), with the official code's extras (KD, freezing, official
    re-expansion) off. Field meanings: ``space`` a space name or list of branch kinds
    (:mod:`repsearch.spaces`); ``reexpand``, ``attach_schedule``, ``freeze_inherited_during_warmup``,
    ``carry``, ``kd`` as the module docstring. Source: RepAn supplementary §1.2, §2.1 (CIFAR setting).

    Raises:
        pydantic.ValidationError (a one-line recipe error): a non-positive count, ``cycle_lr_decay``
            outside (0, 1], an unknown option or space; cross-section errors in :meth:`check_recipe`.
    """

    name: Literal["repan"] = "repan"
    cycles: PositiveInt = 5
    epochs_per_cycle: PositiveInt = 30
    space: Union[str, list[str]] = "repvgg"
    reexpand: Literal["function_preserving", "official"] = "function_preserving"
    attach_schedule: AttachSchedule = "paper"
    attach_warmup: NonNegativeInt = 5
    cycle_lr_decay: float = Field(1.0, gt=0.0, le=1.0)
    freeze_inherited_during_warmup: bool = False
    carry: Literal["last", "best_val"] = "last"
    kd: Optional[KDSpec] = None

    _space = field_validator("space")(classmethod(lambda cls, v: check_space(v)))

    def check_recipe(self, recipe) -> None:
        """Cross-section checks (called by the Recipe's validation; one line each).

        Raises:
            ValueError: ``attach_warmup >= epochs_per_cycle``; ``train.epochs != cycles ×
                epochs_per_cycle``; ``train.warmup_epochs >= epochs_per_cycle``; a pruner
                (``val/top1`` drops at every LR restart); a space that gives no conv of the model a
                branch beyond ``kxk``; a teacher file that is missing or does not fit the dataset.
        """
        epc = self.epochs_per_cycle
        if self.attach_warmup >= epc:
            raise ValueError(
                f"method.attach_warmup ({self.attach_warmup}) must be smaller than method.epochs_per_cycle ({epc})"
            )
        if recipe.train.epochs != self.cycles * epc:
            raise ValueError(
                f"train.epochs ({recipe.train.epochs}) must equal method.cycles x method.epochs_per_cycle "
                f"({self.cycles} x {epc} = {self.cycles * epc})"
            )
        if recipe.train.warmup_epochs >= epc:
            raise ValueError(
                f"train.warmup_epochs ({recipe.train.warmup_epochs}) must be smaller than method.epochs_per_cycle ({epc})"
            )
        if recipe.sweep is not None and recipe.sweep.pruner != "none":
            raise ValueError(
                f"sweep.pruner: '{recipe.sweep.pruner}' cannot be used with RepAn (val/top1 drops at every LR "
                "restart and the sweep reports every epoch); use pruner: none"
            )
        _check_space_fits_model(self.space, recipe)
        if self.kd is not None:
            from repsearch.data import NUM_CLASSES

            path = Path(self.kd.teacher).expanduser()
            if path.is_file():  # a run id is checked when the trial starts
                try:
                    load_deployed(path, "cpu", NUM_CLASSES.get(recipe.data.dataset))
                except UserError as exc:
                    raise ValueError(f"method.kd.teacher: {exc}") from None

    def dependencies(self) -> dict[str, str]:
        """A teacher given by MLflow run id is resolved by the parent before the study is named
        (:mod:`repsearch.dependencies`): its ``deployed.pt`` is downloaded from the study's own
        MLflow store, checked like a teacher file, and ``kd.teacher`` becomes the local path."""
        from repsearch.deployed import RUN_ID

        t = self.kd.teacher if self.kd is not None else None
        if t is not None and RUN_ID.match(t) and not Path(t).expanduser().exists():
            return {"kd.teacher": "deployed.pt"}
        return {}

    def resolved(self, field: str, run_id: Optional[str], path: str, sha256: str) -> dict[str, Any]:
        """``kd.teacher`` becomes the downloaded file (the hash then covers its path under
        ``runs/deps/<run id>/``, the same on every re-run)."""
        return {"kd.teacher": path}

    def check_resolved(self, recipe) -> None:
        """After resolution: the teacher file fits the dataset (one line otherwise).

        Raises:
            repsearch.errors.UserError: unreadable, not a deployed model, another number of classes.
        """
        if self.kd is not None and Path(self.kd.teacher).expanduser().is_file():
            from repsearch.data import NUM_CLASSES

            load_deployed(Path(self.kd.teacher).expanduser(), "cpu", NUM_CLASSES.get(recipe.data.dataset))


def _check_space_fits_model(space: Union[str, list[str]], recipe: Any) -> None:
    """A space that leaves no branch beyond ``kxk`` on every candidate conv is a recipe error
    (DESIGN.md "Operation spaces"). The model is built on the meta device (no memory, no init cost).

    Raises:
        ValueError: naming the space, the model and its convs' geometry problem.
    """
    from repsearch.models import build_model

    kinds = resolve_space(space)
    try:
        with torch.device("meta"):
            model = build_model(recipe.model.name, 10, recipe.model.width, **recipe.model.options)
    except Exception as exc:  # the model section reports its own errors; do not mask them here
        log.debug("space check skipped: %s", exc)
        return
    convs = candidate_convs(model, max_depth=1)
    if not any(eligible_branches(c, kinds)[0] for c in convs.values()):
        raise ValueError(
            f"method.space: {space!r} gives no conv of {recipe.model.name} a branch beyond kxk "
            f"({len(convs)} square K>1 convs; e.g. identity needs C_in = C_out and stride 1)"
        )


# ------------------------------------------------------------------------------------- the method
@dataclass
class _Snapshot:
    """The best validated state of the current cycle (``carry: best_val``)."""

    val_top1: float  # %
    val_loss: float  # nats
    epoch: int  # from 1
    state: dict[str, torch.Tensor]  # model.state_dict() clone (λ is not in it)
    lams: dict[str, Optional[float]]  # block path -> attach rate λ the epoch was validated with


@register_method
class RepAn(Method):
    """RepAn's training-time hooks (see the module docstring for the algorithm and its sources:
    RepAn supplementary §1.1, §1.2, Eq. 1, 5; xfey/RepAn ``tools/cycle/``).

    Args: as :class:`repsearch.methods.base.Method` (``spec`` a :class:`RepAnSpec`).

    Attributes:
        cycle_vals: validation top-1 (%) of the weights each finished cycle carries.
        teacher: the KD teacher (eval mode, frozen) or None.

    Events (``self.events``, written to ``events.json``): ``expand`` (epoch 0, per conv),
    ``carry`` (cycle end with ``carry: best_val``: the epoch restored, its val/top1 and λ),
    ``boundary`` (epoch, cycle, number of blocks fused and re-expanded, the two errors).

    Raises:
        UserError: from :meth:`prepare` when the KD teacher cannot be loaded.
    """

    Spec = RepAnSpec

    def __init__(self, spec, **kwargs):
        super().__init__(spec, **kwargs)
        self.kinds = resolve_space(spec.space)
        self.teacher: Optional[nn.Module] = None
        self._lam = 1.0
        self._measures: dict[str, float] = {}
        self._best: Optional[_Snapshot] = None
        self._final: dict[str, float] = {}
        self.cycle_vals: list[float] = []
        self._frozen: list[nn.Parameter] = []
        self._following_bn: Optional[dict[str, nn.BatchNorm2d]] = None  # None: recompute (structure changed)
        init_from = getattr(getattr(self.recipe, "model", None), "init_from", None)
        self._pretrained = bool(init_from)

    # -- bookkeeping --------------------------------------------------------------------------
    def cycle_of(self, epoch: int) -> tuple[int, int]:
        """``(cycle, e)`` of ``epoch`` (from 1): cycle a count from 0, e the 0-based epoch within
        it (units: epochs). Raises nothing."""
        return (epoch - 1) // self.spec.epochs_per_cycle, (epoch - 1) % self.spec.epochs_per_cycle

    def is_cycle_end(self, epoch: int) -> bool:
        """True at the last epoch (from 1) of a cycle. Raises nothing."""
        return epoch % self.spec.epochs_per_cycle == 0

    def is_boundary(self, epoch: int) -> bool:
        """True at the end (epoch from 1) of every cycle but the last: fuse and re-expand after this
        epoch. Raises nothing."""
        return self.is_cycle_end(epoch) and epoch < self.spec.cycles * self.spec.epochs_per_cycle

    def _blocks(self, model: nn.Module) -> dict[str, RepBlock]:
        """Top-level blocks (RepAn grows the model's own convs only)."""
        all_blocks = repblocks(model)
        return {p: b for p, b in all_blocks.items() if not any(p.startswith(q + ".") for q in all_blocks if q != p)}

    def _init(self) -> tuple[float, Any]:
        """``(gamma_init, conv_init)`` of new branches for the re-expansion mode."""
        return (0.0, official_uniform) if self.spec.reexpand == "function_preserving" else (1.0, official_uniform)

    def _expand_all(self, model: nn.Module, epoch: int, lam: float, stats: Optional[dict] = None) -> int:
        gamma, conv_init = self._init()
        n = 0
        for path, conv in list(candidate_convs(model, max_depth=1).items()):
            if not eligible_branches(conv, self.kinds)[0]:
                continue
            block, added, skipped = expand(model, path, self.kinds, gamma_init=gamma, conv_init=conv_init)
            block.set_attach_rate(lam)
            if stats and path in stats:
                _load_branch_stats(block, stats[path])
            n += 1
            if epoch == 0:
                self.events.append({"epoch": 0, "kind": "expand", "path": path, "added": list(added), "skipped": dict(skipped)})
        self._following_bn = None  # the structure changed
        return n

    # -- structure ----------------------------------------------------------------------------
    def prepare(self, model: nn.Module, loader: Iterable) -> nn.Module:
        """Expand every eligible square K > 1 conv with ``space`` (same init as a re-expansion, λ of
        a cycle's epoch 0) and load the KD teacher if any. ``loader`` is not read. Returns ``model``
        (changed in place). Source: RepAn supplementary §1.1.

        Raises:
            UserError: the teacher cannot be found or does not fit (see :func:`load_deployed`).
        """
        device = next(model.parameters()).device
        self._expand_all(model, 0, attach_rate(self.spec.attach_schedule, 0, self.spec.attach_warmup))
        if self.spec.kd is not None and self.teacher is None:
            self.teacher = self._load_teacher(device)
        return model

    def _load_teacher(self, device: torch.device) -> nn.Module:
        from repsearch.data import NUM_CLASSES

        n = NUM_CLASSES.get(self.recipe.data.dataset) if self.recipe is not None else None
        with tempfile.TemporaryDirectory(prefix="repan-teacher-") as tmp:
            path = resolve_deployed(self.spec.kd.teacher, self.recipe, Path(tmp))
            teacher, _ = load_deployed(path, device, n)
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Set λ (dimensionless) of every block for ``epoch`` (from 1) from ``attach_schedule``
        (supplementary Eq. 5 / official ``cycle_*_cifar.py``) and choose the parameters frozen this
        epoch (``freeze_inherited_during_warmup``). Raises nothing."""
        _, e = self.cycle_of(epoch)
        self._lam = attach_rate(self.spec.attach_schedule, e, self.spec.attach_warmup)
        for block in self._blocks(model).values():
            block.set_attach_rate(self._lam)
        self._measures = {}
        self._frozen = self._freeze_params(model, epoch)

    def _freeze_params(self, model: nn.Module, epoch: int) -> list[nn.Parameter]:
        """The parameters whose gradients ``after_backward`` drops this epoch: each block's ``kxk``
        conv and BN and the model BN that follows the block (the inherited BN)."""
        if not self.spec.freeze_inherited_during_warmup:
            return []
        cycle, e = self.cycle_of(epoch)
        if e >= self.spec.attach_warmup or (cycle == 0 and not self._pretrained):
            return []
        blocks = self._blocks(model)
        if self._following_bn is None:  # once per structure change (fx tracing is not free)
            modules = dict(model.named_modules())
            self._following_bn = {
                conv: modules[bn] for conv, bn in conv_bn_pairs(model) if conv in blocks and isinstance(modules.get(bn), nn.BatchNorm2d)
            }
        params = [p for b in blocks.values() for p in b.kxk.parameters()]
        params += [p for path in blocks if path in self._following_bn for p in self._following_bn[path].parameters()]
        return params

    def after_backward(self, model: nn.Module, step: int) -> None:
        """During a cycle's λ warm-up with ``freeze_inherited_during_warmup``: drop the inherited
        ``kxk`` branches' and their following BNs' gradients (``grad = None``; no host sync;
        official ``freeze_conv3_grad``). ``step`` counts optimizer steps from 0. Raises nothing."""
        for p in self._frozen:
            p.grad = None

    def on_epoch_end(self, model: nn.Module, epoch: int, loader: Iterable, measures: dict | None = None) -> EpochChanges:
        """Track the cycle's best validation weights (``carry: best_val``); at a cycle end restore
        them with their λ and record ``repan/cycle_val_top1``; at a boundary fuse and re-expand every
        block and reset the optimizer state (``reset_optimizer="all"``).

        Args:
            model: the training-time model.
            epoch: the epoch just validated (from 1).
            loader: the training loader (the boundary's probe batch, see :meth:`boundary`).
            measures: the epoch's measures; ``val/top1`` (%) and ``val/loss`` (nats) are read.

        Returns:
            :class:`EpochChanges`: structure changed + ``all`` at a boundary; ``all`` when a last
            cycle restored earlier weights; nothing otherwise.

        Raises:
            RuntimeError: a snapshot no longer fits the model (a bug: the structure changes only at
                boundaries, after the restore).
        """
        measures = measures or {}
        val = float(measures.get("val/top1", float("nan")))
        val_loss = float(measures.get("val/loss", float("nan")))
        if self.spec.carry == "best_val" and math.isfinite(val) and (self._best is None or val > self._best.val_top1):
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            lams = {p: b.attach_rate for p, b in self._blocks(model).items()}
            self._best = _Snapshot(val, val_loss, epoch, state, lams)
        if not self.is_cycle_end(epoch):
            return EpochChanges()
        cycle, _ = self.cycle_of(epoch)
        carried, carried_loss, carried_epoch = val, val_loss, epoch
        changed = False
        if self.spec.carry == "best_val" and self._best is not None:
            best = self._best
            carried, carried_loss, carried_epoch = best.val_top1, best.val_loss, best.epoch
            if best.epoch != epoch:
                model.load_state_dict(best.state, strict=True)
                for path, block in self._blocks(model).items():
                    lam = best.lams.get(path)
                    if lam is not None:
                        block.set_attach_rate(lam)  # λ is not in state_dict(): the validated model needs it
                changed = True
            self.events.append(
                {"epoch": epoch, "kind": "carry", "cycle": cycle + 1, "from_epoch": best.epoch, "val_top1": carried,
                 "attach_rate": next(iter(best.lams.values()), None)}
            )
            self._best = None
        self.cycle_vals.append(carried)
        self._measures["repan/cycle_val_top1"] = carried
        if not self.is_boundary(epoch):
            # the last cycle: these weights are deployed, so their validation measures are the trial's
            self._final = {"repan/carried_epoch": float(carried_epoch)}
            if changed:
                self._final.update({"val/top1": carried, "val/loss": carried_loss})
            return EpochChanges(reset_optimizer="all" if changed else "none")
        self.boundary(model, epoch, loader)
        return EpochChanges(structure_changed=True, reset_optimizer="all")

    @torch.no_grad()
    def boundary(self, model: nn.Module, epoch: int, loader: Optional[Iterable]) -> dict[str, float]:
        """Fuse every block into its conv, then re-expand (the cycle boundary after ``epoch``, from 1;
        RepAn supplementary §1.1).

        The probe batch is the first batch of ``loader``'s current epoch, ``(B, 3, H, W)``, taken
        without side effects: ``loader.batches()`` when the loader has it
        (:class:`repsearch.data.DeviceLoader`), else ``next(iter(loader))``; none (no error
        measures) when ``loader`` is None or empty.

        Returns (and records as measures) ``repan/fuse_max_abs_err`` and ``repan/expand_max_abs_err``:
        max |Δ logits| in eval mode on the probe batch (logits ``(B, classes)``).

        Raises:
            RuntimeError: from :func:`repsearch.rep.collapse` / :func:`repsearch.rep.expand` when a
                block cannot be fused or re-expanded (a bug, not a user mistake).
        """
        was_training = model.training
        model.eval()
        x = _probe_batch(loader)
        y_multi = model(x).float() if x is not None else None
        stats: dict[str, dict] = {}
        blocks = self._blocks(model)
        for path in sorted(blocks, key=lambda p: -p.count(".")):
            block = blocks[path]
            if self.spec.reexpand == "official":
                stats[path] = _branch_stats(block)
            others = [k for k in block.kinds if k != "kxk"]
            block.remove_branches(others, absorb=True)
            collapse(model, path)  # the conv's Parameter kept; its bias folded into the following BN
        y_fused = model(x).float() if x is not None else None
        next_lam = attach_rate(self.spec.attach_schedule, 0, self.spec.attach_warmup)
        n = self._expand_all(model, epoch, next_lam, stats)
        y_exp = model(x).float() if x is not None else None
        model.train(was_training)
        out = {}
        if x is not None:
            out["repan/fuse_max_abs_err"] = (y_fused - y_multi).abs().max().item()
            out["repan/expand_max_abs_err"] = (y_exp - y_fused).abs().max().item()
        self._measures.update(out)
        self.events.append(
            {"epoch": epoch, "kind": "boundary", "cycle": self.cycle_of(epoch)[0] + 1, "fused": len(blocks), "expanded": n, **out}
        )
        log.info("epoch %d: RepAn boundary: %d blocks fused, %d re-expanded %s", epoch, len(blocks), n, out)
        return out

    # -- optimisation ---------------------------------------------------------------------------
    def scheduler(self, optimizer: torch.optim.Optimizer, train_spec, steps_per_epoch: int):
        """Per-step LR: a fresh cosine (SGDR, Loshchilov & Hutter 2017) in every cycle from
        ``lr × cycle_lr_factor(c)`` to ``min_lr × cycle_lr_factor(c)``; the linear warm-up of
        ``train.warmup_epochs`` (epochs) in the first cycle only. Stepped once per optimizer step
        (``steps_per_epoch`` steps an epoch). Returns a ``LambdaLR``. Raises nothing (the recipe
        checks ``warmup_epochs < epochs_per_cycle``)."""
        spe = max(1, int(steps_per_epoch))
        per_cycle = self.spec.epochs_per_cycle * spe
        warm = train_spec.warmup_epochs * spe
        floor = train_spec.min_lr / train_spec.lr
        decay = self.spec.cycle_lr_decay

        def factor(step: int) -> float:
            c, s = divmod(step, per_cycle)
            c = min(c, self.spec.cycles - 1)
            s = step - c * per_cycle
            peak = cycle_lr_factor(c, decay)
            w = warm if c == 0 else 0
            if s < w:
                return peak * (s + 1) / w
            t = (s - w) / max(1, per_cycle - w)
            return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t))))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """CE with label smoothing; with ``kd``: ``α·T²·KL(p_t ‖ p_s) + (1−α)·CE`` at temperature T
        (official ``runner/criterion.py`` ``KD_Loss``, KL ``batchmean``). Shapes: logits (B, classes),
        target (B,) int64, images (B, 3, H, W) (the teacher's input); returns a 0-dim tensor (nats).
        Raises nothing beyond torch's shape errors."""
        ce = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        if self.teacher is None:
            return ce
        kd = self.spec.kd
        with torch.no_grad():
            t_logits = self.teacher(images).float()
        T = kd.temperature
        kl = F.kl_div(F.log_softmax(logits / T, dim=1), F.log_softmax(t_logits / T, dim=1), reduction="batchmean", log_target=True)
        return kd.alpha * T * T * kl + (1.0 - kd.alpha) * ce

    # -- measures, state -----------------------------------------------------------------------
    def epoch_measures(self, epoch: int) -> dict[str, float]:
        """``attach_rate`` (the epoch's λ) and ``cycle`` (from 1) every epoch; ``repan/cycle_val_top1``
        (%) at cycle ends; ``repan/fuse_max_abs_err`` and ``repan/expand_max_abs_err`` (logits) at
        boundaries. Raises nothing."""
        out = {"attach_rate": self._lam, "cycle": float(self.cycle_of(epoch)[0] + 1)}
        out.update(self._measures)
        return out

    def final_measures(self) -> dict[str, float]:
        """``repan/carried_epoch`` (from 1: the epoch whose weights the last cycle deploys) and,
        when the last cycle restored an earlier epoch (``carry: best_val``), that epoch's
        ``val/top1`` (%) and ``val/loss`` (nats), which replace the last epoch's in the trial's
        final measures (``repsearch.trial.run_trial`` merges them over ``history[-1]``), so that the
        objective and the best-run pick describe the deployed weights. Empty before the last cycle
        ends. Raises nothing."""
        return dict(self._final)

    def state_dict(self) -> dict[str, Any]:
        """Events, the per-cycle validation top-1, λ, the final measures and, with ``carry:
        best_val``, the current cycle's best snapshot (its epoch, val/top1 (%), val/loss (nats),
        state_dict tensors and per-block λ), so a resumed cycle carries the same weights. Plain
        tensors and JSON-able values only. Raises nothing."""
        best = None
        if self._best is not None:
            b = self._best
            best = {"val_top1": b.val_top1, "val_loss": b.val_loss, "epoch": b.epoch,
                    "state": {k: v.detach().cpu() for k, v in b.state.items()}, "lams": dict(b.lams)}
        return {"events": list(self.events), "cycle_vals": list(self.cycle_vals), "lam": self._lam,
                "final": dict(self._final), "best": best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (missing keys take their defaults; the snapshot's tensors
        go to the method's device). Raises nothing."""
        self.events = list(state.get("events", []))
        self.cycle_vals = [float(v) for v in state.get("cycle_vals", [])]
        self._lam = float(state.get("lam", 1.0))
        self._final = {str(k): float(v) for k, v in state.get("final", {}).items()}
        best = state.get("best")
        self._best = None
        if best is not None:
            self._best = _Snapshot(
                float(best["val_top1"]), float(best["val_loss"]), int(best["epoch"]),
                {k: v.to(self.device) for k, v in best["state"].items()},
                {str(k): (None if v is None else float(v)) for k, v in best["lams"].items()},
            )


def _probe_batch(loader: Optional[Iterable]) -> Optional[torch.Tensor]:
    """Images ``(B, 3, H, W)`` of the first batch of ``loader``'s current epoch, without advancing
    its epoch counter (``DeviceLoader.batches``); None for no loader or an empty one."""
    if loader is None:
        return None
    per_epoch = getattr(loader, "batches", None)
    first = next(iter(per_epoch() if callable(per_epoch) else loader), None)
    return None if first is None else first[0]


def _bns(branch: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in branch.modules() if isinstance(m, nn.BatchNorm2d)]


def _branch_stats(block: RepBlock) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``{kind: [(running_mean, running_var) of every BN of the branch, module order]}`` for the
    non-``kxk`` branches (the official re-expansion carries them over)."""
    return {
        kind: [(bn.running_mean.clone(), bn.running_var.clone()) for bn in _bns(block.branches[kind])]
        for kind in block.kinds
        if kind != "kxk"
    }


@torch.no_grad()
def _load_branch_stats(block: RepBlock, stats: dict) -> None:
    for kind, saved in stats.items():
        if kind not in block.branches:
            continue
        bns = _bns(block.branches[kind])
        if len(bns) != len(saved):
            continue
        for bn, (mean, var) in zip(bns, saved):
            if bn.running_mean.shape == mean.shape:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
