"""Model surgery: find conv→BN pairs, swap RepBlocks in and out, deploy (DyRep Sec. 3, Fig. 2).

Paths are the dotted names of ``model.named_modules()`` (``"features.0"``,
``"features.0.branches.kxk.conv"``). The *nesting depth* of a module is the number of
re-parameterizable blocks strictly above it (the model's own convs: 0; the ``kxk`` conv of a block
or the inner KxK conv of its ``1x1-kxk`` branch: 1).

Re-parameterizable block protocol (:func:`is_rep_block`): besides :class:`RepBlock`, any
``nn.Module`` that is not a :class:`~repsearch.rep.branches.Branch` and exposes

- ``equivalent_kernel() -> (W, b)``: the block as one conv, ``(C_out, C_in/groups, K, K)`` and
  ``(C_out,)``, in eval mode;
- ``fuse() -> nn.Conv2d``: that conv as a module (with a bias, or without one when the bias is 0);
- ``describe() -> dict``: JSON-able, with ``"type"`` and ``"branches"`` (list of branch kinds);
- ``origin_bias``: whether the replaced conv had a bias;
- geometry ints ``in_channels, out_channels, kernel_size, stride, padding, groups``

is treated as a block by :func:`conv_bn_pairs`, :func:`nesting_depth`, :func:`fuse_blocks`,
:func:`deploy`, :func:`count_branches` and :func:`structure` (e.g.
:class:`~repsearch.rep.csla.CSLABlock`, RepOpt §3.2). Growth and pruning (:func:`expand`,
:func:`collapse`, :func:`repblocks`, :func:`apply_structure`, :func:`restore_attach_rates`) are
RepBlock-only.
"""

from __future__ import annotations

import copy
import logging
from typing import Iterable, Optional

import torch
import torch.fx
import torch.nn as nn

from repsearch.rep.block import RepBlock, eligible_branches
from repsearch.rep.branches import Branch, ConvInit, conv_geometry

__all__ = [
    "is_rep_block",
    "get_module",
    "set_module",
    "conv_bn_pairs",
    "candidate_convs",
    "nesting_depth",
    "expand",
    "repblocks",
    "fuse_blocks",
    "collapse",
    "deploy",
    "count_branches",
    "structure",
    "apply_structure",
    "restore_attach_rates",
    "structure_shape",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- paths
def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (``""`` is the model itself).

    Raises:
        KeyError: when no module lives at that path.
    """
    if path == "":
        return model
    m = model
    for part in path.split("."):
        child = m._modules.get(part) if isinstance(m, nn.Module) else None
        if child is None:
            raise KeyError(f"no module at '{path}' (missing '{part}')")
        m = child
    return m


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` with ``new`` (registered under the same name).

    Raises:
        KeyError: when the parent does not exist or ``path`` is empty.
    """
    if not path:
        raise KeyError("cannot replace the root module")
    parent_path, _, name = path.rpartition(".")
    parent = get_module(model, parent_path)
    if name not in parent._modules:
        raise KeyError(f"no module at '{path}'")
    parent._modules[name] = new


_GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "groups")


def is_rep_block(m: object) -> bool:
    """Whether ``m`` is a re-parameterizable block (the module docstring's protocol): a
    :class:`RepBlock`, or an ``nn.Module`` that is not a ``Branch``, has a callable
    ``equivalent_kernel`` and ``fuse``, an ``origin_bias`` attribute and int geometry attributes
    (``in_channels, out_channels, kernel_size, stride, padding, groups``). A plain ``nn.Conv2d``
    (tuple ``kernel_size``, no ``equivalent_kernel``) and a branch are not blocks."""
    if isinstance(m, RepBlock):
        return True
    if not isinstance(m, nn.Module) or isinstance(m, Branch):
        return False
    if not (callable(getattr(m, "equivalent_kernel", None)) and callable(getattr(m, "fuse", None))):
        return False
    if not hasattr(m, "origin_bias"):
        return False
    return all(isinstance(getattr(m, a, None), int) for a in _GEOMETRY)


def _block_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_rep_block(m)]


def _depth(path: str, block_paths: Iterable[str]) -> int:
    """Number of block paths strictly above ``path`` (``""`` = the root, above everything else)."""
    return sum(1 for bp in block_paths if bp != path and (bp == "" or path.startswith(bp + ".")))


