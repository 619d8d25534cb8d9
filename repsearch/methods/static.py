"""``static``: every eligible conv expanded with an operation space from the start and fused at
deploy — the RepVGG (``repvgg``), DBB (``dbb``) and ACB (``acb``) baselines (DyRep Table 2, "DBB")."""

from __future__ import annotations

from typing import Iterable, Literal, Union

from pydantic import NonNegativeFloat, field_validator
from torch import nn

from repsearch.methods.base import Method, register_method
from repsearch.schema import MethodSpecModel, check_space
from repsearch.rep import candidate_convs, expand, kaiming_fan_out
from repsearch.spaces import resolve_space


class StaticSpec(MethodSpecModel):
    """Every eligible conv expanded with ``space`` from the start and fused at deploy (RepVGG, DBB, ACB
    baselines). ``gamma_init`` is the last-BN γ of the added branches (1.0 as in DBB/RepVGG)."""

    name: Literal["static"] = "static"
    space: Union[str, list[str]] = "dbb"
    gamma_init: NonNegativeFloat = 1.0

    _space = field_validator("space")(classmethod(lambda cls, v: check_space(v)))


@register_method
class Static(Method):
    """Expand every square K > 1 conv of the model into a :class:`~repsearch.rep.RepBlock` with the
    space's branches (ineligible ones skipped per conv and recorded), new last-BN γ = ``gamma_init``."""

    Spec = StaticSpec

    def prepare(self, model: nn.Module, loader: Iterable) -> nn.Module:
        kinds = resolve_space(self.spec.space)
        for path in list(candidate_convs(model, max_depth=1)):
            _, added, skipped = expand(model, path, kinds, gamma_init=self.spec.gamma_init, conv_init=kaiming_fan_out)
            self.events.append(
                {"epoch": 0, "kind": "expand", "path": path, "added": list(added), "skipped": dict(skipped)}
            )
        return model
