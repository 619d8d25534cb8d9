"""Mid-trial checkpoints: what a killed trial leaves so that the next trial of its point resumes it
exactly (DESIGN.md "Checkpoints and resume — contract").

A checkpoint is one file ``<out_dir>/checkpoints/epoch_XXXX.pt`` (XXXX the last finished epoch,
from 1) written by :class:`Checkpointer` at the end of an epoch (never inside one: no I/O and no
host sync on the hot path) every ``train.checkpoint_every`` epochs (default about every 10% of the
run: :func:`default_every`) and at the end of the epoch after any epoch whose
:class:`~repsearch.methods.base.EpochChanges` was non-empty. It holds plain tensors and JSON-able
values only, so it loads with ``torch.load(..., weights_only=True)``:

- ``format`` (:data:`FORMAT`), ``epoch``, ``meta`` (the trial recipe's hash: a checkpoint is only
  resumed by the same configuration and seed);
- ``model``: :func:`model_record` — the method's structure record (``Method.structure``: blocks,
  nesting, branch kinds, geometry, λ), the branch order of every block, the parameter and buffer
  names in module order, and the ``state_dict`` (CPU copies);
- ``method``: ``Method.state_dict()`` (DyRep: saliency sums, counters, events, generator; RepAn:
  cycle values, λ, the cycle's best snapshot; ...);
- ``trainer``: ``Trainer.state_dict()`` — optimizer and scheduler state, the parameter names of
  every optimizer group (checked on load), the per-epoch history, the running averages (avg
  FLOPs/params), device seconds, fp32/TF32 epochs, the loader's epoch and the python / numpy /
  torch (CPU and CUDA) RNG states (:func:`rng_state`).

Files are written atomically (a temporary file in the same folder, fsynced, then ``os.replace``),
only the newest :data:`KEEP` are kept, and the trial removes the folder when it finishes.

Resuming (:func:`restore_model`, then ``Method.load_state_dict`` and ``Trainer.load_state_dict``)
rebuilds the plain model from its constructor, runs ``method.prepare`` (the method's own set-up:
a KD teacher, the scales of RepOpt, the blocks of static/RepAn), lets the method re-apply the
recorded structure (``Method.restore_structure``), puts every block's branches in the recorded
order, checks that the parameter and buffer names equal the recorded ones and loads the state_dict
with ``strict=True``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from repsearch.rep import RepBlock

if TYPE_CHECKING:  # pragma: no cover
    from repsearch.methods.base import Method

log = logging.getLogger(__name__)

#: Version of the checkpoint layout; a file of another version is not resumed.
FORMAT = 1
#: The checkpoints' folder inside a trial's out_dir (also ``repsearch.sweep.worker.CHECKPOINTS``).
DIRNAME = "checkpoints"
#: Checkpoints kept per trial (the newest ones).
KEEP = 2
_NAME = re.compile(r"^epoch_(\d{4,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed: unreadable, another format or configuration, or a model
    whose rebuilt structure, parameters or optimizer groups differ from the recorded ones."""


# ------------------------------------------------------------------------------------ policy
def default_every(epochs: int) -> int:
    """The default checkpoint period in epochs: about 10% of the run, ``max(1, round(epochs / 10))``."""
    return max(1, int(round(int(epochs) / 10)))


def resolve_every(train_spec: Any) -> int:
    """``train.checkpoint_every`` with its default applied (0 = no checkpoints)."""
    every = getattr(train_spec, "checkpoint_every", None)
    return default_every(train_spec.epochs) if every is None else int(every)


