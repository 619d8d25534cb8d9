"""DDP within a trial: several processes (ranks) train one trial together (DESIGN.md "Distributed
trials — contract").

How a trial trains on ``R`` ranks:

- **Batch**: ``train.batch_size`` is the *global* batch; every rank takes its ``batch_size / R``
  slice of each global batch of the epoch's permutation (:class:`repsearch.data.DeviceLoader` with
  ``rank``/``world_size``), so the recipe describes the same experiment on any number of ranks (the
  effective batch, per-rank × ranks, is logged and tagged). Every rank seeds alike: the model's
  initial weights, the permutation and the augmentation draws are the same everywhere.
- **Gradients**: :class:`torch.nn.parallel.DistributedDataParallel` averages them over ranks in
  backward; BatchNorm statistics are each rank's own batch slice (as the official DyRep and RepVGG
  code train: no SyncBN, which is CUDA-only), rank 0's running statistics are broadcast at every
  forward (DDP's ``broadcast_buffers``) and once after every epoch, before evaluation.
- **Metrics**: training and validation sums (loss, correct, images) are all-reduced once per epoch.
- **Structure changes**: the method's saliency accumulators are all-reduced once per adjustment
  (:meth:`repsearch.methods.base.Method.distributed_sync`; the official DyRep code all-reduces per
  conv per step), every rank runs ``on_epoch_end`` on the same (unsharded) batches, rank 0's
  decisions are broadcast (:meth:`~repsearch.methods.base.Method.agree`), the structures'
  fingerprints are compared (:func:`check_same_structure`), then the optimizer groups are synced and
  the DDP wrapper is rebuilt (its constructor broadcasts rank 0's parameters and buffers).
- **Stores**: only rank 0 talks to Optuna and MLflow and writes checkpoints and artifacts; the other
  ranks follow (:func:`follow`): rank 0 broadcasts each trial's recipe (and the checkpoint it
  resumes) before it trains (:func:`leader_trial_fn`), and a stop message at the end
  (:func:`stop_followers`).

Launch: ``repsearch run RECIPE --nproc-per-node N`` re-executes itself under ``torchrun``
(:func:`torchrun_argv`); a recipe with ``train.distributed: ddp`` started by ``torchrun`` or by
Slurm's ``srun`` (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, with ``MASTER_ADDR`` and
``MASTER_PORT`` set by the job script) joins the process group the environment describes
(:func:`env_world`). Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Environment variable set by ``repsearch run --nproc-per-node`` for its torchrun ranks: DDP on,
#: whatever the recipe's ``train.distributed`` says.
FORCE_ENV = "REPSEARCH_DDP"
#: Seconds a collective may wait (a rank that waits for rank 0's deploy check, a slow epoch).
TIMEOUT_S = 3 * 3600


class DistributedError(RuntimeError):
    """A distributed set-up or consistency error: an environment without a world, a global batch
    that the ranks cannot share evenly, ranks whose structures differ after a change."""


class StoppedByRank0(RuntimeError):
    """Raised on the ranks other than 0 when rank 0 left the trial after an epoch (its report raised:
    a pruned trial, a store error); rank 0 re-raises its own error at the same point."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the trial's process group.

    Attributes:
        rank: global rank, 0 .. world_size - 1 (0 talks to the stores).
        world_size: number of ranks (>= 2 when a context exists).
        local_rank: rank on this node (the CUDA device index on GPU nodes).
        backend: ``gloo`` (CPU) or ``nccl`` (CUDA).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        """True on rank 0."""
        return self.rank == 0

    def device(self, requested: Optional[str] = None) -> str:
        """This rank's device: ``cuda:<local_rank>`` with the NCCL backend, else ``cpu``
        (``requested`` is only checked).

        Raises:
            DistributedError: a CUDA device asked for in a gloo (CPU) group.
        """
        if self.backend == "nccl":
            return f"cuda:{self.local_rank}"
        if requested and requested.startswith("cuda"):
            raise DistributedError("DDP on CUDA needs the nccl backend; this process group uses gloo")
        return "cpu"

    def describe(self, batch_size: int) -> str:
        """One line: ``ddp: 2 ranks x 32 images = global batch 64 (gloo)``."""
        return f"ddp: {self.world_size} ranks x {batch_size // self.world_size} images = global batch {batch_size} ({self.backend})"


_CURRENT: Optional[DistContext] = None


def current() -> Optional[DistContext]:
    """The process group this process joined with :func:`init`, or None (one process per trial)."""
    return _CURRENT


def env_world(environ: Optional[dict] = None) -> Optional[tuple[int, int, int]]:
    """``(rank, world_size, local_rank)`` described by torchrun's (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``) or Slurm's (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``) environment,
    or None when neither describes more than one process."""
    env = os.environ if environ is None else environ
    for rank_k, world_k, local_k in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if world_k in env and rank_k in env:
            world = int(env[world_k])
            if world > 1:
                return int(env[rank_k]), world, int(env.get(local_k, env[rank_k]))
    return None