def nesting_depth(model: nn.Module, path: str) -> int:
    """Number of blocks (:func:`is_rep_block`) strictly above the module at ``path`` (0 for the
    model's own convs).

    Raises:
        KeyError: when no module lives at ``path``.
    """
    get_module(model, path)
    return _depth(path, _block_paths(model))


def _is_convlike(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) or is_rep_block(m)


# ---------------------------------------------------------------------------------- conv→BN pairs
class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # noqa: D401
        return is_rep_block(m) or super().is_leaf_module(m, qualname)


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]]:
    graph = _Tracer().trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        conv = get_module(model, node.target)
        if not _is_convlike(conv) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_module" or calls[user.target] != 1 or not user.args or user.args[0] is not node:
            continue
        bn = get_module(model, user.target)
        if isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels:
            pairs.append((node.target, user.target))
    return pairs


def _pairs_registration(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    inside = _block_paths(model)
    for name, parent in model.named_modules():
        if is_rep_block(parent) or any(name.startswith(bp + ".") for bp in inside if bp):
            continue
        children = list(parent.named_children())
        for (na, a), (nb, b) in zip(children, children[1:]):
            if _is_convlike(a) and isinstance(b, nn.BatchNorm2d) and b.num_features == a.out_channels:
                prefix = f"{name}." if name else ""
                pairs.append((prefix + na, prefix + nb))
    return pairs


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``[(conv_path, bn_path)]`` for every ``nn.Conv2d`` or block (:func:`is_rep_block`) outside any
    block whose output feeds only a ``BatchNorm2d`` of matching width.

    Uses ``torch.fx`` symbolic tracing (blocks as leaves; a module called more than once is not
    paired); when tracing fails (data-dependent control flow), falls back to registration order:
    a conv immediately followed by a BN among the children of one parent (true of ``nn.Sequential``
    and of the usual ``conv1, bn1, conv2, bn2`` blocks).

    Returns:
        pairs in graph (or registration) order.
    """
    try:
        return _pairs_fx(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError ...)
        log.debug("fx tracing failed (%s); pairing conv→BN by registration order", exc)
        return _pairs_registration(model)


# ---------------------------------------------------------------------------------- candidates
def _reparameterizable(conv: nn.Conv2d) -> bool:
    try:
        conv_geometry(conv)
    except ValueError:
        return False
    return True


def candidate_convs(model: nn.Module, max_depth: int = 2) -> dict[str, nn.Conv2d]:
    """Convs that Rep may grow (DyRep Sec. 3.3; DESIGN.md "DyRep schedule").

    Every ``nn.Conv2d`` with a square kernel K > 1 (dilation 1, zero padding mode) nested in fewer
    than ``max_depth`` blocks (:func:`is_rep_block`): depth 0 = the model's own convs, depth 1 = the ``kxk`` conv of a
    block and the inner KxK conv of its ``1x1-kxk`` branch.

    Returns:
        ``{path: conv}`` in ``named_modules`` order (stable).
    """
    blocks = _block_paths(model)
    out: dict[str, nn.Conv2d] = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        kh, kw = m.kernel_size
        if kh != kw or kh <= 1 or not _reparameterizable(m):
            continue
        if _depth(name, blocks) < max_depth:
            out[name] = m
    return out


def repblocks(model: nn.Module, deepest_first: bool = False) -> dict[str, RepBlock]:
    """``{path: block}`` for every :class:`RepBlock`, nested ones included (other blocks of the
    :func:`is_rep_block` protocol, e.g. a CSLABlock, are not listed: this is the DyRep/RepAn view).

    Args:
        deepest_first: order by nesting depth, deepest first (stable within a depth); otherwise
            ``named_modules`` order (outer before inner).
    """
    items = [(n, m) for n, m in model.named_modules() if isinstance(m, RepBlock)]
    if deepest_first:
        paths = [n for n, _ in items]
        items.sort(key=lambda nm: -_depth(nm[0], paths))
    return dict(items)


def _top_blocks(model: nn.Module) -> dict[str, nn.Module]:
    paths = _block_paths(model)
    return {n: get_module(model, n) for n in paths if _depth(n, paths) == 0}


# ---------------------------------------------------------------------------------- expand
def expand(
    model: nn.Module,
    path: str,
    kinds: Iterable[str],
    *,
    gamma_init: float,
    conv_init: Optional[ConvInit] = None,
    compensate: bool = False,
) -> tuple[RepBlock, tuple[str, ...], dict[str, str]]:
    """Rep: turn the conv at ``path`` into a RepBlock with the eligible branches of ``kinds``
    (DyRep Algorithm 1; DESIGN.md "Operation spaces").

    A conv is swapped for ``RepBlock.from_conv(conv)`` (its weight Parameter kept); a RepBlock at
    ``path`` gets the missing kinds added (RepAn re-expansion). Works at any depth (a conv inside a
    block's branch). Ineligible or already present kinds are skipped and recorded, not an error.

    New branches are added in canonical kind order (:meth:`RepBlock.add_branch`), so the global RNG
    is consumed in a fixed order.

    Args:
        model: the model, modified in place.
        path: dotted path of an ``nn.Conv2d`` or ``RepBlock``.
        kinds: requested branch kinds (``kxk`` implied).
        gamma_init: the new branches' last-BN γ (keyword-only, required; DyRep 0.01, Fig. 4;
            DBB/RepVGG 1).
        conv_init: a :data:`~repsearch.rep.branches.ConvInit` applied to every new conv after
            PyTorch's own init (DyRep's official code: ``kaiming_fan_out``), or ``None`` to keep
            PyTorch's ``nn.Conv2d`` init.
        compensate: when true, call :meth:`RepBlock.compensate` with the module's eval-mode kernel
            from before the expansion, so that the block's eval output is unchanged (DyRep Eq. 6;
            calibrate the new BNs first if you want calibrated statistics).

    Returns:
        ``(block, added_kinds, skipped)`` with ``skipped = {kind: reason}``.

    Raises:
        KeyError: no module at ``path``; TypeError: it is neither a conv nor a block, or
        ``gamma_init`` is missing; ValueError: unknown kind or a conv that cannot be re-parameterized.
    """
    mod = get_module(model, path)
    if not isinstance(mod, (nn.Conv2d, RepBlock)):
        raise TypeError(f"'{path}' is a {type(mod).__name__}, not an nn.Conv2d or RepBlock")
    kept, skipped = eligible_branches(mod, kinds)
    target = None
    if compensate:
        with torch.no_grad():
            if isinstance(mod, RepBlock):
                w, b = mod.equivalent_kernel()
            else:
                w = mod.weight
                b = mod.bias if mod.bias is not None else torch.zeros_like(w[:, 0, 0, 0])
            target = (w.detach().clone(), b.detach().clone())
    if isinstance(mod, RepBlock):
        block = mod
    else:
        block = RepBlock.from_conv(mod)
        set_module(model, path, block)
    added = []
    for k in kept:
        if k in block.branches:
            skipped[k] = "already present"
            continue
        block.add_branch(k, gamma_init=gamma_init, conv_init=conv_init)
        added.append(k)
    if target is not None:
        block.compensate(*target)
    if added or skipped:
        log.debug("expand %s: added %s, skipped %s", path, added, skipped)
    return block, tuple(added), skipped


# ---------------------------------------------------------------------------------- collapse / fuse
def _following_bn(model: nn.Module, path: str) -> Optional[nn.BatchNorm2d]:
    """The BN fed only by the module at ``path``: the owning branch's BN for a nested conv, the
    traced/registered follower for a top-level one."""
    parent_path, _, name = path.rpartition(".")
    parent = get_module(model, parent_path)
    if isinstance(parent, Branch):
        return parent.following_bn(name)
    if nesting_depth(model, path) > 0:
        return None
    for cp, bp in conv_bn_pairs(model):
        if cp == path:
            return get_module(model, bp)
    return None


@torch.no_grad()
def collapse(model: nn.Module, path: str) -> nn.Module:
    """Replace a RepBlock left with its ``kxk`` branch alone by a plain module (DyRep code: a block
    whose extra branches were all cut becomes a plain conv). Exact in eval mode.

    - ``kxk`` conv plain: the block becomes that conv (same weight Parameter) with the BN folded in;
      the folded bias goes into the following BN's running mean (exact: a constant before a BN only
      shifts its mean; train-mode BN ignores it) or, if the original conv had a bias, into that bias.
      When neither is possible and the bias is non-zero, the block is left as it is.
    - ``kxk`` conv a nested block: the block becomes the nested block, compensated to the outer kernel.

    Returns:
        the module now at ``path``.

    Raises:
        KeyError / TypeError: no RepBlock at ``path``; ValueError: the block has other branches.
    """
    block = get_module(model, path)
    if not isinstance(block, RepBlock):
        raise TypeError(f"'{path}' is a {type(block).__name__}, not a RepBlock")
    if block.kinds != ("kxk",):
        raise ValueError(f"block '{path}' still has branches {list(block.kinds)[1:]}; remove them first")
    w, b = block.equivalent_kernel()
    w, b = w.detach().clone(), b.detach().clone()
    inner = block.kxk.conv
    if isinstance(inner, RepBlock):
        inner.compensate(w, b)
        inner.origin_bias = block.origin_bias
        set_module(model, path, inner)
        return inner
    bn = None
    if not block.origin_bias and bool((b != 0).any()):
        bn = _following_bn(model, path)
        if bn is None or bn.running_mean is None:
            log.warning("collapse %s: non-zero bias and no following BN; block kept", path)
            return block
    inner.weight.copy_(w)
    if block.origin_bias:
        inner.bias = nn.Parameter(b)
    elif bn is not None:
        bn.running_mean.sub_(b.to(bn.running_mean))
    inner.train(block.training)
    set_module(model, path, inner)
    return inner


def fuse_blocks(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every top-level block (:func:`is_rep_block`) by its ``fuse()`` conv (a RepBlock: with
    bias; nested blocks fused into their parent's kernel). Exact in eval mode (DyRep Fig. 2, deploy).

    Args:
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        the model with no block left (a copy unless ``inplace``).
    """
    m = model if inplace else copy.deepcopy(model)
    if is_rep_block(m):
        return m.fuse()
    for path, block in _top_blocks(m).items():
        set_module(m, path, block.fuse())
    return m