# ------------------------------------------------------------------------------------ plain values
def plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` made loadable with ``torch.load(weights_only=True)``: tensors become detached CPU
    copies, numpy scalars python numbers, numpy arrays tensors, paths strings; dicts, lists and
    tuples are converted element by element; str, int, float, bool, None, torch dtypes, devices and
    sizes stay.

    Raises:
        CheckpointError: any other type (named with its place in ``obj``), so that a checkpoint that
            would not load is never written.
    """
    if isinstance(obj, np.generic):  # before float: numpy.float64 is a float subclass that does not load
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {k: plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, (torch.dtype, torch.device, torch.Size)):  # weights_only reads these as they are
        return obj
    raise CheckpointError(f"{where}: a {type(obj).__name__} cannot go into a weights_only checkpoint")


# ------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """The python, numpy (legacy global) and torch RNG states (CPU, and every CUDA device when CUDA
    is initialised) as plain values: ``{"python", "numpy", "torch", "cuda"}``."""
    version, state, gauss = random.getstate()
    key, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "python": (version, tuple(state), gauss),
        "numpy": (str(key), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state` output. CUDA states are restored when this process has as many CUDA
    devices (otherwise a warning: a run resumed on another machine is not bitwise identical).

    Raises:
        CheckpointError: a malformed state.
    """
    try:
        version, st, gauss = state["python"]
        random.setstate((int(version), tuple(int(v) for v in st), gauss))
        key, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((key, np.asarray(keys.tolist(), dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"malformed RNG state in checkpoint: {exc}") from None
    cuda = state.get("cuda")
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint holds %d CUDA RNG states; this process has %s CUDA devices: not restored",
                        len(cuda), torch.cuda.device_count() if torch.cuda.is_available() else 0)


# ------------------------------------------------------------------------------------ files
def checkpoint_path(folder: str | os.PathLike, epoch: int) -> Path:
    """``<folder>/epoch_XXXX.pt`` for ``epoch`` (from 1)."""
    return Path(folder) / f"epoch_{int(epoch):04d}.pt"


def checkpoint_epoch(path: str | os.PathLike) -> Optional[int]:
    """The epoch in a checkpoint's file name (``epoch_0004.pt`` -> 4), None for another name."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The checkpoints in ``folder``, oldest epoch first (temporary files are not listed; an absent
    folder lists none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(checkpoint_epoch(p), p) for p in folder.iterdir() if p.is_file()]
    return [p for e, p in sorted((e, p) for e, p in found if e is not None)]


def latest_checkpoint(folder: str | os.PathLike) -> Optional[Path]:
    """The newest checkpoint in ``folder`` (highest epoch), or None."""
    found = list_checkpoints(folder)
    return found[-1] if found else None


