"""INT8 post-training quantization (PTQ) of deployed plain models, and their kernel statistics.

RepOptimizers (Ding et al., ICLR 2023) §4.4, Appendix C, Tables 8 and 10: a simple INT8 PTQ keeps
RepOpt-VGG-B1 at 75.89% top-1 while the deployed RepVGG-B1 collapses to 54.55%, because BN fusion
and branch addition widen the distribution of the deployed kernels (Table 8: standard deviation of
the kernel parameters, RepOpt-VGG 0.0066 vs RepVGG 0.0234). This module measures both sides:

- :func:`ptq_int8`: torchao's PT2E flow on CPU — ``torch.export.export`` of the fp32 model in eval
  mode with a dynamic batch dimension, ``prepare_pt2e`` with ``X86InductorQuantizer`` and its
  default configuration (BN folded into the conv, int8 per-channel symmetric weights, uint8
  per-tensor affine activations with histogram observers), calibration on the batches the caller
  gives, ``convert_pt2e``. The returned module holds quantize/dequantize ops around fp32 ops and
  runs eagerly on CPU (no ``torch.compile``: it took 76 s on 2 cores, METHODS.md).
- :func:`calibration_batches`: N non-augmented batches of the TRAINING split (never val/test).
- :func:`kernel_std`: per-layer standard deviation of the deployed conv kernels with the following
  BN folded in (what the x86 quantizer quantizes; RepOpt Table 8).
- :func:`evaluate_int8`: top-1 of the quantized module (batches moved to CPU).
- :func:`int8_measures` (the end-of-trial step, :mod:`repsearch.trial`) and :func:`quantize_run`
  (``repsearch quantize RUN_ID``: a finished run's ``deployed.pt`` from MLflow).

``torchao`` is imported lazily (only :func:`ptq_int8` needs it); its absence or a model that
``torch.export`` cannot capture is a :class:`QuantizeError` (one line).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

from repsearch.errors import UserError

log = logging.getLogger(__name__)

#: The torchao quantizer every PTQ uses (recorded as the tag ``int8.quantizer``).
QUANTIZER = "X86InductorQuantizer"
#: Name of the per-layer kernel statistics artifact.
KERNEL_STD_ARTIFACT = "kernel_std.json"


class QuantizeError(UserError):
    """INT8 PTQ is impossible here: torchao is missing, or ``torch.export`` / the quantizer fails on
    the model (the one-line message names the model class, the failing step and why)."""


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ----------------------------------------------------------------------------------- torchao
def _torchao():
    """``(prepare_pt2e, convert_pt2e, X86InductorQuantizer, get_default_x86_inductor_quantization_config)``.

    Raises:
        QuantizeError: torchao is not installed (or cannot be imported).
    """
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)  # torchao 0.18 registers an Enum as a pytree constant: a warning per import
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    except ImportError as exc:
        raise QuantizeError(
            f"int8 PTQ needs torchao (pip install 'torchao>=0.18,<0.19' -c constraints.txt): {_one_line(exc)}"
        ) from None
    finally:
        pytree_log.setLevel(level)
    return prepare_pt2e, convert_pt2e, X86InductorQuantizer, get_default_x86_inductor_quantization_config


def require_torchao() -> None:
    """Check that torchao's PT2E modules import (a trial with ``quantize.mode: ptq`` calls this before
    training, so a missing package fails in seconds, not after the run).

    Raises:
        QuantizeError: torchao is missing (one line with the install command).
    """
    _torchao()


def _spec_words(spec: Any) -> str:
    """``"int8 per_channel_symmetric PerChannelMinMaxObserver"`` for a torchao ``QuantizationSpec``."""
    observer = getattr(spec, "observer_or_fake_quant_ctr", None)
    observer = getattr(observer, "p", observer)  # torchao's PartialWrapper around a functools.partial
    observer = getattr(observer, "func", observer)
    dtype = str(getattr(spec, "dtype", "?")).replace("torch.", "")
    qscheme = str(getattr(spec, "qscheme", "?")).replace("torch.", "")
    return f"{dtype} {qscheme} {getattr(observer, '__name__', str(observer))}"


def quantizer_tags(calib_batches: int, calib_images: Optional[int] = None) -> dict[str, str]:
    """The quantizer configuration as MLflow tags: ``int8.quantizer``, ``int8.config``, ``int8.weights``,
    ``int8.activations``, ``int8.calib_batches`` (and ``int8.calib_images`` when given).

    Raises:
        QuantizeError: torchao is missing.
    """
    *_, get_config = _torchao()
    cfg = get_config()
    tags = {
        "int8.quantizer": QUANTIZER,
        "int8.config": "get_default_x86_inductor_quantization_config (PT2E, static, BN folded)",
        "int8.weights": _spec_words(cfg.weight),
        "int8.activations": _spec_words(cfg.input_activation),
        "int8.calib_batches": str(int(calib_batches)),
    }
    if calib_images is not None:
        tags["int8.calib_images"] = str(int(calib_images))
    return tags


# --------------------------------------------------------------------------------------- PTQ
def _images(batch: Any) -> torch.Tensor:
    """The image tensor of a calibration batch: a tensor, or the first element of (images, labels)."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"a calibration batch must be a tensor (B, 3, H, W) or (images, labels), got {type(batch).__name__}")
    return batch.detach().to("cpu", torch.float32).contiguous()


