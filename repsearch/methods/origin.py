"""``origin``: the plain model trained as is, with no re-parameterization — the baseline line of
every table (DyRep Table 2, "origin")."""

from __future__ import annotations

from typing import Literal

from repsearch.methods.base import Method, register_method
from repsearch.schema import MethodSpecModel


class OriginSpec(MethodSpecModel):
    """The plain model trained as is (no re-parameterization): the ``origin`` baseline."""

    name: Literal["origin"] = "origin"


@register_method
class Origin(Method):
    """The plain model; ``prepare``, ``on_epoch_end`` and ``deploy`` change nothing."""

    Spec = OriginSpec
