"""Saliency scores of convolutions for DyRep's Rep step (a registry of metrics).

An *operation* ``o`` is one ``nn.Conv2d`` with kernel ``θ`` of shape ``(C_out, C_in/groups, K, K)``;
``g = ∂L/∂θ`` (same shape) is the gradient of the training loss on one batch. Every metric maps an
op to one real number ``S_o`` (units: random none; grad_norm loss per unit of ``θ``; snip and
synflow loss units (first-order changes of ``L``); grasp (loss per unit of ``θ``)², like
``‖g‖²``); the op with the largest score is re-parameterized ("argmax of the scores" is the
selection rule for every metric; ties go to the op that comes first in the ops' order).
Metrics (DyRep main paper Eq. 3-4, supplementary A.3 Eq. 11-15):

==========  ===========================================  ==========================================
name        S_o                                          source
==========  ===========================================  ==========================================
random      ``U[0, 1)`` i.i.d. per op                    DyRep supp. Eq. 11
grad_norm   ``‖g‖₂``                                     DyRep supp. Eq. 12
snip        ``Σ_i |g_i θ_i|``                            DyRep supp. Eq. 13; Lee et al. 2019 (SNIP)
grasp       ``Σ_i −(H g)_i θ_i``                         DyRep supp. Eq. 14; Wang et al. 2020 (GraSP)
synflow     ``Σ_i g_i θ_i`` (signed)                     DyRep main Eq. 3-4 = supp. Eq. 15
vote        most votes of the voters (default            DyRep supp. A.3 (rule: repsearch, below)
            grad_norm, snip, synflow); ties: synflow
==========  ===========================================  ==========================================

``synflow`` here is DyRep's signed first-order saliency on the training batch's gradients (as in
the official code), NOT Tanaka et al.'s data-free SynFlow (|θ| network, all-ones input).

synflow on conv-BN: only BN's ε survives
----------------------------------------
For a conv (no bias) followed by BN in train mode, ``y = γ_c (x − μ_c)/sqrt(σ_c² + ε) + β_c`` with
``x = conv(θ)`` and ``μ_c``, ``σ_c²`` the batch mean and biased batch variance of channel ``c``.
Scaling ``θ`` by ``α`` scales ``x − μ`` by ``α`` and ``σ²`` by ``α²``, so
``d y/dα|_{α=1} = (y − β_c) · ε/(σ_c² + ε)`` and, exactly,

    ``Σ g ⊙ θ = dL(αθ)/dα|_{α=1} = Σ_c ε/(σ_c² + ε) · γ_c · ∂L/∂γ_c``

(tested in float64). With ``ε = 1e-5`` this is about 1e-7 to 1e-5 of snip's ``Σ|g ⊙ θ|``: the
signed sum cancels almost completely, and the score is decided by how precisely ``g`` is
computed. Measured against float64 gradients on real CIFAR-10 batches: fp32 gradients rank the
convs with Spearman 0.95-0.97 and agree on the per-interval argmax 4/4; TF32 (emulated) gives
Spearman −0.46 to −0.68 and 2/4; bf16 1/4 (chance with 4 candidates). So fp32 resolves it and
TF32/bf16/fp16 do not: repsearch trains without autocast and with TF32 off while such a metric
is scored (``Method.fp32_gradients``, ``train.tf32``), and reduces the sum in float64 (the
gradients' own precision is the caller's).

When the score is read matters. The official code's first public release read it after
``optimizer.step()``: then ``θ' = θ − lr·u`` (``u`` the update direction, ``u = g`` for plain SGD)
and ``Σ g ⊙ θ' ≈ −lr·Σ g ⊙ u ≈ −lr·‖g‖²`` (the ε term is negligible): a different metric, a
gradient norm. Later releases read it before the step, as repsearch does
(:meth:`SaliencyAccumulator.step` runs after ``backward()``, before ``optimizer.step()``).

grasp on conv-BN equals ‖g‖²
----------------------------
With the BN ε → 0 the loss is invariant to the scale of each such kernel, ``L(αθ_o) = L(θ_o)``,
so ``g_o(αθ_o) = g_o/α`` and ``g_o'(αθ_o) = g_o'`` for every other op ``o'``; differentiating in
``α`` at ``α = 1`` gives ``H_oo θ_o = −g_o`` and ``H_o'o θ_o = 0``. Hence (``H`` symmetric)
GraSP's ``−θ_o · (H g)_o = −Σ_o' g_o' · H_o'o θ_o = ‖g_o‖²``: grasp is the squared gradient norm
(measured: equal to ‖g‖² to 7 digits at ε → 0, to 2e-4 at ε = 1e-5; tested in float64). grasp
and grad_norm therefore nearly always vote for the same op, and a vote containing both counts
the gradient norm twice: grasp is not a default voter
(:data:`DEFAULT_VOTERS`), though it may be added back (``select_op(..., voters=...)``).

Vote
----
DyRep supp. A.3 only says "picking operations with the most votes". repsearch's rule
(:data:`VOTE_RULE`): each voter (a metric, :data:`DEFAULT_VOTERS` unless given, validated by
:func:`check_voters`) votes for its top-scored op (ties within a voter: the first op in order);
the op with the most votes wins; equal votes go to the op that synflow ranks higher, EVEN when
synflow is not a voter (so the training loop always accumulates synflow for vote:
:func:`step_metrics_for`).

Where the scores come from
--------------------------
The *free* metrics (grad_norm, snip, synflow) reuse the gradients of the ordinary training step:
:class:`SaliencyAccumulator` adds their per-op values to one device tensor after every backward,
with no host synchronisation, and averages them over the steps since the last reset (DyRep
Algorithm 1: scores averaged over the epochs since the last adjustment). ``random`` is drawn at
selection time from a caller-seeded generator. ``grasp`` needs a Hessian-gradient product, so it
is computed only at adjustment time on a few training batches (:func:`grasp_scores`). ``vote``
combines the voters' scores (:func:`vote_scores`).

New metrics are added with :func:`register_metric` (selection-time scorer) and
:func:`register_step_metric` (per-step reducer accumulated by :class:`SaliencyAccumulator`).

This module imports only torch and the standard library.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "FREE_METRICS",
    "DEFAULT_VOTERS",
    "VOTE_TIEBREAK",
    "VOTE_RULE",
    "REGISTRY",
    "STEP_REDUCERS",
    "MetricSpec",
    "StepReducer",
    "StepTensors",
    "SelectionContext",
    "STEP_METRICS",
    "step_metrics_for",
    "check_voters",
    "available_metrics",
    "get_metric",
    "register_metric",
    "register_step_metric",
    "SaliencyAccumulator",
    "random_scores",
    "grasp_scores",
    "vote_scores",
    "argmax_op",
    "select_op",
]

#: The built-in metrics, in the order of DyRep supp. Table 10 (``vote`` last).
METRICS: tuple[str, ...] = ("random", "grad_norm", "snip", "grasp", "synflow", "vote")
#: Metrics that need no extra forward/backward pass: they use the training step's gradients
#: (``random`` uses none at all).
FREE_METRICS: tuple[str, ...] = ("random", "grad_norm", "snip", "synflow")
#: The metrics that vote in ``vote`` unless the caller names others (repsearch's choice: DyRep
#: gives no details). Not grasp: on conv-BN networks grasp = ‖g‖² (module notes), so with
#: grad_norm it would count the gradient norm twice.
DEFAULT_VOTERS: tuple[str, ...] = ("grad_norm", "snip", "synflow")
#: The metric whose ranking breaks equal vote counts, whether or not it is a voter.
VOTE_TIEBREAK: str = "synflow"
#: The vote rule, as written to the event log (``details["vote"]["rule"]``).
VOTE_RULE: str = (
    "each voter votes for its top-scored op (ties within a voter: first op in order); "
    "most votes wins; equal votes: the op synflow ranks higher (equal synflow scores: first op in order)"
)


# --------------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------------


class StepTensors:
    """The tensors one training step offers to the per-step reducers.

    Attributes:
        weights: kernels ``θ`` of the ops whose gradient exists this step, each
            ``(C_out, C_in/groups, K, K)``, detached.
        grads: their gradients ``g = ∂L/∂θ`` (same shapes), AS STORED in ``.grad`` (possibly
            multiplied by a loss scale: the accumulator unscales the reducers' results).

    ``grad_times_weight`` (``[g ⊙ θ]``, same shapes) is computed once and shared by the reducers
    that need it (snip, synflow).
    """

    def __init__(self, weights: list[Tensor], grads: list[Tensor]) -> None:
        self.weights = weights
        self.grads = grads
        self._gw: list[Tensor] | None = None

    @property
    def grad_times_weight(self) -> list[Tensor]:
        """``[g ⊙ θ]`` per op (one multi-tensor kernel, cached for the step)."""
        if self._gw is None:
            self._gw = torch._foreach_mul(self.grads, self.weights)
        return self._gw


@dataclass(frozen=True)
class StepReducer:
    """A per-step metric: ``fn(StepTensors) -> list of 0-dim tensors`` (one per op given).

    ``grad_degree`` is the degree of homogeneity of the value in ``g`` (value(s·g) =
    s**grad_degree · value(g), s > 0): the accumulator unscales loss-scaled gradients by dividing
    the value by ``grad_scale ** grad_degree`` instead of copying every gradient.
    """

    name: str
    fn: Callable[[StepTensors], list[Tensor]]
    grad_degree: int = 1


@dataclass(frozen=True)
class MetricSpec:
    """A selection-time metric.

    Attributes:
        name: the metric's name (as in recipes, ``method.scoring``).
        scorer: ``scorer(ctx: SelectionContext) -> (scores, details)`` with ``scores`` a dict
            op path -> float (every op of ``ctx.ops``, in that order; larger = more salient) and
            ``details`` a JSON-serialisable dict for the event log.
        step_metrics: the per-step reducers (names in :data:`STEP_REDUCERS`) that the training
            loop must accumulate for this metric.
    """

    name: str
    scorer: Callable[["SelectionContext"], tuple[dict[str, float], dict[str, Any]]]
    step_metrics: tuple[str, ...] = ()


#: Selection-time metrics by name (the only module state: a registry).
REGISTRY: dict[str, MetricSpec] = {}
#: Per-step reducers by name.
STEP_REDUCERS: dict[str, StepReducer] = {}


def available_metrics() -> tuple[str, ...]:
    """Names of every registered metric (the built-in :data:`METRICS` first)."""
    return tuple(REGISTRY)


def _unknown_metric(name: object) -> ValueError:
    return ValueError(f"unknown saliency metric {name!r}: not one of {', '.join(available_metrics())}")


def get_metric(name: str) -> MetricSpec:
    """The :class:`MetricSpec` registered as ``name``.

    Raises:
        ValueError: ``name`` is not registered (the message lists the registered metrics).
    """
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise _unknown_metric(name) from None


def STEP_METRICS(metric: str) -> tuple[str, ...]:  # noqa: N802 (name fixed by the contract)
    """The free metrics that must be accumulated every training step for ``metric``.

    ``random`` and ``grasp`` -> ``()``; ``grad_norm``/``snip``/``synflow`` -> themselves;
    ``vote`` (with :data:`DEFAULT_VOTERS`) -> ``("grad_norm", "snip", "synflow")``. For a vote
    with other voters use :func:`step_metrics_for`.

    Raises:
        ValueError: unknown metric.
    """
    return get_metric(metric).step_metrics


def step_metrics_for(metric: str, voters: Sequence[str] | None = None) -> tuple[str, ...]:
    """The per-step metrics the training loop must accumulate to score ``metric`` with ``voters``.

    For ``vote``: the union of the voters' per-step metrics (in voter order) plus ``synflow``,
    which breaks equal vote counts even when it is not a voter; e.g.
    ``step_metrics_for("vote", ["grad_norm", "grasp"]) == ("grad_norm", "synflow")`` (grasp and
    random are computed at selection time). For every other metric: :func:`STEP_METRICS`
    (``voters`` is validated but not used).

    Args:
        metric: a registered metric name.
        voters: the vote's voters (``None``: :data:`DEFAULT_VOTERS`); see :func:`check_voters`.

    Returns:
        Names of per-step reducers (:data:`STEP_REDUCERS`), without duplicates.

    Raises:
        ValueError: unknown metric, or invalid ``voters`` (:func:`check_voters`).
    """
    spec = get_metric(metric)
    checked = check_voters(voters)
    if metric != "vote":
        return spec.step_metrics
    return _vote_step_metrics(checked)


def _vote_step_metrics(voters: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    for v in voters:
        for s in get_metric(v).step_metrics:
            if s not in out:
                out.append(s)
    if VOTE_TIEBREAK not in out:
        out.append(VOTE_TIEBREAK)
    return tuple(out)


def check_voters(voters: Sequence[str] | None) -> tuple[str, ...]:
    """Validate the voters of ``vote`` and return them as a tuple (``None`` -> :data:`DEFAULT_VOTERS`).

    Any registered metric except ``vote`` may vote, ``random`` and ``grasp`` included (grasp needs
    the model, loss and probe batches at selection time; random the generator). The order is
    kept: it is the order of ``details["vote"]["voters"]``.

    Args:
        voters: a sequence of metric names (not a single string), or ``None``.

    Returns:
        The voters as a tuple of str.

    Raises:
        ValueError: (one-line message) ``voters`` is a string or not a sequence, is empty, has
            duplicates, contains ``vote`` itself, or an unknown metric (the message lists the
            allowed ones).
    """
    if voters is None:
        return DEFAULT_VOTERS
    if isinstance(voters, (str, bytes)) or not isinstance(voters, Iterable):
        raise ValueError(f"voters must be a list of metric names, not {voters!r}")
    out = tuple(voters)
    allowed = [m for m in available_metrics() if m != "vote"]
    if not out:
        raise ValueError(f"voters is empty: name at least one of {', '.join(allowed)}")
    dups = sorted({str(v) for v in out if out.count(v) > 1})
    if dups:
        raise ValueError(f"duplicate voters {', '.join(dups)} in {list(out)}: each metric votes once")
    if "vote" in out:
        raise ValueError(f"'vote' cannot be one of its own voters (allowed: {', '.join(allowed)})")
    for v in out:
        if not isinstance(v, str) or v not in allowed:
            raise ValueError(f"unknown voter {v!r}: not one of {', '.join(allowed)}")
    return out


def register_metric(
    name: str, step_metrics: tuple[str, ...] = (), *, replace: bool = False
) -> Callable[[Callable], Callable]:
    """Decorator registering a selection-time scorer ``fn(ctx) -> (scores, details)``.

    Args:
        name: metric name.
        step_metrics: per-step reducers this metric reads from the accumulator.
        replace: allow overwriting an existing registration.

    Raises:
        ValueError: ``name`` already registered (and not ``replace``), or a step metric is not a
            registered per-step reducer.
    """
    for s in step_metrics:
        if s not in STEP_REDUCERS:
            raise ValueError(f"metric {name!r}: step metric {s!r} is not a registered per-step reducer")

    def deco(fn: Callable) -> Callable:
        if name in REGISTRY and not replace:
            raise ValueError(f"saliency metric {name!r} is already registered")
        REGISTRY[name] = MetricSpec(name=name, scorer=fn, step_metrics=tuple(step_metrics))
        return fn

    return deco


def register_step_metric(
    name: str, grad_degree: int = 1, *, replace: bool = False
) -> Callable[[Callable], Callable]:
    """Decorator registering a per-step reducer ``fn(StepTensors) -> list[0-dim Tensor]``.

    The reducer must not synchronise with the host (no ``.item()``, ``float()``, ``bool()`` of a
    tensor, no data-dependent shapes): it runs after every backward.

    Raises:
        ValueError: ``name`` already registered (and not ``replace``).
    """

    def deco(fn: Callable) -> Callable:
        if name in STEP_REDUCERS and not replace:
            raise ValueError(f"step metric {name!r} is already registered")
        STEP_REDUCERS[name] = StepReducer(name=name, fn=fn, grad_degree=grad_degree)
        return fn

    return deco


# --------------------------------------------------------------------------------------------
# Per-step reducers (free metrics)
# --------------------------------------------------------------------------------------------


@register_step_metric("grad_norm")
def _step_grad_norm(t: StepTensors) -> list[Tensor]:
    """``‖g‖₂`` per op (DyRep supp. Eq. 12)."""
    return list(torch._foreach_norm(t.grads, 2))


@register_step_metric("snip")
def _step_snip(t: StepTensors) -> list[Tensor]:
    """``Σ|g ⊙ θ|`` per op (DyRep supp. Eq. 13; Lee et al. 2019): the L1 norm of ``g ⊙ θ``."""
    return list(torch._foreach_norm(t.grad_times_weight, 1))


@register_step_metric("synflow")
def _step_synflow(t: StepTensors) -> list[Tensor]:
    """``Σ g ⊙ θ`` per op, signed (DyRep main Eq. 3-4, supp. Eq. 15), summed in float64.

    For a conv followed by BN in train mode this is exactly ``Σ_c ε/(σ_c²+ε)·γ_c·∂L/∂γ_c``
    (BN's ε term; ``σ_c²`` the batch variance of channel ``c``, ``γ_c`` the BN scale), about 1e-7
    to 1e-5 of snip's ``Σ|g ⊙ θ|`` (module notes). fp32 gradients resolve it (measured vs float64
    on CIFAR-10: Spearman 0.95-0.97, per-interval argmax 4/4); TF32 (−0.46 to −0.68, 2/4),
    bf16 (1/4) and fp16 do not. The sum is reduced in float64 so that the summation error stays
    below the gradients' own rounding error. Read after ``backward()``, before the optimizer
    step (after it, the value is ≈ −lr·‖g‖², a different metric).
    """
    return [p.sum(dtype=torch.float64) for p in t.grad_times_weight]


# --------------------------------------------------------------------------------------------
# Accumulator
# --------------------------------------------------------------------------------------------


class SaliencyAccumulator:
    """Sums per-step saliency scores of a set of convs on the device, without host syncs.

    Args:
        ops: ordered mapping op path -> ``nn.Conv2d`` (kernel ``(C_out, C_in/groups, K, K)``).
            The modules are kept (their ``.weight`` is read at every step, so a parameter swapped
            in by surgery is seen).
        metrics: names of per-step metrics to accumulate (:data:`STEP_REDUCERS`, e.g. the output
            of :func:`step_metrics_for`). ``"random"`` is accepted and ignored (it is drawn at
            selection time); duplicates are dropped.
        device: where the accumulator lives; default the first op's weight device (CPU if none).

    State: ``sum`` of shape ``(n_metrics, n_ops)`` (float64) and a 0-dim count of the steps that
    were added, both on ``device``; ``n_steps`` (python int) counts ``step()`` calls since the last
    reset.

    Raises:
        ValueError: a metric that is not a per-step metric.
    """

    def __init__(
        self,
        ops: Mapping[str, nn.Conv2d],
        metrics: Iterable[str],
        device: torch.device | str | None = None,
    ) -> None:
        names: list[str] = []
        for m in metrics:
            if m == "random":
                continue
            if m not in STEP_REDUCERS:
                raise ValueError(
                    f"{m!r} is not a per-step saliency metric: not one of "
                    f"{', '.join(('random',) + tuple(STEP_REDUCERS))}"
                )
            if m not in names:
                names.append(m)
        self.metrics: tuple[str, ...] = tuple(names)
        self._reducers = [STEP_REDUCERS[m] for m in self.metrics]
        self._device = torch.device(device) if device is not None else None
        self.n_steps = 0
        self.reset(ops)

    # -- state ---------------------------------------------------------------------------------

    @property
    def ops(self) -> dict[str, nn.Conv2d]:
        """The ops being scored (ordered mapping path -> conv)."""
        return dict(zip(self._paths, self._modules))

    @property
    def device(self) -> torch.device:
        """The device holding the accumulator tensors."""
        return self._sum.device

    def reset(self, ops: Mapping[str, nn.Conv2d] | None = None) -> None:
        """Zero the sums and ``n_steps``; with ``ops``, score that new op set from now on
        (e.g. after a Rep/Dep structure change)."""
        if ops is not None:
            self._paths = list(ops.keys())
            self._modules = list(ops.values())
        device = self._device
        if device is None:
            device = self._modules[0].weight.device if self._modules else torch.device("cpu")
        self._sum = torch.zeros(len(self.metrics), len(self._paths), dtype=torch.float64, device=device)
        self._count = torch.zeros((), dtype=torch.float64, device=device)
        self._zero_cache: dict[torch.dtype, Tensor] = {}
        self.n_steps = 0

    def _zeros_of(self, dtype: torch.dtype) -> Tensor:
        z = self._zero_cache.get(dtype)
        if z is None:
            z = self._zero_cache[dtype] = torch.zeros((), dtype=dtype, device=self._sum.device)
        return z

    # -- per step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, grad_scale: float | Tensor | None = None) -> None:
        """Add this step's scores; call after ``backward()``, before ``optimizer.step()``.

        Args:
            grad_scale: the factor the loss was multiplied by before backward (a GradScaler's
                scale, as a python float or a 0-dim tensor, on any device; > 0). ``None``: the
                gradients are already unscaled (fp32 or bf16 autocast). The scores are those of the
                unscaled gradient ``g / grad_scale``.

        An op whose ``weight.grad`` is ``None`` this step contributes 0. A step whose values are
        not all finite (a GradScaler overflow step, which the scaler skips too) is not added and
        not counted in the average. No host synchronisation: only asynchronous device kernels.
        """
        self.n_steps += 1
        n_ops = len(self._paths)
        if not self._reducers or n_ops == 0:
            return
        idx: list[int] = []
        weights: list[Tensor] = []
        grads: list[Tensor] = []
        for i, mod in enumerate(self._modules):
            w = mod.weight
            g = w.grad
            if g is not None:
                idx.append(i)
                weights.append(w.detach())
                grads.append(g.detach())
        if not idx:
            # Nothing has a gradient: a step of zeros (counted).
            self._count.add_(1.0)
            return
        tensors = StepTensors(weights, grads)
        rows: list[Tensor] = []
        for red in self._reducers:
            vals = red.fn(tensors)
            dtype = vals[0].dtype
            row = [self._zeros_of(dtype)] * n_ops
            for k, i in enumerate(idx):
                v = vals[k]
                row[i] = v if v.dtype == dtype else v.to(dtype)
            row_t = torch.stack(row)  # (n_ops,)
            if grad_scale is not None and red.grad_degree:
                row_t = row_t.double() / (grad_scale if red.grad_degree == 1 else grad_scale**red.grad_degree)
            rows.append(row_t)
        stacked = torch.stack([r.double() for r in rows])  # (n_metrics, n_ops), float64
        ok = torch.isfinite(stacked).all()
        self._sum.add_(torch.where(ok, stacked, torch.zeros_like(stacked)))
        self._count.add_(ok)

    # -- read out ------------------------------------------------------------------------------

    def averages(self) -> dict[str, dict[str, float]]:
        """Mean per-step score since the last reset: metric -> {op path: float}.

        ``grad_norm`` is the mean of the per-step norms (as the official code's AverageMeter),
        not the norm of the mean gradient. One device->host transfer for everything. With no
        step added yet every score is 0.
        """
        if not self.metrics:
            return {}
        avg = (self._sum / self._count.clamp_min(1.0)).cpu().tolist()
        return {m: dict(zip(self._paths, avg[r])) for r, m in enumerate(self.metrics)}

    def all_reduce(self) -> None:
        """DDP: sum ``sum`` and the step count over every rank of the default process group (one
        collective on the concatenated tensor), so :meth:`averages` is the mean over all ranks'
        steps on every rank. Source: the official DyRep code (hunto/image_classification_sota)
        all-reduces every conv's score at every step; once per adjustment gives the same averages.

        Raises:
            RuntimeError / ValueError: no default process group (torch.distributed not initialised).
        """
        import torch.distributed as tdist

        flat = torch.cat([self._sum.reshape(-1), self._count.reshape(1)])
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        self._sum.copy_(flat[:-1].view_as(self._sum))
        self._count.copy_(flat[-1])

    def n_counted(self) -> int:
        """Number of steps added to the sums since the last reset (host sync; for logs)."""
        return int(round(float(self._count.cpu())))

    def state_dict(self) -> dict[str, Any]:
        """The accumulator's state for a checkpoint (tensors on CPU)."""
        return {
            "paths": list(self._paths),
            "metrics": list(self.metrics),
            "sum": self._sum.detach().cpu(),
            "count": self._count.detach().cpu(),
            "n_steps": self.n_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (same op paths and metrics).

        Raises:
            ValueError: the paths or metrics differ from this accumulator's.
        """
        if list(state["paths"]) != self._paths or tuple(state["metrics"]) != self.metrics:
            raise ValueError("saliency accumulator state: op paths or metrics do not match")
        self._sum.copy_(state["sum"])
        self._count.copy_(state["count"])
        self.n_steps = int(state["n_steps"])


# --------------------------------------------------------------------------------------------
# Selection-time scores
# --------------------------------------------------------------------------------------------


def random_scores(ops: Mapping[str, nn.Module], generator: torch.Generator) -> dict[str, float]:
    """Random saliency scores, ``S_o ~ U[0, 1)`` i.i.d. (DyRep supp. Eq. 11).

    Args:
        ops: ordered mapping op path -> conv (only the paths are used).
        generator: a seeded ``torch.Generator`` (its device is used); consumes ``len(ops)`` draws.

    Returns:
        op path -> float in [0, 1).
    """
    vals = torch.rand(len(ops), generator=generator, device=generator.device).tolist()
    return dict(zip(ops.keys(), vals))


def grasp_scores(
    model: nn.Module,
    ops: Mapping[str, nn.Conv2d],
    batches: Iterable[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> dict[str, float]:
    """GraSP saliency ``S_o = Σ_i −(H g)_i θ_i`` (DyRep supp. Eq. 14; Wang et al. 2020).

    On conv-BN networks (each conv followed by a train-mode BN) this is ``‖g_o‖²`` up to BN's ε:
    the loss is invariant to the scale of the conv's kernel, so ``H_oo θ_o = −g_o`` and
    ``H_o'o θ_o = 0`` (module notes; measured: equal to 7 digits at ε → 0, to 2e-4 at ε = 1e-5).
    It then ranks the ops as grad_norm does, which is why it is not in :data:`DEFAULT_VOTERS`.

    Per batch: ``g = ∂L/∂θ`` over the candidate kernels ``θ = (θ_o)_o`` with ``create_graph=True``,
    ``z = Σ_o Σ_i g_i · stopgrad(g_i)``, ``H g = ∂z/∂θ`` (double backprop), score
    ``S_o = −Σ_i (H g)_i θ_i``; the scores are averaged over the batches. ``H`` is the Hessian
    block of the candidate kernels (gradients of other parameters are not part of ``g``).

    The model runs in its current mode (train or eval, as the caller set it) under the caller's
    autocast context (fp32 recommended). Its buffers (BN running mean/var/num_batches_tracked and
    any other) are saved and restored, so running statistics are NOT changed; ``.grad`` of the
    parameters is not touched (``torch.autograd.grad``).

    Args:
        model: maps images ``(N, C, H, W)`` to logits ``(N, classes)``.
        ops: ordered mapping op path -> ``nn.Conv2d`` inside ``model``.
        batches: iterable of ``(images (N, C, H, W), labels (N,))``; moved to the ops' device.
        loss_fn: ``loss_fn(logits, labels) -> 0-dim tensor`` (mean over the batch).

    Returns:
        op path -> float (ops whose weight does not require grad or is unused: 0.0).

    Raises:
        ValueError: ``batches`` is empty.
    """
    paths = list(ops.keys())
    modules = list(ops.values())
    if not paths:
        return {}
    live = [i for i, m in enumerate(modules) if m.weight.requires_grad]
    device = modules[0].weight.device
    total = torch.zeros(len(paths), dtype=torch.float64, device=device)
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    n_batches = 0
    try:
        with torch.enable_grad():
            for images, labels in batches:
                n_batches += 1
                if not live:
                    continue
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                weights = [modules[i].weight for i in live]
                loss = loss_fn(model(images), labels)
                grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
                z = None
                for g in grads:
                    if g is not None and g.requires_grad:
                        term = (g * g.detach()).sum()
                        z = term if z is None else z + term
                if z is None:
                    continue  # the loss is at most linear in the kernels: H g = 0
                hg = torch.autograd.grad(z, weights, allow_unused=True)
                vals = [
                    -(h.detach() * w.detach()).sum().to(torch.float64) if h is not None else total.new_zeros(())
                    for h, w in zip(hg, weights)
                ]
                total.index_add_(0, torch.tensor(live, device=device), torch.stack(vals))
                del loss, grads, z, hg
    finally:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
    if n_batches == 0:
        raise ValueError("grasp_scores: no probe batches given")
    return dict(zip(paths, (total / n_batches).cpu().tolist()))


def vote_scores(
    per_metric: Mapping[str, Mapping[str, float]],
    tiebreak: str = VOTE_TIEBREAK,
    *,
    tiebreak_scores: Mapping[str, float] | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """Vote of several metrics (DyRep supp. A.3 "picking operations with the most votes").

    repsearch's rule (:data:`VOTE_RULE`; the paper gives no more): every metric in ``per_metric``
    is a voter and votes for its top op (ties within a metric: the first op in order); the op
    with the most votes wins; equal vote counts go to the op that the ``tiebreak`` metric
    (synflow) ranks higher, whether or not it is a voter. Encoded as scores so that the argmax is
    the winner: ``score = votes + (n − r) / (n + 1)`` with ``r`` the op's 0-based rank by the
    tiebreak scores (stable: equal values keep op order; NaN ranks last) and ``n`` the number of
    ops, so the fraction lies in (0, 1) and never outweighs a vote.

    Args:
        per_metric: voter -> {op path: score}; every voter must score the same ops.
        tiebreak: the name of the tie-break metric; without ``tiebreak_scores`` its scores are
            ``per_metric[tiebreak]`` (it is then a voter too).
        tiebreak_scores: op path -> score of the tie-break metric when it is not (or not only)
            a voter; same ops.

    The op order is that of the tie-break scores' dict.

    Returns:
        ``(scores, winners)``: op path -> vote score (float), and voter -> the op it voted for.

    Raises:
        ValueError: no tie-break scores (``tiebreak`` missing from ``per_metric`` and no
            ``tiebreak_scores``), metrics scoring different op sets, or no ops.
    """
    if tiebreak_scores is None:
        if tiebreak not in per_metric:
            raise ValueError(
                f"vote_scores: the tie-break metric {tiebreak!r} is missing from {sorted(per_metric)}"
            )
        tb = per_metric[tiebreak]
    else:
        tb = tiebreak_scores
    order = list(tb.keys())
    if not order:
        raise ValueError("vote_scores: no ops to vote on")
    for m, sc in per_metric.items():
        if set(sc.keys()) != set(order):
            raise ValueError(f"vote_scores: metric {m!r} scores other ops than the tie-break {tiebreak!r}")
    winners = {m: argmax_op({p: sc[p] for p in order}) for m, sc in per_metric.items()}
    votes = dict.fromkeys(order, 0)
    for w in winners.values():
        votes[w] += 1
    ranked = sorted(order, key=lambda p: -_finite_or_neg_inf(tb[p]))  # stable
    n = len(order)
    scores = {p: float(votes[p]) + (n - r) / (n + 1) for r, p in enumerate(ranked)}
    return {p: scores[p] for p in order}, winners


def _finite_or_neg_inf(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def argmax_op(scores: Mapping[str, float]) -> str:
    """The op with the largest score; ties: the first in order; NaN counts as −inf.

    Raises:
        ValueError: empty ``scores``.
    """
    best: str | None = None
    best_v = -math.inf
    for p, v in scores.items():
        v = _finite_or_neg_inf(v)
        if best is None or v > best_v:
            best, best_v = p, v
    if best is None:
        raise ValueError("no candidate ops to select from")
    return best


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


@dataclass
class SelectionContext:
    """What a scorer may use at adjustment time (see :func:`select_op` for the fields).

    ``voters`` are the metrics that vote in ``vote`` (``None``: :data:`DEFAULT_VOTERS`), checked
    and turned into a tuple by :func:`check_voters` at construction (ValueError if invalid).

    ``averages()`` and ``probe_batches()`` are computed at most once and cached, so a combined
    metric (vote) pays one host transfer and one pass over the probe loader.
    """

    accumulator: SaliencyAccumulator | None
    model: nn.Module | None
    ops: Mapping[str, nn.Conv2d]
    probe_batches_fn: Callable[[], Iterable[tuple[Tensor, Tensor]]] | None
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None
    generator: torch.Generator | None
    voters: Sequence[str] | None = None
    _averages: dict[str, dict[str, float]] | None = field(default=None, repr=False)
    _batches: list[tuple[Tensor, Tensor]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.voters = check_voters(self.voters)

    def averages(self) -> dict[str, dict[str, float]]:
        """The accumulator's averages (cached). Raises ValueError without an accumulator."""
        if self._averages is None:
            if self.accumulator is None:
                raise ValueError("this saliency metric needs a SaliencyAccumulator")
            self._averages = self.accumulator.averages()
        return self._averages

    def step_scores(self, metric: str) -> dict[str, float]:
        """Averaged per-step scores of ``metric`` for every op of ``self.ops``.

        Raises:
            ValueError: the accumulator does not hold ``metric`` or misses one of the ops.
        """
        avgs = self.averages()
        if metric not in avgs:
            raise ValueError(
                f"metric {metric!r} was not accumulated (accumulator metrics: {sorted(avgs)})"
            )
        row = avgs[metric]
        missing = [p for p in self.ops if p not in row]
        if missing:
            raise ValueError(f"ops not scored by the accumulator (reset it with the new ops): {missing}")
        return {p: row[p] for p in self.ops}

    def probe_batches(self) -> list[tuple[Tensor, Tensor]]:
        """The probe batches (``probe_batches_fn()``, called once and cached)."""
        if self._batches is None:
            if self.probe_batches_fn is None:
                raise ValueError("this saliency metric needs probe_batches_fn")
            self._batches = list(self.probe_batches_fn())
        return self._batches

    def n_steps(self) -> int:
        """Training steps seen by the accumulator since its last reset (0 without one)."""
        return self.accumulator.n_steps if self.accumulator is not None else 0


def _free_scorer(metric: str) -> Callable[[SelectionContext], tuple[dict[str, float], dict[str, Any]]]:
    def scorer(ctx: SelectionContext) -> tuple[dict[str, float], dict[str, Any]]:
        return ctx.step_scores(metric), {"n_steps": ctx.n_steps()}

    scorer.__name__ = f"_score_{metric}"
    scorer.__doc__ = f"Averaged per-step {metric} scores from the accumulator."
    return scorer


@register_metric("random")
def _score_random(ctx: SelectionContext) -> tuple[dict[str, float], dict[str, Any]]:
    """Uniform random scores from the caller's generator (DyRep supp. Eq. 11)."""
    if ctx.generator is None:
        raise ValueError("metric 'random' needs a torch.Generator")
    return random_scores(ctx.ops, ctx.generator), {}


register_metric("grad_norm", ("grad_norm",))(_free_scorer("grad_norm"))
register_metric("snip", ("snip",))(_free_scorer("snip"))


@register_metric("grasp")
def _score_grasp(ctx: SelectionContext) -> tuple[dict[str, float], dict[str, Any]]:
    """GraSP on the probe batches (DyRep supp. Eq. 14)."""
    if ctx.model is None or ctx.loss_fn is None:
        raise ValueError("metric 'grasp' needs the model and loss_fn")
    batches = ctx.probe_batches()
    return grasp_scores(ctx.model, ctx.ops, batches, ctx.loss_fn), {"n_probe_batches": len(batches)}


register_metric("synflow", ("synflow",))(_free_scorer("synflow"))


@register_metric("vote", _vote_step_metrics(DEFAULT_VOTERS))
def _score_vote(ctx: SelectionContext) -> tuple[dict[str, float], dict[str, Any]]:
    """Vote of ``ctx.voters``, equal votes by synflow rank (DyRep supp. A.3; :data:`VOTE_RULE`).

    ``details``: ``vote`` = {``voters``, ``tiebreak`` ("synflow"), ``rule`` (:data:`VOTE_RULE`),
    ``votes`` (op -> number of votes), ``tiebreak_scores`` (op -> synflow score)}, ``winners``
    (voter -> op), ``per_metric`` (voter -> {op: score}), plus the voters' own details
    (``n_steps``, ``n_probe_batches``).
    """
    voters = check_voters(ctx.voters)
    per_metric: dict[str, dict[str, float]] = {}
    details: dict[str, Any] = {}
    for m in voters:
        per_metric[m], d = get_metric(m).scorer(ctx)
        details.update(d)
    if VOTE_TIEBREAK in per_metric:
        tb = per_metric[VOTE_TIEBREAK]
    else:
        tb, d = get_metric(VOTE_TIEBREAK).scorer(ctx)
        details.update(d)
    scores, winners = vote_scores(per_metric, tiebreak=VOTE_TIEBREAK, tiebreak_scores=tb)
    votes = dict.fromkeys(tb, 0)
    for w in winners.values():
        votes[w] += 1
    details["vote"] = {
        "voters": list(voters),
        "tiebreak": VOTE_TIEBREAK,
        "rule": VOTE_RULE,
        "votes": votes,
        "tiebreak_scores": dict(tb),
    }
    details["winners"] = winners
    details["per_metric"] = per_metric
    return scores, details


def select_op(
    metric: str,
    accumulator: SaliencyAccumulator | None,
    model: nn.Module | None,
    ops: Mapping[str, nn.Conv2d],
    probe_batches_fn: Callable[[], Iterable[tuple[Tensor, Tensor]]] | None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
    generator: torch.Generator | None,
    *,
    voters: Sequence[str] | None = None,
) -> tuple[str, dict[str, float], dict[str, Any]]:
    """Score every candidate op with ``metric`` and pick the most salient (DyRep Algorithm 1, Rep).

    Args:
        metric: a registered metric name (:data:`METRICS` or added by :func:`register_metric`).
        accumulator: holds the per-step averages of ``step_metrics_for(metric, voters)`` over
            ``ops``.
        model: the training model (grasp/vote run it on the probe batches, in its current mode;
            BN running statistics are restored afterwards).
        ops: ordered mapping op path -> ``nn.Conv2d``: the candidates.
        probe_batches_fn: ``() -> iterable of (images (N, C, H, W), labels (N,))``; called (once)
            only by metrics that need probe batches (grasp; vote with grasp among its voters).
        loss_fn: ``loss_fn(logits, labels) -> 0-dim tensor`` (grasp; vote with grasp among its voters).
        generator: seeded ``torch.Generator`` (random, or a vote with random as a voter).
        voters: the metrics that vote when ``metric`` is ``vote`` (keyword; ``None``:
            :data:`DEFAULT_VOTERS` = grad_norm, snip, synflow); validated by :func:`check_voters`
            for every metric, used only by vote.

    Returns:
        ``(best_op_path, scores, details)``: the argmax of ``scores`` (ties: first in op order),
        op path -> float, and a JSON-serialisable dict for the event log (``metric``, ``n_steps``,
        and per metric e.g. ``n_probe_batches``; vote adds ``vote`` (``voters``, ``tiebreak``,
        ``rule``, ``votes``, ``tiebreak_scores``), ``winners`` (voter -> op) and ``per_metric``
        (voter -> {op: score})).

    Raises:
        ValueError: unknown metric (the message lists the metrics), no ops, invalid ``voters``
            (:func:`check_voters`), or a missing input the metric needs (accumulator metric,
            generator, probe batches).
    """
    spec = get_metric(metric)
    voters = check_voters(voters)
    if len(ops) == 0:
        raise ValueError("select_op: no candidate ops")
    ctx = SelectionContext(
        accumulator=accumulator,
        model=model,
        ops=ops,
        probe_batches_fn=probe_batches_fn,
        loss_fn=loss_fn,
        generator=generator,
        voters=voters,
    )
    scores, extra = spec.scorer(ctx)
    best = argmax_op({p: scores[p] for p in ops})
    details: dict[str, Any] = {"metric": metric, "n_steps": ctx.n_steps()}
    details.update(extra)
    logger.debug("saliency %s: selected %s (score %.6g)", metric, best, scores[best])
    return best, dict(scores), details
