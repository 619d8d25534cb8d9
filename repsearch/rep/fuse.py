"""Pure tensor transforms of exact structural re-parameterization.

Every function here maps the parameters of a linear op (optionally followed by BN in eval mode) to
one KxK convolution kernel ``W`` of shape ``(C_out, C_in/groups, K, K)`` and a bias ``b`` of shape
``(C_out,)``. They are the transforms of DBB (Ding et al., CVPR 2021, Sec. 3.2, transforms I-VI),
used by RepVGG and DyRep (DyRep Sec. 3, Eq. 2 and Eq. 8).

Nothing here owns modules or state; the functions are differentiable (callers wrap them in
``torch.no_grad()`` when they write the result into parameters).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "fuse_bn",
    "fuse_bn_module",
    "pad_to_kxk",
    "merge_1x1_kxk",
    "avg_kernel",
    "identity_kernel",
    "conv_kernel",
]

log = logging.getLogger(__name__)


def fuse_bn(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    gamma: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the conv before it (DyRep Eq. 8; DBB transform I).

    ``BN(conv(x) + bias)`` equals ``conv'(x) + b'`` with ``W' = W * γ/σ`` (per output channel) and
    ``b' = (bias − μ)·γ/σ + β``, σ = sqrt(running_var + eps).

    Args:
        weight: conv kernel, shape ``(C_out, C_in/groups, kH, kW)`` (any kernel shape).
        bias: conv bias ``(C_out,)`` or ``None`` (zero).
        running_mean, running_var: BN running statistics, ``(C_out,)``.
        gamma, beta: BN affine parameters ``(C_out,)``; ``None`` means 1 / 0 (``affine=False``).
        eps: BN epsilon.

    Returns:
        ``(W', b')`` with the shapes of ``weight`` and ``(C_out,)``.

    Raises:
        ValueError: when the BN size does not match ``weight.shape[0]``.
    """
    c_out = weight.shape[0]
    if running_mean.shape[0] != c_out or running_var.shape[0] != c_out:
        raise ValueError(
            f"BN has {running_mean.shape[0]} channels but the kernel has {c_out} output channels"
        )
    if gamma is None:
        gamma = torch.ones_like(running_mean)
    if beta is None:
        beta = torch.zeros_like(running_mean)
    if bias is None:
        bias = torch.zeros_like(running_mean)
    scale = gamma / torch.sqrt(running_var + eps)
    w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b = (bias - running_mean) * scale + beta
    return w, b


