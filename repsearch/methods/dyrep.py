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
   branch alone becomes a plain conv again.

Saliency scores (:mod:`repsearch.scoring`) accumulate on the device after every backward, with no
host sync per step; GraSP (and vote) probe ``probe_batches`` training batches at adjustment time.
"""

from __future__ import annotations

import itertools
import logging
from typing import Iterable

import torch
from torch import nn

from repsearch import scoring
from repsearch.methods.base import Method
from repsearch.rep import candidate_convs, collapse, conv_kernel, eligible_branches, expand, repblocks
from repsearch.spaces import resolve_space

log = logging.getLogger(__name__)


def recalibrate_bn(model: nn.Module, bns: list[nn.BatchNorm2d], loader: Iterable, n_batches: int) -> int:
    """Re-estimate the running statistics of ``bns`` on ``n_batches`` batches of ``loader``.

    Cumulative average (``momentum=None``) after ``reset_running_stats``; every other module stays
    in eval mode; no gradients (DyRep §4.1 / official code: 20 batches). Restores train/eval modes
    and momenta. Returns the number of batches used.
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


class DyRep(Method):
    """DyRep's training-time hooks (see the module docstring for the algorithm and its sources).

    Events (``self.events``, written to ``events.json``):
      - ``rep``: epoch, path, depth, added/skipped branches, the metric, the averaged scores of every
        candidate op, per-metric winners (vote), the block's eval-mode max error after compensation.
      - ``dep``: epoch, path, branch importances of the block, their mean and std, removed branches,
        and whether the block collapsed to a plain conv.
      - ``dep_scan``: epoch, importances of every block examined (cut or not).
    """

    name = "dyrep"

    def __init__(self, spec, label_smoothing: float = 0.0, seed: int = 0):
        super().__init__(spec, label_smoothing, seed)
        self.kinds = resolve_space(spec.space)
        self.accumulator: scoring.SaliencyAccumulator | None = None
        self.generator = torch.Generator().manual_seed(seed)
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
        metrics = scoring.STEP_METRICS(self.spec.scoring)
        if self.accumulator is None:
            self.accumulator = scoring.SaliencyAccumulator(ops, metrics, device)
        else:
            self.accumulator.reset(ops)

    def prepare(self, model: nn.Module, loader: Iterable) -> nn.Module:
        self._reset_scores(model)
        return model

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

    def on_epoch_end(self, model: nn.Module, epoch: int, loader: Iterable) -> bool:
        if not self.adjusts_at(epoch):
            return False
        grown = self.rep(model, epoch, loader)
        self.dep(model, epoch, exempt={grown} if grown else set())
        if epoch >= self.last_adjustment:
            self.accumulator = None  # no adjustment left: stop scoring (DESIGN.md: none after grow_until)
        else:
            self._reset_scores(model)
        return True

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
            spec.scoring, self.accumulator, model, ops, probe_batches, self._probe_loss, self.generator
        )
        conv = ops[best]
        device, dtype = conv.weight.device, conv.weight.dtype
        with torch.no_grad():
            w_old, b_old = (t.detach().clone() for t in conv_kernel(conv))
        depth_before = sum(1 for p in repblocks(model) if best.startswith(p + "."))
        block, added, skipped = expand(model, best, self.kinds, gamma_init=spec.gamma_init)
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
            imp = block.branch_importance()
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

    def describe(self) -> dict:
        return {"n_rep": self.n_rep, "n_dep": self.n_dep, "n_branches_cut": self.n_cut}
