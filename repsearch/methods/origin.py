"""``origin``: the plain conv-BN model trained as is — the baseline of every table (DyRep Table 2)."""

from __future__ import annotations

from repsearch.methods.base import Method


class Origin(Method):
    """The plain model; ``prepare``, ``on_epoch_end`` and ``deploy`` change nothing."""

    name = "origin"