@torch.no_grad()
def deploy(model: nn.Module) -> nn.Module:
    """The inference model: exactly the origin architecture (DyRep Fig. 2; DESIGN.md "Models").

    Deep-copies ``model``, fuses every top-level block (:func:`is_rep_block`: RepBlock, CSLABlock)
    into one conv, and folds that conv's bias into the BN that follows it (``running_mean −= bias``;
    the bias is removed) unless the original conv had a bias (a block whose ``fuse()`` gives no bias
    needs no folding). The result has the origin model's modules and ``state_dict`` keys and shapes;
    a model without blocks deploys to (a copy of) itself.

    Raises:
        ValueError: naming the path, when a fused conv has a non-zero bias, the original conv had
            none, and no BatchNorm (with running statistics) follows it.
    """
    if is_rep_block(model):  # the model is one block: its conv, no BN to fold into
        conv = model.fuse()
        if not model.origin_bias and conv.bias is not None:
            bias = conv.bias.detach()
            conv.bias = None
            if bool((bias != 0).any()):
                raise ValueError("deploy: fused conv '' has a non-zero bias and no BatchNorm follows it to absorb it")
        return conv
    m = copy.deepcopy(model)
    top = _top_blocks(m)
    pairs = None
    for path, block in top.items():
        conv = block.fuse()
        set_module(m, path, conv)
        if block.origin_bias or conv.bias is None:
            continue
        bias = conv.bias.detach().clone()
        conv.bias = None
        if not bool((bias != 0).any()):
            continue
        if pairs is None:
            pairs = dict(conv_bn_pairs(m))
        bn = get_module(m, pairs[path]) if path in pairs else None
        if bn is None or bn.running_mean is None:
            raise ValueError(
                f"deploy: fused conv '{path}' has a non-zero bias and no BatchNorm follows it to absorb it"
            )
        bn.running_mean.sub_(bias.to(bn.running_mean))
    return m