@torch.no_grad()
def ptq_int8(model: nn.Module, calib_batches: Iterable[Any], *, example_input: torch.Tensor) -> nn.Module:
    """Static INT8 post-training quantization of a plain fp32 model with torchao's PT2E flow on CPU.

    Steps: a CPU fp32 copy of ``model`` in eval mode (the caller's model is not touched) →
    ``torch.export.export`` with a dynamic batch dimension (a static export fails at any other batch
    size) → ``prepare_pt2e`` with ``X86InductorQuantizer`` and its default configuration (folds BN
    into the conv; int8 per-channel symmetric weights; uint8 per-tensor affine activations, histogram
    observers) → one forward pass per calibration batch (only these batches: ``example_input`` only
    fixes the traced shapes) → ``convert_pt2e`` (quantize/dequantize ops around fp32 ops).

    Args:
        model: the deployed plain model (any device; copied to CPU).
        calib_batches: float ``(B, 3, H, W)`` batches (or ``(images, labels)`` pairs), each used once;
            draw them from the training split (:func:`calibration_batches`), never from val/test.
        example_input: a float ``(B, 3, H, W)`` input for tracing; a batch of 1 is repeated to 2
            (``torch.export`` specialises a dynamic dimension whose example size is 1).

    Returns:
        the quantized ``torch.fx.GraphModule``: input ``(N, 3, H, W)`` float on CPU for any N >= 1,
        output as ``model``'s. Call it directly (it refuses ``.eval()`` / ``.train()``; it is
        already in inference form).

    Raises:
        QuantizeError: torchao is missing, ``torch.export`` cannot capture the model (e.g.
            data-dependent control flow), the quantizer fails, or ``calib_batches`` is empty.
    Source: RepOptimizers §4.4 / Appendix C (simple INT8 PTQ); torchao PT2E static quantization.
    """
    prepare_pt2e, convert_pt2e, X86InductorQuantizer, get_config = _torchao()
    name = type(model).__name__
    fp32 = copy.deepcopy(model).to("cpu", torch.float32).eval()
    x = _images(example_input)
    if x.dim() < 1 or x.shape[0] < 1:
        raise QuantizeError(f"int8 PTQ of {name}: example_input needs a batch dimension, got shape {tuple(x.shape)}")
    if x.shape[0] == 1:
        x = x.repeat(2, *([1] * (x.dim() - 1)))
    batch = torch.export.Dim("batch", min=1)
    try:
        graph = torch.export.export(fp32, (x,), dynamic_shapes=({0: batch},)).module()
    except Exception as exc:  # export raises many types (UserError, Unsupported, GuardOnDataDependent ...)
        raise QuantizeError(f"int8 PTQ: torch.export of {name} failed: {_one_line(exc)}") from None
    quantizer = X86InductorQuantizer().set_global(get_config())
    try:
        prepared = prepare_pt2e(graph, quantizer)
    except Exception as exc:
        raise QuantizeError(f"int8 PTQ: prepare_pt2e ({QUANTIZER}) of {name} failed: {_one_line(exc)}") from None
    n = 0
    for b in calib_batches:
        prepared(_images(b))
        n += 1
    if n == 0:
        raise QuantizeError(f"int8 PTQ of {name}: no calibration batch was given")
    try:
        quantized = convert_pt2e(prepared)
    except Exception as exc:
        raise QuantizeError(f"int8 PTQ: convert_pt2e of {name} failed: {_one_line(exc)}") from None
    log.info("int8 PTQ of %s: calibrated on %d batches", name, n)
    return quantized