def save_checkpoint(payload: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``payload`` (made :func:`plain`) to ``path`` atomically: a temporary file in the same
    folder, flushed and fsynced, then ``os.replace`` (a reader or a kill at any moment sees the old
    file or the new one, never half of one). Returns ``path``.

    Raises:
        CheckpointError: a value that would not load with ``weights_only=True``.
        OSError: the folder cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = plain(dict(payload))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # the rename itself survives a power cut only once the folder is synced
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict:
    """Read a checkpoint with ``torch.load(..., weights_only=True)``.

    Args:
        map_location: where the tensors go (default CPU; the restore copies them onto the model).
        mmap: map the file instead of reading it (cheap: for the ``meta`` and ``epoch`` only).

    Raises:
        CheckpointError: unreadable, not a dict, or another :data:`FORMAT`.
    """
    try:
        data = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # pickle, zip and I/O errors of many types
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: checkpoint format {fmt!r}, this repsearch reads {FORMAT}")
    return data


class Checkpointer:
    """Writes a trial's checkpoints (the policy of the module docstring).

    Args:
        folder: ``<out_dir>/checkpoints``.
        every: period in epochs (:func:`resolve_every`; 0 = never, also not after structure changes).
        keep: newest files kept (default :data:`KEEP`).
        meta: JSON-able facts stored in every file (``recipe_hash``).
    """

    def __init__(self, folder: str | os.PathLike, every: int, keep: int = KEEP, meta: Optional[dict] = None):
        self.folder = Path(folder)
        self.every = int(every)
        self.keep = max(1, int(keep))
        self.meta = dict(meta or {})

    def due(self, epoch: int, changed_before: bool) -> bool:
        """Whether the end of ``epoch`` (from 1) gets a checkpoint: every ``every`` epochs, and after
        an epoch whose end changed the structure or the optimizer (``changed_before``)."""
        if self.every <= 0:
            return False
        return epoch % self.every == 0 or bool(changed_before)

    def save(self, epoch: int, state: Mapping[str, Any]) -> Path:
        """Write ``state`` (``model``, ``method``, ``trainer``) as the checkpoint of ``epoch`` and
        remove all but the newest :attr:`keep`. Returns the file."""
        payload = {"format": FORMAT, "epoch": int(epoch), "meta": dict(self.meta), **state}
        path = save_checkpoint(payload, checkpoint_path(self.folder, epoch))
        for old in list_checkpoints(self.folder)[: -self.keep]:
            old.unlink(missing_ok=True)
        log.debug("checkpoint %s", path)
        return path

    def clear(self) -> None:
        """Remove every checkpoint (and temporary file) and the folder (the trial finished)."""
        remove_checkpoints(self.folder)


def remove_checkpoints(folder: str | os.PathLike) -> None:
    """Remove a checkpoints folder and everything in it (nothing when absent)."""
    shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------ model
def _branch_order(model: nn.Module) -> dict[str, list[str]]:
    return {path: list(m.branches.keys()) for path, m in model.named_modules() if isinstance(m, RepBlock)}


def model_record(model: nn.Module, method: "Method") -> dict[str, Any]:
    """What rebuilds the training-time model exactly: ``structure`` (``method.structure(model)``),
    ``branch_order`` (every RepBlock's branch keys in module order, nested blocks included),
    ``parameters`` / ``buffers`` (names in module order) and ``state_dict`` (CPU copies)."""
    return {
        "structure": method.structure(model),
        "branch_order": _branch_order(model),
        "parameters": [n for n, _ in model.named_parameters()],
        "buffers": [n for n, _ in model.named_buffers()],
        "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
    }


def restore_model(model: nn.Module, method: "Method", record: Mapping[str, Any]) -> nn.Module:
    """Give ``model`` — the plain model after ``method.prepare`` — the recorded structure and
    weights: ``method.restore_structure(model, record["structure"])``, every block's branches put in
    the recorded order (sums are added in that order), the parameter and buffer names checked against
    the recorded ones, then ``load_state_dict(strict=True)``. Returns the model (the one
    ``restore_structure`` returned), on the device its parameters were on.

    Raises:
        CheckpointError: the structure cannot be rebuilt, or the names differ after rebuilding.
    """
    try:
        model = method.restore_structure(model, record["structure"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot rebuild the recorded structure: {exc}") from None
    order = record.get("branch_order", {})
    blocks = {p: m for p, m in model.named_modules() if isinstance(m, RepBlock)}
    for path, keys in order.items():
        block = blocks.get(path)
        if block is None or set(block.branches.keys()) != set(keys):
            have = None if block is None else list(block.branches.keys())
            raise CheckpointError(f"block '{path}': recorded branches {list(keys)}, rebuilt {have}")
        if list(block.branches.keys()) != list(keys):
            block.branches = nn.ModuleDict([(k, block.branches[k]) for k in keys])
    for what, now in (("parameters", [n for n, _ in model.named_parameters()]), ("buffers", [n for n, _ in model.named_buffers()])):
        recorded = list(record[what])
        if now != recorded:
            diff = next((f"{a!r} vs {b!r}" for a, b in zip(recorded, now) if a != b), f"{len(recorded)} vs {len(now)} names")
            raise CheckpointError(f"rebuilt model's {what} differ from the checkpoint's ({diff})")
    try:
        model.load_state_dict(record["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not load: {str(exc).splitlines()[0]}") from None
    return model