# ---------------------------------------------------------------------------------- accounting
def count_branches(model: nn.Module) -> int:
    """``n_branches``: the number of branch modules in the model (every branch of every block, nested
    ones included; a ``kxk`` branch holding a nested block counts 1 besides the nested branches) plus
    1 for every ``nn.Conv2d`` outside any block. A block of the :func:`is_rep_block` protocol that
    is not a RepBlock counts ``len(describe()["branches"])`` (a CSLABlock: 2, or 3 with identity).
    A plain model gives its number of convs."""
    blocks = _block_paths(model)
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, Branch):
            n += 1
        elif not isinstance(m, RepBlock) and is_rep_block(m):
            n += len(m.describe()["branches"])
        elif isinstance(m, nn.Conv2d) and _depth(name, blocks) == 0:
            n += 1
    return n


def structure(model: nn.Module) -> dict[str, dict]:
    """``{path: block.describe()}`` for every top-level block (:func:`is_rep_block`; nested RepBlocks
    inside ``nested``); JSON-able, for ``structure.json``. Rebuild RepBlocks with
    :func:`apply_structure` (other block types are rebuilt by the method that made them)."""
    return {path: block.describe() for path, block in _top_blocks(model).items()}


def apply_structure(
    model: nn.Module,
    struct: dict[str, dict],
    *,
    gamma_init: float,
    conv_init: Optional[ConvInit] = None,
) -> nn.Module:
    """Rebuild the training-time structure recorded by :func:`structure` on a plain model, in place,
    so that a saved ``state_dict`` of the grown model loads with ``strict=True``.

    Args:
        model: the plain (origin) model, modified in place.
        struct: ``{path: RepBlock.describe()}`` as :func:`structure` returns it.
        gamma_init, conv_init: initialisation of the rebuilt branches, passed to :func:`expand`
            (``gamma_init`` keyword-only and required; both are irrelevant once a state_dict is
            loaded, but they decide the values and the RNG draws before that).

    Returns:
        ``model``.

    Raises:
        TypeError: ``gamma_init`` missing.
        ValueError: when the recorded branches cannot be rebuilt (different model), or a recorded
            block is not a RepBlock (e.g. a ``CSLABlock``: its method rebuilds it).
    """

    def _apply(path: str, desc: dict) -> None:
        kind = desc.get("type", "RepBlock")
        if kind != "RepBlock":
            raise ValueError(f"'{path}': apply_structure rebuilds RepBlocks only, the structure records a {kind}")
        block, _, _ = expand(model, path, desc["branches"], gamma_init=gamma_init, conv_init=conv_init)
        block.origin_bias = bool(desc.get("origin_bias", False))
        if set(block.kinds) != set(desc["branches"]):
            raise ValueError(f"'{path}': recorded branches {desc['branches']} but built {list(block.kinds)}")
        for rel, sub in desc.get("nested", {}).items():
            _apply(f"{path}.{rel}", sub)

    for path, desc in struct.items():
        _apply(path, desc)
    return model