def qdq_ops(qmodel: nn.Module) -> dict[str, int]:
    """Count the quantize/dequantize ops of a quantized graph: ``{"quantize": n, "dequantize": m}``.

    Counts ``call_function`` nodes whose target name contains ``quantize_per`` / ``dequantize_per``
    (``quantized_decomposed.*_per_tensor`` and ``*_per_channel``); 0 and 0 for a plain module.
    """
    counts = {"quantize": 0, "dequantize": 0}
    graph = getattr(qmodel, "graph", None)
    if graph is None:
        return counts
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        target = str(node.target)
        if "dequantize_per" in target:
            counts["dequantize"] += 1
        elif "quantize_per" in target:
            counts["quantize"] += 1
    return counts


@torch.no_grad()
def evaluate_int8(qmodel: nn.Module, loader: Iterable) -> float:
    """Top-1 (percent) of a quantized module over ``loader`` (batches moved to CPU, fp32).

    ``loader`` yields ``(images (B, 3, H, W) float, labels (B,) int64)`` on any device. (Not
    :func:`repsearch.train.evaluate`: that calls ``.eval()``, which an exported graph refuses, and
    keeps the batches on the loader's device.) Returns NaN for an empty loader.
    """
    correct, n = 0, 0
    for images, labels in loader:
        logits = qmodel(images.detach().to("cpu", torch.float32).contiguous())
        correct += int((logits.argmax(1) == labels.to("cpu")).sum())
        n += int(labels.shape[0])
    return 100.0 * correct / n if n else float("nan")


def calibration_batches(data, n: int, *, seed: int = 0, batch_size: Optional[int] = None) -> list[torch.Tensor]:
    """``n`` non-augmented batches of the TRAINING split on CPU (PTQ calibration; never val/test).

    A shuffled loader over ``data.train``'s images (drawn with ``seed``) with every augmentation off
    (no pad/crop, no flip, no Cutout), normalised as the evaluation loaders; full batches only.

    Args:
        data: a :class:`repsearch.data.DataBundle` (its training loader may live on CUDA).
        n: batches wanted (>= 1); fewer when the training split holds fewer full batches.
        seed: the shuffle seed (the trial's seed).
        batch_size: images per batch (default: the training batch size).

    Returns:
        float ``(B, 3, H, W)`` CPU tensors, ``min(n, N_train // B)`` of them.

    Raises:
        ValueError: ``n`` < 1.
    """
    from repsearch.data import DeviceLoader

    if int(n) < 1:
        raise ValueError(f"calibration needs at least one batch, got {n}")
    train = data.train
    loader = DeviceLoader(
        train.images, train.labels, int(batch_size or train.batch_size), mean=data.mean, std=data.std,
        train=True, device=train.device, seed=seed, cutout=0, pad=0, flip=False, drop_last=True, crop=train.crop,
    )
    out = []
    for images, _ in loader.batches(0):
        if len(out) >= n:
            break
        out.append(images.to("cpu").contiguous())
    if len(out) < n:
        log.warning("int8 calibration: the training split has %d full batches, fewer than %d", len(out), n)
    return out


