"""Training speed and memory: RepOpt-VGG (plain conv-BN-ReLU + Grad Mult SGD) vs RepVGG (3x3-BN +
1x1-BN + identity-BN per layer, the form RepOpt trains as its baseline) of the same architecture, in
one process, at the same batch, on synthetic data (RepOptimizers Table 2: RepOpt-VGG-B1 trains ~1.8x
as fast as RepVGG-B1 on a 2080Ti and fits a larger batch).

Measures per arm: training images/s (median of timed steps: forward, backward, optimizer step, no
data loading), peak memory (CUDA: ``max_memory_allocated``; CPU: the growth of the peak RSS of a
fresh process that runs only that arm, over its RSS after the imports), and on CUDA the largest power-of-two batch that fits (doubling until out of memory).
Prints a rich table and the RepOpt/RepVGG speed ratio. Run on demand:

    .venv/bin/python benchmarks/repopt_speed.py --device cpu --model repvgg_b1 --width 0.25 --batch-size 32
    .venv/bin/python benchmarks/repopt_speed.py --device cuda --model repvgg_b1 --batch-size 256 --image-size 224
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from repsearch.measures import peak_memory_mb, reset_peak_memory
from repsearch.methods.repopt import RepOpt, RepOptSpec
from repsearch.methods.static import Static, StaticSpec
from repsearch.models import build_model
from repsearch.spec import TrainSpec


def build(arm: str, args, device: torch.device):
    """(model, optimizer) of ``arm`` (``repopt`` or ``repvgg``) on ``device``."""
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=args.classes, width=args.width, stem_stride=args.stem_stride)
    train = TrainSpec(epochs=2, lr=0.1, momentum=0.9, nesterov=True, weight_decay=4e-5, wd_on_norm=False)
    method = Static(StaticSpec(space="repvgg", post_bn="absorb")) if arm == "repvgg" else RepOpt(RepOptSpec(stage="target", scales="hs_init"))
    model = method.prepare(model, []).to(device)
    if args.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # before the optimizer: Grad Mult tensors follow it
    opt = method.optimizer(model, train)
    return model, opt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(model, opt, batch: int, steps: int, args, device: torch.device) -> list[float]:
    """Seconds per training step (forward, loss, backward, step) on a fixed synthetic batch."""
    x = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    if args.channels_last and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (batch,), device=device)
    model.train()
    times = []
    for i in range(steps + args.warmup):
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return times


def max_batch(arm: str, args, device: torch.device) -> int:
    """Largest power-of-two batch whose training step fits in CUDA memory (0 on CPU)."""
    if device.type != "cuda":
        return 0
    best, b = 0, args.batch_size
    while b <= args.max_batch:
        try:
            model, opt = build(arm, args, device)
            run_steps(model, opt, b, 1, argparse.Namespace(**{**vars(args), "warmup": 0}), device)
            best = b
            b *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            model = opt = None
            torch.cuda.empty_cache()
    return best


def measure_arm(arm: str, args) -> tuple[float, float, float, int]:
    """(images/s, peak memory MiB, train-time params M, largest CUDA batch) of one arm."""
    device = torch.device(args.device)
    reset_peak_memory(device)
    base = 0.0 if device.type == "cuda" else peak_memory_mb(device)  # CPU: the fresh process after imports
    model, opt = build(arm, args, device)
    times = run_steps(model, opt, args.batch_size, args.steps, args, device)
    mem = peak_memory_mb(device) - base
    n_params = sum(q.numel() for q in model.parameters()) / 1e6
    model = opt = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return args.batch_size / statistics.median(times), mem, n_params, max_batch(arm, args, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="repvgg_b1")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--stem-stride", type=int, default=2)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=8192, help="upper limit of the CUDA batch search")
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)

    rows = {}
    for arm in ("repvgg", "repopt"):
        if device.type == "cpu":  # a fresh process per arm: its peak RSS is that arm's alone
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(1) as pool:
                rows[arm] = pool.apply(measure_arm, (arm, args))
        else:
            rows[arm] = measure_arm(arm, args)
    table = Table(title=f"{args.model} width {args.width:g}, {args.image_size}x{args.image_size}, batch {args.batch_size}, {device}")
    for col in ("arm", "train images/s", "peak memory (MiB)", "train-time params (M)", "largest batch"):
        table.add_column(col, justify="right")
    for arm, (ips, mem, n, mb) in rows.items():
        table.add_row(arm, f"{ips:,.1f}", f"{mem:,.0f}", f"{n:.2f}", str(mb) if mb else "n/a (CPU)")
    console = Console()
    console.print(table)
    console.print(f"RepOpt-VGG / RepVGG training speed: {rows['repopt'][0] / rows['repvgg'][0]:.2f}x "
                  f"(RepOpt Table 2: ~1.8x for B1 on a 2080Ti)")


if __name__ == "__main__":
    main()
