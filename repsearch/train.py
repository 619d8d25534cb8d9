"""The training loop: SGD + cosine LR (via the method's hooks), bf16 autocast and channels_last on
CUDA, per-epoch evaluation and the per-epoch measures of DESIGN.md's measures contract.

The hot path (one training step) does forward, loss, backward, ``method.after_backward`` (on-device
saliency accumulation), the optimizer and LR steps, and adds the batch's loss and correct count to
on-device accumulators: no host sync per step. The host reads the accumulators once per epoch.
"""

from __future__ import annotations

import logging
import math
import random
import time
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

from repsearch import optim
from repsearch.measures import RunningAverage, count_macs, count_params, peak_memory_mb, reset_peak_memory
from repsearch.methods.base import Method
from repsearch.rep import count_branches

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite (checked once per epoch): the trial fails."""


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); optionally turn on deterministic kernels
    (``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN deterministic)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    # set both ways: trials run one after another in one process
    torch.use_deterministic_algorithms(bool(deterministic), warn_only=True)
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = False


def autocast_for(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when ``amp``; a disabled context elsewhere (no GradScaler is needed for
    bf16, so gradients are never scaled)."""
    enabled = bool(amp) and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, amp: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and top-1 (percent) of ``model`` in eval mode over ``loader``.

    ``loader`` yields ``(images (B, 3, H, W) float, labels (B,) int64)`` already on ``device``.
    One host sync at the end. Restores the model's previous train/eval mode.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    n = 0
    with autocast_for(device, amp):
        for images, labels in loader:
            logits = model(images).float()
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
            correct += (logits.argmax(1) == labels).sum()
            n += labels.shape[0]
    model.train(was_training)
    if n == 0:
        return float("nan"), float("nan")
    loss, corr = torch.stack([loss_sum, correct.double()]).tolist()
    return loss / n, 100.0 * corr / n


class Trainer:
    """Train ``model`` with ``method``'s hooks for ``train_spec.epochs`` epochs.

    Args:
        model: the training-time model (after ``method.prepare``), on ``device``.
        method: a :class:`~repsearch.methods.base.Method`.
        train_loader / val_loader: iterables of ``(images, labels)`` on ``device``; ``len(train_loader)``
            = optimizer steps per epoch.
        train_spec: the recipe's ``train`` section.
        device: torch device.
        on_epoch: called as ``on_epoch(epoch, measures)`` after every epoch (epoch counts from 1).
        on_step: called as ``on_step(epoch, step_in_epoch)`` after every step (progress bars; must not sync).

    Raises:
        NonFiniteLoss: when the epoch's mean training loss is NaN or infinite.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        train_loader,
        val_loader,
        train_spec,
        device: torch.device,
        on_epoch: Optional[Callable[[int, dict], None]] = None,
        on_step: Optional[Callable[[int, int], None]] = None,
    ):
        self.model = model
        self.method = method
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.spec = train_spec
        self.device = torch.device(device)
        self.on_epoch = on_epoch
        self.on_step = on_step
        self.cuda = self.device.type == "cuda"
        self.channels_last = bool(train_spec.channels_last) and self.cuda
        self.optimizer = method.optimizer(model, train_spec)
        self.scheduler = method.scheduler(self.optimizer, train_spec, len(train_loader))
        self.history: list[dict[str, float]] = []
        self.avg_flops = RunningAverage()
        self.avg_params = RunningAverage()
        self.device_seconds = 0.0
        self._structure_changed()

    # ---------------------------------------------------------------------------------------
    def _structure_changed(self) -> None:
        """After construction or a structure change only: put new modules in channels_last (CUDA) and
        measure MACs/params/branches of the current training-time structure."""
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.flops_m = count_macs(self.model) / 1e6
        self.params_m = count_params(self.model) / 1e6
        self.n_branches = count_branches(self.model)

    def _train_epoch(self, epoch: int) -> tuple[float, float, int, float]:
        model, opt, sched, method = self.model, self.optimizer, self.scheduler, self.method
        model.train()
        # bf16 autocast unless the method needs fp32 gradients this epoch (DyRep's signed synflow)
        amp = bool(self.spec.amp) and not method.fp32_gradients(epoch)
        lr = opt.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        n = 0
        step0 = (epoch - 1) * len(self.train_loader)
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)  # shuffle/augmentation draws keyed by (seed, epoch)
        for i, (images, labels) in enumerate(self.train_loader):
            with autocast_for(self.device, amp):
                logits = model(images)
                loss = method.loss(logits.float(), labels, images)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            method.after_backward(model, step0 + i)
            opt.step()
            lr = opt.param_groups[0]["lr"]  # the LR this step used (a python float: no sync)
            sched.step()
            loss_sum += loss.detach() * labels.shape[0]
            correct += (logits.detach().argmax(1) == labels).sum()
            n += labels.shape[0]
            if self.on_step is not None:
                self.on_step(epoch, i + 1)
        if n == 0:
            raise RuntimeError("the training loader yielded no batch (train_subset smaller than batch_size?)")
        total_loss, total_correct = torch.stack([loss_sum.double(), correct.double()]).tolist()
        return total_loss / n, 100.0 * total_correct / n, n, lr

    def fit(self) -> list[dict[str, float]]:
        """Run every epoch; returns the per-epoch measures (also passed to ``on_epoch``)."""
        spec = self.spec
        for epoch in range(1, spec.epochs + 1):
            reset_peak_memory(self.device)
            t0 = time.perf_counter()
            train_loss, train_top1, n, lr = self._train_epoch(epoch)
            if self.cuda:
                torch.cuda.synchronize(self.device)
            train_s = time.perf_counter() - t0
            if not math.isfinite(train_loss):
                raise NonFiniteLoss(f"training loss is {train_loss} at epoch {epoch} (lr {self.optimizer.param_groups[0]['lr']:.3g})")
            flops_m, params_m, n_branches = self.flops_m, self.params_m, self.n_branches
            self.avg_flops.update(flops_m)
            self.avg_params.update(params_m)
            changed = self.method.on_epoch_end(self.model, epoch, self.train_loader)
            if changed:
                counts = optim.sync_param_groups(self.optimizer, self.model, spec.wd_on_norm)
                log.debug("epoch %d: structure changed, optimizer groups updated %s", epoch, counts)
                self._structure_changed()
            val_loss, val_top1 = evaluate(self.model, self.val_loader, self.device, spec.amp)
            epoch_s = time.perf_counter() - t0
            self.device_seconds += epoch_s
            m = {
                "train/loss": train_loss,
                "train/top1": train_top1,
                "val/loss": val_loss,
                "val/top1": val_top1,
                "lr": lr,
                "epoch_time_s": epoch_s,
                "train_images_per_s": n / train_s if train_s > 0 else float("nan"),
                "mem_peak_mb": peak_memory_mb(self.device),
                "flops_m": flops_m,
                "params_m": params_m,
                "avg_flops_m": self.avg_flops.mean,
                "avg_params_m": self.avg_params.mean,
                "n_branches": float(n_branches),
                "cost_gpu_hours": self.device_seconds / 3600.0,
            }
            self.history.append(m)
            if self.on_epoch is not None:
                self.on_epoch(epoch, m)
        return self.history
