"""Exact structural re-parameterization primitives (DyRep Sec. 3; DBB Sec. 3.2; RepVGG; ACB).

No training logic and no import from the rest of repsearch. Layers:

- :mod:`repsearch.rep.fuse`: pure tensor transforms to one KxK kernel ``(W, b)``.
- :mod:`repsearch.rep.branches`: branch modules with ``equivalent_kernel()``.
- :mod:`repsearch.rep.block`: :class:`RepBlock` (add / compensate / remove / fuse).
- :mod:`repsearch.rep.csla`: :class:`CSLABlock`, RepOptimizers' BN-free constant-scale block
  (RepOpt §3.2).
- :mod:`repsearch.rep.surgery`: conv→BN pairs, expand, collapse, deploy, structure; any module of
  the block protocol (:func:`is_rep_block`: ``equivalent_kernel``, ``fuse``, ``describe``,
  ``origin_bias``, geometry) is a block there.

No method's choices are baked in: callers pass the new branches' last-BN γ (``gamma_init``,
required), their conv initialiser (``conv_init``: a :data:`ConvInit` such as
:func:`kaiming_fan_out`, or ``None`` for PyTorch's own) and the branch-importance rule
(:data:`ImportanceRule`, required by :meth:`RepBlock.branch_importance`).
"""

from repsearch.rep.block import ImportanceRule, RepBlock, eligible_branches, eligible_kinds
from repsearch.rep.branches import (
    BRANCH_KINDS,
    PADDING_FREE_KINDS,
    BNAndPad,
    Branch,
    ConvBNBranch,
    ConvInit,
    IdentityBranch,
    KxkBranch,
    OneByOneAvgBranch,
    OneByOneKxkBranch,
    conv_geometry,
    ineligibility,
    kaiming_fan_out,
    last_bn_gamma_abs_mean,
    make_branch,
    reset_bn_to_identity,
)
from repsearch.rep.csla import CSLABlock
from repsearch.rep.fuse import (
    avg_kernel,
    conv_kernel,
    fuse_bn,
    fuse_bn_module,
    identity_kernel,
    merge_1x1_kxk,
    pad_to_kxk,
)
from repsearch.rep.surgery import (
    apply_structure,
    candidate_convs,
    collapse,
    conv_bn_pairs,
    count_branches,
    deploy,
    expand,
    fuse_blocks,
    get_module,
    is_rep_block,
    nesting_depth,
    restore_attach_rates,
    structure_shape,
    repblocks,
    set_module,
    structure,
)

__all__ = [
    "BRANCH_KINDS",
    "PADDING_FREE_KINDS",
    "BNAndPad",
    "Branch",
    "CSLABlock",
    "ConvBNBranch",
    "ConvInit",
    "IdentityBranch",
    "ImportanceRule",
    "KxkBranch",
    "OneByOneAvgBranch",
    "OneByOneKxkBranch",
    "RepBlock",
    "apply_structure",
    "avg_kernel",
    "candidate_convs",
    "collapse",
    "conv_bn_pairs",
    "conv_geometry",
    "conv_kernel",
    "count_branches",
    "deploy",
    "eligible_branches",
    "eligible_kinds",
    "expand",
    "fuse_blocks",
    "fuse_bn",
    "fuse_bn_module",
    "get_module",
    "identity_kernel",
    "ineligibility",
    "is_rep_block",
    "kaiming_fan_out",
    "last_bn_gamma_abs_mean",
    "make_branch",
    "merge_1x1_kxk",
    "nesting_depth",
    "pad_to_kxk",
    "repblocks",
    "reset_bn_to_identity",
    "restore_attach_rates",
    "set_module",
    "structure",
    "structure_shape",
]
