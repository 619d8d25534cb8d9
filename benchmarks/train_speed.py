"""Training throughput (issue 16): the bare training step (synthetic batch, the method's optimizer)
for every model × batch size × precision × compile, optionally the real Trainer on real CIFAR-10 and
the cost of the free saliency metrics, and on CUDA the largest batch that fits.

Models: ``origin`` (plain VGG-16), ``dbb`` (static DBB: every conv a 4-branch block),
``dyrep-grown`` (a structure DyRep grows: 4 convs expanded with all 7 branch types, one of them
nested once), ``repvgg`` (RepVGG-A0 training-time: static ``repvgg`` space with ``post_bn: absorb``,
CIFAR stem stride 1) and ``repopt-vgg`` (the plain RepOpt-VGG-A0 trained by RepOptSGD with Grad
Mult, ``hs_init`` scales: the optimizer's overhead is in the step). ``--width`` scales all of them.

Precision ``fp32`` = no autocast, contiguous, TF32 off (the Trainer's defaults: exact fp32);
``bf16`` = bf16 autocast + channels_last, as the Trainer runs on CUDA (``train.amp``,
``train.channels_last``). The Trainer never autocasts on CPU, so a CPU bf16 row prints "n/a on CPU".
Compile ``default`` (or any ``train.compile`` mode) runs the forward through
:class:`repsearch.compile.CompiledForward`, as the Trainer does; "compile s" is its first step
(compile + one step, wall seconds).

    .venv/bin/python benchmarks/train_speed.py --device cpu     # ~12 min on 2 busy cores (DBB compile ~6)
    .venv/bin/python benchmarks/train_speed.py --device cpu --compile off      # eager only: no compile wait
    .venv/bin/python benchmarks/train_speed.py --device cuda --max-batch --costs
    .venv/bin/python benchmarks/train_speed.py --device cpu --compile off --ddp 2   # + a DDP row per cell

``--ddp N`` adds a row per cell trained by N DDP processes (:func:`ddp_cell`: NCCL, one GPU each,
on CUDA; gloo on CPU) sharing the global batch: images/s is the global rate, comparable with the
one-process row above it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from rich.console import Console
from rich.table import Table

from repsearch import scoring
from repsearch.compile import CompiledForward
from repsearch.methods.base import Method
from repsearch.methods.repopt import RepOpt, RepOptSpec
from repsearch.methods.static import Static, StaticSpec
from repsearch.models import build_model
from repsearch.rep import candidate_convs, count_branches, expand, kaiming_fan_out
from repsearch.spaces import resolve_space
from repsearch.spec import TrainSpec
from repsearch.train import Trainer, autocast_for, tf32_scope

MODELS = ("origin", "dbb", "dyrep-grown", "repvgg", "repopt-vgg")


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


def build(name: str, width: float, device: torch.device) -> tuple[torch.nn.Module, Method]:
    """``(training-time model on device, the method whose optimizer hook trains it)`` for a name of
    :data:`MODELS` at ``width``. Raises KeyError for another name."""
    if name in ("repvgg", "repopt-vgg"):
        plain = build_model("repvgg_a0", num_classes=10, width=width, stem_stride=1)
        if name == "repvgg":
            method: Method = Static(StaticSpec(space="repvgg", post_bn="absorb"))
        else:
            method = RepOpt(RepOptSpec(stage="target", scales="hs_init"))
        return method.prepare(plain, []).to(device), method
    if name not in ("origin", "dbb", "dyrep-grown"):
        raise KeyError(f"unknown model {name!r}; one of {', '.join(MODELS)}")
    model = build_model("vgg16", num_classes=10, width=width)
    if name == "dbb":
        model = Static(StaticSpec(space="dbb")).prepare(model, [])
    elif name == "dyrep-grown":
        model = grown_dyrep(model)
    return model.to(device), Method(None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Cell:
    """One row of the step table: model name, batch (images), precision (fp32 | bf16), compile mode."""

    model: str
    batch: int
    precision: str
    compile: str


def bare_step_rate(model, device, batch, steps, amp, channels_last, metric=None, optimizer=None,
                   compile_mode: str = "off", warm: int = 5) -> tuple[float, float]:
    """``(images/s, compile seconds)`` of forward + backward + optimizer step on one fixed synthetic
    batch ``(batch, 3, 32, 32)`` (no data pipeline), timed over ``steps`` steps after ``warm``
    (the first of which compiles when ``compile_mode`` is on; its wall time is the second value,
    0 when off). ``optimizer``: the method's (default SGD, momentum 0.9). With ``metric``, the
    saliency accumulator's ``step()`` runs after every backward. TF32 stays off (exact fp32)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt).train()
    x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = CompiledForward(model, compile_mode, device)
    acc = None
    if metric is not None:
        acc = scoring.SaliencyAccumulator(candidate_convs(model, 2), scoring.STEP_METRICS(metric) or (metric,), device)
    with tf32_scope(False):
        for i in range(steps + warm):
            if i == warm:
                sync(device)
                t0 = time.perf_counter()
            with autocast_for(device, amp):
                loss = torch.nn.functional.cross_entropy(forward(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if acc is not None:
                acc.step()
            opt.step()
            forward.step_done()
        sync(device)
    return steps * batch / (time.perf_counter() - t0), forward.seconds


def bare_cell(cell: Cell, width: float, device: torch.device, steps: int, repeats: int, warm: int = 5) -> Optional[dict]:
    """One row: a fresh model and its method's optimizer, the median images/s of ``repeats`` bare
    runs (each ``warm`` untimed then ``steps`` timed steps; a compiled cell compiles once per run).
    Returns the row's columns: ``branches``, ``img_s`` (None = not applicable), ``compile_s``,
    ``note``; None = no row (bf16 with compile on CPU: the eager bf16 row already says n/a)."""
    if cell.precision == "bf16" and device.type != "cuda":
        if cell.compile != "off":
            return None  # one n/a row per model and batch
        return {"branches": "", "img_s": None, "compile_s": 0.0, "note": "n/a on CPU (the Trainer autocasts on CUDA only)"}
    model, method = build(cell.model, width, device)
    spec = TrainSpec(epochs=2, batch_size=cell.batch, lr=0.01)
    bf16 = cell.precision == "bf16"
    if bf16:
        model.to(memory_format=torch.channels_last)  # before the optimizer (RepOpt's Grad Mult tensors)
    opt = method.optimizer(model, spec)
    runs = [bare_step_rate(model, device, cell.batch, steps, bf16, bf16, optimizer=opt, compile_mode=cell.compile, warm=warm)
            for _ in range(repeats)]
    return {"branches": str(count_branches(model)), "img_s": statistics.median(r[0] for r in runs),
            "compile_s": statistics.median(r[1] for r in runs), "note": type(opt).__name__}


def _ddp_worker(rank: int, world: int, port: int, cell: Cell, width: float, device_type: str, steps: int, warm: int,
                out: str) -> None:
    """One DDP rank of :func:`ddp_cell`: join the group, train ``cell.batch / world`` images per step."""
    import json
    import os

    from repsearch import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist = distributed.init(cuda=device_type == "cuda")
    try:
        device = torch.device(dist.device(device_type))
        torch.manual_seed(0)
        model, method = build(cell.model, width, device)
        bf16 = cell.precision == "bf16"
        if bf16:
            model.to(memory_format=torch.channels_last)
        opt = method.optimizer(model, TrainSpec(epochs=2, batch_size=cell.batch, lr=0.01))
        net = distributed.wrap(model, dist, device)
        rate, comp = bare_step_rate(net, device, cell.batch // world, steps, bf16, bf16, optimizer=opt,
                                    compile_mode=cell.compile, warm=warm)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"img_s": rate * world, "compile_s": comp, "branches": str(count_branches(model))}, f)
        distributed.shutdown(barrier=True)
    finally:
        distributed.shutdown()