# ------------------------------------------------------------------------------ kernel stats
@dataclass
class KernelStats:
    """Kernel standard deviations of a deployed model (RepOpt Table 8).

    Attributes:
        layers: one dict per ``nn.Conv2d`` in ``named_modules`` order: ``layer`` (module path),
            ``shape`` (``[C_out, C_in/groups, K, K]``), ``bn_folded`` (a following BN was folded in),
            ``std`` (standard deviation of every kernel element, unbiased).
        mean, max: mean and maximum of the per-layer ``std`` (NaN for a model without convs).
    """

    layers: list[dict[str, Any]]
    mean: float
    max: float

    @property
    def measures(self) -> dict[str, float]:
        """``{"int8/kernel_std_mean": mean, "int8/kernel_std_max": max}`` (registered final measures)."""
        return {"int8/kernel_std_mean": self.mean, "int8/kernel_std_max": self.max}

    def to_json(self) -> str:
        """The ``kernel_std.json`` artifact: ``{"mean", "max", "layers": [...]}``."""
        return json.dumps({"mean": self.mean, "max": self.max, "layers": self.layers}, indent=1)


@torch.no_grad()
def kernel_std(model: nn.Module) -> KernelStats:
    """Per-layer standard deviation of the deployed conv kernels with the following BN folded in.

    Every ``nn.Conv2d`` of ``model``: when :func:`repsearch.rep.conv_bn_pairs` pairs it with a BN, the
    kernel is ``W·γ/σ`` (:func:`repsearch.rep.fuse_bn`, σ = sqrt(running_var + eps)) — the kernel the
    x86 quantizer quantizes after folding BN — else its own weight. ``std`` is
    ``torch.std`` over all ``C_out·C_in/groups·K·K`` elements (unbiased). The model is not modified.

    Returns:
        :class:`KernelStats` (per-layer list, mean and max over layers).
    Source: RepOptimizers Table 8 and Appendix C (Fig. 3: BN fusion and branch addition enlarge the
    kernel's standard deviation).
    """
    from repsearch.rep import conv_bn_pairs, fuse_bn

    modules = dict(model.named_modules())
    following = {conv: bn for conv, bn in conv_bn_pairs(model)}
    layers = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        w = m.weight.detach().float()
        bn = modules.get(following.get(name, ""))
        folded = isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
        if folded:
            w, _ = fuse_bn(
                w, None, bn.running_mean.float(), bn.running_var.float(),
                None if bn.weight is None else bn.weight.detach().float(),
                None if bn.bias is None else bn.bias.detach().float(), bn.eps,
            )
        layers.append({"layer": name, "shape": list(w.shape), "bn_folded": bool(folded), "std": float(w.std())})
    stds = [layer["std"] for layer in layers]
    if not stds:
        return KernelStats(layers, float("nan"), float("nan"))
    return KernelStats(layers, sum(stds) / len(stds), max(stds))


# ------------------------------------------------------------------------- end-of-trial step
def int8_measures(
    plain: nn.Module, data, *, calib_batches: int, seed: int = 0
) -> tuple[dict[str, float], dict[str, str]]:
    """Quantize a deployed model (:func:`ptq_int8` on CPU, calibrated on ``calib_batches`` training
    batches) and evaluate it on the validation and test splits.

    Args:
        plain: the deployed plain fp32 model (any device; a CPU copy is quantized).
        data: the :class:`repsearch.data.DataBundle` the model was trained on.
        calib_batches: training batches for calibration (``quantize.calib_batches``).
        seed: the calibration shuffle seed (the trial's).

    Returns:
        ``({"int8/val_top1": %, "int8/test_top1": %}, tags)`` with the tags of :func:`quantizer_tags`.

    Raises:
        QuantizeError: torchao missing or the model cannot be exported/quantized.
    """
    batches = calibration_batches(data, calib_batches, seed=seed)
    if not batches:
        raise QuantizeError("int8 PTQ: the training split holds no full batch for calibration")
    qmodel = ptq_int8(plain, batches, example_input=batches[0][:2])
    numbers = {"int8/test_top1": evaluate_int8(qmodel, data.test)}
    if data.val is not None:
        numbers["int8/val_top1"] = evaluate_int8(qmodel, data.val)
    tags = quantizer_tags(len(batches), sum(int(b.shape[0]) for b in batches))
    return numbers, tags


