"""Grad Mult and the RepOptimizer update rules (RepOptimizers, ICLR 2023, §3.2 and Appendix A).

A CSLA block (:class:`~repsearch.rep.csla.CSLABlock`: ``s ⊙ KxK + t ⊙ 1x1 + scale_identity ⊙ x``
with constant ``s``, ``t``) trained with SGD equals ONE KxK conv, initialised to the block's
equivalent kernel, trained with its gradient multiplied element-wise by the Grad Mult
(CSLA ≡ GR, RepOpt Appendix A, Eq. 14; RepOpt §3.2 for the channel-wise RepOpt-VGG form):

- :func:`grad_mult` builds the multiplier tensor ``(C_out, C_in/groups, K, K)``;
- :class:`RepOptSGD`: ``torch.optim.SGD`` that multiplies the listed gradients first (power 2);
- :class:`RepOptAdamW`: AdamW that multiplies the gradient AND the Adam update (power 1), the
  official ``repoptimizer_adamw.py`` semantics.

Why power 1 and |s| for AdamW: Adam normalises each parameter's update by its own gradient scale,
so a CSLA branch ``c·W_c`` moves the equivalent kernel by ``c·Δ(W_c) ≈ −lr·|c|·m/√v`` (the sign of
``c`` cancels); summing the branches gives ``−lr·(|s| + |t| + 1)·m/√v``. With the official raw ``s``
a negative searched scale flips that branch's contribution and the equivalence breaks
(METHODS.md: 1.8e-2 vs 1.5e-6 output error after 20 steps). The AdamW equivalence is exact only up
to Adam's ``eps``: per branch the denominator is ``√v̂_G + eps/|c|`` instead of ``√v̂_G + eps/M``
(``v̂_G`` the bias-corrected second moment of the equivalent kernel's gradient), so it holds when
``eps ≪ min(|s|, |t|, 1)·√v̂_G`` element-wise.

Multipliers are not optimizer state: ``state_dict()`` holds the usual SGD/AdamW state only (it loads
into ``torch.optim.SGD`` / ``AdamW`` and back); rebuild the multipliers from the searched scales and
pass them again (constructor or :meth:`RepOptSGD.set_grad_mults`) after loading. They are moved
lazily, once, to their parameter's device, dtype and memory format at the first :meth:`step` after
a ``model.to(...)`` (``nn.Module.to`` keeps the Parameter objects, so the map stays valid).
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping, Optional

import torch
from torch import nn

__all__ = ["grad_mult", "RepOptSGD", "RepOptAdamW"]

log = logging.getLogger(__name__)


def grad_mult(
    s: torch.Tensor,
    t: Optional[torch.Tensor],
    *,
    identity: bool,
    in_channels: int,
    kernel_size: int = 3,
    power: int,
    groups: int = 1,
) -> torch.Tensor:
    """The Grad Mult of one KxK conv trained in place of a CSLA block (RepOpt §3.2, Eq. 3; App. A).

    ``M[c, d, p, q] = |s_c|^p`` everywhere, ``+ |t_c|^p`` at the kernel centre, ``+ 1`` at the centre
    of the diagonal (output channel c meets its own input channel, per group) when ``identity``.
    ``p = 2`` for SGD (RepOpt §3.2), ``p = 1`` for AdamW (official ``repoptimizer_adamw.py``; |s|
    rather than raw s, see the module docstring).

    Args:
        s: ``(C_out,)`` scales of the KxK branch (RepOpt's ``s``).
        t: ``(C_out,)`` scales of the 1x1 branch, or ``None`` for a layer without a 1x1 branch.
        identity: whether the CSLA block has the identity branch (needs ``in_channels == C_out``).
        in_channels: C_in of the conv.
        kernel_size: K (odd when ``t`` or ``identity`` is used: they sit at the centre).
        power: 1 (AdamW) or 2 (SGD).
        groups: the conv's groups (must divide C_in and C_out).

    Returns:
        ``(C_out, C_in/groups, K, K)`` on ``s``'s device and dtype.

    Raises:
        ValueError: a power other than 1 or 2, ``s``/``t`` not 1-D of one length, ``identity`` with
            ``in_channels != C_out``, groups not dividing the channels, or an even K with a centre term.
    """
    if power not in (1, 2):
        raise ValueError(f"grad_mult power must be 1 (AdamW) or 2 (SGD), got {power}")
    if s.dim() != 1:
        raise ValueError(f"s must have shape (C_out,), got {tuple(s.shape)}")
    c_out = s.shape[0]
    if t is not None and tuple(t.shape) != (c_out,):
        raise ValueError(f"t must have shape ({c_out},) like s, got {tuple(t.shape)}")
    if groups < 1 or in_channels % groups or c_out % groups:
        raise ValueError(f"groups={groups} must divide C_in={in_channels} and C_out={c_out}")
    k = int(kernel_size)
    if (t is not None or identity) and k % 2 == 0:
        raise ValueError(f"the 1x1 and identity terms need an odd kernel size (a centre), got K={k}")
    if identity and in_channels != c_out:
        raise ValueError(f"an identity branch needs C_in == C_out, got {in_channels} -> {c_out}")
    cin_g = in_channels // groups
    s_p = s.detach().abs() ** power
    m = s_p.view(-1, 1, 1, 1).expand(c_out, cin_g, k, k).clone()
    c = k // 2
    if t is not None:
        m[:, :, c, c] += (t.detach().to(m).abs() ** power).view(-1, 1)
    if identity:
        idx = torch.arange(c_out, device=m.device)
        m[idx, idx % cin_g, c, c] += 1.0
    return m


# ---------------------------------------------------------------------------------- multiplier store
class _GradMults:
    """Shared multiplier bookkeeping of the RepOptimizers (a mixin; needs ``param_groups``)."""

    _grad_mults: dict

    def set_grad_mults(self, grad_mults: Mapping[nn.Parameter, torch.Tensor]) -> None:
        """Replace the ``{parameter: multiplier}`` map (e.g. after ``load_state_dict``, or new scales).

        Multipliers are copied to their parameter's device, dtype and memory format (strides) now and
        again lazily, once, whenever the parameter has moved since (``model.to(device)``,
        channels_last).

        Raises:
            ValueError: a multiplier whose shape differs from its parameter's, or a key that is not a
                parameter of this optimizer.
        """
        own = {id(p) for g in self.param_groups for p in g["params"]}
        mults = {}
        for p, m in grad_mults.items():
            if id(p) not in own:
                raise ValueError(
                    f"grad_mults has a tensor of shape {tuple(p.shape)} that is not a parameter of this optimizer"
                )
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(p.shape):
                shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"grad mult of shape {shape} does not match its parameter's shape {tuple(p.shape)}")
            mults[p] = _placed(m.detach(), p)
        self._grad_mults = mults

    @property
    def grad_mults(self) -> dict:
        """The current ``{parameter: multiplier}`` map (read-only view; use :meth:`set_grad_mults`)."""
        return dict(self._grad_mults)

    def _mult_for(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        m = self._grad_mults.get(p)
        if m is None:
            return None
        if m.device != p.device or m.dtype != p.dtype or m.stride() != p.stride():
            m = _placed(m, p)
            self._grad_mults[p] = m
        return m


def _placed(m: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``m`` on ``p``'s device and dtype with ``p``'s strides (memory format)."""
    if m.device == p.device and m.dtype == p.dtype and m.stride() == p.stride():
        return m
    out = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device)
    out.copy_(m)
    return out


