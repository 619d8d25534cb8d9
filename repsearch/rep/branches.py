"""Branch modules of a re-parameterizable block.

A branch is a linear op followed by BN (DyRep Sec. 3.1; DBB Sec. 3.2). In eval mode every branch
equals one KxK conv with bias, returned by ``equivalent_kernel()`` as ``(W, b)`` with shapes
``(C_out, C_in/groups, K, K)`` and ``(C_out,)``. The branches of one block share the parent conv's
geometry ``(C_in, C_out, K, stride, padding, groups)``, so their outputs have the same shape and
their kernels add (DyRep Eq. 2).

Kinds (DyRep Table 1 / DBB Fig. 2 / ACB / RepVGG):

========== =================================================================================
``kxk``     the original conv (maybe a nested ``RepBlock``) + BN
``1x1``     1x1 conv (stride s) + BN, zero-padded to KxK
``1xk``     1xK conv, padding (0, K//2) + BN (ACB)
``kx1``     Kx1 conv, padding (K//2, 0) + BN (ACB)
``1x1-kxk`` 1x1 conv (C_in → C_in) + BN that pads with its zero-input value + KxK conv
            (padding 0, stride s) + BN (DBB transform III)
``1x1-avg`` 1x1 conv (C_in → C_out) + BN-and-pad + KxK average pool (stride s) + BN (DBB transform V)
``identity`` a bare BN (C_in = C_out, stride 1), the identity kernel per group (RepVGG)
========== =================================================================================

Eligibility (DyRep official code's rule, see :func:`ineligibility`): a conv whose padding is not
K//2 takes only ``kxk``, ``1x1-kxk`` and ``1x1-avg``; ``identity`` needs C_in = C_out and stride 1.

Initialisation is the caller's choice, with no method's default baked in: every constructor takes
``gamma_init`` (the last BN's γ; required keyword: DyRep 0.01, DBB/RepVGG 1) and ``conv_init`` (a
:data:`ConvInit` applied to each new conv, ``None`` = PyTorch's own ``nn.Conv2d`` initialisation).
Named initialisers: :func:`kaiming_fan_out`. Importance helper: :func:`last_bn_gamma_abs_mean`.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn as nn

from repsearch.rep.fuse import (
    avg_kernel,
    conv_kernel,
    fuse_bn,
    fuse_bn_module,
    identity_kernel,
    merge_1x1_kxk,
    pad_to_kxk,
)

__all__ = [
    "BRANCH_KINDS",
    "PADDING_FREE_KINDS",
    "ineligibility",
    "reset_bn_to_identity",
    "BNAndPad",
    "Branch",
    "KxkBranch",
    "ConvBNBranch",
    "OneByOneKxkBranch",
    "OneByOneAvgBranch",
    "IdentityBranch",
    "make_branch",
    "conv_geometry",
    "ConvInit",
    "kaiming_fan_out",
    "last_bn_gamma_abs_mean",
]

log = logging.getLogger(__name__)

#: Every branch kind, in canonical order (``kxk`` first: the original conv's own branch).
BRANCH_KINDS: tuple[str, ...] = ("kxk", "1x1", "1x1-kxk", "1x1-avg", "1xk", "kx1", "identity")

#: Kinds that work for any padding of the parent conv (they pad explicitly or are the conv itself).
PADDING_FREE_KINDS: frozenset[str] = frozenset({"kxk", "1x1-kxk", "1x1-avg"})


def _check_kind(kind: str) -> None:
    if kind not in BRANCH_KINDS:
        raise ValueError(f"unknown branch type '{kind}' is not one of {', '.join(BRANCH_KINDS)}")


def ineligibility(
    kind: str,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    padding: int,
    groups: int = 1,
) -> Optional[str]:
    """Why branch ``kind`` cannot join a conv of this geometry, or ``None`` if it can.

    Rules (DyRep official code, ``dyrep.py``; DESIGN.md "Operation spaces"):
    ``identity`` needs C_in = C_out and stride 1; a conv whose padding is not K//2 takes only
    ``kxk``, ``1x1-kxk``, ``1x1-avg``. repsearch adds: the centred kinds (``1x1``, ``1xk``, ``kx1``,
    ``identity``) need an odd K (an even kernel has no centre), and ``1xk``/``kx1`` need K > 1.

    Args:
        kind: one of :data:`BRANCH_KINDS`.
        in_channels, out_channels, kernel_size, stride, padding, groups: the parent conv's geometry
            (square kernel, symmetric int stride and padding).

    Returns:
        a one-line reason, or ``None``.

    Raises:
        ValueError: for an unknown kind.
    """
    _check_kind(kind)
    if kind in PADDING_FREE_KINDS:
        return None
    k = kernel_size
    if kind == "identity":
        if in_channels != out_channels:
            return f"identity needs C_in == C_out (conv maps {in_channels} -> {out_channels} channels)"
        if stride != 1:
            return f"identity needs stride 1 (conv has stride {stride})"
    if k % 2 == 0:
        return f"{kind} needs an odd kernel size to be centred (conv has K={k})"
    if padding != k // 2:
        return (
            f"{kind} needs padding K//2={k // 2} (conv has padding {padding}); "
            f"only {', '.join(sorted(PADDING_FREE_KINDS))} apply"
        )
    if kind in ("1xk", "kx1") and k == 1:
        return f"{kind} needs K > 1 (conv has K=1)"
    return None


@torch.no_grad()
def reset_bn_to_identity(bn: nn.BatchNorm2d, beta: Optional[torch.Tensor] = None) -> None:
    """Reset a BN to the exact eval-mode identity-plus-bias map ``x ↦ x + beta``.

    Running mean 0, running variance ``1 − eps`` (so ``sqrt(var + eps) == 1`` exactly in fp32),
    γ = 1, β = ``beta`` (zeros when ``None``), ``num_batches_tracked`` = 0. Used for the ``kxk``
    branch's BN at Rep/compensation time (DyRep Eq. 6; the official code resets it to γ = 1, β = 0
    with var = 1, which leaves a factor 1/sqrt(1 + eps) that repsearch avoids).

    Args:
        bn: the BN to reset in place (affine, with running statistics).
        beta: ``(C,)`` or ``None``.

    Raises:
        ValueError: when the BN is not affine or tracks no running statistics.
    """
    if bn.weight is None or bn.bias is None or bn.running_mean is None or bn.running_var is None:
        raise ValueError("reset_bn_to_identity needs an affine BN with running statistics")
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.zero_()
    bn.weight.fill_(1.0)
    if beta is None:
        bn.bias.zero_()
    else:
        bn.bias.copy_(beta.detach().to(bn.bias))


def _new_bn(num_features: int, gamma: float, eps: float, factory: dict) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(num_features, eps=eps, **factory)
    with torch.no_grad():
        bn.weight.fill_(gamma)
        bn.bias.zero_()
    return bn


#: A branch conv initialiser: called once on every new bias-free ``nn.Conv2d`` of a branch, right
#: after PyTorch's own initialisation, under ``torch.no_grad()``; it modifies the conv in place
#: (e.g. ``conv.weight``, shape ``(C_out, C_in/groups, K_h, K_w)``) and returns ``None``.
ConvInit = Callable[[nn.Conv2d], None]


def kaiming_fan_out(conv: nn.Conv2d) -> None:
    """Fan-out Kaiming normal init of ``conv.weight`` in place (a :data:`ConvInit`).

    ``W ~ N(0, std²)`` with ``std = sqrt(2 / (C_out · K_h · K_w))`` (dimensionless; PyTorch's fan-out
    of a conv weight ``(C_out, C_in/groups, K_h, K_w)`` is ``C_out · K_h · K_w``, groups ignored), i.e.
    ``nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")``. Draws from the global torch
    RNG (one ``normal_`` over the weight); the bias, if any, is left as it is.

    Sources: He et al., "Delving Deep into Rectifiers", ICCV 2015, Sec. 2.2 (Eq. 10, the backward /
    fan-out form with gain sqrt(2) for ReLU); DyRep's official code initialises the convs of new
    branches this way (as torchvision's VGG/ResNet initialise their convs).
    """
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")


def _new_conv(
    cin: int, cout: int, kernel, stride, padding, groups: int, factory: dict, conv_init: Optional[ConvInit]
) -> nn.Conv2d:
    """A bias-free conv with PyTorch's default init, then ``conv_init`` (if any) applied in place."""
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=False, **factory)
    if conv_init is not None:
        with torch.no_grad():
            conv_init(conv)
    return conv


