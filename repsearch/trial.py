"""One trial: data -> model -> method.prepare -> Trainer.fit -> deploy + equivalence check -> artifacts.

The deploy check runs at the end of every trial (DESIGN.md flow): the deployed plain model is saved
as ``deployed.pt`` (model name, constructor arguments, state_dict), loaded back into the origin
model's constructor with ``strict=True`` and ``weights_only=True``, and its outputs on the
validation split are compared with the training-time model's (eval mode, fp32, TF32 off). Then
the deployed kernels' standard deviations are recorded (``kernel_std.json``, every trial) and, with
``quantize.mode: ptq``, a CPU copy of the reloaded model is INT8-quantized and evaluated
(:mod:`repsearch.quantize`).

Mid-trial checkpoints (:mod:`repsearch.checkpoint`) go to ``<out_dir>/checkpoints/`` while the trial
trains and are removed when it finishes; ``run_trial(resume_from=...)`` continues a killed trial from
one of them and ends as the uninterrupted trial would (timing measures aside).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from repsearch import distributed
from repsearch.checkpoint import DIRNAME, CheckpointError, Checkpointer, load_checkpoint, resolve_every, restore_model
from repsearch.data import build_data, resolve_data_root
from repsearch.measures import check_measures, count_macs, count_params
from repsearch.methods import Method, build_method
from repsearch.models import build_model, model_kwargs
from repsearch.quantize import KERNEL_STD_ARTIFACT, int8_measures, kernel_std, require_torchao
from repsearch.spec import Recipe, recipe_hash, recipe_yaml
from repsearch.train import Trainer, evaluate, seed_everything, tf32_scope

log = logging.getLogger(__name__)

#: DESIGN.md conventions: max|y_fused - y_ref| <= TOLERANCE * max(1, max|y_ref|).
TOLERANCE = 1e-5

class DeployMismatch(RuntimeError):
    """The deployed model's outputs differ from the training-time model's beyond the tolerance."""


@dataclass
class TrialResult:
    """What one trial produced.

    Attributes:
        final: final measures, numbers only (``val/top1`` etc. of the last epoch, ``test/top1``,
            ``deploy/*``, ``avg_flops_m``, ``avg_params_m``, ``cost_gpu_hours``, ``fp32_epochs``,
            ``int8/kernel_std_mean``/``_max``, with ``quantize.mode: ptq`` ``int8/val_top1`` and
            ``int8/test_top1``, the method's numeric ``final_measures`` such as DyRep's ``n_rep``, ``n_dep``).
        history: per-epoch measures (DESIGN.md measures contract), epoch 1 first.
        artifacts: files written into ``out_dir``.
        events: the method's structural events (Rep/Dep/expand).
        tags: non-numeric facts (MLflow tags): ``precision``, ``not_learning`` (the reason, only for
            a collapsed trial), the quantizer's ``int8.*`` (``quantize.mode: ptq``), the method's
            non-numeric ``final_measures``.
        resumed_epoch: the checkpoint's epoch (from 1) when the trial resumed one, else None.
    """

    final: dict[str, float]
    history: list[dict[str, float]]
    artifacts: list[Path] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    resumed_epoch: Optional[int] = None


#: A trial is "not learning" when its training loss stays within this fraction of ln(classes) ...
COLLAPSE_LOSS_TOL = 0.01
#: ... for this many consecutive epochs after the first (or its val/top1 never leaves chance).
COLLAPSE_EPOCHS = 3


def learning_check(history: list[dict[str, float]], num_classes: int, n_val: int) -> Optional[str]:
    """Why a trial did not learn, or None when it did (issue: "a dead run never looks like a result").

    A trial is marked when (a) its training loss stayed within 1% of ln(classes) — the loss of a
    uniform prediction — for the last :data:`COLLAPSE_EPOCHS` or more consecutive epochs after the
    first (a run that collapsed and recovered is not marked), or (b) its val/top1 stayed at chance
    in every epoch: at most 100/classes % plus two binomial standard errors of an ``n_val``-image
    validation split (at least 2 points).

    Args:
        history: per-epoch measures with ``train/loss`` (nats) and ``val/top1`` (%), epoch 1 first.
        num_classes: number of classes (chance = 100/num_classes %).
        n_val: validation images (for the chance band).

    Returns:
        a one-line reason (the ``not_learning`` tag), or None.
    """
    if not history or num_classes < 2:
        return None
    ln_c = math.log(num_classes)
    run: list[int] = []  # the plateau that reaches the last epoch
    for epoch, m in enumerate(history, start=1):
        if epoch > 1 and abs(m["train/loss"] - ln_c) <= COLLAPSE_LOSS_TOL * ln_c:
            run.append(epoch)
        else:
            run = []
    if len(run) >= COLLAPSE_EPOCHS:
        return f"train/loss within 1% of ln({num_classes}) = {ln_c:.3f} for epochs {run[0]}-{run[-1]}"
    chance = 100.0 / num_classes
    p = 1.0 / num_classes
    band = max(2.0, 200.0 * math.sqrt(p * (1 - p) / max(1, n_val)))
    if all(m["val/top1"] <= chance + band for m in history):
        best = max(m["val/top1"] for m in history)
        return f"val/top1 at chance in every epoch (best {best:.2f}% <= {chance:.1f}% + {band:.1f})"
    return None


@torch.no_grad()
def _outputs(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    outs, labels = [], []
    for images, y in loader:
        outs.append(model(images.contiguous()).float())
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def deploy_check(trained: nn.Module, deployed: nn.Module, loader, device: torch.device) -> dict[str, float]:
    """Compare eval-mode outputs (B, classes) of the training-time and deployed models on ``loader``.

    Runs in fp32 with TF32 off on CUDA. Returns ``deploy/max_abs_err``, ``deploy/rel_err``
    (= max_abs_err / max(1, max|y_ref|)), ``deploy/val_top1`` and ``train_model/val_top1`` (percent).
    """
    with tf32_scope(False):
        trained_mode = trained.training
        y_ref, labels = _outputs(trained, loader)
        y_dep, _ = _outputs(deployed, loader)
        trained.train(trained_mode)
    max_abs, ref_max, top_ref, top_dep = torch.stack(
        [
            (y_dep - y_ref).abs().max(),
            y_ref.abs().max(),
            (y_ref.argmax(1) == labels).float().mean() * 100,
            (y_dep.argmax(1) == labels).float().mean() * 100,
        ]
    ).tolist()
    return {
        "deploy/max_abs_err": max_abs,
        "deploy/rel_err": max_abs / max(1.0, ref_max),
        "deploy/val_top1": top_dep,
        "train_model/val_top1": top_ref,
    }


def run_trial(
    recipe: Recipe,
    *,
    data_root: Optional[str],
    device: str,
    out_dir: Path,
    on_epoch: Optional[Callable[[int, dict[str, float]], None]] = None,
    progress: bool = True,
    method: Optional[Method] = None,
    resume_from: Optional[str | Path] = None,
) -> TrialResult:
    """Train one configuration and deploy it.

    Checkpoints (:mod:`repsearch.checkpoint`): while training, ``<out_dir>/checkpoints/epoch_XXXX.pt``
    every ``train.checkpoint_every`` epochs and after every structure change (the newest 2 kept),
    removed when the trial returns. With ``resume_from`` the trial continues from that checkpoint:
    the data, the plain model and ``method.prepare`` as usual, then the recorded structure and
    weights, the method's, optimizer's, scheduler's and trainer's states and the RNG states; the
    checkpoint's epochs are replayed to ``on_epoch`` (same measures, in order: a new MLflow run gets
    the whole history), an event ``{"kind": "resume", "epoch": E, "checkpoint": path, "from_trial": N}``
    is added to the method's events, and the remaining epochs train. With ``train.deterministic`` on
    CPU the result equals the uninterrupted trial's bit for bit (timing measures aside).

    DDP (:mod:`repsearch.distributed`): in a process that joined a process group, every rank calls
    this with the same recipe; the loaders are sharded (``train.batch_size`` is the global batch),
    the device is the rank's own (``cuda:<local rank>`` or ``cpu``), and only rank 0 reports epochs,
    writes checkpoints, deploys, checks, evaluates the test split and writes artifacts; the other
    ranks return after training with ``final`` = the last epoch's measures and no artifacts. The tag
    ``distributed`` states the ranks and the effective batch (per-rank x ranks).

    Args:
        recipe: a trial's recipe (no sweep applied any more; ``recipe.seed`` is the trial's seed).
        data_root: ``--data-root`` (or None: ``REPSEARCH_DATA``, then ``data.root``).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        out_dir: folder for the artifacts (created).
        on_epoch: ``on_epoch(epoch, measures)`` after every epoch (tracking, pruning).
        progress: show a rich progress bar on stderr.
        method: a method instance to use instead of the one ``recipe.method`` names (tests and
            programmatic use; the recipe's ``method`` section is then only recorded).
        resume_from: a checkpoint file of an earlier trial of this configuration and seed (its
            ``trials/<study>/<NNNN>/checkpoints/`` folder names trial NNNN as ``from_trial``).

    Raises:
        repsearch.checkpoint.CheckpointError: ``resume_from`` is unreadable, was written for another
            configuration or seed (recipe hash), or does not rebuild on this model.
        repsearch.errors.DataError: missing data root or layout (a user mistake).
        repsearch.train.NonFiniteLoss: NaN/inf training loss.
        DeployMismatch: deployed outputs differ beyond the tolerance (a bug; the figures are in the message).
        repsearch.quantize.QuantizeError: ``quantize.mode: ptq`` without torchao (before training) or
            with a deployed model that torch.export / the x86 quantizer cannot handle.
        repsearch.distributed.DistributedError: DDP ranks whose structures differ after a change.
    """
    dist = distributed.current()
    if dist is not None:
        device = dist.device(device)
    elif recipe.train.distributed == "ddp" and distributed.env_world() is None:
        log.info("train.distributed: ddp outside torchrun/srun: the trial trains in this one process")
    with tf32_scope(recipe.train.tf32):
        return _run_trial(recipe, data_root, torch.device(device), Path(out_dir), on_epoch, progress, method, resume_from, dist)


def _read_resume(path: Path, recipe: Recipe) -> dict:
    """The checkpoint at ``path`` (CPU tensors), checked to be this trial's configuration and seed."""
    ckpt = load_checkpoint(path, map_location="cpu")
    want, got = recipe_hash(recipe), ckpt.get("meta", {}).get("recipe_hash")
    if got != want:
        raise CheckpointError(f"{path}: written for another configuration or seed (recipe hash {str(got)[:12]}, this trial {want[:12]})")
    return ckpt


def _from_trial(path: Path) -> Optional[int]:
    """Trial NNNN of ``.../trials/<study>/<NNNN>/checkpoints/epoch_XXXX.pt`` (None elsewhere)."""
    name = path.parent.parent.name
    return int(name) if path.parent.name == DIRNAME and name.isdigit() else None


def _run_trial(recipe, data_root, dev, out_dir, on_epoch, progress, method, resume_from=None, dist=None) -> TrialResult:
    if recipe.quantize.mode == "ptq":
        require_torchao()  # fail before training, not after it
    ckpt = _read_resume(Path(resume_from), recipe) if resume_from is not None else None
    seed_everything(recipe.seed, recipe.train.deterministic)
    out_dir.mkdir(parents=True, exist_ok=True)
    d = recipe.data
    root = resolve_data_root(data_root, d.root)
    data = build_data(
        root,
        dataset=d.dataset,
        fmt=d.format,
        download=d.download,
        val_size=d.val_size,
        split_seed=d.split_seed,
        train_subset=d.train_subset,
        test_subset=d.test_subset,
        cutout=d.cutout,
        image_size=d.image_size,
        augment=d.augment,
        batch_size=recipe.train.batch_size,
        eval_batch_size=recipe.train.eval_batch_size,
        device=str(dev),
        seed=recipe.seed,
        channels_last=recipe.train.channels_last and dev.type == "cuda",
        rank=dist.rank if dist is not None else 0,
        world_size=dist.world_size if dist is not None else 1,
    )
    main = dist is None or dist.is_main
    if dist is not None:
        log.info("%s", dist.describe(recipe.train.batch_size))
    if not main:
        on_epoch, progress = None, False
    kwargs = model_kwargs(recipe.model.name, data.num_classes, recipe.model.width, **recipe.model.options)
    model = build_model(recipe.model.name, **kwargs).to(dev)
    if recipe.model.init_from and ckpt is None:  # -- model.init_from (RepAn issue): a finished run's weights --
        from repsearch.deployed import load_init_from

        load_init_from(model, recipe.model.init_from, recipe, recipe.model.name, kwargs)
    if method is None:
        method = build_method(recipe, dev)
    model = method.prepare(model, data.train).to(dev)
    resumed_epoch = None
    if ckpt is not None:  # -- the recorded structure, weights and method state ------------
        model = restore_model(model, method, ckpt["model"]).to(dev)
        method.load_state_dict(ckpt["method"])
        resumed_epoch = int(ckpt["epoch"])
        method.events.append(
            {"epoch": resumed_epoch, "kind": "resume", "checkpoint": str(resume_from), "from_trial": _from_trial(Path(resume_from))}
        )
        log.info("resuming from %s (epoch %d)", resume_from, resumed_epoch)
    checkpointer = Checkpointer(out_dir / DIRNAME, resolve_every(recipe.train), meta={"recipe_hash": recipe_hash(recipe)}) if main else None

    bar = _ProgressBar(recipe.train.epochs, len(data.train)) if progress else None
    t_start = time.perf_counter()

    def epoch_cb(epoch: int, m: dict[str, float]) -> None:
        if bar is not None:
            bar.epoch_done(epoch, m)
        if on_epoch is not None:
            on_epoch(epoch, m)

    trainer = Trainer(
        model,
        method,
        data.train,
        data.val,
        recipe.train,
        dev,
        on_epoch=epoch_cb,
        on_step=bar.step if bar is not None else None,
        checkpointer=checkpointer,
        dist=dist,
    )
    try:
        if ckpt is not None:
            state = ckpt["trainer"]

            def replay() -> None:  # the caller's record of the done epochs (rank 0 alone under DDP)
                for epoch, m in enumerate(state["history"], start=1):
                    epoch_cb(epoch, dict(m))

            distributed.leave_together(replay, dist, "while replaying its checkpoint")
            if bar is not None:
                bar.step(len(state["history"]), len(data.train))
            trainer.load_state_dict(state)  # RNG states last: nothing may draw after this but training
            ckpt = state = None
        history = trainer.fit()
    finally:
        if bar is not None:
            bar.close()
    dist_tag = "none" if dist is None else dist.describe(recipe.train.batch_size)
    if not main:  # rank 0 deploys, checks, evaluates the test split and writes the artifacts
        return TrialResult(final=dict(history[-1]), history=history, events=list(method.events),
                           tags={"distributed": dist_tag}, resumed_epoch=resumed_epoch)
    if dist is not None:  # rank 0 checks and evaluates on whole splits, not on its shard
        data = dataclasses.replace(data, train=data.train.unsharded(), test=data.test.unsharded(),
                                   val=data.val.unsharded() if data.val is not None else None)

    # -- deploy, save, reload strictly, check equivalence on the validation split ----------
    deployed = method.deploy(model)
    ckpt = {"model": recipe.model.name, "kwargs": kwargs, "state_dict": deployed.state_dict()}
    artifacts: list[Path] = []
    deployed_path = out_dir / "deployed.pt"
    torch.save(ckpt, deployed_path)
    artifacts.append(deployed_path)
    loaded = torch.load(deployed_path, map_location=dev, weights_only=True)
    plain = build_model(loaded["model"], **loaded["kwargs"]).to(dev)
    plain.load_state_dict(loaded["state_dict"], strict=True)
    check = deploy_check(model, plain, data.val, dev)
    _, test_top1 = evaluate(plain, data.test, dev, amp=False)

    final = dict(history[-1])
    final.update(check)
    final["test/top1"] = test_top1
    final["deploy/flops_m"] = count_macs(plain, (1, 3, data.image_size, data.image_size)) / 1e6
    final["deploy/params_m"] = count_params(plain) / 1e6
    final["trial_time_s"] = time.perf_counter() - t_start
    numbers, tags = trainer.final_measures()
    tags["distributed"] = dist_tag
    final.update(numbers)
    for k, v in method.final_measures().items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            final[k] = float(v)
        else:
            tags[k] = v if isinstance(v, str) else json.dumps(v, default=_jsonable)
    # -- kernel statistics (every trial) and INT8 PTQ (quantize.mode ptq): repsearch.quantize ------
    kstats = kernel_std(plain)
    final.update({k: v for k, v in kstats.measures.items() if math.isfinite(v)})
    kernel_path = out_dir / KERNEL_STD_ARTIFACT
    kernel_path.write_text(kstats.to_json())
    artifacts.append(kernel_path)
    if recipe.quantize.mode == "ptq":  # on a CPU copy of the reloaded plain model
        int8, int8_tags = int8_measures(plain, data, calib_batches=recipe.quantize.calib_batches, seed=recipe.seed)
        final.update(int8)
        tags.update(int8_tags)
    # ---------------------------------------------------------------------------------------------
    check_measures({k: v for k, v in final.items() if k not in history[-1]}, "final", f"method {method.name}")
    reason = learning_check(history, data.num_classes, data.n_val)
    if reason is not None:
        tags["not_learning"] = reason
        log.warning("trial (seed %d) is not learning: %s", recipe.seed, reason)

    for name, payload in (
        ("recipe.yaml", recipe_yaml(recipe)),
        ("events.json", json.dumps(method.events, indent=1, default=_jsonable)),
        ("structure.json", json.dumps(method.structure(model), indent=1, default=_jsonable)),
    ):
        p = out_dir / name
        p.write_text(payload)
        artifacts.append(p)
    artifacts.extend(Path(a) for a in method.artifacts(out_dir))

    if not check["deploy/rel_err"] <= TOLERANCE:
        raise DeployMismatch(
            f"deployed model differs from the training-time model: max abs err {check['deploy/max_abs_err']:.3g}, "
            f"relative {check['deploy/rel_err']:.3g} > {TOLERANCE:g}"
        )
    if checkpointer is not None:
        checkpointer.clear()  # the trial finished: nothing to resume
    return TrialResult(final=final, history=history, artifacts=artifacts, events=list(method.events), tags=tags,
                       resumed_epoch=resumed_epoch)


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


class _ProgressBar:
    """A rich progress bar over the trial's training steps, with the last epoch's val top-1."""

    def __init__(self, epochs: int, steps_per_epoch: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.steps = steps_per_epoch
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.progress.add_task("train", total=epochs * steps_per_epoch, epoch=1, epochs=epochs, info="")
        self.progress.start()

    def step(self, epoch: int, step: int) -> None:
        self.progress.update(self.task, completed=(epoch - 1) * self.steps + step, epoch=epoch)

    def epoch_done(self, epoch: int, m: dict[str, float]) -> None:
        self.progress.update(
            self.task, info=f"val top-1 {m['val/top1']:.2f}  loss {m['train/loss']:.3f}  {m['flops_m']:.1f}M MACs"
        )

    def close(self) -> None:
        self.progress.stop()
