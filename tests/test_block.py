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
    ConvBNBranch,
    IdentityBranch,
    KxkBranch,
    OneByOneAvgBranch,
    OneByOneKxkBranch,
    RepBlock,
    eligible_branches,
    eligible_kinds,
    ineligibility,
    kaiming_fan_out,
    last_bn_gamma_abs_mean,
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
            block.add_branch(kind, gamma_init=0.01, conv_init=kaiming_fan_out)
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
            make_branch(kind, *geom, gamma_init=0.01, conv_init=kaiming_fan_out)
        return
    torch.manual_seed(GEOMS.index(geom) * 10 + BRANCH_KINDS.index(kind))
    branch = make_branch(kind, *geom, gamma_init=0.01, conv_init=kaiming_fan_out)
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
    init = {"gamma_init": 0.01, "conv_init": kaiming_fan_out}
    with pytest.raises(ValueError, match="already present"):
        block.add_branch("kxk", **init)
    block.add_branch("1x1", **init)
    with pytest.raises(ValueError, match="already present"):
        block.add_branch("1x1", **init)
    with pytest.raises(ValueError, match="stride"):
        block.add_branch("identity", **init)
    with pytest.raises(ValueError, match="not one of"):
        block.add_branch("5x5", **init)
    assert not block.eligible("identity") and block.eligible("1x1-avg")


def test_new_branch_init():
    torch.manual_seed(0)
    block = RepBlock.from_conv(nn.Conv2d(8, 8, 3, padding=1))
    for k in NON_KXK:
        block.add_branch(k, gamma_init=0.01, conv_init=kaiming_fan_out)
    for k in NON_KXK:
        br = block.branches[k]
        assert torch.allclose(br.last_bn.weight, torch.full((8,), 0.01))
        assert torch.count_nonzero(br.last_bn.bias) == 0
        inner = [m for m in br.modules() if isinstance(m, nn.BatchNorm2d) and m is not br.last_bn]
        for m in inner:
            assert torch.all(m.weight == 1)
    imp = block.branch_importance(lambda br, kxk: last_bn_gamma_abs_mean(br))
    assert list(imp) == list(NON_KXK)  # canonical order
    assert all(abs(v - 0.01) < 1e-7 for v in imp.values())
    # the DyRep rule (ratio to the kxk branch) is tested in test_dyrep.py


# ------------------------------------------------------------------------- no method defaults in rep/
BRANCH_CLASSES = [
    (ConvBNBranch, ("1x1",)),
    (OneByOneKxkBranch, ()),
    (OneByOneAvgBranch, ()),
    (IdentityBranch, ()),
]


def test_gamma_init_is_required():
    """No DyRep γ = 0.01 default: make_branch, every branch class and add_branch need gamma_init."""
    geom = (4, 4, 3, 1, 1, 1)
    for kind in BRANCH_KINDS:
        with pytest.raises(TypeError, match="gamma_init"):
            make_branch(kind, *geom)
        with pytest.raises(TypeError, match="gamma_init"):
            make_branch(kind, *geom, conv_init=kaiming_fan_out)
    for cls, lead in BRANCH_CLASSES:
        with pytest.raises(TypeError, match="gamma_init"):
            cls(*lead, *geom)
        with pytest.raises(TypeError):  # keyword-only: no positional γ after the geometry
            cls(*lead, *geom, 0.01)
        assert cls(*lead, *geom, gamma_init=1.0).last_bn.weight.eq(1.0).all()
    block = RepBlock.from_conv(nn.Conv2d(4, 4, 3, padding=1))
    for kind in NON_KXK:
        with pytest.raises(TypeError, match="gamma_init"):
            block.add_branch(kind)
    assert block.kinds == ("kxk",)
    block.add_branch("1x1", gamma_init=1.0)  # conv_init may be left out (None)
    assert torch.all(block.branches["1x1"].last_bn.weight == 1.0)


def _branch_convs(branch):
    return [m for m in branch.modules() if isinstance(m, nn.Conv2d)]


def test_conv_init_none_is_pytorch_default_init():
    """conv_init=None: exactly nn.Conv2d's own init (same values, same RNG draws), not fan-out normal."""
    cin = cout = 64
    torch.manual_seed(11)
    branch = make_branch("1x1", cin, cout, 3, 1, 1, gamma_init=1.0, conv_init=None)
    after = torch.randn(3)
    torch.manual_seed(11)
    ref = nn.Conv2d(cin, cout, 1, bias=False)
    assert torch.equal(branch.conv.weight, ref.weight)
    assert torch.equal(torch.randn(3), after)  # nothing else drawn from the RNG
    # PyTorch's default (kaiming_uniform_, a=sqrt(5)): std 1/sqrt(3 fan_in) = 0.072;
    # fan-out normal: std sqrt(2 / fan_out) = 0.177
    std_default = branch.conv.weight.std().item()
    assert abs(std_default - 1 / (3 * cin) ** 0.5) < 0.01
    torch.manual_seed(11)
    fan_out = make_branch("1x1", cin, cout, 3, 1, 1, gamma_init=1.0, conv_init=kaiming_fan_out)
    std_fan_out = fan_out.conv.weight.std().item()
    assert abs(std_fan_out - (2 / cout) ** 0.5) < 0.02
    assert std_fan_out > 2 * std_default
    # kaiming_fan_out = PyTorch's init, then kaiming_normal_(fan_out, relu), same RNG order
    torch.manual_seed(11)
    ref = nn.Conv2d(cin, cout, 1, bias=False)
    nn.init.kaiming_normal_(ref.weight, mode="fan_out", nonlinearity="relu")
    assert torch.equal(fan_out.conv.weight, ref.weight)


