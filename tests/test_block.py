"""Branches and RepBlock: every kind alone and combined equals its fused conv in eval mode (random BN
statistics in every BN, inner ones included); Rep compensation (DyRep Eq. 6), Dep (Eq. 10), nesting."""

import itertools
import json
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repsearch.rep import (
    BRANCH_KINDS,
    KxkBranch,
    RepBlock,
    eligible_branches,
    eligible_kinds,
    ineligibility,
    make_branch,
)
from equivalence import assert_close, randomize_bns

NON_KXK = BRANCH_KINDS[1:]






def geometries():
    """(C_in, C_out, K, stride, padding, groups) cases: K in {1,2,3,5}, stride {1,2}, groups {1,2,4},
    padding K//2 and 0; a random C_in/C_out drawn per case (seeded)."""
    rng = random.Random(0)
    out = []
    for k, s, g in itertools.product([1, 2, 3, 5], [1, 2], [1, 2, 4]):
        for p in sorted({k // 2, 0}):
            cin = g * rng.choice([1, 2, 3])
            cout = cin if rng.random() < 0.5 else g * rng.choice([1, 2, 3])
            out.append((cin, cout, k, s, p, g))
    return out


GEOMS = geometries()


def _ids(g):
    return "cin{}-cout{}-k{}-s{}-p{}-g{}".format(*g)


def make_block(geom, kinds, bias=True, seed=0):
    torch.manual_seed(seed)
    cin, cout, k, s, p, g = geom
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=g, bias=bias)
    block = RepBlock.from_conv(conv)
    for kind in kinds:
        if kind != "kxk":
            block.add_branch(kind, gamma_init=0.01)
    randomize_bns(block)
    return conv, block.eval()


def conv_of(block_or_branch, x, geom):
    w, b = block_or_branch.equivalent_kernel()
    _, _, _, s, p, g = geom
    return F.conv2d(x, w, b, s, p, 1, g)


# ------------------------------------------------------------------------- branches alone
@pytest.mark.parametrize("kind", BRANCH_KINDS)
@pytest.mark.parametrize("geom", GEOMS, ids=_ids)
def test_branch_equals_its_kernel(kind, geom):
    cin, cout, k, s, p, g = geom
    reason = ineligibility(kind, *geom)
    if reason is not None:
        with pytest.raises(ValueError):
            make_branch(kind, *geom)
        return
    torch.manual_seed(GEOMS.index(geom) * 10 + BRANCH_KINDS.index(kind))
    branch = make_branch(kind, *geom)
    randomize_bns(branch)
    branch.eval()
    x = torch.randn(2, cin, 7, 6)
    y = branch(x)
    assert_close(conv_of(branch, x, geom), y)
    w, b = branch.equivalent_kernel()
    assert w.shape == (cout, cin // g, k, k) and b.shape == (cout,)
    assert branch.last_bn.num_features == cout
    # the small kernels sit at the centre of the KxK kernel (DBB transform VI)
    support = {"1x1": (slice(k // 2, k // 2 + 1), slice(k // 2, k // 2 + 1)),
               "1xk": (slice(k // 2, k // 2 + 1), slice(None)),
               "kx1": (slice(None), slice(k // 2, k // 2 + 1)),
               "identity": (slice(k // 2, k // 2 + 1), slice(k // 2, k // 2 + 1))}.get(kind)
    if support is not None:
        mask = torch.zeros(k, k, dtype=torch.bool)
        mask[support] = True
        assert torch.count_nonzero(w[..., ~mask]) == 0
        assert torch.count_nonzero(w[..., mask]) > 0


def test_eligibility_rules():
    # identity: C_in == C_out and stride 1
    assert ineligibility("identity", 8, 16, 3, 1, 1) is not None
    assert ineligibility("identity", 8, 8, 3, 2, 1) is not None
    assert ineligibility("identity", 8, 8, 3, 1, 1, 2) is None
    # padding != K//2: only kxk, 1x1-kxk, 1x1-avg (DyRep code's rule)
    ok = {k for k in BRANCH_KINDS if ineligibility(k, 8, 8, 3, 1, 0) is None}
    assert ok == {"kxk", "1x1-kxk", "1x1-avg"}
    assert {k for k in BRANCH_KINDS if ineligibility(k, 8, 8, 5, 1, 2) is None} == set(BRANCH_KINDS)
    assert ineligibility("1xk", 8, 8, 1, 1, 0) is not None
    with pytest.raises(ValueError, match="not one of"):
        ineligibility("3x3", 8, 8, 3, 1, 1)


def test_eligible_kinds_and_branches():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    assert eligible_kinds(conv) == ("kxk", "1x1", "1x1-kxk", "1x1-avg", "1xk", "kx1")
    kept, skipped = eligible_branches(conv, ["kxk", "identity", "1x1", "kx1", "1x1"])
    assert kept == ["1x1", "kx1"] and set(skipped) == {"identity"}
    assert "stride" in skipped["identity"] or "C_in" in skipped["identity"]
    kept, skipped = eligible_branches(nn.Conv2d(4, 4, 3, padding=0), BRANCH_KINDS)
    assert kept == ["1x1-kxk", "1x1-avg"]
    assert set(skipped) == {"1x1", "1xk", "kx1", "identity"}
    with pytest.raises(ValueError, match="not one of"):
        eligible_branches(conv, ["1x3"])


def test_from_conv_is_exact_and_shares_parameters():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2, bias=True)
    block = RepBlock.from_conv(conv).eval()
    assert block.kxk.conv.weight is conv.weight
    assert block.kxk.conv.bias is None and conv.bias is not None  # the input conv is left intact
    assert block.origin_bias
    assert torch.equal(block.kxk.bn.bias.detach(), conv.bias.detach())
    x = torch.randn(2, 6, 9, 8)
    assert_close(block(x), conv(x))
    assert (block.in_channels, block.out_channels, block.kernel_size, block.stride, block.padding, block.groups) == (
        6, 4, 3, 2, 1, 2)
    fused = block.fuse()
    assert isinstance(fused, nn.Conv2d) and fused.bias is not None
    assert_close(fused(x), conv(x))


def test_from_conv_rejects_unsupported_convs():
    with pytest.raises(ValueError, match="dilation"):
        RepBlock.from_conv(nn.Conv2d(4, 4, 3, padding=2, dilation=2))
    with pytest.raises(ValueError, match="square"):
        RepBlock.from_conv(nn.Conv2d(4, 4, (1, 3)))
    with pytest.raises(ValueError, match="padding_mode"):
        RepBlock.from_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError):
        RepBlock.from_conv(nn.Linear(4, 4))
    # 'same' padding is read as K//2
    block = RepBlock.from_conv(nn.Conv2d(4, 4, 3, padding="same"))
    assert block.padding == 1 and block.eligible("identity")


# ------------------------------------------------------------------------- blocks
COMBOS = [
    ("1x1", "identity"),  # RepVGG
    ("1x1", "1x1-kxk", "1x1-avg"),  # DBB
    ("1xk", "kx1"),  # ACB
    tuple(BRANCH_KINDS),  # DyRep
]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "+".join(c))
@pytest.mark.parametrize("geom", GEOMS, ids=_ids)
def test_block_fuses_exactly(combo, geom):
    kept, _ = eligible_branches(nn.Conv2d(geom[0], geom[1], geom[2], geom[3], geom[4], groups=geom[5]), combo)
    conv, block = make_block(geom, kept, bias=geom[3] == 1, seed=len(combo))
    assert block.kinds == ("kxk", *kept)
    x = torch.randn(2, geom[0], 8, 7)
    y = block(x)
    assert_close(block.fuse()(x), y)
    assert_close(conv_of(block, x, geom), y)


def test_add_branch_errors():
    _, block = make_block((4, 4, 3, 2, 1, 1), [])
    with pytest.raises(ValueError, match="already present"):
        block.add_branch("kxk")
    block.add_branch("1x1")
    with pytest.raises(ValueError, match="already present"):
        block.add_branch("1x1")
    with pytest.raises(ValueError, match="stride"):
        block.add_branch("identity")
    with pytest.raises(ValueError, match="not one of"):
        block.add_branch("5x5")
    assert not block.eligible("identity") and block.eligible("1x1-avg")


def test_new_branch_init():
    torch.manual_seed(0)
    block = RepBlock.from_conv(nn.Conv2d(8, 8, 3, padding=1))
    for k in NON_KXK:
        block.add_branch(k, gamma_init=0.01)
    for k in NON_KXK:
        br = block.branches[k]
        assert torch.allclose(br.last_bn.weight, torch.full((8,), 0.01))
        assert torch.count_nonzero(br.last_bn.bias) == 0
        inner = [m for m in br.modules() if isinstance(m, nn.BatchNorm2d) and m is not br.last_bn]
        for m in inner:
            assert torch.all(m.weight == 1)
    imp = block.branch_importance()
    assert set(imp) == set(NON_KXK)
    assert all(abs(v - 0.01) < 1e-7 for v in imp.values())
    with torch.no_grad():
        block.kxk.bn.weight.fill_(-2.0)
        block.branches["1x1"].last_bn.weight[:4] = 0.5
    imp = block.branch_importance()
    assert abs(imp["identity"] - 0.005) < 1e-7
    assert abs(imp["1x1"] - (4 * 0.5 + 4 * 0.01) / 8 / 2) < 1e-6


@pytest.mark.parametrize("geom", [(8, 8, 3, 1, 1, 1), (4, 8, 5, 2, 2, 4), (6, 6, 3, 1, 0, 2), (8, 8, 3, 1, 1, 8)], ids=_ids)
def test_compensate_makes_block_equal_target(geom):
    kinds = eligible_kinds(nn.Conv2d(geom[0], geom[1], geom[2], geom[3], geom[4], groups=geom[5]))
    _, block = make_block(geom, kinds, seed=3)
    target = nn.Conv2d(geom[0], geom[1], geom[2], geom[3], geom[4], groups=geom[5], bias=True).eval()
    x = torch.randn(2, geom[0], 7, 9)
    assert (block(x) - target(x)).abs().max() > 1e-2
    weight_param = block.kxk.conv.weight
    block.compensate(target.weight, target.bias)
    assert block.kxk.conv.weight is weight_param  # in place: optimizer state survives
    assert_close(block(x), target(x))
    block.compensate(target.weight, None)
    assert_close(block(x), F.conv2d(x, target.weight, None, geom[3], geom[4], 1, geom[5]))
    with pytest.raises(ValueError, match="shape"):
        block.compensate(target.weight[:, :, :1, :1], target.bias)


@pytest.mark.parametrize("geom", [(8, 8, 3, 1, 1, 1), (4, 8, 3, 2, 1, 2), (6, 6, 5, 1, 0, 1)], ids=_ids)
def test_remove_branches_keeps_output(geom):
    kinds = eligible_kinds(nn.Conv2d(geom[0], geom[1], geom[2], geom[3], geom[4], groups=geom[5]))
    _, block = make_block(geom, kinds, seed=4)
    x = torch.randn(2, geom[0], 8, 8)
    y0 = block(x)
    present = list(block.kinds[1:])
    cut = present[::2]
    assert block.remove_branches(cut) == cut
    assert block.kinds == tuple(k for k in ("kxk", *present) if k not in cut)
    assert_close(block(x), y0)
    block.remove_branches(block.kinds[1:])
    assert block.kinds == ("kxk",)
    assert_close(block(x), y0)
    # without absorbing, the output changes
    _, block2 = make_block(geom, kinds, seed=4)
    block2.remove_branches([present[0]], absorb=False)
    assert (block2(x) - y0).abs().max() > 1e-3


def test_remove_branches_errors():
    _, block = make_block((4, 4, 3, 1, 1, 1), ["1x1"])
    with pytest.raises(ValueError, match="kxk"):
        block.remove_branches(["kxk"])
    with pytest.raises(ValueError, match="not present"):
        block.remove_branches(["identity"])
    with pytest.raises(ValueError, match="not one of"):
        block.remove_branches(["7x7"])
    assert block.remove_branches([]) == []


def _nested_block(seed=5):
    """Outer block (8->8, K3, all kinds) whose kxk conv is a block (all kinds) and whose 1x1-kxk
    inner KxK conv is a block (padding 0: 1x1-kxk, 1x1-avg)."""
    torch.manual_seed(seed)
    outer = RepBlock.from_conv(nn.Conv2d(8, 8, 3, padding=1, bias=False))
    for k in NON_KXK:
        outer.add_branch(k)
    inner = RepBlock.from_conv(outer.kxk.conv)
    outer.kxk.conv = inner
    for k in eligible_kinds(inner)[1:]:
        inner.add_branch(k)
    conv2 = outer.branches["1x1-kxk"].conv2
    inner2 = RepBlock.from_conv(conv2)
    outer.branches["1x1-kxk"].conv2 = inner2
    kept, skipped = eligible_branches(inner2, BRANCH_KINDS)
    assert kept == ["1x1-kxk", "1x1-avg"] and "identity" in skipped
    for k in kept:
        inner2.add_branch(k)
    randomize_bns(outer)
    return outer.eval()


def test_nested_blocks_fuse_exactly():
    outer = _nested_block()
    x = torch.randn(2, 8, 9, 7)
    y = outer(x)
    fused = outer.fuse()
    assert_close(fused(x), y)
    desc = outer.describe()
    json.dumps(desc)
    assert set(desc["nested"]) == {"branches.kxk.conv", "branches.1x1-kxk.conv2"}
    assert desc["nested"]["branches.1x1-kxk.conv2"]["branches"] == ["kxk", "1x1-kxk", "1x1-avg"]
    assert desc["branches"] == list(BRANCH_KINDS)


def test_nested_compensate_and_remove():
    outer = _nested_block(6)
    x = torch.randn(2, 8, 6, 6)
    target = nn.Conv2d(8, 8, 3, padding=1).eval()
    outer.compensate(target.weight, target.bias)
    assert_close(outer(x), target(x))
    inner = outer.kxk.conv
    assert inner.kinds == BRANCH_KINDS  # nested branches kept, its kxk compensated
    y0 = outer(x)
    outer.remove_branches(["1x1-kxk", "identity", "1x1"])
    assert_close(outer(x), y0)
    inner.remove_branches(["1x1-avg", "kx1"])
    assert_close(outer(x), y0)
    assert_close(outer.fuse()(x), y0)


def test_kxk_branch_rejects_bn_mismatch():
    with pytest.raises(ValueError, match="BN"):
        KxkBranch(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(4))


def test_train_mode_forward_backward_reaches_all_parameters():
    outer = _nested_block(7)
    outer.train()
    x = torch.randn(4, 8, 6, 6)
    y = outer(x)
    assert y.shape == (4, 8, 6, 6)
    (y * torch.randn_like(y)).sum().backward()
    for name, p in outer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # train mode uses batch statistics, so it differs from eval
    outer.eval()
    assert (outer(x) - y).abs().max() > 1e-3


def test_block_modes_and_device_follow_conv():
    conv = nn.Conv2d(4, 4, 3, padding=1).double()
    conv.eval()
    block = RepBlock.from_conv(conv)
    assert not block.training
    block.add_branch("1x1")
    assert not block.branches["1x1"].training
    assert block.branches["1x1"].conv.weight.dtype == torch.float64


def test_reset_bn_to_identity_is_exact():
    from repsearch.rep import reset_bn_to_identity

    torch.manual_seed(8)
    for eps in (1e-5, 1e-3):
        bn = nn.BatchNorm2d(5, eps=eps)
        randomize_bns(bn)
        beta = torch.randn(5)
        reset_bn_to_identity(bn, beta)
        bn.eval()
        x = torch.randn(2, 5, 4, 4)
        assert torch.equal(bn(x), x + beta.reshape(1, -1, 1, 1))
        reset_bn_to_identity(bn)
        assert torch.equal(bn(x), x)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(RepBlock.from_conv(conv).eval()(x), conv(x))
