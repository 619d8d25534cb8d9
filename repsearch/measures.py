"""Cost measures every run records (DESIGN.md "Measures every run records — contract").

- MACs: multiply-accumulates of one forward pass, counted by ``torch.utils.flop_counter``
  (``FlopCounterMode`` counts 2 FLOPs per MAC for conv / matmul and nothing for BN, bias, pooling
  or activations), so MACs = total // 2. Reported as ``flops_m`` in millions, as the papers do
  (DyRep Table 2: VGG-16 "313 M").
- Parameters: every parameter of the training-time model, BN gamma/beta included.
- Epoch-weighted averages of both (the papers' "Avg. FLOPs/Params", DyRep Table 2).
- Peak memory: device memory on CUDA, process peak RSS on CPU, in MiB.

Every measure a run can record is registered once in :data:`MEASURES` (name, unit, when it is
recorded, whether a sweep may optimise it): the recipe's ``sweep.objective`` and the reports read
the registry, and the Trainer refuses a method's measure that is not registered. A method registers
its own measures where it is defined (:func:`register_measure`), so adding one touches one place.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Measure:
    """One registered measure.

    Attributes:
        name: the metric name as logged to MLflow (e.g. ``val/top1``).
        unit: its unit in words (``%``, ``M MACs``, ``epochs``, ``count``...).
        description: one line: what it is and where it comes from.
        when: ``epoch`` (logged every epoch, step = epoch, and also a final value) or ``final``
            (logged once at the end of a trial).
        objective: whether ``sweep.objective`` may name it (test accuracy never: it is reported,
            not optimised).
    """

    name: str
    unit: str
    description: str
    when: Literal["epoch", "final"] = "epoch"
    objective: bool = True


#: Every measure a run may record, by name (the only module state: a registry).
MEASURES: dict[str, Measure] = {}


def register_measure(
    name: str, unit: str, description: str, when: Literal["epoch", "final"] = "epoch", objective: bool = True,
    *, replace: bool = False,
) -> Measure:
    """Register a measure so that objectives, reports and the Trainer accept it.

    Args:
        name: the metric name as logged (``val/top1``; ``test/`` names are never objectives).
        unit: its unit in words (``%``, ``M MACs``, ``epochs``, ``count``, ``s``...).
        description: one line: what it is, where it comes from.
        when: ``epoch`` (every epoch, step = epoch) or ``final`` (once per trial).
        objective: whether ``sweep.objective.metric`` may name it.
        replace: allow re-registering a name with other attributes.

    Returns:
        the registered :class:`Measure`.

    Raises:
        ValueError: ``name`` is already registered with other attributes (and not ``replace``), or
            ``when`` is neither ``epoch`` nor ``final``.
    """
    if when not in ("epoch", "final"):
        raise ValueError(f"measure {name!r}: when must be 'epoch' or 'final', got {when!r}")
    m = Measure(name, unit, description, when, objective and not name.startswith("test/"))
    old = MEASURES.get(name)
    if old is not None and old != m and not replace:
        raise ValueError(f"measure {name!r} is already registered as {old}")
    MEASURES[name] = m
    return m


def unregister_measure(name: str) -> None:
    """Remove a registered measure (tests that register a temporary one); unknown names are ignored."""
    MEASURES.pop(name, None)


def objective_metrics() -> tuple[str, ...]:
    """Names a sweep may optimise (registered with ``objective=True``), in registration order."""
    return tuple(n for n, m in MEASURES.items() if m.objective)


def check_measures(values: dict, when: str, source: str) -> None:
    """Check that every key of ``values`` is a registered measure (``when``: ``epoch``/``final``).

    Raises:
        KeyError: an unregistered name, or a ``final`` measure reported per epoch (a bug in
            ``source``, not a user mistake); the message names the source and points to
            :func:`register_measure`.
    """
    unknown = [k for k in values if k not in MEASURES or (when == "epoch" and MEASURES[k].when != "epoch")]
    if unknown:
        raise KeyError(
            f"{source}: {when} measure(s) {', '.join(map(repr, unknown))} not registered; "
            "call repsearch.measures.register_measure first"
        )


# DESIGN.md "Measures every run records — contract": per epoch (step = epoch)
for _name, _unit, _desc, _obj in (
    ("val/top1", "%", "validation top-1 (eval mode; selection and pruning use it)", True),
    ("val/loss", "nats", "validation cross-entropy (eval mode)", True),
    ("train/top1", "%", "training top-1 over the epoch (augmented images, train mode)", True),
    ("train/loss", "nats", "mean training cross-entropy over the epoch's steps", True),
    ("avg_flops_m", "M MACs", "epoch-weighted mean of flops_m so far (the papers' Avg. FLOPs)", True),
    ("avg_params_m", "M", "epoch-weighted mean of params_m so far (the papers' Avg. Params)", True),
    ("flops_m", "M MACs", "multiply-accumulates of one forward pass on one image, training-time model", True),
    ("params_m", "M", "parameters of the training-time model, BN included", True),
    ("n_branches", "count", "branches of every RepBlock plus plain convs of the training-time model", True),
    ("cost_gpu_hours", "device-hours", "cumulative device time of the trial (the device tag says which)", True),
    ("epoch_time_s", "s", "wall time of the epoch: training, validation and the method's hooks", True),
    ("train_images_per_s", "images/s", "training throughput of the epoch's steps", True),
    ("mem_peak_mb", "MiB", "device memory peak (CUDA) or process peak RSS (CPU)", True),
    ("lr", "1", "learning rate used by the epoch's last step (first param group)", False),
):
    register_measure(_name, _unit, _desc, "epoch", _obj)
# train.compile on only (repsearch.compile): cumulative, per epoch and final
for _name, _unit, _desc in (
    ("compile_count", "count", "torch.compile builds of the training forward so far (the first, then one per structure change)"),
    ("compile_s", "s", "wall time of the first training steps after the builds, summed (compile plus one step)"),
    ("compile_recompiles", "count", "graphs dynamo compiled in other training steps (guard failures: shape, dtype, autocast)"),
):
    register_measure(_name, _unit, _desc, "epoch", False)
# at the end of a trial
for _name, _unit, _desc, _obj in (
    ("test/top1", "%", "test top-1 of the deployed model (reported, never optimised)", False),
    ("deploy/val_top1", "%", "validation top-1 of the deployed (fused, plain) model", True),
    ("deploy/max_abs_err", "logit", "max |deployed - training-time| eval output on the validation split", False),
    ("deploy/rel_err", "1", "deploy/max_abs_err / max(1, max|training-time output|)", False),
    ("deploy/flops_m", "M MACs", "MACs of the deployed model on one image", True),
    ("deploy/params_m", "M", "parameters of the deployed model", True),
    ("train_model/val_top1", "%", "validation top-1 of the training-time model in the deploy check", False),
    ("trial_time_s", "s", "wall time of the trial from the first epoch to the deploy check", False),
    ("fp32_epochs", "epochs", "epochs trained without autocast (fp32 compute; all of them on CPU)", False),
):
    register_measure(_name, _unit, _desc, "final", _obj)
# INT8 post-training quantization and kernel statistics (repsearch.quantize; RepOptimizers §4.4,
# Tables 8 and 10): int8/*_top1 only with quantize.mode ptq, the kernel std on every trial
for _name, _unit, _desc, _obj in (
    ("int8/val_top1", "%", "validation top-1 of the INT8 PTQ deployed model (torchao X86InductorQuantizer, CPU)", True),
    ("int8/test_top1", "%", "test top-1 of the INT8 PTQ deployed model (reported, never optimised)", False),
    ("int8/kernel_std_mean", "1", "mean over conv layers of the std of the deployed kernel, following BN folded in (RepOpt Table 8)", True),
    ("int8/kernel_std_max", "1", "max over conv layers of the std of the deployed kernel, following BN folded in", True),
):
    register_measure(_name, _unit, _desc, "final", _obj)


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