def fuse_bn_module(
    weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fuse_bn` reading the statistics from a ``nn.BatchNorm2d`` (DyRep Eq. 8).

    Args:
        weight: ``(C_out, C_in/groups, kH, kW)``; bias: ``(C_out,)`` or ``None``.
        bn: a BatchNorm with running statistics (``track_running_stats=True``).

    Returns:
        ``(W', b')`` as :func:`fuse_bn`.

    Raises:
        ValueError: when the BN tracks no running statistics (its eval output depends on the batch).
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("a BatchNorm without running statistics cannot be fused into a conv")
    return fuse_bn(weight, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def pad_to_kxk(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Zero-pad a 1x1, 1xK, Kx1 (or any smaller odd-offset) kernel centrally to KxK (DBB transform VI).

    Args:
        weight: ``(C_out, C_in/groups, kH, kW)`` with ``kH, kW <= k`` and ``k - kH``, ``k - kW`` even.
        k: target kernel size.

    Returns:
        ``(C_out, C_in/groups, k, k)``; the input kernel sits at the centre.

    Raises:
        ValueError: when the kernel is larger than ``k`` or cannot be centred (odd size difference).
    """
    kh, kw = weight.shape[-2], weight.shape[-1]
    dh, dw = k - kh, k - kw
    if dh < 0 or dw < 0:
        raise ValueError(f"cannot pad a {kh}x{kw} kernel to {k}x{k}: it is larger")
    if dh % 2 or dw % 2:
        raise ValueError(f"cannot centre a {kh}x{kw} kernel in {k}x{k}: the size difference is odd")
    if dh == 0 and dw == 0:
        return weight
    return F.pad(weight, (dw // 2, dw // 2, dh // 2, dh // 2))


def merge_1x1_kxk(
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a 1x1 conv followed by a KxK conv into one KxK conv, per group (DBB transform III).

    ``conv_kxk(conv_1x1(x) + b1) + b2`` equals ``conv(x; W) + b`` where, within group g,
    ``W[o, i] = Σ_d W2[o, d] · W1[d, i]`` and ``b[o] = b2[o] + Σ_d (Σ_hw W2[o, d]) · b1[d]``.
    The bias part is exact at the borders only if the map between the two convs is padded with
    ``b1`` (the value a zero input takes), as ``BNAndPad`` does (DBB Sec. 3.2).

    Args:
        w1: ``(D, C_in/groups, 1, 1)`` — the first conv (C_in → D, ``groups`` groups).
        b1: ``(D,)`` or ``None`` (zero).
        w2: ``(C_out, D/groups, K, K)`` — the second conv (D → C_out, ``groups`` groups).
        b2: ``(C_out,)`` or ``None`` (zero).
        groups: number of groups of both convs.

    Returns:
        ``(W, b)``: ``(C_out, C_in/groups, K, K)`` and ``(C_out,)``.

    Raises:
        ValueError: on inconsistent shapes or a first kernel that is not 1x1.
    """
    if w1.shape[-2:] != (1, 1):
        raise ValueError(f"the first kernel must be 1x1, got {tuple(w1.shape[-2:])}")
    d, cin_g = w1.shape[0], w1.shape[1]
    c_out, d_g = w2.shape[0], w2.shape[1]
    if d % groups or c_out % groups or d // groups != d_g:
        raise ValueError(
            f"shapes do not chain with groups={groups}: first {tuple(w1.shape)}, second {tuple(w2.shape)}"
        )
    k_h, k_w = w2.shape[-2], w2.shape[-1]
    w1g = w1.reshape(groups, d_g, cin_g)  # (g, D/g, C_in/g)
    w2g = w2.reshape(groups, c_out // groups, d_g, k_h, k_w)  # (g, C_out/g, D/g, K, K)
    w = torch.einsum("godhw,gdi->goihw", w2g, w1g).reshape(c_out, cin_g, k_h, k_w)
    if b2 is None:
        b2 = torch.zeros(c_out, dtype=w2.dtype, device=w2.device)
    if b1 is None:
        b = b2
    else:
        b1g = b1.reshape(groups, d_g)
        b = b2 + torch.einsum("god,gd->go", w2g.sum(dim=(-2, -1)), b1g).reshape(c_out)
    return w, b


def avg_kernel(
    channels: int,
    k: int,
    groups: int = 1,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
) -> torch.Tensor:
    """A KxK average pool (``count_include_pad=True``) as a grouped conv kernel (DBB transform V).

    Args:
        channels: number of channels C (input = output).
        k: pool size K (the pool's stride and padding become the conv's).
        groups: the conv's groups (must divide C); the pool acts per channel in every case.

    Returns:
        ``(C, C/groups, K, K)`` with ``1/K²`` where the output channel meets its own input channel.

    Raises:
        ValueError: when ``groups`` does not divide ``channels``.
    """
    if channels % groups:
        raise ValueError(f"groups={groups} does not divide channels={channels}")
    w = torch.zeros(channels, channels // groups, k, k, dtype=dtype, device=device)
    idx = torch.arange(channels, device=w.device)
    w[idx, idx % (channels // groups)] = 1.0 / (k * k)
    return w


def identity_kernel(
    channels: int,
    k: int,
    groups: int = 1,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
) -> torch.Tensor:
    """The identity map as a KxK conv kernel with padding K//2 (RepVGG's identity branch).

    Args:
        channels: C (input = output). k: odd kernel size K. groups: must divide C.

    Returns:
        ``(C, C/groups, K, K)``: 1 at the centre where the output channel meets its own input.

    Raises:
        ValueError: when K is even (no centre) or ``groups`` does not divide ``channels``.
    """
    if k % 2 == 0:
        raise ValueError(f"an identity kernel needs an odd kernel size, got {k}")
    if channels % groups:
        raise ValueError(f"groups={groups} does not divide channels={channels}")
    w = torch.zeros(channels, channels // groups, k, k, dtype=dtype, device=device)
    idx = torch.arange(channels, device=w.device)
    w[idx, idx % (channels // groups), k // 2, k // 2] = 1.0
    return w


def conv_kernel(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(W, b)`` of a conv-like module: a plain ``nn.Conv2d`` or anything with
    ``equivalent_kernel()`` (a ``RepBlock``: its fused eval-mode kernel — this is what makes nesting
    work, DyRep Sec. 3.3 "Rep is recursive").

    Returns:
        ``(W, b)``: ``(C_out, C_in/groups, kH, kW)`` and ``(C_out,)`` (zeros when the conv has no
        bias).

    Raises:
        TypeError: for any other module.
    """
    if isinstance(module, nn.Conv2d):
        w = module.weight
        b = module.bias if module.bias is not None else torch.zeros(
            w.shape[0], dtype=w.dtype, device=w.device
        )
        return w, b
    fn = getattr(module, "equivalent_kernel", None)
    if callable(fn):
        return fn()
    raise TypeError(f"{type(module).__name__} is neither nn.Conv2d nor a block with equivalent_kernel()")
