"""One trial: data -> model -> method.prepare -> Trainer.fit -> deploy + equivalence check -> artifacts.

The deploy check runs at the end of every trial (DESIGN.md flow): the deployed plain model is saved
as ``deployed.pt`` (model name, constructor arguments, state_dict), loaded back into the origin
model's constructor with ``strict=True`` and ``weights_only=True``, and its outputs on the
validation split are compared with the training-time model's (eval mode, fp32, TF32 off).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from repsearch.data import build_data, resolve_data_root
from repsearch.measures import count_macs, count_params
from repsearch.methods import build_method
from repsearch.models import build_model
from repsearch.spec import Recipe, recipe_yaml
from repsearch.train import Trainer, evaluate, seed_everything

log = logging.getLogger(__name__)

#: DESIGN.md conventions: max|y_fused - y_ref| <= TOLERANCE * max(1, max|y_ref|).
TOLERANCE = 1e-5

class DeployMismatch(RuntimeError):
    """The deployed model's outputs differ from the training-time model's beyond the tolerance."""


@dataclass
class TrialResult:
    """What one trial produced.

    Attributes:
        final: final measures (``val/top1`` etc. of the last epoch, ``test/top1``, ``deploy/*``,
            ``avg_flops_m``, ``avg_params_m``, ``cost_gpu_hours``, ``n_rep``, ``n_dep``).
        history: per-epoch measures (DESIGN.md measures contract), epoch 1 first.
        artifacts: files written into ``out_dir``.
        events: the method's structural events (Rep/Dep/expand).
    """

    final: dict[str, float]
    history: list[dict[str, float]]
    artifacts: list[Path] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)


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
    cuda = torch.device(device).type == "cuda"
    if cuda:
        prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        trained_mode = trained.training
        y_ref, labels = _outputs(trained, loader)
        y_dep, _ = _outputs(deployed, loader)
        trained.train(trained_mode)
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
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
) -> TrialResult:
    """Train one configuration and deploy it.

    Args:
        recipe: a trial's recipe (no sweep applied any more; ``recipe.seed`` is the trial's seed).
        data_root: ``--data-root`` (or None: ``REPSEARCH_DATA``, then ``data.root``).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        out_dir: folder for the artifacts (created).
        on_epoch: ``on_epoch(epoch, measures)`` after every epoch (tracking, pruning).
        progress: show a rich progress bar on stderr.

    Raises:
        repsearch.errors.DataError: missing data root or layout (a user mistake).
        repsearch.train.NonFiniteLoss: NaN/inf training loss.
        DeployMismatch: deployed outputs differ beyond the tolerance (a bug; the figures are in the message).
    """
    dev = torch.device(device)
    seed_everything(recipe.seed, recipe.train.deterministic)
    out_dir = Path(out_dir)
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
        batch_size=recipe.train.batch_size,
        eval_batch_size=recipe.train.eval_batch_size,
        device=str(dev),
        seed=recipe.seed,
        channels_last=recipe.train.channels_last and dev.type == "cuda",
    )
    model_kwargs = {"num_classes": data.num_classes, "width": recipe.model.width}
    model = build_model(recipe.model.name, **model_kwargs).to(dev)
    method = build_method(recipe.method, label_smoothing=recipe.train.label_smoothing, seed=recipe.seed)
    model = method.prepare(model, data.train).to(dev)

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
    )
    try:
        history = trainer.fit()
    finally:
        if bar is not None:
            bar.close()

    # -- deploy, save, reload strictly, check equivalence on the validation split ----------
    deployed = method.deploy(model)
    ckpt = {"model": recipe.model.name, "kwargs": model_kwargs, "state_dict": deployed.state_dict()}
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
    final["deploy/flops_m"] = count_macs(plain) / 1e6
    final["deploy/params_m"] = count_params(plain) / 1e6
    final["trial_time_s"] = time.perf_counter() - t_start
    final.update({k: float(v) for k, v in method.describe().items()})

    for name, payload in (
        ("recipe.yaml", recipe_yaml(recipe)),
        ("events.json", json.dumps(method.events, indent=1, default=_jsonable)),
        ("structure.json", json.dumps(method.structure(model), indent=1, default=_jsonable)),
    ):
        p = out_dir / name
        p.write_text(payload)
        artifacts.append(p)

    if not check["deploy/rel_err"] <= TOLERANCE:
        raise DeployMismatch(
            f"deployed model differs from the training-time model: max abs err {check['deploy/max_abs_err']:.3g}, "
            f"relative {check['deploy/rel_err']:.3g} > {TOLERANCE:g}"
        )
    return TrialResult(final=final, history=history, artifacts=artifacts, events=list(method.events))


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