def ddp_cell(cell: Cell, world: int, width: float, device: torch.device, steps: int, warm: int) -> Optional[dict]:
    """The DDP row of ``cell``: ``world`` spawned processes (gloo on CPU, each ``cores // world``
    threads; NCCL on CUDA, one GPU each) train the global batch ``cell.batch`` split evenly, with the
    gradient all-reduce of :class:`~torch.nn.parallel.DistributedDataParallel`; images/s is the
    global rate (rank 0's per-rank rate × ranks: the all-reduce keeps the ranks in step)."""
    import json
    import socket
    import tempfile

    import torch.multiprocessing as mp

    if cell.batch % world or (cell.precision == "bf16" and device.type != "cuda"):
        return None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/rank0.json"
        mp.start_processes(_ddp_worker, args=(world, port, cell, width, device.type, steps, warm, out), nprocs=world,
                           start_method="spawn")
        with open(out) as f:
            r = json.load(f)
    return {**r, "note": f"DDP {world} x {cell.batch // world} ({'nccl' if device.type == 'cuda' else 'gloo'})"}


def trainer_rate(model, data, device, spec) -> float:
    """Training images/s of the real Trainer (real data, augmentation, on-device accumulators),
    from the last epoch's ``train_images_per_s`` (the first epoch warms up)."""
    trainer = Trainer(model, Method(None), data.train, data.val, spec, device)
    return trainer.fit()[-1]["train_images_per_s"]