def test_custom_conv_init_is_honoured_for_every_new_conv():
    calls = []

    def const(conv):
        calls.append(conv)
        conv.weight.fill_(0.25)  # called under no_grad: in-place on a Parameter is allowed

    n_convs = {"kxk": 1, "1x1": 1, "1x1-kxk": 2, "1x1-avg": 1, "1xk": 1, "kx1": 1, "identity": 0}
    for kind in BRANCH_KINDS:
        calls.clear()
        branch = make_branch(kind, 4, 4, 3, 1, 1, gamma_init=0.5, conv_init=const)
        convs = _branch_convs(branch)
        assert len(convs) == n_convs[kind] and calls == convs  # once per conv, in module order
        assert all(torch.all(c.weight == 0.25) and c.weight.requires_grad for c in convs)
        assert torch.all(branch.last_bn.weight == 0.5)
    block = RepBlock.from_conv(nn.Conv2d(4, 4, 3, padding=1))
    original = block.kxk.conv.weight.detach().clone()
    calls.clear()
    for kind in NON_KXK:
        block.add_branch(kind, gamma_init=0.01, conv_init=const)
    assert len(calls) == sum(n_convs[k] for k in NON_KXK)
    assert torch.equal(block.kxk.conv.weight, original)  # the original conv is never re-initialised


# ------------------------------------------------------------------------- branch importance
def test_branch_importance_needs_a_rule_and_honours_it():
    _, block = make_block((8, 8, 3, 1, 1, 1), NON_KXK)
    with pytest.raises(TypeError):
        block.branch_importance()
    seen = []

    def rule(branch, kxk):
        seen.append((branch, kxk))
        assert not torch.is_grad_enabled()
        return len(branch.kind) + torch.tensor(0.5)  # tensors are converted to float

    imp = block.branch_importance(rule)
    assert imp == {k: len(k) + 0.5 for k in NON_KXK}
    assert all(type(v) is float for v in imp.values())
    assert [b for b, _ in seen] == [block.branches[k] for k in NON_KXK]
    assert all(kxk is block.kxk for _, kxk in seen)
    assert RepBlock.from_conv(nn.Conv2d(4, 4, 3, padding=1)).branch_importance(rule) == {}

    def failing(branch, kxk):
        raise ValueError("no importance for you")

    with pytest.raises(ValueError, match="no importance"):
        block.branch_importance(failing)


def test_last_bn_gamma_abs_mean():
    torch.manual_seed(12)
    for kind in BRANCH_KINDS:
        branch = make_branch(kind, 6, 6, 3, 1, 1, gamma_init=1.0)
        randomize_bns(branch)
        expected = branch.last_bn.weight.abs().mean().item()
        assert last_bn_gamma_abs_mean(branch) == expected
    # identity has its bare BN as last BN (as before): an importance like any other branch
    ident = make_branch("identity", 6, 6, 3, 1, 1, gamma_init=-0.3)
    assert ident.last_bn is ident.bn and abs(last_bn_gamma_abs_mean(ident) - 0.3) < 1e-7
    # no last BN, or one without γ: ValueError
    with pytest.raises(ValueError, match="no last BN"):
        last_bn_gamma_abs_mean(nn.Conv2d(4, 4, 3))
    ident.bn = nn.BatchNorm2d(6, affine=False)
    with pytest.raises(ValueError, match="no last BN"):
        last_bn_gamma_abs_mean(ident)


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
    init = {"gamma_init": 0.01, "conv_init": kaiming_fan_out}
    outer = RepBlock.from_conv(nn.Conv2d(8, 8, 3, padding=1, bias=False))
    for k in NON_KXK:
        outer.add_branch(k, **init)
    inner = RepBlock.from_conv(outer.kxk.conv)
    outer.kxk.conv = inner
    for k in eligible_kinds(inner)[1:]:
        inner.add_branch(k, **init)
    conv2 = outer.branches["1x1-kxk"].conv2
    inner2 = RepBlock.from_conv(conv2)
    outer.branches["1x1-kxk"].conv2 = inner2
    kept, skipped = eligible_branches(inner2, BRANCH_KINDS)
    assert kept == ["1x1-kxk", "1x1-avg"] and "identity" in skipped
    for k in kept:
        inner2.add_branch(k, **init)
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
    block.add_branch("1x1", gamma_init=0.01, conv_init=kaiming_fan_out)
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
