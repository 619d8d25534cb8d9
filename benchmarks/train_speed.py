"""Training throughput: the real Trainer on real CIFAR-10 vs the bare synthetic-data step, and the
cost of the free saliency metrics (random, grad_norm, snip, synflow) as a fraction of step time.

Models: ``origin`` (plain VGG-16), ``dbb`` (static DBB: every conv a 4-branch block) and
``dyrep-grown`` (a structure DyRep grows: 4 convs expanded with all 7 branch types, one of them
nested once). Run on demand; prints a table (images/s; fraction of step time).

    .venv/bin/python benchmarks/train_speed.py --device cpu --width 0.25 --train-subset 2048
    .venv/bin/python benchmarks/train_speed.py --device cuda --batch-size 128
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from repsearch import scoring
from repsearch.data import build_data, resolve_data_root
from repsearch.methods.base import Method
from repsearch.methods.static import Static
from repsearch.models import build_model
from repsearch.rep import candidate_convs, count_branches, expand, kaiming_fan_out
from repsearch.spaces import resolve_space
from repsearch.methods.static import StaticSpec
from repsearch.spec import TrainSpec
from repsearch.train import Trainer, autocast_for


def grown_dyrep(model: torch.nn.Module) -> torch.nn.Module:
    """A DyRep-like grown structure: 4 top-level convs expanded with the dyrep space, one nested."""
    kinds = resolve_space("dyrep")
    paths = list(candidate_convs(model, max_depth=1))
    for path in paths[1:: max(1, len(paths) // 4)][:4]:
        expand(model, path, kinds, gamma_init=0.01, conv_init=kaiming_fan_out)
    nested = [p for p in candidate_convs(model, max_depth=2) if ".branches.kxk." in p]
    if nested:
        expand(model, nested[0], kinds, gamma_init=0.01, conv_init=kaiming_fan_out)
    return model


def build(name: str, width: float, device: torch.device) -> torch.nn.Module:
    model = build_model("vgg16", num_classes=10, width=width)
    if name == "dbb":
        model = Static(StaticSpec(space="dbb")).prepare(model, [])
    elif name == "dyrep-grown":
        model = grown_dyrep(model)
    return model.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step_rate(model, device, batch, steps, amp, channels_last, metric=None) -> float:
    """Images/s of forward + backward + SGD step on one fixed synthetic batch (no data pipeline).
    With ``metric``, the saliency accumulator's ``step()`` runs after every backward."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt).train()
    x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    acc = None
    if metric is not None:
        acc = scoring.SaliencyAccumulator(candidate_convs(model, 2), scoring.STEP_METRICS(metric) or (metric,), device)
    warm = 5
    for i in range(steps + warm):
        if i == warm:
            sync(device)
            t0 = time.perf_counter()
        with autocast_for(device, amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if acc is not None:
            acc.step()
        opt.step()
    sync(device)
    return steps * batch / (time.perf_counter() - t0)


def trainer_rate(model, data, device, spec) -> float:
    """Training images/s of the real Trainer (real data, augmentation, on-device accumulators),
    from the last epoch's ``train_images_per_s`` (the first epoch warms up)."""
    trainer = Trainer(model, Method(None), data.train, data.val, spec, device)
    return trainer.fit()[-1]["train_images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=float, default=None, help="VGG-16 width (default 1 on CUDA, 0.25 on CPU)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None, help="bare steps timed (default 100 CUDA, 10 CPU)")
    ap.add_argument("--train-subset", type=int, default=None, help="training images per epoch (default all on CUDA, 2048 on CPU)")
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--models", default="origin,dbb,dyrep-grown")
    ap.add_argument("--repeats", type=int, default=3, help="paired repetitions per figure (median)")
    args = ap.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    width = args.width if args.width is not None else (1.0 if cuda else 0.25)
    steps = args.steps or (100 if cuda else 15)
    subset = args.train_subset if args.train_subset is not None else (None if cuda else 2048)
    amp = cuda and not args.no_amp
    cl = cuda and not args.no_channels_last
    torch.manual_seed(0)
    data = build_data(
        resolve_data_root(args.data_root, None), val_size=500, train_subset=subset, test_subset=100,
        batch_size=args.batch_size, eval_batch_size=500, device=str(device), channels_last=cl,
    )
    spec = TrainSpec(epochs=2, batch_size=args.batch_size, amp=amp, channels_last=cl, lr=0.01)
    console = Console(width=160)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    table = Table(title=f"train speed: VGG-16 x{width:g}, batch {args.batch_size}, {name}, torch {torch.__version__}, "
                        f"{'bf16' if amp else 'fp32'}{' + channels_last' if cl else ''}")
    for col in ("model", "branches", "bare img/s", "Trainer img/s", "Trainer/bare",
                "random", "grad_norm", "snip", "synflow"):
        table.add_column(col, justify="right")
    for mname in args.models.split(","):
        model = build(mname, width, device)
        real = trainer_rate(model, data, device, spec)
        bare = statistics.median(bare_step_rate(model, device, args.batch_size, steps, amp, cl) for _ in range(args.repeats))
        costs = []
        for metric in scoring.FREE_METRICS:
            ratios = []
            for _ in range(args.repeats):  # paired, interleaved runs: the median ratio resists noise
                base = bare_step_rate(model, device, args.batch_size, steps, amp, cl)
                with_metric = bare_step_rate(model, device, args.batch_size, steps, amp, cl, metric=metric)
                ratios.append(base / with_metric - 1)
            costs.append(f"{statistics.median(ratios):+.1%}")
        table.add_row(mname, str(count_branches(model)), f"{bare:,.0f}", f"{real:,.0f}", f"{real / bare:.0%}", *costs)
    console.print(table)
    console.print("bare: forward+backward+SGD on one synthetic batch; Trainer: real data, augmentation, measures "
                  "(last of 2 epochs). Metric columns: extra step time with the on-device saliency accumulation "
                  "after backward, median of paired runs (random draws at adjustment time only: ~0 by design).")


if __name__ == "__main__":
    main()