def structure_shape(struct: dict) -> dict:
    """:func:`structure` output without the values that change during training (RepAn's
    ``attach_rate``): what two models of the same structure share. JSON-able, recursive."""

    def _shape(desc: dict) -> dict:
        out = {k: v for k, v in desc.items() if k not in ("attach_rate", "nested")}
        out["nested"] = {rel: _shape(sub) for rel, sub in desc.get("nested", {}).items()}
        return out

    return {path: _shape(desc) for path, desc in struct.items()}


def restore_attach_rates(model: nn.Module, struct: dict[str, dict]) -> int:
    """Set λ (RepAn's attach rate, a non-persistent buffer that ``state_dict`` does not carry) of
    every RepBlock whose :func:`structure` record has an ``attach_rate``, nested ones included.

    Args:
        model: a model with the recorded structure (after :func:`apply_structure` or its method's
            ``prepare``).
        struct: ``{path: describe()}`` as :func:`structure` returns it.

    Returns:
        the number of blocks whose λ was set.

    Raises:
        KeyError / TypeError: a recorded path with no RepBlock in ``model``.
    """
    n = 0

    def _set(path: str, desc: dict) -> None:
        nonlocal n
        if "attach_rate" in desc and desc["attach_rate"] is not None:
            block = get_module(model, path)
            if not isinstance(block, RepBlock):
                raise TypeError(f"'{path}' is a {type(block).__name__}, not a RepBlock with an attach rate")
            block.set_attach_rate(float(desc["attach_rate"]))
            n += 1
        for rel, sub in desc.get("nested", {}).items():
            _set(f"{path}.{rel}", sub)

    for path, desc in struct.items():
        _set(path, desc)
    return n
