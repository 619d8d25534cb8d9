"""DyRep (Huang et al., CVPR 2022): dynamic re-parameterization during training — Algorithm 1 as
METHODS.md settles it.

Every ``interval`` epochs (end of epoch e with e % interval == 0 and e <= grow_until, DESIGN.md DyRep
schedule contract):

1. **Rep** (§4.1): the candidate op (square K > 1 conv nested in fewer than ``max_depth`` blocks) with
   the largest saliency score averaged since the last adjustment is turned into a
   :class:`~repsearch.rep.RepBlock` with every eligible branch of the operation space; new branches
   are randomly initialised with last-BN γ = ``gamma_init`` (Fig. 4), β = 0.
2. The new branches' BN running statistics are re-calibrated on ``recal_batches`` training batches
   (cumulative average, no gradients, rest of the model in eval mode).
3. **Compensation** (Eq. 6): ``F_ori <- F_ori - Σ F_new`` so that the block equals the old op in eval
   mode exactly (up to floating-point rounding).
4. **Dep** (§4.2, Eq. 9-10 read as the official code does): for every block but the one just grown,
   branch importance ``s_j = mean|γ_last_j| / mean|γ_kxk|`` over its non-kxk branches; if the
   unbiased std of {s_j} exceeds ``dep_threshold`` (λ), every branch with ``s_j < mean`` and
   ``s_j < dep_floor`` is cut after folding its fused kernel into the kxk branch (Eq. 10,
   ``F_ori <- F_ori + F_j``), which leaves the eval-mode output unchanged. A block left with its kxk
   branch alone becomes a plain conv again. ``dep: false`` skips this step (DyRep Table 6, "w/o Dep").

Saliency scores (:mod:`repsearch.scoring`) accumulate on the device after every backward, with no
host sync per step; GraSP (and vote with grasp among its voters) probe ``probe_batches`` training batches at adjustment
time.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Iterable, Literal, Union

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, field_validator

import torch
from torch import nn

from repsearch import scoring
from repsearch.measures import register_measure
from repsearch.methods.base import EpochChanges, Method, register_method
from repsearch.methods.recalibrate import recalibrate_bn
from repsearch.schema import MethodSpecModel, check_saliency_metric, check_space
from repsearch.rep import candidate_convs, collapse, conv_kernel, eligible_branches, expand, repblocks
from repsearch.rep import Branch, KxkBranch, kaiming_fan_out, last_bn_gamma_abs_mean
from repsearch.spaces import resolve_space

log = logging.getLogger(__name__)

register_measure("n_rep", "count", "DyRep: Rep steps (ops grown into blocks) over the trial", "final")
register_measure("n_dep", "count", "DyRep: Dep steps (blocks that lost branches) over the trial", "final")
register_measure("n_branches_cut", "count", "DyRep: branches removed by Dep over the trial", "final")


class DyRepSpec(MethodSpecModel):
    """DyRep (CVPR 2022, Algorithm 1) as METHODS.md settles it.

    Units: ``interval`` and ``grow_until`` in epochs (counted from 1; an adjustment runs at the end of
    epoch e when e % interval == 0 and e <= grow_until); ``recal_batches`` and ``probe_batches`` in
    training batches. ``scoring`` is the saliency metric of Rep (:mod:`repsearch.scoring`); ``voters``
    the metrics that vote when ``scoring: vote`` (default grad_norm, snip, synflow: grasp equals
    ‖g‖² on conv-BN nets and would count the gradient norm twice; ties go to synflow's ranking).
    ``gamma_init`` is the new branches' last-BN γ (paper 0.01, Fig. 4); ``dep_threshold`` is λ of
    Eq. 10 (0.02); ``dep_floor`` the official code's importance floor (0.1); ``max_depth`` caps Rep's
    recursion (2: the model's convs and the convs inside one block). ``dep`` switches Dep (§4.2) on
    (default) or off: ``false`` is DyRep Table 6's "w/o Dep" (Rep only: every grown block keeps all its
    branches until deploy; ``dep_threshold`` and ``dep_floor`` are then unused and left out of the
    study hash).
    """

    name: Literal["dyrep"] = "dyrep"
    space: Union[str, list[str]] = "dyrep"
    scoring: str = "synflow"
    voters: list[str] = Field(default_factory=lambda: list(scoring.DEFAULT_VOTERS))
    interval: PositiveInt = 15
    gamma_init: PositiveFloat = 0.01
    dep_threshold: NonNegativeFloat = 0.02
    dep_floor: NonNegativeFloat = 0.1
    recal_batches: NonNegativeInt = 20
    grow_until: PositiveInt = 500
    max_depth: PositiveInt = 2
    probe_batches: PositiveInt = 4
    dep: bool = True

    _space = field_validator("space")(classmethod(lambda cls, v: check_space(v)))
    _scoring = field_validator("scoring")(classmethod(lambda cls, v: check_saliency_metric(v)))

    @field_validator("voters")
    @classmethod
    def _voters(cls, v: list[str]) -> list[str]:
        """Checked against the metric registry and put in registry order: the vote does not depend
        on the voters' order, so two orders are one recipe (one study)."""
        order = scoring.available_metrics()
        return sorted(scoring.check_voters(v), key=order.index)

    def hash_ignored(self) -> set[str]:
        """``voters`` matter only when ``scoring`` is ``vote``; ``dep_threshold`` and ``dep_floor``
        only when ``dep`` is on."""
        ignored = set() if self.scoring == "vote" else {"voters"}
        if not self.dep:
            ignored |= {"dep_threshold", "dep_floor"}
        return ignored

    def check_recipe(self, recipe) -> None:
        """Cross-section check (called by the Recipe's validation).

        Raises:
            ValueError: ``grow_until < interval`` (DyRep would never adjust).
        """
        if self.grow_until < self.interval:
            raise ValueError(
                f"method.grow_until ({self.grow_until}) < method.interval ({self.interval}): DyRep would never adjust"
            )


def dyrep_importance(branch: Branch, kxk: KxkBranch) -> float:
    """DyRep's branch importance (Eq. 9) as the official code reads it, a
    :data:`repsearch.rep.ImportanceRule`: ``s_j = mean_c |γ_last_j| / mean_c |γ_kxk|``.

    Eq. 9 scores a branch by the magnitude of its last BN's scaling factors γ; the official code
    averages |γ| over the channels of the branch's last BN and divides by the same mean of the
    ``kxk`` (original conv) branch's BN (γ = 1 right after Rep/compensation, which resets that BN to
    the identity). A dimensionless Python float; ``inf`` when the ``kxk`` mean is 0.

    Raises:
        ValueError: for a branch without a last BN (:func:`repsearch.rep.last_bn_gamma_abs_mean`).
    """
    ref = last_bn_gamma_abs_mean(kxk)
    g = last_bn_gamma_abs_mean(branch)
    return g / ref if ref > 0 else float("inf")


@register_method
class DyRep(Method):
    """DyRep's training-time hooks (see the module docstring for the algorithm and its sources).

    Events (``self.events``, written to ``events.json``):
      - ``rep``: epoch, path, depth, added/skipped branches, the metric, the averaged scores of every
        candidate op, per-metric winners (vote), the block's eval-mode max error after compensation.
      - ``dep``: epoch, path, branch importances of the block, their mean and std, removed branches,
        and whether the block collapsed to a plain conv.
      - ``dep_scan``: epoch, importances of every block examined (cut or not).
    """

    Spec = DyRepSpec

    def __init__(self, spec, **kwargs):
        super().__init__(spec, **kwargs)
        self.kinds = resolve_space(spec.space)
        self.accumulator: scoring.SaliencyAccumulator | None = None
        self.generator = torch.Generator().manual_seed(self.seed)
        self.n_rep = 0
        self.n_dep = 0
        self.n_cut = 0

    # -------------------------------------------------------------------------------------
    def _ops(self, model: nn.Module) -> dict[str, nn.Conv2d]:
        """Rep's candidates: square K > 1 convs nested in fewer than ``max_depth`` blocks that the
        space gives at least one branch beyond kxk (growing any other would add nothing)."""
        ops = candidate_convs(model, max_depth=self.spec.max_depth)
        return {p: c for p, c in ops.items() if eligible_branches(c, self.kinds)[0]}

    def _reset_scores(self, model: nn.Module) -> None:
        device = next(model.parameters()).device
        ops = self._ops(model)
        metrics = scoring.step_metrics_for(self.spec.scoring, self.spec.voters)
        if self.accumulator is None:
            self.accumulator = scoring.SaliencyAccumulator(ops, metrics, device)
        else:
            self.accumulator.reset(ops)

    def prepare(self, model: nn.Module, loader: Iterable) -> nn.Module:
        self._reset_scores(model)
        return model

    def restore_structure(self, model: nn.Module, structure: dict) -> nn.Module:
        """Rebuild the grown blocks recorded in a checkpoint (:meth:`Method.restore_structure`), then
        score the rebuilt model's candidate ops, as after an adjustment, so that
        :meth:`load_state_dict` finds the accumulator over the same ops (paths, order)."""
        model = super().restore_structure(model, structure)
        if self.accumulator is not None:
            self._reset_scores(model)
        return model

    def distributed_sync(self, model: nn.Module, epoch: int) -> None:
        """DDP: at an adjustment epoch only, sum the saliency accumulator over ranks (one
        all-reduce; the averages are then over every rank's steps). Scores read the DDP-averaged
        gradients, so they already agree up to rounding; the sum makes them agree exactly."""
        if self.dist is not None and self.adjusts_at(epoch) and self.accumulator is not None:
            self.accumulator.all_reduce()

    def after_backward(self, model: nn.Module, step: int) -> None:
        if self.accumulator is not None and self.accumulator.metrics:
            self.accumulator.step()

    @property
    def last_adjustment(self) -> int:
        """The last epoch (from 1) whose end runs an adjustment: the largest multiple of
        ``interval`` not above ``grow_until``."""
        return (self.spec.grow_until // self.spec.interval) * self.spec.interval

    def fp32_gradients(self, epoch: int) -> bool:
        """synflow (and vote, which uses it) read Σ g⊙θ, which for a conv followed by BN is ~1e-7
        of snip's magnitude (BN makes the loss invariant to the conv's scale, so the exact value is
        0 up to BN's eps): bf16 gradients would decide the ranking. So these epochs train without
        autocast while scores are still collected (until the last adjustment)."""
        return self.spec.scoring in ("synflow", "vote") and epoch <= self.last_adjustment

    def adjusts_at(self, epoch: int) -> bool:
        """True when an adjustment (Rep then Dep) runs at the end of ``epoch`` (from 1): DESIGN.md."""
        return epoch % self.spec.interval == 0 and epoch <= self.spec.grow_until

    def on_epoch_end(self, model: nn.Module, epoch: int, loader: Iterable, measures: dict | None = None) -> EpochChanges:
        """Adjust (Rep, then Dep) at the end of ``epoch`` when the schedule says so. The optimizer's
        groups are then updated in place and surviving parameters keep their momentum, as the
        official code does (``reset_optimizer="none"``). With ``dep: false`` (Table 6 "w/o Dep") only
        Rep runs: no ``dep``/``dep_scan`` events, ``n_dep`` and ``n_branches_cut`` stay 0."""
        if not self.adjusts_at(epoch):
            return EpochChanges()
        grown = self.rep(model, epoch, loader)
        if self.spec.dep:
            self.dep(model, epoch, exempt={grown} if grown else set())
        if epoch >= self.last_adjustment:
            self.accumulator = None  # no adjustment left: stop scoring (DESIGN.md: none after grow_until)
        else:
            self._reset_scores(model)
        return EpochChanges(structure_changed=True)

    # -- Rep ------------------------------------------------------------------------------
    def rep(self, model: nn.Module, epoch: int, loader: Iterable) -> str | None:
        """Grow the top-scored op into a block (steps 1-3). Returns the block's path or None."""
        ops = self._ops(model)
        if not ops:
            return None
        spec = self.spec

        def probe_batches():
            return list(itertools.islice(iter(loader), spec.probe_batches))

        best, scores, details = scoring.select_op(
            spec.scoring, self.accumulator, model, ops, probe_batches, self._probe_loss, self.generator,
            voters=spec.voters,
        )
        best = self.agree(best)  # DDP: rank 0 decides (scores equal up to rounding on every rank)
        conv = ops[best]
        device, dtype = conv.weight.device, conv.weight.dtype
        with torch.no_grad():
            w_old, b_old = (t.detach().clone() for t in conv_kernel(conv))
        depth_before = sum(1 for p in repblocks(model) if best.startswith(p + "."))
        block, added, skipped = expand(model, best, self.kinds, gamma_init=spec.gamma_init, conv_init=kaiming_fan_out)
        block.to(device=device, dtype=dtype)
        new_bns = [
            m for kind, br in block.branches.items() if kind != "kxk" for m in br.modules() if isinstance(m, nn.BatchNorm2d)
        ]
        recalibrate_bn(model, new_bns, loader, spec.recal_batches)
        block.compensate(w_old, b_old)
        with torch.no_grad():
            w_new, b_new = block.equivalent_kernel()
            comp_err = max((w_new - w_old).abs().max().item(), (b_new - b_old).abs().max().item())
        self.n_rep += 1
        self.events.append(
            {
                "epoch": epoch,
                "kind": "rep",
                "path": best,
                "depth": depth_before,
                "added": [k for k in added if k != "kxk"],
                "skipped": dict(skipped),
                "metric": spec.scoring,
                "scores": scores,
                "details": details,
                "compensation_max_err": comp_err,
            }
        )
        log.info("epoch %d: Rep %s (+%s)", epoch, best, ", ".join(added))
        return best

    def _probe_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    # -- Dep ------------------------------------------------------------------------------
    def dep(self, model: nn.Module, epoch: int, exempt: set[str]) -> int:
        """Cut unimportant branches over every block, nested included (step 4). Returns branches cut."""
        spec = self.spec
        scan: dict[str, dict[str, float]] = {}
        cut_total = 0
        # deepest blocks first, so a collapse never invalidates a path still to visit
        for path, block in sorted(repblocks(model).items(), key=lambda kv: -kv[0].count(".")):
            if path in exempt:
                continue
            imp = block.branch_importance(dyrep_importance)
            scan[path] = imp
            if len(imp) < 2:
                continue  # torch.std of one value is NaN in the official code: never cut
            values = torch.tensor(list(imp.values()), dtype=torch.float64)
            std, mean = values.std().item(), values.mean().item()
            if not std > spec.dep_threshold:
                continue
            remove = [k for k, s in imp.items() if s < mean and s < spec.dep_floor]
            if not remove:
                continue
            block.remove_branches(remove)
            collapsed = len(block.branches) == 1
            if collapsed:
                collapse(model, path)  # a block left with kxk alone becomes a plain conv again
            cut_total += len(remove)
            self.n_dep += 1
            self.n_cut += len(remove)
            self.events.append(
                {
                    "epoch": epoch,
                    "kind": "dep",
                    "path": path,
                    "importances": imp,
                    "mean": mean,
                    "std": std,
                    "threshold": spec.dep_threshold,
                    "floor": spec.dep_floor,
                    "removed": remove,
                    "collapsed": collapsed,
                }
            )
            log.info("epoch %d: Dep %s -%s", epoch, path, ", ".join(remove))
        self.events.append({"epoch": epoch, "kind": "dep_scan", "importances": scan, "cut": cut_total})
        return cut_total

    def final_measures(self) -> dict[str, Any]:
        """``n_rep``, ``n_dep``, ``n_branches_cut`` (counts over the trial)."""
        return {"n_rep": self.n_rep, "n_dep": self.n_dep, "n_branches_cut": self.n_cut}

    def state_dict(self) -> dict[str, Any]:
        """Counters, events, the random metric's generator state and the saliency accumulator
        (plain tensors and JSON-able values: loads with ``weights_only=True``)."""
        return {
            "events": list(self.events),
            "n_rep": self.n_rep,
            "n_dep": self.n_dep,
            "n_cut": self.n_cut,
            "generator": self.generator.get_state(),
            "accumulator": self.accumulator.state_dict() if self.accumulator is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output after :meth:`prepare` on a model with the same structure.

        Raises:
            ValueError: the accumulator's op paths or metrics differ from the model's candidates.
        """
        self.events = list(state["events"])
        self.n_rep, self.n_dep, self.n_cut = int(state["n_rep"]), int(state["n_dep"]), int(state["n_cut"])
        self.generator.set_state(state["generator"])
        if state.get("accumulator") is None:
            self.accumulator = None
        elif self.accumulator is None:
            raise ValueError("DyRep state holds saliency scores but this DyRep has no accumulator: call prepare() first")
        else:
            self.accumulator.load_state_dict(state["accumulator"])