class BNAndPad(nn.Module):
    """BatchNorm whose output is padded with the value the BN gives a zero input (DBB ``BNAndPad``).

    The pad value is ``β − γ·μ/σ`` from the running statistics (in train mode as well), so that a
    following KxK conv with padding 0 merges exactly with the preceding 1x1 conv into one KxK conv
    with padding ``pad`` (DBB Sec. 3.2, transform III).

    Input ``(N, C, H, W)``; output ``(N, C, H + 2·pad, W + 2·pad)``.
    """

    def __init__(self, num_features: int, pad: int, eps: float = 1e-5, **factory) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, **factory)
        self.pad = int(pad)

    def pad_value(self) -> torch.Tensor:
        """``(C,)``: the BN's eval-mode output for a zero input, ``β − γ·μ/sqrt(var + eps)``."""
        bn = self.bn
        return bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        p = self.pad
        if p == 0:
            return y
        n, c, h, w = y.shape
        out = self.pad_value().to(y.dtype).reshape(1, c, 1, 1).expand(n, c, h + 2 * p, w + 2 * p).clone()
        out[:, :, p : p + h, p : p + w] = y
        return out

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class Branch(nn.Module):
    """Base class of a branch: the parent conv's geometry, ``forward``, ``equivalent_kernel``.

    Args:
        in_channels, out_channels: C_in, C_out of the parent conv.
        kernel_size: K (square), stride, padding (symmetric ints), groups.

    Raises:
        ValueError: on a non-positive size, groups not dividing the channels, or the branch being
            ineligible for this geometry (:func:`ineligibility`).
    """

    kind: str = ""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        padding: int,
        groups: int,
        kind: Optional[str] = None,
    ):
        super().__init__()
        if kind is not None:
            self.kind = kind
        if min(in_channels, out_channels, kernel_size, stride, groups) < 1 or padding < 0:
            raise ValueError(
                f"invalid geometry C_in={in_channels} C_out={out_channels} K={kernel_size} "
                f"stride={stride} padding={padding} groups={groups}"
            )
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide C_in={in_channels} and C_out={out_channels}")
        reason = ineligibility(self.kind, in_channels, out_channels, kernel_size, stride, padding, groups)
        if reason is not None:
            raise ValueError(reason)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = int(kernel_size)
        self.stride = int(stride)
        self.padding = int(padding)
        self.groups = int(groups)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        """The branch's last BN (the one whose output the block sums), shape ``(C_out,)`` parameters.

        Importance rules read its γ (e.g. DyRep Eq. 9; see :func:`last_bn_gamma_abs_mean`). A branch
        without one (none here; e.g. a BN-free scaled branch) raises ``NotImplementedError``.
        """
        raise NotImplementedError

    def equivalent_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode ``(W, b)``: ``(C_out, C_in/groups, K, K)``, ``(C_out,)`` (differentiable)."""
        raise NotImplementedError

    #: child conv name -> name of the BN that alone consumes its output (see :meth:`following_bn`)
    _FOLLOWERS: dict[str, str] = {}

    def following_bn(self, child: str) -> Optional[nn.BatchNorm2d]:
        """The BN applied directly (and only) to the output of child conv ``child``, or ``None``.

        Used to fold a constant bias into that BN's running mean (exact in eval mode).
        """
        name = self._FOLLOWERS.get(child)
        if name is None:
            return None
        m = getattr(self, name)
        return m.bn if isinstance(m, BNAndPad) else m

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class KxkBranch(Branch):
    """The original conv's branch: ``bn(conv(x))`` (DyRep Fig. 2).

    ``conv`` is an ``nn.Conv2d`` with geometry ``(C_in, C_out, K, stride, padding, groups)`` or,
    after a nested Rep, a ``RepBlock`` with that geometry (DyRep: Rep is recursive).

    Raises:
        ValueError: when the conv is not square, has dilation ≠ 1, non-zero padding mode, asymmetric
            stride/padding, or the BN size differs from C_out.
    """

    kind = "kxk"
    _FOLLOWERS = {"conv": "bn"}

    def __init__(self, conv: nn.Module, bn: nn.BatchNorm2d):
        geom = conv_geometry(conv)
        super().__init__(*geom)
        if bn.num_features != geom[1]:
            raise ValueError(f"BN has {bn.num_features} features, conv has {geom[1]} output channels")
        self.conv = conv
        self.bn = bn

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def equivalent_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = conv_kernel(self.conv)
        return fuse_bn_module(w, b, self.bn)


class ConvBNBranch(Branch):
    """``1x1``, ``1xk`` or ``kx1``: one small conv (stride s, centred padding) + BN, zero-padded to KxK
    at fusion (DBB transform VI; ACB's asymmetric branches).

    Needs padding = K//2 and an odd K (see :func:`ineligibility`).

    Init (keyword-only): ``gamma_init`` = the last BN's γ (required, no default; β = 0),
    ``conv_init`` = a :data:`ConvInit` applied to the new conv (``None``: PyTorch's own init), ``eps`` =
    the BNs' epsilon, ``device``/``dtype`` via ``**factory``. Inner BNs: γ = 1, β = 0. Running
    statistics: mean 0, var 1.

    Raises:
        ValueError: a kind other than ``1x1``/``1xk``/``kx1``, an invalid or ineligible geometry.
    """

    _FOLLOWERS = {"conv": "bn"}

    def __init__(
        self,
        kind: str,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        padding: int,
        groups: int,
        *,
        gamma_init: float,
        conv_init: Optional[ConvInit] = None,
        eps: float = 1e-5,
        **factory,
    ):
        if kind not in ("1x1", "1xk", "kx1"):
            raise ValueError(f"ConvBNBranch is for 1x1, 1xk, kx1, not '{kind}'")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, kind=kind)
        k, p = self.kernel_size, self.padding
        shape, pad = {"1x1": ((1, 1), (0, 0)), "1xk": ((1, k), (0, p)), "kx1": ((k, 1), (p, 0))}[kind]
        self.conv = _new_conv(in_channels, out_channels, shape, stride, pad, groups, factory, conv_init)
        self.bn = _new_bn(out_channels, gamma_init, eps, factory)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def equivalent_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = fuse_bn_module(self.conv.weight, None, self.bn)
        return pad_to_kxk(w, self.kernel_size), b


class OneByOneKxkBranch(Branch):
    """``1x1-kxk``: 1x1 conv (C_in → C_in, groups g) → :class:`BNAndPad` (pad = parent padding) →
    KxK conv (C_in → C_out, stride s, padding 0, groups g) → BN (DBB transform III, internal
    channels = C_in as DBB). ``conv2`` may later be replaced by a ``RepBlock`` (nested Rep).

    Init (keyword-only): ``gamma_init`` = the last BN's γ (required, no default; β = 0),
    ``conv_init`` = a :data:`ConvInit` applied to both new convs, ``conv1`` first (``None``:
    PyTorch's own init), ``eps`` = the BNs' epsilon, ``device``/``dtype`` via ``**factory``. Inner
    BNs: γ = 1, β = 0. Running statistics: mean 0, var 1.

    Raises:
        ValueError: an invalid or ineligible geometry.
    """

    kind = "1x1-kxk"
    _FOLLOWERS = {"conv1": "bn1", "conv2": "bn2"}

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        padding: int,
        groups: int,
        *,
        gamma_init: float,
        conv_init: Optional[ConvInit] = None,
        eps: float = 1e-5,
        **factory,
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups)
        mid = in_channels
        self.conv1 = _new_conv(in_channels, mid, 1, 1, 0, groups, factory, conv_init)
        self.bn1 = BNAndPad(mid, padding, eps=eps, **factory)
        self.conv2 = _new_conv(mid, out_channels, kernel_size, stride, 0, groups, factory, conv_init)
        self.bn2 = _new_bn(out_channels, gamma_init, eps, factory)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.bn1(self.conv1(x))))

    def equivalent_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1, b1 = fuse_bn_module(self.conv1.weight, None, self.bn1.bn)
        w2, b2 = conv_kernel(self.conv2)
        w2, b2 = fuse_bn_module(w2, b2, self.bn2)
        return merge_1x1_kxk(w1, b1, w2, b2, self.groups)


class OneByOneAvgBranch(Branch):
    """``1x1-avg``: 1x1 conv (C_in → C_out, groups g) → :class:`BNAndPad` (pad = parent padding) →
    KxK average pool (stride s, padding 0) → BN (DBB transform V then III).

    Init (keyword-only): ``gamma_init`` = the last BN's γ (required, no default; β = 0),
    ``conv_init`` = a :data:`ConvInit` applied to the new 1x1 conv (``None``: PyTorch's own init), ``eps`` =
    the BNs' epsilon, ``device``/``dtype`` via ``**factory``. Inner BNs: γ = 1, β = 0. Running
    statistics: mean 0, var 1.

    Raises:
        ValueError: an invalid or ineligible geometry.
    """

    kind = "1x1-avg"
    _FOLLOWERS = {"conv": "bn1"}

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        padding: int,
        groups: int,
        *,
        gamma_init: float,
        conv_init: Optional[ConvInit] = None,
        eps: float = 1e-5,
        **factory,
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups)
        self.conv = _new_conv(in_channels, out_channels, 1, 1, 0, groups, factory, conv_init)
        self.bn1 = BNAndPad(out_channels, padding, eps=eps, **factory)
        self.avg = nn.AvgPool2d(kernel_size, stride=stride, padding=0, count_include_pad=True)
        self.bn2 = _new_bn(out_channels, gamma_init, eps, factory)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.avg(self.bn1(self.conv(x))))

    def equivalent_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1, b1 = fuse_bn_module(self.conv.weight, None, self.bn1.bn)
        a = avg_kernel(self.out_channels, self.kernel_size, self.groups, dtype=w1.dtype, device=w1.device)
        w, b = merge_1x1_kxk(w1, b1, a, None, self.groups)
        return fuse_bn_module(w, b, self.bn2)


class IdentityBranch(Branch):
    """``identity``: a bare BN on the input (RepVGG; DyRep code's ``dbb_id``); needs C_in = C_out,
    stride 1, padding K//2; fuses to the identity kernel per group.

    Init (keyword-only): ``gamma_init`` = its BN's γ (required, no default; β = 0; running mean 0,
    var 1); ``conv_init`` is accepted for a uniform signature and unused (no conv); ``eps``,
    ``**factory`` (device, dtype) as for the other branches.

    Raises:
        ValueError: an invalid or ineligible geometry (C_in ≠ C_out, stride ≠ 1, ...).
    """

    kind = "identity"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        padding: int,
        groups: int,
        *,
        gamma_init: float,
        conv_init: Optional[ConvInit] = None,
        eps: float = 1e-5,
        **factory,
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups)
        self.bn = _new_bn(out_channels, gamma_init, eps, factory)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)

    def equivalent_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        ref = self.bn.running_mean
        w = identity_kernel(self.out_channels, self.kernel_size, self.groups, dtype=ref.dtype, device=ref.device)
        return fuse_bn_module(w, None, self.bn)


def conv_geometry(conv: nn.Module) -> tuple[int, int, int, int, int, int]:
    """``(C_in, C_out, K, stride, padding, groups)`` of a square conv-like module.

    Accepts an ``nn.Conv2d`` (padding given as int, pair or ``'valid'``/``'same'``) or any module
    exposing those attributes as ints (a ``RepBlock``).

    Raises:
        ValueError: for a non-square kernel, asymmetric stride/padding, dilation ≠ 1, a padding mode
            other than ``'zeros'``, or ``'same'`` padding with an even kernel.
    """
    if isinstance(conv, nn.Conv2d):
        kh, kw = conv.kernel_size
        if kh != kw:
            raise ValueError(f"only square kernels can be re-parameterized, got {kh}x{kw}")
        if tuple(conv.dilation) != (1, 1):
            raise ValueError(f"dilation must be 1, got {tuple(conv.dilation)}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode must be 'zeros', got '{conv.padding_mode}'")
        sh, sw = conv.stride
        if sh != sw:
            raise ValueError(f"stride must be symmetric, got {tuple(conv.stride)}")
        pad = conv.padding
        if isinstance(pad, str):
            if pad == "valid":
                p = 0
            elif kh % 2 == 1:
                p = kh // 2
            else:
                raise ValueError("padding='same' with an even kernel is asymmetric")
        else:
            if pad[0] != pad[1]:
                raise ValueError(f"padding must be symmetric, got {tuple(pad)}")
            p = pad[0]
        return conv.in_channels, conv.out_channels, kh, sh, p, conv.groups
    try:
        return (
            int(conv.in_channels),
            int(conv.out_channels),
            int(conv.kernel_size),
            int(conv.stride),
            int(conv.padding),
            int(conv.groups),
        )
    except (AttributeError, TypeError):
        raise ValueError(f"{type(conv).__name__} is not a square conv-like module") from None


_CLASSES = {
    "1x1": ConvBNBranch,
    "1xk": ConvBNBranch,
    "kx1": ConvBNBranch,
    "1x1-kxk": OneByOneKxkBranch,
    "1x1-avg": OneByOneAvgBranch,
    "identity": IdentityBranch,
}


def make_branch(
    kind: str,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    *,
    gamma_init: float,
    conv_init: Optional[ConvInit] = None,
    eps: float = 1e-5,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
) -> Branch:
    """Build a freshly initialised branch of ``kind`` for a parent conv of this geometry.

    Each new conv gets PyTorch's own ``nn.Conv2d`` init, then ``conv_init`` (if not ``None``) in
    place; the last BN γ = ``gamma_init``, β = 0; inner BNs γ = 1, β = 0; running statistics mean 0,
    var 1. ``kxk`` builds a new KxK conv + BN (γ = ``gamma_init``). No method's choice is a default:
    DyRep (Algorithm 1, Rep step; Fig. 4) passes ``gamma_init=0.01, conv_init=kaiming_fan_out`` (its
    official code), DBB/RepVGG ``gamma_init=1``.

    Args:
        kind: one of :data:`BRANCH_KINDS`.
        in_channels, out_channels, kernel_size, stride, padding, groups: the parent conv's geometry
            (square K, symmetric int stride and padding).
        gamma_init: the last BN's γ (keyword-only, required).
        conv_init: a :data:`ConvInit` (e.g. :func:`kaiming_fan_out`) or ``None`` (PyTorch's default).
            Convs are created (and ``conv_init`` called) in the branch's module order, so the
            global RNG is consumed in a fixed order.
        eps: every new BN's epsilon.
        device, dtype: of the new parameters and buffers.

    Returns:
        the branch, in training mode; its ``equivalent_kernel()`` is ``(C_out, C_in/groups, K, K)``,
        ``(C_out,)``.

    Raises:
        TypeError: ``gamma_init`` missing.
        ValueError: unknown kind, invalid geometry, or a kind ineligible for it.
    """
    _check_kind(kind)
    factory = {"device": device, "dtype": dtype}
    init = {"gamma_init": gamma_init, "conv_init": conv_init, "eps": eps}
    if kind == "kxk":
        conv = _new_conv(in_channels, out_channels, kernel_size, stride, padding, groups, factory, conv_init)
        return KxkBranch(conv, _new_bn(out_channels, gamma_init, eps, factory))
    cls = _CLASSES[kind]
    if cls is ConvBNBranch:
        return ConvBNBranch(
            kind, in_channels, out_channels, kernel_size, stride, padding, groups, **init, **factory
        )
    return cls(in_channels, out_channels, kernel_size, stride, padding, groups, **init, **factory)


def last_bn_gamma_abs_mean(branch: nn.Module) -> float:
    """``mean_c |γ_c|`` of ``branch.last_bn`` (a Python float, dimensionless): the BN-scale magnitude
    that importance rules build on (DyRep Eq. 9 normalises it by the ``kxk`` branch's; see
    ``repsearch.methods.dyrep.dyrep_importance``).

    Every branch kind here has a last BN, ``identity`` included (its bare BN) and ``kxk`` (its
    ``bn``). Reads the values only (no autograd graph).

    Raises:
        ValueError: when the branch has no last BN (``last_bn`` missing, raising
            ``NotImplementedError``, or ``None``) or that BN is not affine (no γ).
    """
    try:
        bn = branch.last_bn
    except (AttributeError, NotImplementedError):
        bn = None
    if bn is None or getattr(bn, "weight", None) is None:
        raise ValueError(f"{type(branch).__name__} has no last BN with a γ to read an importance from")
    return bn.weight.detach().abs().mean().item()
