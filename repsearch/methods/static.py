"""``static``: every eligible conv expanded with an operation space from the start and fused at
deploy — the RepVGG (``repvgg``), DBB (``dbb``) and ACB (``acb``) baselines (DyRep Table 2, "DBB")."""

from __future__ import annotations

from typing import Iterable

from torch import nn

from repsearch.methods.base import Method
from repsearch.rep import candidate_convs, expand
from repsearch.spaces import resolve_space


class Static(Method):
    """Expand every square K > 1 conv of the model into a :class:`~repsearch.rep.RepBlock` with the
    space's branches (ineligible ones skipped per conv and recorded), new last-BN γ = ``gamma_init``."""

    name = "static"

    def prepare(self, model: nn.Module, loader: Iterable) -> nn.Module:
        kinds = resolve_space(self.spec.space)
        for path in list(candidate_convs(model, max_depth=1)):
            _, added, skipped = expand(model, path, kinds, gamma_init=self.spec.gamma_init)
            self.events.append(
                {"epoch": 0, "kind": "expand", "path": path, "added": list(added), "skipped": dict(skipped)}
            )
        return model
