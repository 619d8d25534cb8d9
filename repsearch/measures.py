"""Cost measures every run records (DESIGN.md "Measures every run records — contract").

- MACs: multiply-accumulates of one forward pass, counted by ``torch.utils.flop_counter``
  (``FlopCounterMode`` counts 2 FLOPs per MAC for conv / matmul and nothing for BN, bias, pooling
  or activations), so MACs = total // 2. Reported as ``flops_m`` in millions, as the papers do
  (DyRep Table 2: VGG-16 "313 M").
- Parameters: every parameter of the training-time model, BN gamma/beta included.
- Epoch-weighted averages of both (the papers' "Avg. FLOPs/Params", DyRep Table 2).
- Peak memory: device memory on CUDA, process peak RSS on CPU, in MiB.
"""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
        return tensor.device, dtype
    return torch.device("cpu"), torch.float32


def count_macs(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32)) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on a zeros input of ``input_size``.

    The default ``(1, 3, 32, 32)`` is one CIFAR image. Runs in eval mode under ``torch.no_grad``
    on the model's device and dtype, and restores every submodule's train/eval flag afterwards.
    Counted with ``FlopCounterMode`` (2 per MAC; BN, bias, pooling and activations count 0), so
    the result is its total // 2.

    Returns:
        MACs as an int (VGG-16, 10 classes: 313,463,808).
    Source: DESIGN.md "Measures every run records — contract"; DyRep Table 2 (FLOPs = MACs).
    """
    device, dtype = _model_device_dtype(model)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        x = torch.zeros(input_size, device=device, dtype=dtype)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        return int(counter.get_total_flops()) // 2
    finally:
        for module, training in modes:
            module.training = training


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (shared tensors once), BN gamma/beta included.

    Source: DESIGN.md "Measures every run records — contract" (VGG-16: 14,986,698).
    """
    return sum(p.numel() for p in model.parameters())


class RunningAverage:
    """Weighted mean of a per-epoch value (the papers' "Avg. FLOPs/Params", DyRep Table 2).

    ``update(value)`` once per epoch (weight 1 by default); ``mean`` is ``sum(w v) / sum(w)``
    (0.0 before any update); ``count`` is the number of updates.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.weight = 0.0
        self.count = 0

    def update(self, value: float, weight: float = 1.0) -> float:
        """Add one epoch's ``value`` with ``weight`` (>= 0); returns the new mean.

        Raises:
            ValueError: negative weight.
        """
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.total += float(value) * float(weight)
        self.weight += float(weight)
        self.count += 1
        return self.mean

    @property
    def mean(self) -> float:
        """The weighted mean so far (0.0 before any update)."""
        return self.total / self.weight if self.weight > 0 else 0.0

    def state_dict(self) -> dict[str, float]:
        """``{"total", "weight", "count"}``, for checkpoints."""
        return {"total": self.total, "weight": self.weight, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from :meth:`state_dict`."""
        self.total = float(state["total"])
        self.weight = float(state["weight"])
        self.count = int(state["count"])


def peak_memory_mb(device: str | torch.device) -> float:
    """Peak memory in MiB: ``torch.cuda.max_memory_allocated`` on CUDA (since the last
    :func:`reset_peak_memory`), else the process's peak resident set size (``ru_maxrss``: KiB on
    Linux, bytes on macOS; it cannot be reset).

    Source: DESIGN.md "Measures every run records — contract" (``mem_peak_mb``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def reset_peak_memory(device: str | torch.device) -> None:
    """Reset the CUDA peak-memory counter of ``device`` (no-op elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