def wanted(recipe_mode: str = "none", environ: Optional[dict] = None) -> bool:
    """True when this process should join a process group: ``train.distributed: ddp`` (or
    ``repsearch run --nproc-per-node``, :data:`FORCE_ENV`) and an environment of 2+ processes."""
    env = os.environ if environ is None else environ
    return (recipe_mode == "ddp" or env.get(FORCE_ENV) == "1") and env_world(env) is not None


def init(cuda: Optional[bool] = None) -> DistContext:
    """Join the process group the environment describes (:func:`env_world`) and remember it
    (:func:`current`). ``MASTER_ADDR``/``MASTER_PORT`` come from the environment (torchrun sets
    them; a Slurm script exports them). On CPU each rank gets ``cores // local ranks`` threads.

    Args:
        cuda: use CUDA and NCCL (default: when CUDA is available).
    Raises:
        DistributedError: no world of 2+ processes, no ``MASTER_ADDR``/``MASTER_PORT``, or (CUDA)
            a local rank without a visible GPU.
    """
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    world = env_world()
    if world is None:
        raise DistributedError("train.distributed: ddp needs to be started by torchrun or srun (no RANK/WORLD_SIZE of 2+ processes)")
    rank, size, local = world
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        if k not in os.environ:
            raise DistributedError(f"DDP: {k} is not set (torchrun sets it; a Slurm script must export it)")
    use_cuda = torch.cuda.is_available() if cuda is None else bool(cuda)
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise DistributedError(f"DDP: local rank {local} has no GPU ({torch.cuda.device_count()} visible; one process per GPU)")
        torch.cuda.set_device(local)
    else:
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_size)))
    torch.distributed.init_process_group(
        backend, init_method="env://", rank=rank, world_size=size, timeout=timedelta(seconds=TIMEOUT_S)
    )
    _CURRENT = DistContext(rank=rank, world_size=size, local_rank=local, backend=backend)
    log.info("joined the process group: rank %d of %d (local %d, %s)", rank, size, local, backend)
    return _CURRENT


def shutdown(barrier: bool = False) -> None:
    """Leave the process group (idempotent). ``barrier``: on a clean exit, wait for every rank first
    (no rank tears its connections down while another still uses them); leave it False on an error
    path, where another rank may never arrive."""
    global _CURRENT
    if _CURRENT is not None and torch.distributed.is_initialized():
        if barrier:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    _CURRENT = None


# --------------------------------------------------------------------------------- collectives
def all_reduce_sum(t: torch.Tensor, dist: Optional[DistContext]) -> torch.Tensor:
    """Sum ``t`` (any shape, on this rank's device) over ranks in place and return it; no-op
    without a process group. One collective."""
    if dist is not None:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, dist: Optional[DistContext]) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank; ``obj`` itself without a process group."""
    if dist is None:
        return obj
    box = [obj if dist.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast_buffers(model: nn.Module, dist: Optional[DistContext]) -> None:
    """Overwrite every buffer (BN running statistics, attach rates) with rank 0's: one broadcast
    per buffer. No-op without a process group."""
    if dist is None:
        return
    for b in model.buffers():
        torch.distributed.broadcast(b, src=0)


def leave_together(report: Callable[[], None], dist: Optional[DistContext], where: str) -> None:
    """Run ``report`` — what rank 0 alone does for a trial (checkpoint, MLflow, Optuna pruning; a
    no-op on the other ranks) — so that when it raises on rank 0 every rank leaves the trial at this
    same point: one broadcast says whether rank 0 stopped. Without a process group ``report`` just runs.

    Args:
        report: a function of no argument.
        dist: the trial's process group, or None.
        where: for the other ranks' message, e.g. ``"after epoch 3"``.
    Raises:
        Whatever ``report`` raised (rank 0); :class:`StoppedByRank0` on the other ranks.
    """
    if dist is None:
        report()
        return
    error: Optional[BaseException] = None
    try:
        report()
    except Exception as exc:  # noqa: BLE001 (re-raised below, on every rank)
        error = exc
    stop = broadcast_object(None if error is None else f"{type(error).__name__}: {error}", dist)
    if error is not None:
        raise error
    if stop is not None:
        raise StoppedByRank0(f"rank 0 stopped the trial {where}: {stop}")


def structure_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's parameter and buffer names and shapes (module order): two models with
    the same fingerprint have the same blocks, branches, nesting and branch order."""
    h = hashlib.sha256()
    for kind, items in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, t in items:
            h.update(f"{kind}:{name}:{tuple(t.shape)};".encode())
    return h.hexdigest()


def check_same_structure(model: nn.Module, dist: Optional[DistContext], epoch: int) -> None:
    """After a structure change: every rank's :func:`structure_fingerprint` must equal rank 0's
    (one all-gather of the fingerprints, so that every rank reaches the same verdict).

    Raises:
        DistributedError: on every rank, when any rank's structure differs (the trial fails).
    """
    if dist is None:
        return
    prints: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(prints, structure_fingerprint(model))
    differ = [r for r, fp in enumerate(prints) if fp != prints[0]]
    if differ:
        raise DistributedError(f"ranks {differ}: the structure after epoch {epoch} differs from rank 0's")