def costs_table(args, device, width, steps, console) -> None:
    """The Trainer on real CIFAR-10 vs the bare step, and the free saliency metrics' extra step time
    (``--costs``; VGG-16 models, first batch size, the first precision)."""
    from repsearch.data import build_data, resolve_data_root

    cuda = device.type == "cuda"
    batch = int(args.batch_sizes.split(",")[0])
    amp = cl = cuda and args.precision.split(",")[0] == "bf16"
    subset = args.train_subset if args.train_subset is not None else (None if cuda else 2048)
    torch.manual_seed(0)
    data = build_data(
        resolve_data_root(args.data_root, None), val_size=500, train_subset=subset, test_subset=100,
        batch_size=batch, eval_batch_size=500, device=str(device), channels_last=cl,
    )
    spec = TrainSpec(epochs=2, batch_size=batch, amp=amp, channels_last=cl, lr=0.01)
    table = Table(title=f"Trainer and metric costs: width {width:g}, batch {batch}, {'bf16 + channels_last' if amp else 'fp32'}")
    for col in ("model", "bare img/s", "Trainer img/s", "Trainer/bare", *scoring.FREE_METRICS):
        table.add_column(col, justify="right")
    for mname in [m for m in args.models.split(",") if m in ("origin", "dbb", "dyrep-grown")]:
        model, _ = build(mname, width, device)
        real = trainer_rate(model, data, device, spec)
        bare = statistics.median(bare_step_rate(model, device, batch, steps, amp, cl)[0] for _ in range(args.repeats))
        costs = []
        for metric in scoring.FREE_METRICS:
            ratios = []
            for _ in range(args.repeats):  # paired, interleaved runs: the median ratio resists noise
                base = bare_step_rate(model, device, batch, steps, amp, cl)[0]
                with_metric = bare_step_rate(model, device, batch, steps, amp, cl, metric=metric)[0]
                ratios.append(base / with_metric - 1)
            costs.append(f"{statistics.median(ratios):+.1%}")
        table.add_row(mname, f"{bare:,.0f}", f"{real:,.0f}", f"{real / bare:.0%}", *costs)
    console.print(table)
    console.print("Trainer: real data, augmentation, measures (last of 2 epochs). Metric columns: extra step time "
                  "with the on-device saliency accumulation after backward, median of paired runs (random draws "
                  "at adjustment time only: ~0 by design).")