# ------------------------------------------------------------------- repsearch quantize RUN_ID
@dataclass
class QuantizeReport:
    """What ``repsearch quantize RUN_ID`` measured (all on CPU, on the data the run's recipe names).

    Attributes:
        run_id: the MLflow run.
        fp32: ``{"val/top1", "test/top1"}`` of the deployed fp32 model (%, re-measured).
        int8: ``{"int8/val_top1", "int8/test_top1"}`` (%).
        kernel: the :class:`KernelStats` of the deployed model.
        tags: the quantizer tags set on the run.
    """

    run_id: str
    fp32: dict[str, float]
    int8: dict[str, float]
    kernel: KernelStats
    tags: dict[str, str] = field(default_factory=dict)


def _open_run(run_id: str, runs_dir: Optional[str], tracking_uri: Optional[str]):
    """A :class:`repsearch.tracking.Tracker` bound to the experiment of ``run_id`` (creates nothing).

    Raises:
        repsearch.tracking.TrackingError: no MLflow store there, or no run with that id.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from repsearch.spec import Recipe
    from repsearch.tracking import Tracker, TrackingError, resolve_stores

    stores = resolve_stores(Recipe(), "quantize", runs_dir=runs_dir, tracking_uri=tracking_uri)
    uri = stores.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        try:
            stores.runs_dir.rmdir()  # only when resolve_stores just created it empty
        except OSError:
            pass
        raise TrackingError(f"no MLflow store at {uri}; pass the runs folder of the study (--runs-dir) or --tracking-uri")
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
        experiment = client.get_experiment(run.info.experiment_id)
    except MlflowException:
        raise TrackingError(f"no MLflow run with id {run_id!r} in {uri}") from None
    return Tracker(replace(stores, experiment=experiment.name, artifact_location=None))


@contextlib.contextmanager
def _no_mlflow_progress_bar():
    """Turn MLflow's artifact download progress bar (tqdm on stderr) off inside the block."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def quantize_run(
    run_id: str,
    *,
    calib_batches: Optional[int] = None,
    data_root: Optional[str] = None,
    runs_dir: Optional[str] = None,
    tracking_uri: Optional[str] = None,
    log_to_run: bool = True,
) -> QuantizeReport:
    """INT8 PTQ of a finished run's deployed model (``repsearch quantize RUN_ID``).

    Downloads ``recipe.yaml`` and ``deployed.pt`` of ``run_id`` from MLflow, rebuilds the data as the
    recipe says (on CPU), re-measures the fp32 val/test top-1, quantizes (:func:`int8_measures`) and
    computes :func:`kernel_std`; then (``log_to_run``) logs ``int8/val_top1``, ``int8/test_top1``,
    ``int8/kernel_std_mean``, ``int8/kernel_std_max`` onto the run (one ``log_batch``, step = the
    recipe's epochs), sets the quantizer tags and logs ``kernel_std.json``. The Optuna study is not
    touched, so the comparison table shows these columns only for trials quantized at the end of
    training (``quantize.mode: ptq``).

    Args:
        run_id: an MLflow run (a trial's child run).
        calib_batches: calibration batches (default: the recipe's ``quantize.calib_batches``).
        data_root: ``--data-root`` (> ``REPSEARCH_DATA`` > the recipe's ``data.root``).
        runs_dir, tracking_uri: the stores, as for ``repsearch run``.

    Raises:
        repsearch.tracking.TrackingError: unknown run id, or the run has no ``deployed.pt`` / ``recipe.yaml``.
        repsearch.data.DataError: the data is missing.
        QuantizeError: torchao missing or the model cannot be quantized.
    """
    from repsearch.data import build_data, resolve_data_root
    from repsearch.models import build_model
    from repsearch.spec import load_recipe
    from repsearch.train import evaluate

    if calib_batches is not None and int(calib_batches) < 1:
        raise QuantizeError(f"--calib-batches must be >= 1, got {calib_batches}")
    tracker = _open_run(run_id, runs_dir, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="repsearch-quantize-") as tmp, _no_mlflow_progress_bar():
        ckpt_path = tracker.download_artifact(run_id, "deployed.pt", Path(tmp))
        recipe_path = tracker.download_artifact(run_id, "recipe.yaml", Path(tmp))
        recipe, _ = load_recipe(recipe_path)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    plain = build_model(ckpt["model"], **ckpt["kwargs"])
    plain.load_state_dict(ckpt["state_dict"], strict=True)
    plain.eval()
    d = recipe.data
    data = build_data(
        resolve_data_root(data_root, d.root), dataset=d.dataset, fmt=d.format, download=d.download,
        val_size=d.val_size, split_seed=d.split_seed, train_subset=d.train_subset, test_subset=d.test_subset,
        cutout=d.cutout, batch_size=recipe.train.batch_size, eval_batch_size=recipe.train.eval_batch_size,
        device="cpu", seed=recipe.seed, image_size=d.image_size, augment=d.augment,
    )
    cpu = torch.device("cpu")
    fp32 = {"test/top1": evaluate(plain, data.test, cpu)[1]}
    if data.val is not None:
        fp32["val/top1"] = evaluate(plain, data.val, cpu)[1]
    n = int(calib_batches or recipe.quantize.calib_batches)
    int8, tags = int8_measures(plain, data, calib_batches=n, seed=recipe.seed)
    kernel = kernel_std(plain)
    tags["int8.source"] = "repsearch quantize"
    if log_to_run:
        metrics = {**int8, **{k: v for k, v in kernel.measures.items() if math.isfinite(v)}}
        tracker.log_metrics(run_id, metrics, step=recipe.train.epochs)
        tracker.set_tags(run_id, tags)
        with tempfile.TemporaryDirectory(prefix="repsearch-quantize-") as tmp:
            p = Path(tmp) / KERNEL_STD_ARTIFACT
            p.write_text(kernel.to_json())
            tracker.log_artifacts(run_id, [p])
    return QuantizeReport(run_id=run_id, fp32=fp32, int8=int8, kernel=kernel, tags=tags)


def quantize_table(report: QuantizeReport):
    """A rich table of a :class:`QuantizeReport`: fp32 vs int8 val/test top-1 (%) and their drop,
    then the kernel std (mean and max over the conv layers, BN folded)."""
    from rich.table import Table

    table = Table(title=f"int8 PTQ ({QUANTIZER}) of run {report.run_id}")
    table.add_column("measure")
    table.add_column("fp32", justify="right")
    table.add_column("int8", justify="right")
    table.add_column("int8 − fp32", justify="right")

    def fmt(v: Optional[float], spec: str = ".2f") -> str:
        return "—" if v is None or not math.isfinite(v) else format(v, spec)

    for label, fkey, qkey in (("val top-1 (%)", "val/top1", "int8/val_top1"), ("test top-1 (%)", "test/top1", "int8/test_top1")):
        f, q = report.fp32.get(fkey), report.int8.get(qkey)
        table.add_row(label, fmt(f), fmt(q), fmt(None if f is None or q is None else q - f, "+.2f"))
    table.add_row("kernel std, mean over layers", fmt(report.kernel.mean, ".4g"), "", "")
    table.add_row("kernel std, max over layers", fmt(report.kernel.max, ".4g"), "", "")
    return table
