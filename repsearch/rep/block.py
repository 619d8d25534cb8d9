"""RepBlock: one conv of a model turned into a sum of branches (DyRep Fig. 2, DBB Fig. 1).

A ``RepBlock`` replaces ONE ``nn.Conv2d`` of a model; the model's own BN after that conv stays where
it is. The block's output is the sum of its branches (DyRep Eq. 2). Branch ``kxk`` holds the
original conv (the same ``Parameter`` objects, so optimizer state survives) followed by a BN that
starts as the exact identity. In eval mode the block equals one KxK conv with bias
(:meth:`RepBlock.equivalent_kernel`, :meth:`RepBlock.fuse`).

Shapes: input ``(N, C_in, H, W)``, output ``(N, C_out, H', W')`` as the original conv.

No method's choice is a default here: new branches take ``gamma_init`` / ``conv_init`` from the
caller (:meth:`RepBlock.add_branch`) and branch importance an :data:`ImportanceRule`
(:meth:`RepBlock.branch_importance`).

Attach rate λ (RepAn, CVPR 2024, supplementary Eq. 1 and 5; official code ``x_3 + λ·(x_1 + x_0)``):
off by default. :meth:`RepBlock.set_attach_rate` turns it on for one block, registering a 0-dim
non-persistent buffer ``attach_lambda`` (so ``state_dict`` keys stay those of a plain block, the value
follows ``.to(device)``, and a compiled model reads it as a tensor instead of recompiling when it
changes). With λ on, the block computes ``kxk(x) + λ·Σ_{j≠kxk} branch_j(x)``; the equivalent kernel,
:meth:`~RepBlock.fuse`, :meth:`~RepBlock.compensate` and :meth:`~RepBlock.remove_branches` all use
that same weighted sum.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from repsearch.rep.branches import (
    BRANCH_KINDS,
    Branch,
    ConvInit,
    KxkBranch,
    conv_geometry,
    ineligibility,
    make_branch,
    reset_bn_to_identity,
)

__all__ = ["RepBlock", "ImportanceRule", "eligible_kinds", "eligible_branches"]

log = logging.getLogger(__name__)

#: A branch-importance rule for :meth:`RepBlock.branch_importance`: ``rule(branch, kxk) -> float``,
#: called once per non-``kxk`` branch of a block with that branch and the block's ``kxk`` branch
#: (for rules normalised by the original conv's branch), under ``torch.no_grad()``. Example: DyRep
#: Eq. 9, ``repsearch.methods.dyrep.dyrep_importance``; a plain one:
#: ``lambda br, kxk: last_bn_gamma_abs_mean(br)``.
ImportanceRule = Callable[[Branch, KxkBranch], float]


def _geometry_of(conv_or_block: nn.Module) -> tuple[int, int, int, int, int, int]:
    return conv_geometry(conv_or_block)


def eligible_kinds(conv_or_block: nn.Module) -> tuple[str, ...]:
    """All branch kinds (``kxk`` included, canonical order) that a conv of this geometry can take.

    Args:
        conv_or_block: an ``nn.Conv2d`` (square, dilation 1) or a :class:`RepBlock`.

    Raises:
        ValueError: when the module cannot be re-parameterized at all (see ``conv_geometry``).
    """
    geom = _geometry_of(conv_or_block)
    return tuple(k for k in BRANCH_KINDS if ineligibility(k, *geom) is None)


def eligible_branches(conv: nn.Module, kinds: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """Split requested branch kinds into those this conv takes and those it does not.

    Rules (DESIGN.md "Operation spaces"; DyRep official code): ``identity`` needs C_in = C_out and
    stride 1; a conv whose padding is not K//2 takes only ``kxk``, ``1x1-kxk``, ``1x1-avg``.

    Args:
        conv: an ``nn.Conv2d`` or :class:`RepBlock`.
        kinds: requested kinds (duplicates and ``kxk`` allowed; ``kxk`` is always part of a block).

    Returns:
        ``(kept, skipped)``: ``kept`` = the eligible non-``kxk`` kinds in canonical order;
        ``skipped`` = ``{kind: reason}`` for the ineligible ones.

    Raises:
        ValueError: for an unknown kind or a module that cannot be re-parameterized.
    """
    geom = _geometry_of(conv)
    wanted = set()
    for k in kinds:
        if k not in BRANCH_KINDS:
            raise ValueError(f"unknown branch type '{k}' is not one of {', '.join(BRANCH_KINDS)}")
        wanted.add(k)
    kept: list[str] = []
    skipped: dict[str, str] = {}
    for k in BRANCH_KINDS:
        if k not in wanted or k == "kxk":
            continue
        reason = ineligibility(k, *geom)
        if reason is None:
            kept.append(k)
        else:
            skipped[k] = reason
    return kept, skipped


class RepBlock(nn.Module):
    """A conv re-parameterized as a sum of branches (DyRep Sec. 3; DBB).

    ``branches`` is an ``nn.ModuleDict`` keyed by kind (one branch per kind); ``branches['kxk']`` is
    always present. Geometry attributes ``in_channels``, ``out_channels``, ``kernel_size``,
    ``stride``, ``padding``, ``groups`` are ints (square kernel, symmetric stride/padding,
    dilation 1). ``origin_bias`` records whether the replaced conv had a bias (used by deploy).

    Args:
        kxk: the ``kxk`` branch (conv or nested block + BN).
        origin_bias: whether the original conv had a bias.
    """

    def __init__(self, kxk: KxkBranch, origin_bias: bool = False):
        super().__init__()
        if not isinstance(kxk, KxkBranch):
            raise TypeError(f"RepBlock needs a KxkBranch, got {type(kxk).__name__}")
        self.in_channels = kxk.in_channels
        self.out_channels = kxk.out_channels
        self.kernel_size = kxk.kernel_size
        self.stride = kxk.stride
        self.padding = kxk.padding
        self.groups = kxk.groups
        self.origin_bias = bool(origin_bias)
        self.branches = nn.ModuleDict({"kxk": kxk})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, eps: float = 1e-5) -> "RepBlock":
        """Wrap a conv as a block whose only branch is ``kxk``, equal to the conv in eval mode.

        The ``kxk`` conv is a bias-free ``nn.Conv2d`` that shares ``conv.weight`` (the same
        ``Parameter``); the input module itself is left untouched. Its BN is the exact identity plus
        bias (:func:`reset_bn_to_identity`: mean 0, var 1 − eps, γ 1, β = ``conv.bias`` or 0).

        Args:
            conv: a square ``nn.Conv2d`` with dilation 1 and zero padding mode.
            eps: the new BN's epsilon.

        Returns:
            a ``RepBlock`` in the conv's training mode, on its device and dtype.

        Raises:
            TypeError: when ``conv`` is not an ``nn.Conv2d``.
            ValueError: when it cannot be re-parameterized (non-square, dilation ≠ 1, ...).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"RepBlock.from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        cin, cout, k, s, p, g = conv_geometry(conv)
        w = conv.weight
        inner = nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=g, bias=False, device="meta")
        inner.weight = w
        bn = nn.BatchNorm2d(cout, eps=eps, device=w.device, dtype=w.dtype)
        reset_bn_to_identity(bn, conv.bias)
        block = cls(KxkBranch(inner, bn), origin_bias=conv.bias is not None)
        block.train(conv.training)
        return block

    # ------------------------------------------------------------------ branches
    @property
    def kinds(self) -> tuple[str, ...]:
        """Present branch kinds in canonical order (``kxk`` first)."""
        return tuple(k for k in BRANCH_KINDS if k in self.branches)

    def geometry(self) -> tuple[int, int, int, int, int, int]:
        """``(C_in, C_out, K, stride, padding, groups)``."""
        return (self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.groups)

    def ineligibility(self, kind: str) -> Optional[str]:
        """Why ``kind`` cannot join this block (geometry only), or ``None``. Raises ValueError for an
        unknown kind."""
        return ineligibility(kind, *self.geometry())

    def eligible(self, kind: str) -> bool:
        """Whether this block's geometry admits branch ``kind`` (DESIGN.md eligibility rules)."""
        return self.ineligibility(kind) is None

    def _factory(self) -> dict:
        for t in self.parameters():
            return {"device": t.device, "dtype": t.dtype}
        for t in self.buffers():
            return {"device": t.device, "dtype": t.dtype}
        return {}

    def add_branch(
        self,
        kind: str,
        *,
        gamma_init: float,
        conv_init: Optional[ConvInit] = None,
        eps: float = 1e-5,
    ) -> str:
        """Add a freshly initialised branch of ``kind`` (DyRep Algorithm 1, Rep step).

        Built by :func:`~repsearch.rep.branches.make_branch` on the block's geometry, device and
        dtype, in the block's training mode. The block's output changes by the new branch's output
        (call :meth:`compensate` to restore it).

        Args:
            kind: a non-``kxk`` kind of :data:`~repsearch.rep.branches.BRANCH_KINDS`.
            gamma_init: the new branch's last-BN γ (keyword-only, required; β = 0; DyRep 0.01,
                DBB/RepVGG 1). Inner BNs γ = 1, β = 0.
            conv_init: a :data:`~repsearch.rep.branches.ConvInit` applied to each new conv after
                PyTorch's own init (e.g. ``kaiming_fan_out``, DyRep's official code), or ``None``
                to keep PyTorch's ``nn.Conv2d`` init.
            eps: the new BNs' epsilon.

        Returns:
            the branch's key in ``self.branches`` (the kind).

        Raises:
            TypeError: ``gamma_init`` missing.
            ValueError: unknown kind, ``kxk``, a kind already present, or an ineligible kind.
        """
        if kind == "kxk" or kind in self.branches:
            raise ValueError(f"branch '{kind}' is already present in this block")
        reason = self.ineligibility(kind)
        if reason is not None:
            raise ValueError(reason)
        branch = make_branch(
            kind, *self.geometry(), gamma_init=gamma_init, conv_init=conv_init, eps=eps, **self._factory()
        )
        branch.train(self.training)
        self.branches[kind] = branch
        return kind

    @property
    def kxk(self) -> KxkBranch:
        """The ``kxk`` branch (original conv + BN)."""
        return self.branches["kxk"]

    # ------------------------------------------------------------------ forward / kernels
    # ------------------------------------------------------------------ attach rate λ (RepAn)
    @property
    def attach_rate(self) -> Optional[float]:
        """λ as a Python float (dimensionless; host sync), or ``None`` when λ is off (every branch
        weighs 1, the default of every block that RepAn did not touch)."""
        lam = self._buffers.get("attach_lambda")
        return None if lam is None else float(lam.item())

    @torch.no_grad()
    def set_attach_rate(self, value: float) -> None:
        """Set λ, the weight of every non-``kxk`` branch (RepAn supplementary Eq. 1, 5).

        The first call registers a 0-dim non-persistent buffer ``attach_lambda`` on the block's device
        and dtype (``state_dict`` keys unchanged); later calls write it in place (``fill_``), so a
        compiled forward is not re-traced. From then on forward, :meth:`equivalent_kernel`,
        :meth:`fuse`, :meth:`compensate` and :meth:`remove_branches` weigh the non-``kxk`` branches
        by λ. λ = 1 gives exactly the plain block's sums; λ = 0 gives the ``kxk`` branch alone.

        Args:
            value: λ (a finite float, usually in [0, 1]).

        Raises:
            ValueError: ``value`` is not finite.
        """
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"attach rate must be finite, got {value}")
        lam = self._buffers.get("attach_lambda")
        if lam is None:
            fac = self._factory()
            dtype = fac.get("dtype", torch.float32)
            if not dtype.is_floating_point:
                dtype = torch.float32
            self.register_buffer(
                "attach_lambda", torch.tensor(value, dtype=dtype, device=fac.get("device")), persistent=False
            )
        else:
            lam.fill_(value)

    def _weight(self, kind: str) -> Optional[torch.Tensor]:
        """λ for a non-``kxk`` branch when λ is on, else ``None`` (weight 1)."""
        if kind == "kxk":
            return None
        return self._buffers.get("attach_lambda")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = getattr(self, "attach_lambda", None)
        if lam is None:
            out = None
            for branch in self.branches.values():
                y = branch(x)
                out = y if out is None else out + y
            return out
        out = self.branches["kxk"](x)
        extra = None
        for kind, branch in self.branches.items():
            if kind == "kxk":
                continue
            y = branch(x)
            extra = y if extra is None else extra + y
        return out if extra is None else out + lam * extra

    def equivalent_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode ``(W, b)`` of the whole block, nested blocks fused recursively (DyRep Eq. 2, 8;
        with λ on, ``W = W_kxk + λ·Σ_j W_j``, RepAn supplementary Eq. 1).

        Returns ``(C_out, C_in/groups, K, K)`` and ``(C_out,)``; differentiable (wrap in no_grad to
        write it somewhere).
        """
        w = b = None
        for kind, branch in self.branches.items():
            wj, bj = branch.equivalent_kernel()
            lam = self._weight(kind)
            if lam is not None:
                wj, bj = wj * lam, bj * lam
            w = wj if w is None else w + wj
            b = bj if b is None else b + bj
        return w, b

    def _check_kernel(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        shape = (self.out_channels, self.in_channels // self.groups, self.kernel_size, self.kernel_size)
        if tuple(weight.shape) != shape:
            raise ValueError(f"kernel shape {tuple(weight.shape)} does not match the block's {shape}")
        if tuple(bias.shape) != (self.out_channels,):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match ({self.out_channels},)")

    @torch.no_grad()
    def _set_kxk_kernel(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Make the ``kxk`` branch equal ``(weight, bias)`` in eval mode, in place (Parameters kept)."""
        kxk = self.kxk
        if isinstance(kxk.conv, RepBlock):
            reset_bn_to_identity(kxk.bn)
            kxk.conv.compensate(weight, bias)
        else:
            kxk.conv.weight.copy_(weight)
            if kxk.conv.bias is not None:
                kxk.conv.bias.zero_()
            reset_bn_to_identity(kxk.bn, bias)

    @torch.no_grad()
    def compensate(self, target_weight: torch.Tensor, target_bias: Optional[torch.Tensor] = None) -> None:
        """Set the ``kxk`` branch so that the block equals the target kernel in eval mode
        (DyRep Eq. 6: ``F_ori ← F_target − Σ_j F_new_j``; with λ on, ``− λ·Σ_j F_new_j``).

        ``kxk`` conv weight = target_W − Σ_j W_j, its BN reset to identity with β = target_b − Σ_j b_j
        (sums over the non-``kxk`` branches, eval-mode kernels). A nested ``kxk`` block is
        compensated recursively. Call after re-calibrating the new branches' BN statistics.

        Args:
            target_weight: ``(C_out, C_in/groups, K, K)``; target_bias: ``(C_out,)`` or ``None`` (0).

        Raises:
            ValueError: on shape mismatch.
        """
        w = target_weight.detach().clone()
        b = (
            torch.zeros(self.out_channels, dtype=w.dtype, device=w.device)
            if target_bias is None
            else target_bias.detach().clone()
        )
        self._check_kernel(w, b)
        for kind, branch in self.branches.items():
            if kind == "kxk":
                continue
            wj, bj = branch.equivalent_kernel()
            lam = self._weight(kind)
            if lam is not None:
                wj, bj = wj * lam, bj * lam
            w -= wj
            b -= bj
        self._set_kxk_kernel(w, b)

    @torch.no_grad()
    def remove_branches(self, kinds: Iterable[str], absorb: bool = True) -> list[str]:
        """Remove branches (Dep, DyRep Sec. 4.2, Eq. 10: ``F_ori ← F_ori + F_j``).

        With ``absorb`` the removed branches' eval-mode kernels (times λ when λ is on) are folded
        into the ``kxk`` branch (written back as its conv weight with its BN reset to identity-plus-bias, recursively for a
        nested ``kxk`` block), so the block's eval output is unchanged. Without, they are dropped.

        Args:
            kinds: kinds to remove (not ``kxk``).

        Returns:
            the removed kinds, canonical order.

        Raises:
            ValueError: for ``kxk``, an unknown kind, or a kind not present.
        """
        kinds = list(dict.fromkeys(kinds))
        for k in kinds:
            if k == "kxk":
                raise ValueError("the kxk branch cannot be removed")
            if k not in BRANCH_KINDS:
                raise ValueError(f"unknown branch type '{k}' is not one of {', '.join(BRANCH_KINDS)}")
            if k not in self.branches:
                raise ValueError(f"branch '{k}' is not present (block has {', '.join(self.kinds)})")
        if not kinds:
            return []
        if absorb:
            w, b = self.kxk.equivalent_kernel()
            w, b = w.clone(), b.clone()
            for k in kinds:
                wj, bj = self.branches[k].equivalent_kernel()
                lam = self._weight(k)
                if lam is not None:
                    wj, bj = wj * lam, bj * lam
                w += wj
                b += bj
            self._set_kxk_kernel(w, b)
        for k in kinds:
            del self.branches[k]
        return [k for k in BRANCH_KINDS if k in kinds]

    @torch.no_grad()
    def branch_importance(self, rule: ImportanceRule) -> dict[str, float]:
        """``{kind: rule(branch, self.kxk)}`` for every non-``kxk`` branch, canonical order (the input
        of a Dep decision, DyRep Sec. 4.2).

        Args:
            rule: an :data:`ImportanceRule` (required; no rule is a default): called once per branch
                under ``torch.no_grad()``; its value is converted with ``float``. DyRep passes
                ``repsearch.methods.dyrep.dyrep_importance`` (Eq. 9 as its official code reads it).

        Returns:
            ``{kind: importance}``, empty for a block with ``kxk`` alone.

        Raises:
            whatever ``rule`` raises (e.g. ``ValueError`` from
            :func:`~repsearch.rep.branches.last_bn_gamma_abs_mean` for a branch without a last BN).
        """
        kxk = self.kxk
        return {kind: float(rule(self.branches[kind], kxk)) for kind in self.kinds if kind != "kxk"}

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """One ``nn.Conv2d`` with bias equal to the block in eval mode (nested blocks included).

        Returns a new conv on the block's device/dtype, in the block's training mode.
        """
        w, b = self.equivalent_kernel()
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
            bias=True,
            device="meta",
        )
        conv.weight = nn.Parameter(w.detach().clone())
        conv.bias = nn.Parameter(b.detach().clone())
        conv.train(self.training)
        return conv

    def describe(self) -> dict:
        """JSON-able structure: geometry, present kinds and nested blocks by relative path.

        ``{"type": "RepBlock", "in_channels", "out_channels", "kernel_size", "stride", "padding",
        "groups", "origin_bias", "branches": [kinds], "nested": {rel_path: describe()}}``, plus
        ``"attach_rate": λ`` when λ is on (RepAn).
        """
        nested = {}
        for kind in self.kinds:
            for name, m in self.branches[kind].named_modules():
                if isinstance(m, RepBlock) and name and not _inside_block(self.branches[kind], name):
                    nested[f"branches.{kind}.{name}"] = m.describe()
        out = {
            "type": "RepBlock",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "groups": self.groups,
            "origin_bias": self.origin_bias,
            "branches": list(self.kinds),
            "nested": nested,
        }
        if "attach_lambda" in self._buffers:
            out["attach_rate"] = self.attach_rate
        return out

    def extra_repr(self) -> str:
        lam = f", attach_rate={self.attach_rate:g}" if "attach_lambda" in self._buffers else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, branches={list(self.kinds)}{lam}"
        )


def _inside_block(root: nn.Module, path: str) -> bool:
    """Whether ``path`` (relative to ``root``) passes through a RepBlock strictly above its end."""
    parts = path.split(".")
    m = root
    for part in parts[:-1]:
        m = getattr(m, part)
        if isinstance(m, RepBlock):
            return True
    return False