# ---------------------------------------------------------------------------------- SGD
class RepOptSGD(_GradMults, torch.optim.SGD):
    """SGD with Grad Mult: RepOpt's update rule for SGD (RepOpt §3.4, Rule of Iteration; Eq. 2).

    ``step()`` multiplies each listed parameter's ``.grad`` in place by its multiplier
    (``torch._foreach_mul_``, no host sync), then runs ``torch.optim.SGD.step`` — so the multiplier
    applies before weight decay and momentum, as the official ``RepOptimizerSGD``, and with
    Nesterov, dampening, param groups, ``state_dict`` and LR schedulers exactly as torch's SGD.
    After ``step()`` the listed ``.grad`` tensors hold the multiplied gradients.

    Args:
        params: parameters or param-group dicts, as ``torch.optim.SGD``.
        grad_mults: ``{parameter: multiplier}`` (same shape as the parameter; :func:`grad_mult` with
            ``power=2``); parameters not listed are plain SGD.
        lr, momentum, dampening, weight_decay, nesterov, **kwargs: ``torch.optim.SGD``'s.

    Raises:
        ValueError: a multiplier's shape differs from its parameter's, a key is not among
            ``params``, or torch's SGD rejects an argument.
    """

    def __init__(
        self,
        params: Iterable,
        grad_mults: Mapping[nn.Parameter, torch.Tensor],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        **kwargs,
    ):
        super().__init__(
            params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, **kwargs
        )
        self.set_grad_mults(grad_mults)

    @torch.no_grad()
    def _apply_grad_mults(self) -> None:
        grads, mults = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self._mult_for(p)
                if m is not None:
                    grads.append(p.grad)
                    mults.append(m)
        if grads:
            torch._foreach_mul_(grads, mults)

    def step(self, closure=None):
        """Multiply the listed gradients by their Grad Mult, then one SGD step (torch's).

        ``closure`` (re-evaluates the loss) runs first, as in ``torch.optim.SGD``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._apply_grad_mults()
        _unhooked_step(torch.optim.SGD)(self)
        return loss


def _unhooked_step(cls: type):
    """``cls.step`` without torch's profiling/step-hook wrapper (``Optimizer._patch_step_function``
    wraps the step of every optimizer class once instantiated; our own ``step`` is wrapped already,
    so calling the wrapped parent again would run every step pre/post hook twice)."""
    fn = cls.step
    return fn.__wrapped__ if getattr(fn, "hooked", False) and hasattr(fn, "__wrapped__") else fn


# ---------------------------------------------------------------------------------- AdamW
class RepOptAdamW(_GradMults, torch.optim.AdamW):
    """AdamW with Grad Mult, the official RepOptimizer semantics (``repoptimizer_adamw.py``).

    For a parameter θ with multiplier M (:func:`grad_mult` with ``power=1``), per step t:
    ``g ← M ⊙ g`` (in place in ``.grad``), ``θ ← θ·(1 − lr·wd)`` (decoupled weight decay),
    ``m ← β1·m + (1−β1)·g``, ``v ← β2·v + (1−β2)·g²``,
    ``θ ← θ − lr/(1−β1^t) · M ⊙ m / (√v/√(1−β2^t) + eps)``. A parameter without a multiplier
    follows ``torch.optim.AdamW`` (Loshchilov & Hutter 2019) to rounding. The whole step is
    ``torch._foreach_*`` ops with the step counts on the parameters' devices (like torch's
    ``capturable`` mode): no host sync. AMSGrad, ``maximize`` and complex parameters are not
    supported. CSLA ≡ GR holds up to Adam's eps (module docstring).

    State per parameter: ``step`` (0-dim float32 on the parameter's device), ``exp_avg``,
    ``exp_avg_sq`` — the keys of ``torch.optim.AdamW``, so state dicts load both ways (a CPU
    ``step`` from torch's AdamW is moved to the parameter's device at the next step).

    Args:
        params: parameters or param-group dicts, as ``torch.optim.AdamW``.
        grad_mults: ``{parameter: multiplier}``, same shape as the parameter; others are plain AdamW.
        lr, betas, eps, weight_decay: ``torch.optim.AdamW``'s (defaults 1e-3, (0.9, 0.999), 1e-8,
            1e-2).

    Raises:
        ValueError: a multiplier's shape differs from its parameter's, a key is not among ``params``,
            or torch's AdamW rejects an argument (negative lr, betas outside [0, 1), ...).
    """

    def __init__(
        self,
        params: Iterable,
        grad_mults: Mapping[nn.Parameter, torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.set_grad_mults(grad_mults)

    @torch.no_grad()
    def step(self, closure=None):
        """One RepOpt-AdamW step for every parameter with a gradient (see the class docstring).

        Raises:
            RuntimeError: a sparse gradient, or a group with ``amsgrad``/``maximize`` set.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise RuntimeError("RepOptAdamW supports neither amsgrad nor maximize")
            params, grads, avgs, sqs, steps = [], [], [], [], []
            m_grads, m_mults, m_idx = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RepOptAdamW does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device != p.device:
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
                m = self._mult_for(p)
                if m is not None:
                    m_grads.append(p.grad)
                    m_mults.append(m)
                    m_idx.append(len(params))
                params.append(p)
                grads.append(p.grad)
                avgs.append(state["exp_avg"])
                sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if params:
                self._update(group, params, grads, avgs, sqs, steps, m_grads, m_mults, m_idx)
        return loss

    @staticmethod
    def _update(group, params, grads, avgs, sqs, steps, m_grads, m_mults, m_idx) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        if m_grads:
            torch._foreach_mul_(m_grads, m_mults)  # g ← M ⊙ g (in .grad, as the official code)
        torch._foreach_add_(steps, 1.0)
        if wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_lerp_(avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(sqs, beta2)
        torch._foreach_addcmul_(sqs, grads, grads, 1.0 - beta2)
        # bias corrections on device, in the parameter's dtype (float64 params get float64 factors)
        t = [st.to(p.dtype) for st, p in zip(steps, params)]
        bc1 = torch._foreach_pow(beta1, t)
        torch._foreach_neg_(bc1)
        torch._foreach_add_(bc1, 1.0)  # 1 − β1^t
        bc2 = torch._foreach_pow(beta2, t)
        torch._foreach_neg_(bc2)
        torch._foreach_add_(bc2, 1.0)
        torch._foreach_sqrt_(bc2)  # √(1 − β2^t)
        denom = torch._foreach_sqrt(sqs)
        torch._foreach_div_(denom, bc2)
        torch._foreach_add_(denom, eps)  # √v̂ + eps
        torch._foreach_mul_(denom, bc1)  # (1 − β1^t)(√v̂ + eps): the update is lr·m / denom
        num = list(avgs)
        if m_idx:
            scaled = torch._foreach_mul([avgs[i] for i in m_idx], m_mults)  # M ⊙ m (the official update)
            for i, x in zip(m_idx, scaled):
                num[i] = x
        torch._foreach_addcdiv_(params, num, denom, value=-lr)
