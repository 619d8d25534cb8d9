"""Shared helpers of the equivalence tests (DESIGN.md conventions: fp32, eval mode,
max|y - y_ref| <= 1e-5 * max(1, max|y_ref|), random BN statistics)."""

import torch
from torch import nn

TOL = 1e-5


def assert_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Assert DESIGN.md's equivalence tolerance between ``y`` and ``ref`` (same shape)."""
    tol = TOL * max(1.0, ref.abs().max().item())
    err = (y - ref).abs().max().item()
    assert y.shape == ref.shape
    assert err <= tol, f"max abs err {err:.3e} > {tol:.3e}"


@torch.no_grad()
def randomize_bns(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Non-trivial running mean/var, γ (both signs) and β in every BN of ``module``."""
    g = generator
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.7 + 0.3)
            sign = torch.randint(0, 2, (c,), generator=g) * 2 - 1
            m.weight.copy_((torch.rand(c, generator=g) + 0.5) * sign)
            m.bias.copy_(torch.randn(c, generator=g) * 0.5)
