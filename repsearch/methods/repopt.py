"""RepOpt (RepOptimizers, Ding et al., ICLR 2023): gradient re-parameterization — RepVGG's structural
prior moved into the optimizer. Two stages, run as two studies (the target depends on the search):

- ``stage: hyper_search`` (§3.3): every conv of a RepVGG-family model (``model.blocks()``, the stem
  included) becomes a :class:`~repsearch.rep.csla.CSLABlock` ``s ⊙ conv3x3 + t ⊙ conv1x1 +
  scale_id ⊙ x`` (BN after the sum) whose scales train with the weights. Init as the official code
  (Appendix B): stem 1.0; block 0 of each stage 1.0; block i ≥ 1 (0-based within its stage)
  √(2/i) for both s and t; identity scale 1.0. The trained scales are written to ``scales.pt``
  (:mod:`repsearch.methods.scales`). Gradient clipping (the official run clips at 5.0) is allowed.
  Deploy fuses every CSLA block exactly into one 3x3 kernel (``s·W3 + t·pad(W1) + diag(scale_id)``).
- ``stage: target`` (§3.2, §3.4): the plain model (the deploy architecture) trained with a Grad Mult
  update rule from the constants of ``scales.pt``:
  * Rule of Initialization (``reinit``): fresh ``kaiming_uniform(a=√5)`` W3 and W1 (PyTorch's conv
    init), ``W = s·W3 + t·pad(W1) + diag(identity scale)`` — the CSLA block's equivalent kernel at
    init (the official code multiplies the identity by the searched identity scale,
    ``use_identity_scales_for_reinit``).
  * Grad Mult (``grad_mult``; Appendix A): :class:`repsearch.gradmult.RepOptSGD` (``|s|²`` +
    ``|t|²`` at the centre + 1 at the centre of the diagonal with an identity branch, multiplied
    before weight decay and momentum) or :class:`repsearch.gradmult.RepOptAdamW` (power 1 on |s|,
    |t|; gradient and update multiplied) by ``train.optimizer``. The stem has a Grad Mult too.
  * ``scales`` (Table 4's "source of constants"): ``searched`` (the Hyper-Search result),
    ``channel_mean`` (each layer's searched scales averaged across channels), ``hs_init`` (the
    Hyper-Search initial values √(2/i)), ``ones``.
  * ``train.grad_clip`` is a recipe error here: clipping the plain model's gradient is not the CSLA
    model's update, the equivalence breaks.

The target recipe names its scales with ``method.scales_from``: ``{recipe: <hyper-search recipe>,
profile: <profile>}`` (the parent runs that study first if it is incomplete and takes its best
complete trial by validation top-1), an MLflow run id, or a ``scales.pt`` path; see
:mod:`repsearch.dependencies`. The parent resolves it before naming the study: the scales' content
sha256 (``method.scales_sha256``) is hashed into the study name, the source is not.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

import torch
from torch import nn

from repsearch import optim
from repsearch.measures import register_measure
from repsearch.methods.base import Method, register_method
from repsearch.methods.scales import ScalesError, build_scales, check_compatible, load_scales, save_scales
from repsearch.rep import get_module, set_module
from repsearch.schema import MethodSpecModel, SpecModel

log = logging.getLogger(__name__)

register_measure("repopt/s_abs_mean", "scale", "RepOpt Hyper-Search: mean |s| (3x3 scales) over every channel of every block", "final")
register_measure("repopt/t_abs_mean", "scale", "RepOpt Hyper-Search: mean |t| (1x1 scales) over every channel of every block", "final")
register_measure("repopt/identity_mean", "scale", "RepOpt Hyper-Search: mean identity scale over the blocks that have one", "final")
register_measure("repopt/n_negative_s", "count", "RepOpt Hyper-Search: channels whose searched 3x3 scale is negative", "final")


class StudyRef(SpecModel):
    """Another recipe's study whose best complete trial provides an artifact (``scales.pt``).

    ``recipe`` is a path (relative paths resolve against the working directory, then against the
    depending recipe's folder's parent); ``profile`` one of its profiles (None: no profile)."""

    recipe: str
    profile: Optional[str] = None


def hs_init_scale(stage: int, index: int) -> float:
    """The Hyper-Search initial value of a block's s and t (RepOpt Appendix B, as the official
    ``repoptvgg_model.py``): 1.0 for the stem (stage 0) and for block 0 of a stage, √(2/i) for block
    i ≥ 1 (0-based index within its stage): 1, √2, 1, √(2/3), ..."""
    if stage == 0 or index == 0:
        return 1.0
    return math.sqrt(2.0 / index)


class RepOptSpec(MethodSpecModel):
    """RepOptimizers (ICLR 2023). ``stage``: ``hyper_search`` (train CSLA scales, write ``scales.pt``)
    or ``target`` (plain model, Rule of Initialization + Grad Mult from the scales). ``scales_from``:
    where the target's scales come from (a :class:`StudyRef`, an MLflow run id or a ``scales.pt``
    path); the parent fills ``scales_sha256`` (hashed) and ``scales_run_id`` when it resolves it.
    ``scales``, ``reinit``, ``grad_mult``: Table 4's ablations (defaults: the full method)."""

    name: Literal["repopt"] = "repopt"
    stage: Literal["hyper_search", "target"] = "target"
    scales_from: Union[StudyRef, str, None] = None
    scales_sha256: Optional[str] = None
    scales_run_id: Optional[str] = None
    scales: Literal["searched", "channel_mean", "hs_init", "ones"] = "searched"
    reinit: bool = True
    grad_mult: bool = True

    def needs_scales_file(self) -> bool:
        """Whether this configuration reads a ``scales.pt`` (target with searched/channel_mean scales)."""
        return self.stage == "target" and self.scales in ("searched", "channel_mean")

    def hash_ignored(self) -> set[str]:
        ignored = {"scales_run_id"}
        if self.scales_sha256 is not None:
            ignored.add("scales_from")  # the content hash names the study, not the source
        if self.stage == "hyper_search":
            ignored |= {"scales", "reinit", "grad_mult", "scales_from", "scales_sha256"}
        elif not self.needs_scales_file():
            ignored |= {"scales_from", "scales_sha256"}
        return ignored

    def dependencies(self) -> dict[str, str]:
        """``scales_from`` names a Hyper-Search run's ``scales.pt`` when this configuration reads one
        and it is not resolved yet."""
        unresolved = self.scales_sha256 is None or isinstance(self.scales_from, StudyRef)
        if self.needs_scales_file() and self.scales_from is not None and unresolved:
            return {"scales_from": "scales.pt"}
        return {}

    def resolved(self, field: str, run_id: Optional[str], path: str, sha256: str) -> dict[str, Any]:
        """``scales_from`` becomes the local file, ``scales_sha256`` its content hash (in the study
        name), ``scales_run_id`` the Hyper-Search run (a tag of every target trial)."""
        return {"scales_from": path, "scales_sha256": sha256, "scales_run_id": run_id}

    def check_dependency_recipe(self, field: str, dep_recipe, recipe) -> None:
        """``scales_from: {recipe, profile}`` must name a RepOpt Hyper-Search of the same model and
        width (checked before that study runs).

        Raises:
            ScalesError: another method or stage, another model or width (one line).
        """
        m = dep_recipe.method
        if m.name != "repopt" or m.stage != "hyper_search":
            raise ScalesError(
                f"method.scales_from names a study of method {m.name}"
                + (f" stage {m.stage}" if m.name == "repopt" else "")
                + ", not a RepOpt Hyper-Search (method: {name: repopt, stage: hyper_search})"
            )
        a, b = dep_recipe.model, recipe.model
        if a.name != b.name or not math.isclose(a.width, b.width):
            raise ScalesError(
                f"method.scales_from: that Hyper-Search trains {a.name} width {a.width:g}, this recipe {b.name} width {b.width:g}"
            )

    def check_resolved(self, recipe) -> None:
        """After resolution (:mod:`repsearch.dependencies`): the scales file exists, is intact and
        fits the recipe's model (name, width, block layout).

        Raises:
            ScalesError: one line naming the mismatch.
        """
        if not self.needs_scales_file():
            return
        from repsearch.models import build_model, model_kwargs

        payload = load_scales(self.scales_from)
        check_compatible(payload, recipe.model.name, recipe.model.width, where=f"scales {self.scales_from}")
        with torch.device("meta"):
            model = build_model(recipe.model.name, **model_kwargs(recipe.model.name, 10, recipe.model.width, **recipe.model.options))
        check_compatible(payload, recipe.model.name, recipe.model.width, list(model.blocks()), where=f"scales {self.scales_from}")

    def check_recipe(self, recipe) -> None:
        """Cross-section checks (one-line ``ValueError``): a RepVGG-family model; no
        ``train.grad_clip`` with ``stage: target``; a target with searched/channel-mean scales names
        ``scales_from``; ``scales_from`` only with ``stage: target``."""
        from repsearch.models import MODELS

        ctor = MODELS.get(recipe.model.name)
        if ctor is not None and not getattr(ctor, "__module__", "").endswith("models.repvgg"):
            raise ValueError(
                f"method repopt needs a RepVGG-family model (repvgg_*: a model with blocks()), got {recipe.model.name}"
            )
        if self.stage == "target" and recipe.train.grad_clip is not None:
            raise ValueError(
                "train.grad_clip with method.stage: target breaks the CSLA = Grad Mult equivalence; remove it "
                "(clipping is allowed in stage: hyper_search)"
            )
        if self.needs_scales_file() and self.scales_from is None:
            raise ValueError(
                f"method.stage: target with scales: {self.scales} needs method.scales_from "
                "({recipe: <hyper-search recipe>, profile: ...}, an MLflow run id, or a scales.pt path)"
            )
        if self.stage == "hyper_search" and self.scales_from is not None:
            raise ValueError("method.scales_from is only for stage: target (stage: hyper_search searches the scales)")