def wrap(model: nn.Module, dist: Optional[DistContext], device: torch.device) -> nn.Module:
    """``model`` inside a new :class:`~torch.nn.parallel.DistributedDataParallel` (its constructor
    broadcasts rank 0's parameters and buffers), or ``model`` itself without a process group."""
    if dist is None:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index if device.index is not None else dist.local_rank] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)  # broadcast_buffers (default): rank 0's buffers at every forward


# --------------------------------------------------------------------------------- trials
_STOP = "stop"


def leader_trial_fn(trial_fn: Callable, dist: DistContext) -> Callable:
    """Rank 0's trial function: broadcast the trial (recipe YAML, data root, the checkpoint it
    resumes, read here and sent whole so that other nodes need no shared folder) to the followers
    (:func:`follow`), then run ``trial_fn`` with the same arguments.

    Args:
        trial_fn: :func:`repsearch.trial.run_trial` or a function of its signature.
        dist: this process's group (rank 0).
    Returns:
        A function of ``trial_fn``'s signature (``run_study``'s ``trial_fn``).
    Raises (when called):
        repsearch.checkpoint.CheckpointError: the checkpoint to resume does not load.
    """
    from repsearch.checkpoint import load_checkpoint
    from repsearch.spec import recipe_yaml

    def run(recipe, *, data_root, device, out_dir, on_epoch=None, progress=True, resume_from=None, **kw):
        ckpt = load_checkpoint(resume_from, map_location="cpu") if resume_from is not None else None
        broadcast_object({"kind": "trial", "recipe": recipe_yaml(recipe), "data_root": data_root, "checkpoint": ckpt}, dist)
        extra = {"resume_from": resume_from} if resume_from is not None else {}
        return trial_fn(recipe, data_root=data_root, device=device, out_dir=out_dir, on_epoch=on_epoch,
                        progress=progress, **extra, **kw)

    return run


def stop_followers(dist: Optional[DistContext]) -> None:
    """Tell the followers that no trial is left (rank 0, once, at the end of its command)."""
    if dist is not None and dist.is_main:
        broadcast_object({"kind": _STOP}, dist)


def follow(dist: DistContext, out_dir: "Optional[os.PathLike[str] | str]" = None, device: Optional[str] = None,
           trial_fn: Optional[Callable] = None) -> int:
    """A rank other than 0: run every trial rank 0 broadcasts until it says stop. Talks to no store.
    A trial that fails with one of :func:`synchronised_errors` is logged and the rank waits for the
    next trial (rank 0 records the failure); any other error propagates (the process ends).

    Args:
        dist: this process's group (rank > 0).
        out_dir: where each trial's scratch folder is made (removed after the trial; default: the
            system's temporary folder).
        device: the ``--device`` asked for (the rank's own device is :meth:`DistContext.device`).
        trial_fn: the trial function (default :func:`repsearch.trial.run_trial`).
    Returns:
        The number of trials run.
    Raises:
        Any error of a trial that is not one of :func:`synchronised_errors`.
    """
    import tempfile
    from pathlib import Path

    import yaml

    from repsearch.spec import Recipe

    if trial_fn is None:
        from repsearch.trial import run_trial as trial_fn
    n = 0
    while True:
        msg = broadcast_object(None, dist)
        if msg is None or msg.get("kind") == _STOP:
            return n
        recipe = Recipe.model_validate(yaml.safe_load(msg["recipe"]))
        n += 1
        with tempfile.TemporaryDirectory(prefix=f"repsearch-rank{dist.rank}-", dir=out_dir) as tmp:
            kw: dict[str, Any] = {}
            if msg.get("checkpoint") is not None:
                path = Path(tmp) / "resume.pt"
                torch.save(msg["checkpoint"], path)
                kw["resume_from"] = path
            try:
                trial_fn(recipe, data_root=msg["data_root"], device=dist.device(device), out_dir=Path(tmp) / "trial",
                         progress=False, **kw)
            except synchronised_errors() as exc:  # rank 0 raised it too and records the failure
                log.warning("rank %d: trial failed: %s", dist.rank, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def synchronised_errors() -> tuple[type[BaseException], ...]:
    """The errors every rank of a trial raises at the same point: a NaN loss (all-reduced), ranks
    whose structures differ (all-gathered), a stop told by rank 0, a checkpoint or data error (the
    same inputs on every rank). A follower that meets one of them waits for rank 0's next trial
    (rank 0 records the failure); any other error ends the follower's process, and torchrun then
    stops the whole group (the trial is failed as stale and resumes from its last checkpoint on the
    next run)."""
    from repsearch.checkpoint import CheckpointError
    from repsearch.errors import DataError
    from repsearch.train import NonFiniteLoss

    return (StoppedByRank0, DistributedError, NonFiniteLoss, CheckpointError, DataError)


def torchrun_argv(nproc: int, argv: Iterable[str]) -> list[str]:
    """The command that re-runs ``repsearch`` with ``argv`` (without ``--nproc-per-node``) under
    ``torchrun --standalone --nproc-per-node nproc`` (one node, a free rendezvous port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(nproc)}",
            "-m", "repsearch.cli", *argv]


def strip_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return out

