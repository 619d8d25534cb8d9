"""``static``: every eligible conv expanded with an operation space from the start and fused at
deploy — the RepVGG (``repvgg``), DBB (``dbb``) and ACB (``acb``) baselines (DyRep Table 2, "DBB").

``post_bn`` chooses where the model's own BN goes:

- ``keep`` (default; DBB/DyRep form): the block replaces the conv only, the model's BN stays after
  the sum of branches: ``BN(Σ_j BN_j(op_j(x)))``.
- ``absorb`` (the RepVGG form RepOptimizers trains as its baseline, RepOpt §4 / RepVGG Fig. 4): the
  model's BN becomes the ``kxk`` branch's BN and nothing normalises the sum:
  ``ReLU(BN_3x3(conv3x3 x) + BN_1x1(conv1x1 x) + BN_id(x))``. No extra BN after the sum — that BN
  widens the fused kernel's distribution (RepOpt Table 8) and would bias an INT8 comparison.
  Deploy still gives the plain conv-BN model: the fused kernel goes into the conv, its bias into the
  BN slot as an identity BN with β = bias (exact in eval mode), so ``deployed.pt`` loads strictly.
"""

from __future__ import annotations

from typing import Iterable, Literal, Union

import torch
from pydantic import NonNegativeFloat, field_validator
from torch import nn

from repsearch.methods.base import Method, register_method
from repsearch.rep import candidate_convs, conv_bn_pairs, deploy, expand, get_module, kaiming_fan_out, reset_bn_to_identity, set_module
from repsearch.schema import MethodSpecModel, check_space
from repsearch.spaces import resolve_space


class StaticSpec(MethodSpecModel):
    """Every eligible conv expanded with ``space`` from the start and fused at deploy (RepVGG, DBB, ACB
    baselines). ``gamma_init`` is the last-BN γ of the added branches (1.0 as in DBB/RepVGG);
    ``post_bn``: ``keep`` the model's BN after the block or ``absorb`` it as the ``kxk`` branch's BN
    (the RepVGG form, see the module docstring)."""

    name: Literal["static"] = "static"
    space: Union[str, list[str]] = "dbb"
    gamma_init: NonNegativeFloat = 1.0
    post_bn: Literal["keep", "absorb"] = "keep"

    _space = field_validator("space")(classmethod(lambda cls, v: check_space(v)))


@register_method
class Static(Method):
    """Expand every square K > 1 conv of the model into a :class:`~repsearch.rep.RepBlock` with the
    space's branches (ineligible ones skipped per conv and recorded), new last-BN γ = ``gamma_init``;
    with ``post_bn: absorb`` the model's BN after each expanded conv moves into its ``kxk`` branch."""

    Spec = StaticSpec

    def __init__(self, spec, **kwargs):
        super().__init__(spec, **kwargs)
        #: conv path -> path of the model BN absorbed into its block (``post_bn: absorb``).
        self.absorbed: dict[str, str] = {}

    def prepare(self, model: nn.Module, loader: Iterable) -> nn.Module:
        kinds = resolve_space(self.spec.space)
        follower = dict(conv_bn_pairs(model)) if self.spec.post_bn == "absorb" else {}
        for path in list(candidate_convs(model, max_depth=1)):
            block, added, skipped = expand(
                model, path, kinds, gamma_init=self.spec.gamma_init, conv_init=kaiming_fan_out
            )
            event = {"epoch": 0, "kind": "expand", "path": path, "added": list(added), "skipped": dict(skipped)}
            bn_path = follower.get(path)
            if bn_path is not None:
                # the model's BN (same Parameters and statistics) becomes the kxk branch's BN
                block.kxk.bn = get_module(model, bn_path)
                set_module(model, bn_path, nn.Identity())
                self.absorbed[path] = bn_path
                event["absorbed_bn"] = bn_path
            elif self.spec.post_bn == "absorb":
                event["absorbed_bn"] = None  # no BN follows this conv: the block keeps the plain form
            self.events.append(event)
        return model

    @torch.no_grad()
    def deploy(self, model: nn.Module) -> nn.Module:
        """The plain origin architecture. With ``post_bn: absorb`` each block's fused ``(W, b)`` (its
        kxk BN included) goes into the conv (bias-free) and an identity BN with β = b takes the BN's
        slot back (running mean 0, var 1 − eps, γ 1): exact in eval mode, loads strictly.

        Raises:
            ValueError: see :func:`repsearch.rep.deploy`.
        """
        if not self.absorbed:
            return deploy(model)
        import copy

        m = copy.deepcopy(model)
        restored: dict[str, tuple[torch.Tensor, nn.BatchNorm2d]] = {}
        for conv_path, bn_path in self.absorbed.items():
            block = get_module(m, conv_path)
            w, b = block.equivalent_kernel()
            src = block.kxk.bn
            bn = nn.BatchNorm2d(
                src.num_features, eps=src.eps, momentum=src.momentum, device=w.device, dtype=w.dtype
            )
            reset_bn_to_identity(bn, b)
            bn.num_batches_tracked.copy_(src.num_batches_tracked)
            conv = nn.Conv2d(
                block.in_channels, block.out_channels, block.kernel_size, stride=block.stride,
                padding=block.padding, groups=block.groups, bias=False, device=w.device, dtype=w.dtype,
            )
            conv.weight.copy_(w)
            conv.train(block.training)
            bn.train(block.training)
            set_module(m, conv_path, conv)
            set_module(m, bn_path, bn)
        return deploy(m)  # any block left (a conv without a BN after it) fused as usual

    def state_dict(self) -> dict:
        return {**super().state_dict(), "absorbed": dict(self.absorbed)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.absorbed = dict(state.get("absorbed", {}))