def fits(model, method, device, batch: int, bf16: bool) -> bool:
    """Whether one training step at ``batch`` runs without ``torch.cuda.OutOfMemoryError`` (the
    cache is emptied after each try)."""
    try:
        opt = method.optimizer(model, TrainSpec(epochs=2, batch_size=batch, lr=0.01))
        bare_step_rate(model, device, batch, 1, bf16, bf16, optimizer=opt, warm=1)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def max_batch(name: str, width: float, device: torch.device, bf16: bool, limit: int = 1 << 16) -> int:
    """The largest batch (images) whose training step fits in device memory: doubling from 64, then
    bisection between the last fit and the first OOM (0 when 1 does not fit; capped at ``limit``)."""
    model, method = build(name, width, device)
    lo, hi = 0, 64
    while hi <= limit and fits(model, method, device, hi, bf16):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(model, method, device, mid, bf16) else (lo, mid)
    return lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=float, default=None, help="model width (default 1 on CUDA, 0.25 on CPU)")
    ap.add_argument("--batch-sizes", default=None, help="comma list (default 128,512 on CUDA, 128 on CPU)")
    ap.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16 (bf16 + channels_last)")
    ap.add_argument("--compile", default="off,default", help="comma list of train.compile modes")
    ap.add_argument("--steps", type=int, default=None, help="bare steps timed (default 100 CUDA, 5 CPU; after 5 / 2 untimed)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per figure, median (default 3 CUDA, 1 CPU)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--costs", action="store_true", help="also the Trainer on real data and the metric costs")
    ap.add_argument("--train-subset", type=int, default=None, help="--costs: training images per epoch (default all on CUDA, 2048 on CPU)")
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--max-batch", action="store_true", help="CUDA: the largest batch that fits for origin, dbb, dyrep-grown")
    ap.add_argument("--ddp", type=int, default=0, metavar="N",
                    help="also a DDP row per cell: N processes (GPUs on CUDA, gloo on CPU) sharing the global batch")
    args = ap.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    width = args.width if args.width is not None else (1.0 if cuda else 0.25)
    steps = args.steps or (100 if cuda else 5)
    args.repeats = args.repeats or (3 if cuda else 1)
    batches = [int(b) for b in (args.batch_sizes or ("128,512" if cuda else "128")).split(",")]
    args.batch_sizes = ",".join(map(str, batches))
    console = Console(width=160)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"

    cells = [Cell(m, b, p, c) for m in args.models.split(",") for b in batches
             for p in args.precision.split(",") for c in args.compile.split(",")]
    rows: list[tuple[Cell, dict]] = []
    runners: list[Callable[[Cell], Optional[dict]]] = [lambda c: bare_cell(c, width, device, steps, args.repeats, 5 if cuda else 2)]
    if args.ddp > 1:
        runners.append(lambda c: ddp_cell(c, args.ddp, width, device, steps, 5 if cuda else 2))
    for cell in cells:
        for run in runners:
            out = run(cell)
            if out is not None:
                rows.append((cell, out))
    eager = {(c.model, c.batch, c.precision): r["img_s"] for c, r in rows if c.compile == "off" and not r["note"].startswith("DDP")}
    table = Table(title=f"bare training step: width {width:g}, {name}, torch {torch.__version__}, {steps} steps, median of {args.repeats}")
    for col in ("model", "branches", "batch", "precision", "compile", "img/s", "vs eager", "compile s", "optimizer / note"):
        table.add_column(col, justify="right")
    for c, r in rows:
        if r["img_s"] is None:
            table.add_row(c.model, r["branches"], str(c.batch), c.precision, "", "n/a", "", "", r["note"])
            continue
        base = eager.get((c.model, c.batch, c.precision))
        ratio = f"{r['img_s'] / base:.2f}x" if base and c.compile != "off" else ""
        comp = f"{r['compile_s']:.1f}" if c.compile != "off" else ""
        table.add_row(c.model, r["branches"], str(c.batch), c.precision, c.compile, f"{r['img_s']:,.0f}", ratio, comp, r["note"])
    console.print(table)
    console.print("bare: forward + backward + the method's optimizer step on one synthetic batch; fp32 = TF32 off, "
                  "contiguous; bf16 = bf16 autocast + channels_last; compile s = first step after the build (compile + 1 step).")

    if args.costs:
        costs_table(args, device, width, steps, console)
    if args.max_batch:
        if not cuda:
            console.print("--max-batch needs a CUDA device (it bisects on torch.cuda.OutOfMemoryError): skipped on CPU.")
        else:
            bf16 = "bf16" in args.precision.split(",")
            for mname in ("origin", "dbb", "dyrep-grown"):
                console.print(f"largest batch that fits, {mname} ({'bf16 + channels_last' if bf16 else 'fp32'}, "
                              f"width {width:g}): {max_batch(mname, width, device, bf16)}")


if __name__ == "__main__":
    main()
