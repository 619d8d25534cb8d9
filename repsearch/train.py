"""The training loop: the method's optimizer and LR schedule, bf16 autocast, TF32 and channels_last on
CUDA, gradient clipping, per-epoch evaluation and the per-epoch measures of DESIGN.md's measures
contract, driven through the method interface v2 (:mod:`repsearch.methods.base`).

The hot path (one training step) does forward, loss, backward, ``method.after_backward`` (on-device
saliency accumulation), the optional global-norm clipping (on device), the optimizer and LR steps,
and adds the batch's loss and correct count to on-device accumulators: no host sync per step. The
host reads the accumulators once per epoch; checkpoints (:mod:`repsearch.checkpoint`) are written at
epoch ends only.

Precision is part of the experiment (DESIGN.md conventions): autocast (``train.amp``, bf16, CUDA
only) and TF32 (``train.tf32``, CUDA only) are decided per epoch — both off while the method scores
fp32 gradients (``Method.fp32_gradients``) — and the trainer records which epochs ran how.

``train.compile`` (:mod:`repsearch.compile`): only the training forward goes through
``torch.compile``, rebuilt after every structure change; ``self.model`` stays the raw module
(hooks, surgery, checkpoints, deploy) and evaluation stays eager.
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

from repsearch import distributed
from repsearch.checkpoint import CheckpointError, Checkpointer, model_record, rng_state, set_rng_state
from repsearch.compile import CompiledForward
from repsearch.measures import RunningAverage, check_measures, count_macs, count_params, peak_memory_mb, reset_peak_memory
from repsearch.methods.base import EpochChanges, Method
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


def tf32_flags() -> tuple[bool, bool]:
    """``(torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)``."""
    return bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)


def set_tf32(on: bool | tuple[bool, bool]) -> None:
    """Set both TF32 flags (CUDA matmuls and cuDNN convolutions); a pair sets them separately.
    They are process-wide and have no effect on CPU."""
    matmul, cudnn = (on, on) if isinstance(on, bool) else on
    torch.backends.cuda.matmul.allow_tf32 = bool(matmul)
    torch.backends.cudnn.allow_tf32 = bool(cudnn)


class tf32_scope:  # noqa: N801 (a context manager, used like a function)
    """Context manager: set both TF32 flags (CUDA matmuls, cuDNN convolutions) to ``on`` and restore
    the previous flags on exit, errors included (trials run one after another in one process).

    Args:
        on: allow TF32 (10-bit mantissa, ~1e-3 relative error) inside the scope; False = exact fp32.
    """

    def __init__(self, on: bool):
        self.on = bool(on)
        self.prev: tuple[bool, bool] = (False, False)

    def __enter__(self) -> "tf32_scope":
        self.prev = tf32_flags()
        set_tf32(self.on)
        return self

    def __exit__(self, *exc) -> None:
        set_tf32(self.prev)


def _epoch_ranges(epochs: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    out: list[str] = []
    for e in sorted(epochs):
        if out and int(out[-1].split("-")[-1]) == e - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{e}"
        else:
            out.append(str(e))
    return ", ".join(out)


def autocast_for(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when ``amp``; a disabled context elsewhere (no GradScaler is needed for
    bf16, so gradients are never scaled)."""
    enabled = bool(amp) and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, amp: bool = False,
             dist: Optional["distributed.DistContext"] = None) -> tuple[float, float]:
    """Mean cross-entropy and top-1 (percent) of ``model`` in eval mode over ``loader``.

    ``loader`` yields ``(images (B, 3, H, W) float, labels (B,) int64)`` already on ``device``.
    One host sync at the end. Restores the model's previous train/eval mode. With ``dist`` (DDP)
    ``loader`` is this rank's shard and the sums (loss, correct, images) are all-reduced once, so
    every rank returns the figures of the whole split.
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
    loss, corr, n = _epoch_sums(loss_sum, correct, n, dist)
    if n == 0:
        return float("nan"), float("nan")
    return loss / n, 100.0 * corr / n


def _epoch_sums(loss_sum: torch.Tensor, correct: torch.Tensor, n: int,
                dist: Optional["distributed.DistContext"]) -> tuple[float, float, float]:
    """``(loss sum, correct, images)`` as python floats, summed over the DDP ranks when ``dist``:
    one all-reduce and one host sync for the three (0-dim device tensors and a python count)."""
    sums = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(n), dtype=torch.float64, device=loss_sum.device)])
    total_loss, total_correct, total_n = distributed.all_reduce_sum(sums, dist).tolist()
    return total_loss, total_correct, total_n


class _TrainingForward(nn.Module):
    """What DDP wraps: ``model`` (a submodule, so DDP sees its parameters) called through the trainer's
    :class:`~repsearch.compile.CompiledForward` (eager when ``train.compile`` is off). Shapes:
    ``(B, 3, H, W)`` images -> ``(B, classes)`` logits."""

    def __init__(self, model: nn.Module, compiled: CompiledForward):
        super().__init__()
        self.model = model
        self.compiled = compiled  # a plain attribute: not a module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compiled(x)


class Trainer:
    """Train ``model`` with ``method``'s hooks for ``train_spec.epochs`` epochs (the hook order is in
    :mod:`repsearch.methods.base`).

    Args:
        model: the training-time model (after ``method.prepare``), on ``device``.
        method: a :class:`~repsearch.methods.base.Method`.
        train_loader / val_loader: iterables of ``(images (B, 3, H, W), labels (B,))`` on ``device``;
            ``len(train_loader)`` = optimizer steps per epoch.
        train_spec: the recipe's ``train`` section.
        device: torch device.
        on_epoch: called as ``on_epoch(epoch, measures)`` after every epoch (epoch counts from 1).
        on_step: called as ``on_step(epoch, step_in_epoch)`` after every step (progress bars; must not sync).
        checkpointer: a :class:`repsearch.checkpoint.Checkpointer`: at the end of an epoch it says is
            due (after the epoch's measures are complete, before ``on_epoch``) the trainer writes
            :meth:`checkpoint_state`; None = no checkpoints.
        dist: the trial's DDP process group (:mod:`repsearch.distributed`), or None. Then the loaders
            are this rank's shards, the training forward runs through a
            :class:`~torch.nn.parallel.DistributedDataParallel` wrapper rebuilt after every structure
            change, the epoch's sums are all-reduced once, rank 0's BN statistics are broadcast before
            evaluation, ``on_epoch_end`` gets the unsharded training batches and the structures are
            compared across ranks after every change. Every rank computes the same measures.

    Resuming: build the Trainer on the restored model and method (:func:`repsearch.checkpoint.restore_model`,
    ``Method.load_state_dict``), call :meth:`load_state_dict` with the checkpoint's ``trainer`` part,
    then :meth:`fit` runs the remaining epochs.

    Attributes:
        history: per-epoch measures, epoch 1 first.
        fp32_epochs / tf32_epochs: the epochs trained without autocast / with TF32 allowed.
        compiled: the training forward (:class:`repsearch.compile.CompiledForward`; eager when
            ``train.compile`` is off); with compile on every epoch also logs ``compile_count``,
            ``compile_s`` and ``compile_recompiles``.

    Raises:
        NonFiniteLoss: when the epoch's mean training loss is NaN or infinite.
        KeyError: a method measure that is not registered in :mod:`repsearch.measures` (a bug).
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
        checkpointer: Optional[Checkpointer] = None,
        dist: Optional["distributed.DistContext"] = None,
    ):
        self.model = model
        self.method = method
        self.dist = dist
        method.dist = dist
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.spec = train_spec
        self.device = torch.device(device)
        self.on_epoch = on_epoch
        self.on_step = on_step
        self.cuda = self.device.type == "cuda"
        self.channels_last = bool(train_spec.channels_last) and self.cuda
        self.grad_clip = getattr(train_spec, "grad_clip", None)
        self.compiled = CompiledForward(model, getattr(train_spec, "compile", "off"), self.device)
        self.net: Callable[[torch.Tensor], torch.Tensor] = self.compiled  # what the training steps call
        # channels_last first: a method's optimizer may build per-parameter tensors (RepOpt's Grad
        # Mult) that must match the parameters' final memory format
        self._structure_changed()
        self.optimizer = method.optimizer(model, train_spec)
        self.scheduler = method.scheduler(self.optimizer, train_spec, len(train_loader))
        self.history: list[dict[str, float]] = []
        self.avg_flops = RunningAverage()
        self.avg_params = RunningAverage()
        self.device_seconds = 0.0
        self.fp32_epochs: list[int] = []
        self.tf32_epochs: list[int] = []
        self.checkpointer = checkpointer
        self._changed_last = False  # the last epoch's end changed something (next epoch end: checkpoint)

    # ---------------------------------------------------------------------------------------
    def _structure_changed(self) -> None:
        """After construction or a structure change only: put new modules in channels_last (CUDA),
        list the parameters to clip, measure MACs/params/branches of the current structure and
        rebuild the compiled training forward (``train.compile``)."""
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.compiled.rebuild()  # self.net is self.compiled without DDP
        if self.dist is not None:
            # a new DDP wrapper for the new parameters (its constructor broadcasts rank 0's weights),
            # around a shim that calls the (compiled) forward: dynamo then compiles the build's own
            # code object inside DDP's forward (its DDPOptimizer splits the graph at the buckets)
            self.net = None  # the old wrapper's reducer goes first
            self.net = distributed.wrap(_TrainingForward(self.model, self.compiled), self.dist, self.device)
        self._clip_params = [p for p in self.model.parameters() if p.requires_grad] if self.grad_clip else []
        side = int(getattr(self.train_loader, "crop", 32))  # the batches' side (data.image_size)
        self.flops_m = count_macs(self.model, (1, 3, side, side)) / 1e6
        self.params_m = count_params(self.model) / 1e6
        self.n_branches = count_branches(self.model)

    def precision(self, epoch: int) -> tuple[bool, bool]:
        """``(autocast, tf32)`` of ``epoch``'s training steps: bf16 autocast when ``train.amp`` on CUDA,
        TF32 when ``train.tf32`` on CUDA, both off while the method needs fp32 gradients."""
        fp32 = self.method.fp32_gradients(epoch)
        amp = bool(self.spec.amp) and self.cuda and not fp32
        tf32 = bool(getattr(self.spec, "tf32", False)) and not fp32
        return amp, tf32

    def _train_epoch(self, epoch: int, amp: bool) -> tuple[float, float, int, float]:
        model, opt, sched, method = self.model, self.optimizer, self.scheduler, self.method
        model.train()
        lr = opt.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        n = 0
        step0 = (epoch - 1) * len(self.train_loader)
        clip, clip_params = self.grad_clip, self._clip_params
        compiled, forward = self.compiled, self.net  # DDP(shim) -> compiled -> model, or compiled -> model
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)  # shuffle/augmentation draws keyed by (seed, epoch)
        for i, (images, labels) in enumerate(self.train_loader):
            with autocast_for(self.device, amp):
                logits = forward(images)
                loss = method.loss(logits.float(), labels, images)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            method.after_backward(model, step0 + i)
            if clip:
                # global L2 norm over every trainable parameter, on device (no host sync)
                nn.utils.clip_grad_norm_(clip_params, clip, foreach=True)
            opt.step()
            lr = opt.param_groups[0]["lr"]  # the LR this step used (a python float: no sync)
            sched.step()
            compiled.step_done()
            loss_sum += loss.detach() * labels.shape[0]
            correct += (logits.detach().argmax(1) == labels).sum()
            n += labels.shape[0]
            if self.on_step is not None:
                self.on_step(epoch, i + 1)
        if n == 0:
            raise RuntimeError("the training loader yielded no batch (train_subset smaller than batch_size?)")
        total_loss, total_correct, n_all = _epoch_sums(loss_sum, correct, n, self.dist)
        return total_loss / n_all, 100.0 * total_correct / n_all, int(n_all), lr

    def fit(self, stop_after: Optional[int] = None) -> list[dict[str, float]]:
        """Run the epochs after the last one run (all of them from a fresh trainer), on the schedule of
        ``train.epochs``; ``stop_after`` (an epoch, from 1) stops early, leaving the LR schedule where
        that epoch left it (a later ``fit`` continues). Returns the per-epoch measures so far (also
        passed to ``on_epoch``). The TF32 flags found at the start are restored at the end."""
        last = self.spec.epochs if stop_after is None else min(int(stop_after), self.spec.epochs)
        with tf32_scope(bool(getattr(self.spec, "tf32", False))):
            for epoch in range(len(self.history) + 1, last + 1):
                self._epoch(epoch)
        return self.history

    def _epoch(self, epoch: int) -> None:
        method = self.method
        reset_peak_memory(self.device)
        t0 = time.perf_counter()
        method.on_epoch_start(self.model, epoch)
        amp, tf32 = self.precision(epoch)
        set_tf32(tf32)
        if not amp:
            self.fp32_epochs.append(epoch)
        if tf32 and self.cuda:
            self.tf32_epochs.append(epoch)
        train_loss, train_top1, n, lr = self._train_epoch(epoch, amp)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        train_s = time.perf_counter() - t0
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(f"training loss is {train_loss} at epoch {epoch} (lr {self.optimizer.param_groups[0]['lr']:.3g})")
        flops_m, params_m, n_branches = self.flops_m, self.params_m, self.n_branches
        self.avg_flops.update(flops_m)
        self.avg_params.update(params_m)
        distributed.broadcast_buffers(self.model, self.dist)  # DDP: rank 0's BN statistics everywhere
        val_loss, val_top1 = evaluate(self.model, self.val_loader, self.device, self.spec.amp, self.dist)
        m = {
            "train/loss": train_loss,
            "train/top1": train_top1,
            "val/loss": val_loss,
            "val/top1": val_top1,
            "lr": lr,
            "train_images_per_s": n / train_s if train_s > 0 else float("nan"),
            "flops_m": flops_m,
            "params_m": params_m,
            "avg_flops_m": self.avg_flops.mean,
            "avg_params_m": self.avg_params.mean,
            "n_branches": float(n_branches),
        }
        loader = self.train_loader
        if self.dist is not None:
            method.distributed_sync(self.model, epoch)
            loader = loader.unsharded()  # every rank decides on the same (global) batches
        changes = method.on_epoch_end(self.model, epoch, loader, dict(m))
        if not isinstance(changes, EpochChanges):
            raise TypeError(f"method {method.name}: on_epoch_end must return EpochChanges, got {type(changes).__name__}")
        if changes:
            counts = method.sync_optimizer(self.optimizer, self.model, changes)
            log.debug("epoch %d: optimizer synced after %s: %s", epoch, changes, counts)
            if changes.structure_changed:
                distributed.check_same_structure(self.model, self.dist, epoch)
                self._structure_changed()
        extra = method.epoch_measures(epoch)
        check_measures(extra, "epoch", f"method {method.name}")
        epoch_s = time.perf_counter() - t0
        self.device_seconds += epoch_s
        m.update(
            {
                "epoch_time_s": epoch_s,
                "mem_peak_mb": peak_memory_mb(self.device),
                "cost_gpu_hours": self.device_seconds / 3600.0,
            }
        )
        m.update(self.compiled.measures())
        m.update({k: float(v) for k, v in extra.items()})
        self.history.append(m)
        changed_before, self._changed_last = self._changed_last, bool(changes)
        # DDP: rank 0 checkpoints and reports (MLflow, Optuna); when that raises (a pruned trial, a
        # full disk) every rank leaves the trial here, or the ranks' collectives would pair up wrongly
        distributed.leave_together(lambda: self._report(epoch, m, changed_before), self.dist, f"after epoch {epoch}")

    def _report(self, epoch: int, m: dict[str, float], changed_before: bool) -> None:
        """The epoch's checkpoint (when due) and ``on_epoch`` (rank 0 only under DDP: the others have neither)."""
        if self.checkpointer is not None and self.checkpointer.due(epoch, changed_before):
            self.checkpointer.save(epoch, self.checkpoint_state())
        if self.on_epoch is not None:
            self.on_epoch(epoch, m)

    # -- checkpoints ------------------------------------------------------------------------
    def _param_names(self) -> list[list[str]]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [[names.get(id(p), f"<unnamed {tuple(p.shape)}>") for p in g["params"]] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """The trainer's own state after the last finished epoch (plain values and tensors):
        ``epoch``, ``history``, ``optimizer`` / ``scheduler`` state dicts, ``optimizer_params`` (the
        parameter names of every optimizer group, in order), the running averages, ``device_seconds``,
        ``fp32_epochs`` / ``tf32_epochs``, ``changed_last``, ``loader_epoch`` (the training loader's
        epoch counter, when it has one) and ``rng`` (:func:`repsearch.checkpoint.rng_state`)."""
        return {
            "epoch": len(self.history),
            "history": [dict(m) for m in self.history],
            "optimizer": self.optimizer.state_dict(),
            "optimizer_params": self._param_names(),
            "scheduler": self.scheduler.state_dict(),
            "avg_flops": self.avg_flops.state_dict(),
            "avg_params": self.avg_params.state_dict(),
            "device_seconds": self.device_seconds,
            "fp32_epochs": list(self.fp32_epochs),
            "tf32_epochs": list(self.tf32_epochs),
            "changed_last": self._changed_last,
            "loader_epoch": getattr(self.train_loader, "epoch", None),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` output: the optimizer (rebuilt by the method's
        ``optimizer`` hook for the restored model) and the scheduler load their states, the history,
        averages and counters are restored, and the RNG states last, so the next :meth:`fit` runs
        the remaining epochs as an uninterrupted run would.

        Raises:
            CheckpointError: the checkpoint is past ``train.epochs``, or the optimizer's groups hold
                other parameters (names, order) than the checkpoint's.
        """
        epoch = int(state["epoch"])
        if epoch > self.spec.epochs or epoch != len(state["history"]):
            raise CheckpointError(f"checkpoint after epoch {epoch} ({len(state['history'])} in its history) does not fit a run of {self.spec.epochs} epochs")
        names = self._param_names()
        if [list(g) for g in state["optimizer_params"]] != names:
            raise CheckpointError("the rebuilt optimizer's parameter groups differ from the checkpoint's (names or order)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = [dict(m) for m in state["history"]]
        self.compiled.restore(self.history[-1] if self.history else {})
        self.avg_flops.load_state_dict(state["avg_flops"])
        self.avg_params.load_state_dict(state["avg_params"])
        self.device_seconds = float(state["device_seconds"])
        self.fp32_epochs = [int(e) for e in state["fp32_epochs"]]
        self.tf32_epochs = [int(e) for e in state["tf32_epochs"]]
        self._changed_last = bool(state["changed_last"])
        if state.get("loader_epoch") is not None and hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(int(state["loader_epoch"]))
        set_rng_state(state["rng"])

    def checkpoint_state(self) -> dict:
        """What a checkpoint holds besides its header: ``model``
        (:func:`repsearch.checkpoint.model_record`), ``method`` (``Method.state_dict()``) and
        ``trainer`` (:meth:`state_dict`)."""
        return {
            "model": model_record(self.model, self.method),
            "method": self.method.state_dict(),
            "trainer": self.state_dict(),
        }

    def final_measures(self) -> tuple[dict[str, float], dict[str, str]]:
        """``(numbers, tags)`` describing how the run trained: ``fp32_epochs`` (count) and the tags
        ``precision`` (e.g. ``fp32`` or ``bf16 autocast: epochs 11-600; fp32: epochs 1-10``, plus
        ``TF32`` where it was allowed on CUDA) and ``precision.fp32_epochs`` (the epoch ranges)."""
        epochs = len(self.history)
        amp_epochs = [e for e in range(1, epochs + 1) if e not in set(self.fp32_epochs)]
        fp32 = [e for e in self.fp32_epochs if e <= epochs]
        if not amp_epochs:
            text = "fp32"
        elif not fp32:
            text = "bf16 autocast"
        else:
            text = f"bf16 autocast: epochs {_epoch_ranges(amp_epochs)}; fp32: epochs {_epoch_ranges(fp32)}"
        if self.tf32_epochs:
            text += f"; TF32 allowed: epochs {_epoch_ranges(self.tf32_epochs)}"
        tags = {"precision": text, "precision.fp32_epochs": _epoch_ranges(fp32) or "none"}
        return {"fp32_epochs": float(len(fp32))}, tags
