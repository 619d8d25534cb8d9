"""CSLABlock: the BN-free, constant-scale linear-addition block of RepOptimizers (RepOpt §3.2, Fig. 2).

A CSLA (Constant-Scale Linear Addition) block replaces ONE ``nn.Conv2d`` of a model, like
:class:`~repsearch.rep.block.RepBlock`; the model's own BN after that conv stays where it is. Its
output is

    ``y = s ⊙ conv_KxK(x) + t ⊙ conv_1x1(x) + scale_identity ⊙ x``

with per-output-channel scales ``s``, ``t``, ``scale_identity`` of shape ``(C_out,)`` (broadcast as
``(1, C_out, 1, 1)``), no BN inside and no bias. Every branch holds exactly one linear trainable op,
so training the block with SGD equals training one KxK conv whose gradient is multiplied by the
Grad Mult (CSLA ≡ GR, RepOpt Appendix A; :mod:`repsearch.gradmult`).

- ``trainable_scales=False``: ``s`` and ``t`` are constant buffers (the CSLA model of a
  RepOptimizer); ``trainable_scales=True``: they are Parameters (the Hyper-Search model, RepOpt §3.3).
- The identity scale is always a trainable Parameter (RepOpt §3.2: "trainable channel-wise
  scaling", a depthwise 1x1 conv times the constant 1, so its Grad Mult entry is 1). It exists only
  when C_in = C_out, stride 1 and the padding keeps the size (K odd, padding K//2).
- Groups are handled exactly: both convs use the replaced conv's ``groups`` and the identity kernel
  is built per group (:func:`~repsearch.rep.fuse.identity_kernel`); RepOpt-VGG itself uses groups=1.

Shapes: input ``(N, C_in, H, W)``, output ``(N, C_out, H', W')`` as the replaced conv.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

from repsearch.rep.branches import conv_geometry, ineligibility
from repsearch.rep.fuse import identity_kernel, pad_to_kxk

__all__ = ["CSLABlock"]

log = logging.getLogger(__name__)


class CSLABlock(nn.Module):
    """A conv replaced by ``s ⊙ KxK + t ⊙ 1x1 (+ scale_identity ⊙ x)``, no BN inside (RepOpt §3.2).

    Geometry attributes (ints, like :class:`~repsearch.rep.block.RepBlock`): ``in_channels``,
    ``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``groups``; ``origin_bias`` records
    whether the replaced conv had a bias (the fused conv then gets a zero bias so that the deployed
    model keeps the origin model's keys). The block itself never has a bias.

    Submodules / tensors (state_dict keys):

    - ``conv``: ``nn.Conv2d(C_in, C_out, K, stride, padding, groups, bias=False)``;
    - ``conv_1x1``: ``nn.Conv2d(C_in, C_out, 1, stride, padding − K//2, groups, bias=False)``;
    - ``s``, ``t``: ``(C_out,)`` Parameters (``trainable_scales``) or buffers (constants);
    - ``scale_identity``: ``(C_out,)`` Parameter, or ``None`` when the block has no identity branch.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, groups: the replaced conv's
            geometry (square K, symmetric stride/padding).
        scale_init: initial value of every entry of ``s`` and ``t`` (RepOpt Appendix B: 1 for the
            first block of a stage, √(2/l) deeper; the caller's choice).
        identity_init: initial value of ``scale_identity`` (RepOpt §3.4: 1).
        trainable_scales: ``s``/``t`` as Parameters (Hyper-Search) or as constant buffers (CSLA).
        origin_bias: whether the replaced conv had a bias.
        identity: build the identity branch when the geometry allows it (default); ``False`` never.
        device, dtype: factory arguments of the new tensors.

    The two convs get PyTorch's default ``nn.Conv2d`` initialisation (kaiming-uniform, a = √5, as
    RepOpt's official code); re-initialise them yourself for another scheme.

    Raises:
        ValueError: when the geometry has no 1x1 branch (even K or padding ≠ K//2; the 1x1 must sit
            at the kernel centre), a non-positive size, or groups not dividing the channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: Optional[int] = None,
        groups: int = 1,
        *,
        scale_init: float,
        identity_init: float = 1.0,
        trainable_scales: bool,
        origin_bias: bool = False,
        identity: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        k = int(kernel_size)
        p = k // 2 if padding is None else int(padding)
        if min(in_channels, out_channels, k, stride, groups) < 1 or p < 0:
            raise ValueError(
                f"invalid CSLA geometry C_in={in_channels} C_out={out_channels} K={k} stride={stride} "
                f"padding={p} groups={groups}"
            )
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide C_in={in_channels} and C_out={out_channels}")
        reason = ineligibility("1x1", in_channels, out_channels, k, stride, p, groups)
        if reason is not None:
            raise ValueError(f"a CSLA block needs a centred 1x1 branch: {reason}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = k
        self.stride = int(stride)
        self.padding = p
        self.groups = int(groups)
        self.origin_bias = bool(origin_bias)
        fk = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_channels, out_channels, k, stride=stride, padding=p, groups=groups, bias=False, **fk)
        self.conv_1x1 = nn.Conv2d(
            in_channels, out_channels, 1, stride=stride, padding=p - k // 2, groups=groups, bias=False, **fk
        )
        s = torch.full((out_channels,), float(scale_init), **fk)
        t = torch.full((out_channels,), float(scale_init), **fk)
        self.trainable_scales = bool(trainable_scales)
        if self.trainable_scales:
            self.s = nn.Parameter(s)
            self.t = nn.Parameter(t)
        else:
            self.register_buffer("s", s)
            self.register_buffer("t", t)
        has_id = identity and ineligibility("identity", in_channels, out_channels, k, stride, p, groups) is None
        if has_id:
            self.scale_identity = nn.Parameter(torch.full((out_channels,), float(identity_init), **fk))
        else:
            self.register_parameter("scale_identity", None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        scale_init: float,
        identity_init: float = 1.0,
        trainable_scales: bool,
        identity: bool = True,
    ) -> "CSLABlock":
        """A CSLA block with ``conv``'s geometry, device, dtype and training mode (RepOpt §3.2).

        Only the geometry is taken: the KxK and 1x1 convs are fresh, with PyTorch's default init
        (RepOpt's Hyper-Search/CSLA model builds its own convs); ``conv`` is left untouched.

        Args:
            conv: a square ``nn.Conv2d`` (dilation 1, zero padding mode, odd K, padding K//2).
            scale_init: initial ``s`` and ``t`` (keyword-only, required; RepOpt Appendix B).
            identity_init: initial identity scale (RepOpt §3.4: 1.0).
            trainable_scales: ``s``/``t`` trainable (Hyper-Search) or constant (CSLA).
            identity: add the identity branch when eligible (C_in = C_out, stride 1).

        Raises:
            TypeError: ``conv`` is not an ``nn.Conv2d``.
            ValueError: the conv cannot be re-parameterized (see ``conv_geometry``) or has no
                centred 1x1 position.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"CSLABlock.from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        cin, cout, k, s, p, g = conv_geometry(conv)
        w = conv.weight
        block = cls(
            cin,
            cout,
            k,
            s,
            p,
            g,
            scale_init=scale_init,
            identity_init=identity_init,
            trainable_scales=trainable_scales,
            origin_bias=conv.bias is not None,
            identity=identity,
            device=w.device,
            dtype=w.dtype,
        )
        block.train(conv.training)
        return block

    # ------------------------------------------------------------------ structure
    @property
    def has_identity(self) -> bool:
        """Whether the block has the identity branch (C_in = C_out, stride 1)."""
        return self.scale_identity is not None

    @property
    def kinds(self) -> tuple[str, ...]:
        """Branch kinds in canonical order: ``("kxk", "1x1")`` or ``("kxk", "1x1", "identity")``."""
        return ("kxk", "1x1", "identity") if self.has_identity else ("kxk", "1x1")

    def geometry(self) -> tuple[int, int, int, int, int, int]:
        """``(C_in, C_out, K, stride, padding, groups)``."""
        return (self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.groups)

    # ------------------------------------------------------------------ forward / kernels
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``s ⊙ conv(x) + t ⊙ conv_1x1(x) (+ scale_identity ⊙ x)``: ``(N, C_in, H, W)`` →
        ``(N, C_out, H', W')``."""
        y = self.conv(x) * self.s.view(1, -1, 1, 1) + self.conv_1x1(x) * self.t.view(1, -1, 1, 1)
        if self.scale_identity is not None:
            y = y + x * self.scale_identity.view(1, -1, 1, 1)
        return y

    def equivalent_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The one KxK conv equal to the block (RepOpt §3.4, Rule of Initialization).

        ``W = s·W_KxK + t·pad(W_1x1) + diag(scale_identity)`` at the kernel centre (per group);
        ``b = 0``. Exact in train and eval mode (no BN inside); differentiable.

        Returns:
            ``(W, b)``: ``(C_out, C_in/groups, K, K)`` and ``(C_out,)`` zeros.
        """
        k = self.kernel_size
        w = self.conv.weight * self.s.view(-1, 1, 1, 1) + pad_to_kxk(self.conv_1x1.weight, k) * self.t.view(-1, 1, 1, 1)
        if self.scale_identity is not None:
            eye = identity_kernel(self.out_channels, k, self.groups, dtype=w.dtype, device=w.device)
            w = w + eye * self.scale_identity.view(-1, 1, 1, 1)
        b = torch.zeros(self.out_channels, dtype=w.dtype, device=w.device)
        return w, b

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """One ``nn.Conv2d`` equal to the block (:meth:`equivalent_kernel`), on its device/dtype and in
        its training mode. It has a (zero) bias only when the replaced conv had one
        (``origin_bias``), so a deployed model keeps the origin model's ``state_dict`` keys."""
        w, b = self.equivalent_kernel()
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
            bias=self.origin_bias,
            device="meta",
        )
        conv.weight = nn.Parameter(w.detach().clone())
        if self.origin_bias:
            conv.bias = nn.Parameter(b.detach().clone())
        conv.train(self.training)
        return conv

    @torch.no_grad()
    def scales(self) -> dict[str, Optional[torch.Tensor]]:
        """The block's scales, detached copies (the Hyper-Search result, RepOpt §3.3).

        Returns:
            ``{"s": (C_out,), "t": (C_out,), "identity": (C_out,) or None}``.
        """
        return {
            "s": self.s.detach().clone(),
            "t": self.t.detach().clone(),
            "identity": None if self.scale_identity is None else self.scale_identity.detach().clone(),
        }

    def describe(self) -> dict:
        """JSON-able structure: ``{"type": "CSLABlock", "in_channels", "out_channels", "kernel_size",
        "stride", "padding", "groups", "origin_bias", "trainable_scales", "branches": kinds,
        "nested": {}}``."""
        return {
            "type": "CSLABlock",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "groups": self.groups,
            "origin_bias": self.origin_bias,
            "trainable_scales": self.trainable_scales,
            "branches": list(self.kinds),
            "nested": {},
        }

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, branches={list(self.kinds)}, "
            f"trainable_scales={self.trainable_scales}"
        )