def _model_blocks(model: nn.Module) -> list:
    blocks = getattr(model, "blocks", None)
    if not callable(blocks):
        raise ValueError(f"method repopt needs a RepVGG-family model with blocks(), got {type(model).__name__}")
    return list(blocks())


@register_method
class RepOpt(Method):
    """RepOptimizers' two stages behind the method interface (ICLR 2023 §3.2–3.4, Appendix A/B).

    ``hyper_search``: :meth:`prepare` swaps every unit's conv (``model.blocks()``) for a
    :class:`~repsearch.rep.csla.CSLABlock` with trainable scales; :meth:`optimizer` decays the
    identity scales but not s/t (official ``set_weight_decay``); :meth:`deploy` fuses the blocks and
    reads the trained scales, written by :meth:`artifacts` as ``scales.pt``.
    ``target``: :meth:`prepare` loads the constants (``scales``) and applies the Rule of
    Initialization (``reinit``); :meth:`optimizer` returns :class:`repsearch.gradmult.RepOptSGD` /
    :class:`repsearch.gradmult.RepOptAdamW` with one Grad Mult tensor ``(C_out, C_in, 3, 3)`` per
    unit conv (``grad_mult``), or plain SGD/AdamW. Deploy is a copy (the model is already plain).

    Raises:
        ValueError: a model without ``blocks()`` (``prepare``).
        repsearch.methods.scales.ScalesError: a missing, altered or mismatched scales file (``prepare``).
    """

    Spec = RepOptSpec

    def __init__(self, spec, **kwargs):
        super().__init__(spec, **kwargs)
        self._blocks: list = []
        #: per block path: (s, t, identity or None) constants of the target's Grad Mult.
        self.constants: dict[str, tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = {}
        self.scales_payload: Optional[dict] = None
        self._summary: dict[str, float] = {}

    # ------------------------------------------------------------------ structure
    def prepare(self, model: nn.Module, loader: Iterable) -> nn.Module:
        self._blocks = _model_blocks(model)
        if self.spec.stage == "hyper_search":
            return self._prepare_search(model)
        return self._prepare_target(model)

    def _prepare_search(self, model: nn.Module) -> nn.Module:
        from repsearch.rep.csla import CSLABlock

        for b in self._blocks:
            path = f"{b.path}.conv"
            conv = get_module(model, path)
            block = CSLABlock.from_conv(
                conv, scale_init=hs_init_scale(b.stage, b.index), identity_init=1.0, trainable_scales=True
            )
            set_module(model, path, block)
        self.events.append({"epoch": 0, "kind": "csla", "blocks": [b.path for b in self._blocks]})
        return model

    def _load_payload(self) -> dict:
        src = self.spec.scales_from
        if isinstance(src, StudyRef) or src is None:
            raise ScalesError(
                "method.scales_from is not resolved to a file (run the recipe with `repsearch run`, which resolves it)"
            )
        path = Path(src)
        if not path.is_file():
            # a run id (the parent resolves to a local path; a worker elsewhere downloads it)
            from repsearch.deployed import fetch_run_artifact

            path = fetch_run_artifact(str(src), "scales.pt", self.recipe)
        payload = load_scales(path)
        if self.spec.scales_sha256 is not None and payload["sha256"] != self.spec.scales_sha256:
            raise ScalesError(
                f"scales file {path} has content sha256 {payload['sha256'][:12]}, the study was named for "
                f"{self.spec.scales_sha256[:12]}"
            )
        return payload

    def _constants(self, model: nn.Module) -> dict[str, tuple]:
        mode = self.spec.scales
        out = {}
        if mode in ("searched", "channel_mean"):
            payload = self._load_payload()
            if self.recipe is not None:
                check_compatible(payload, self.recipe.model.name, self.recipe.model.width, self._blocks)
            self.scales_payload = payload
            by_path = {b["path"]: b for b in payload["blocks"]}
            for b in self._blocks:
                rec = by_path[b.path]
                s, t, i = rec["s"], rec["t"], rec["identity"]
                if mode == "channel_mean":
                    s, t = torch.full_like(s, float(s.mean())), torch.full_like(t, float(t.mean()))
                    i = None if i is None else torch.full_like(i, float(i.mean()))
                out[b.path] = (s, t, i if b.has_identity else None)
            return out
        for b in self._blocks:
            c = get_module(model, f"{b.path}.conv").out_channels
            v = 1.0 if mode == "ones" else hs_init_scale(b.stage, b.index)
            s = torch.full((c,), v)
            out[b.path] = (s, s.clone(), torch.ones(c) if b.has_identity else None)
        return out

    @torch.no_grad()
    def _prepare_target(self, model: nn.Module) -> nn.Module:
        self.constants = self._constants(model)
        if self.spec.reinit:
            for b in self._blocks:
                conv = get_module(model, f"{b.path}.conv")
                s, t, ident = (x.to(conv.weight) if x is not None else None for x in self.constants[b.path])
                conv.weight.copy_(rule_of_initialization(conv, s, t, ident))
        self.events.append({
            "epoch": 0, "kind": "target", "scales": self.spec.scales, "reinit": self.spec.reinit,
            "grad_mult": self.spec.grad_mult, "scales_run_id": self.spec.scales_run_id,
            "scales_sha256": self.scales_payload["sha256"] if self.scales_payload else None,
        })
        return model

    # ------------------------------------------------------------------ optimisation
    def _groups(self, model: nn.Module, train_spec) -> list[dict]:
        """``decay``/``no_decay`` as :func:`repsearch.optim.split_decay`; in Hyper-Search without
        ``wd_on_norm`` the identity scales decay (the official ``set_weight_decay``: 1-dim params
        are not decayed except ``identity.weight``)."""
        decay, no_decay = optim.split_decay(model, train_spec.wd_on_norm)
        if self.spec.stage == "hyper_search" and not train_spec.wd_on_norm:
            ids = {id(p) for m in model.modules() for p in [getattr(m, "scale_identity", None)] if isinstance(p, nn.Parameter)}
            decay = decay + [p for p in no_decay if id(p) in ids]
            no_decay = [p for p in no_decay if id(p) not in ids]
        return [
            {"params": decay, "weight_decay": train_spec.weight_decay, "name": "decay", "wd_on_norm": train_spec.wd_on_norm},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay", "wd_on_norm": train_spec.wd_on_norm},
        ]

    def grad_mults(self, model: nn.Module, power: int) -> dict[nn.Parameter, torch.Tensor]:
        """``{conv.weight: multiplier (C_out, C_in, K, K)}`` for every unit conv of the target model
        (RepOpt §3.2, Appendix A), on the CPU in float32 (the optimizer places each on its weight's
        device, dtype and memory format); ``power`` 2 (SGD) or 1 (AdamW, on |s| and |t|).

        Raises:
            ValueError: ``power`` not 1 or 2 (from :func:`repsearch.gradmult.grad_mult`).
        """
        from repsearch.gradmult import grad_mult

        out = {}
        for b in self._blocks:
            conv = get_module(model, f"{b.path}.conv")
            s, t, ident = self.constants[b.path]
            # placed on the weight's device, dtype and strides by the optimizer (gradmult._GradMults)
            out[conv.weight] = grad_mult(s, t, identity=ident is not None, in_channels=conv.in_channels,
                                         kernel_size=conv.kernel_size[0], power=power)
        return out

    def optimizer(self, model: nn.Module, train_spec) -> torch.optim.Optimizer:
        groups = self._groups(model, train_spec)
        name = getattr(train_spec, "optimizer", "sgd")
        if self.spec.stage == "target" and self.spec.grad_mult:
            from repsearch.gradmult import RepOptAdamW, RepOptSGD

            if name == "adamw":
                return RepOptAdamW(groups, grad_mults=self.grad_mults(model, 1), lr=train_spec.lr,
                                   betas=tuple(train_spec.betas), eps=train_spec.eps)
            return RepOptSGD(groups, grad_mults=self.grad_mults(model, 2), lr=train_spec.lr,
                             momentum=train_spec.momentum, nesterov=train_spec.nesterov)
        if name == "adamw":
            return torch.optim.AdamW(groups, lr=train_spec.lr, betas=tuple(train_spec.betas), eps=train_spec.eps)
        return torch.optim.SGD(groups, lr=train_spec.lr, momentum=train_spec.momentum, nesterov=train_spec.nesterov)

    # ------------------------------------------------------------------ results
    def searched_scales(self, model: nn.Module) -> dict:
        """The ``scales.pt`` payload of a Hyper-Search model (:func:`repsearch.methods.scales.build_scales`)."""
        from repsearch.models import model_kwargs

        blocks = []
        for b in self._blocks:
            sc = get_module(model, f"{b.path}.conv").scales()
            blocks.append({"path": b.path, "stage": b.stage, "index": b.index, "has_identity": b.has_identity,
                           "s": sc["s"], "t": sc["t"], "identity": sc.get("identity")})
        r = self.recipe
        name = r.model.name if r is not None else type(model).__name__
        width = r.model.width if r is not None else 1.0
        kwargs = model_kwargs(name, getattr(model, "num_classes", 10), width, **r.model.options) if r is not None else {}
        return build_scales(name, width, kwargs, blocks)

    def deploy(self, model: nn.Module) -> nn.Module:
        """The plain model (CSLA blocks fused exactly); in Hyper-Search also reads the trained scales
        (written by :meth:`artifacts`, summarised by :meth:`final_measures`)."""
        if self.spec.stage == "hyper_search":
            self.scales_payload = self.searched_scales(model)
            self._summary = dict(self.scales_payload["summary"])
        return super().deploy(model)

    def artifacts(self, out_dir: Path) -> list[Path]:
        """Hyper-Search: ``scales.pt`` (:mod:`repsearch.methods.scales`)."""
        if self.spec.stage != "hyper_search" or self.scales_payload is None:
            return []
        return [save_scales(self.scales_payload, Path(out_dir) / "scales.pt")]

    def final_measures(self) -> dict[str, Any]:
        if self.spec.stage == "hyper_search":
            out: dict[str, Any] = {}
            if self._summary:
                out.update({
                    "repopt/s_abs_mean": self._summary["s_abs_mean"],
                    "repopt/t_abs_mean": self._summary["t_abs_mean"],
                    "repopt/n_negative_s": self._summary["n_negative_s"],
                    "repopt.scales_sha256": self.scales_payload["sha256"],
                })
                if not math.isnan(self._summary["identity_mean"]):
                    out["repopt/identity_mean"] = self._summary["identity_mean"]
            return out
        out = {"repopt.stage": "target", "repopt.scales": self.spec.scales,
               "repopt.reinit": str(self.spec.reinit).lower(), "repopt.grad_mult": str(self.spec.grad_mult).lower()}
        if self.spec.needs_scales_file():
            out["repopt.scales_run_id"] = self.spec.scales_run_id or "(file)"
            out["repopt.scales_sha256"] = self.scales_payload["sha256"] if self.scales_payload else ""
        return out


@torch.no_grad()
def rule_of_initialization(conv: nn.Conv2d, s: torch.Tensor, t: torch.Tensor, identity: Optional[torch.Tensor]) -> torch.Tensor:
    """RepOpt §3.4: the kernel of an imaginary CSLA block at init, ``s·W3 + t·pad(W1) + diag(identity)``
    with fresh ``W3`` (C_out, C_in, K, K) and ``W1`` (C_out, C_in, 1, 1) drawn with PyTorch's conv init
    (``kaiming_uniform_(a=√5)``, fan-in of each tensor).

    Args:
        conv: the plain model's conv (its geometry; groups must be 1; K odd).
        s, t: ``(C_out,)`` per-channel scales of the 3x3 and 1x1 branches.
        identity: ``(C_out,)`` identity scales (needs C_in = C_out, stride 1) or None.

    Returns:
        the kernel ``(C_out, C_in, K, K)`` on the conv's device and dtype.

    Raises:
        ValueError: grouped conv, even K, or an identity term where C_in ≠ C_out.
    """
    k = conv.kernel_size[0]
    if conv.groups != 1 or k % 2 == 0:
        raise ValueError("the Rule of Initialization needs an ungrouped conv with an odd kernel")
    cout, cin = conv.out_channels, conv.in_channels
    w3 = torch.empty(cout, cin, k, k, device=conv.weight.device, dtype=conv.weight.dtype)
    w1 = torch.empty(cout, cin, 1, 1, device=conv.weight.device, dtype=conv.weight.dtype)
    nn.init.kaiming_uniform_(w3, a=math.sqrt(5))
    nn.init.kaiming_uniform_(w1, a=math.sqrt(5))
    w = w3 * s.view(-1, 1, 1, 1)
    c = k // 2
    w[:, :, c, c] += w1[:, :, 0, 0] * t.view(-1, 1)
    if identity is not None:
        if cin != cout:
            raise ValueError(f"an identity term needs C_in = C_out, got {cin} -> {cout}")
        idx = torch.arange(cout, device=w.device)
        w[idx, idx, c, c] += identity
    return w
