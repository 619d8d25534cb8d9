"""Model surgery: conv→BN pairs, candidates, expand (nested too), collapse, deploy to the exact origin
architecture (DESIGN.md "Models": deployed.pt loads into the origin constructor with strict=True)."""

import json

import pytest
import torch
import torch.fx
import torch.nn as nn

from repsearch.rep import (
    BRANCH_KINDS,
    RepBlock,
    apply_structure,
    candidate_convs,
    collapse,
    conv_bn_pairs,
    count_branches,
    deploy,
    expand,
    fuse_blocks,
    get_module,
    kaiming_fan_out,
    nesting_depth,
    repblocks,
    set_module,
    structure,
)
from equivalence import assert_close, randomize_bns






class TinyNet(nn.Module):
    """3 × conv-BN-ReLU (the last one stride 2, the first 3 -> c channels), pool, linear."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class Residual(nn.Module):
    """A BasicBlock-like module: attributes, not a Sequential; a 1x1 shortcut conv + BN."""

    def __init__(self, c=8, branchy=False):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.short = nn.Conv2d(c, c, 1, bias=False)
        self.bn_short = nn.BatchNorm2d(c)
        self.branchy = branchy

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        if self.branchy and y.sum() > 0:  # data-dependent control flow: fx cannot trace this
            y = y * 1.0
        return torch.relu(self.bn2(self.conv2(y)) + self.bn_short(self.short(x)))


def grown_tinynet(seed=0, gamma_init=1.0, conv_init=kaiming_fan_out):
    """TinyNet with every candidate conv expanded to the DyRep space, plus two nested blocks."""
    torch.manual_seed(seed)
    model = TinyNet()
    for path in list(candidate_convs(model)):
        expand(model, path, BRANCH_KINDS, gamma_init=gamma_init, conv_init=kaiming_fan_out)
    expand(model, "features.3.branches.kxk.conv", BRANCH_KINDS, gamma_init=gamma_init, conv_init=kaiming_fan_out)
    expand(model, "features.6.branches.1x1-kxk.conv2", BRANCH_KINDS, gamma_init=gamma_init, conv_init=kaiming_fan_out)
    randomize_bns(model)
    return model.eval()


def test_get_set_module():
    model = TinyNet()
    assert get_module(model, "features.0") is model.features[0]
    assert get_module(model, "") is model
    new = nn.Conv2d(3, 8, 3, padding=1)
    set_module(model, "features.0", new)
    assert model.features[0] is new
    with pytest.raises(KeyError):
        get_module(model, "features.42")
    with pytest.raises(KeyError):
        set_module(model, "nothing.here", new)


def test_conv_bn_pairs_fx_and_fallback():
    model = TinyNet()
    expected = [("features.0", "features.1"), ("features.3", "features.4"), ("features.6", "features.7")]
    assert conv_bn_pairs(model) == expected
    expand(model, "features.3", ["1x1"], gamma_init=0.01, conv_init=kaiming_fan_out)
    assert conv_bn_pairs(model) == expected  # a RepBlock pairs like the conv it replaced
    res = Residual()
    assert set(conv_bn_pairs(res)) == {("conv1", "bn1"), ("conv2", "bn2"), ("short", "bn_short")}
    branchy = Residual(branchy=True)  # not traceable: registration order
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(branchy)
    expand(branchy, "conv2", ["1x1"], gamma_init=0.01, conv_init=kaiming_fan_out)
    assert set(conv_bn_pairs(branchy)) == {("conv1", "bn1"), ("conv2", "bn2"), ("short", "bn_short")}
    # a conv whose output goes elsewhere than a BN is not paired
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    assert conv_bn_pairs(seq) == []


def test_candidates_and_depth():
    torch.manual_seed(0)
    model = TinyNet()
    assert list(candidate_convs(model)) == ["features.0", "features.3", "features.6"]
    block, added, skipped = expand(
        model, "features.3", ["1x1", "1x1-kxk", "identity"], gamma_init=0.01, conv_init=kaiming_fan_out
    )
    assert isinstance(model.features[3], RepBlock) and block is model.features[3]
    assert added == ("1x1", "1x1-kxk", "identity") and skipped == {}
    cands = candidate_convs(model)
    assert list(cands) == [
        "features.0",
        "features.3.branches.kxk.conv",
        "features.3.branches.1x1-kxk.conv2",
        "features.6",
    ]
    assert list(candidate_convs(model, max_depth=1)) == ["features.0", "features.6"]
    assert nesting_depth(model, "features.3") == 0
    assert nesting_depth(model, "features.3.branches.1x1-kxk.conv2") == 1
    expand(model, "features.3.branches.kxk.conv", ["1x1"], gamma_init=0.01, conv_init=kaiming_fan_out)
    assert nesting_depth(model, "features.3.branches.kxk.conv.branches.kxk.conv") == 2
    assert "features.3.branches.kxk.conv.branches.kxk.conv" not in candidate_convs(model)
    assert "features.3.branches.kxk.conv.branches.kxk.conv" in candidate_convs(model, max_depth=3)
    # 1x1 and dilated convs are never candidates
    odd = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.Conv2d(4, 4, 3))
    assert list(candidate_convs(odd)) == ["2"]
    blocks = repblocks(model, deepest_first=True)
    assert list(blocks) == ["features.3.branches.kxk.conv", "features.3"]
    assert list(repblocks(model)) == ["features.3", "features.3.branches.kxk.conv"]


def test_expand_skips_ineligible_and_re_expands():
    model = TinyNet()
    block, added, skipped = expand(model, "features.6", BRANCH_KINDS, gamma_init=0.01, conv_init=kaiming_fan_out)
    assert "identity" in skipped and "identity" not in added
    assert added == ("1x1", "1x1-kxk", "1x1-avg", "1xk", "kx1")
    _, added0, skipped0 = expand(model, "features.0", ["identity", "1x1"], gamma_init=0.01, conv_init=kaiming_fan_out)
    assert added0 == ("1x1",) and "C_in" in skipped0["identity"]
    # re-expanding an existing block adds only what is missing
    block.remove_branches(["1xk", "1x1"])
    again, added2, skipped2 = expand(model, "features.6", ["1x1", "kx1"], gamma_init=0.01, conv_init=kaiming_fan_out)
    assert again is block and added2 == ("1x1",) and skipped2 == {"kx1": "already present"}
    with pytest.raises(TypeError):
        expand(model, "features.1", ["1x1"], gamma_init=0.01, conv_init=kaiming_fan_out)
    with pytest.raises(ValueError, match="not one of"):
        expand(model, "features.3", ["1x2"], gamma_init=0.01, conv_init=kaiming_fan_out)


def test_expand_and_apply_structure_need_gamma_init():
    """No DyRep default in rep/: gamma_init is a required keyword; the model is left untouched."""
    model = TinyNet()
    with pytest.raises(TypeError, match="gamma_init"):
        expand(model, "features.3", ["1x1"])
    with pytest.raises(TypeError, match="gamma_init"):
        expand(model, "features.3", ["1x1"], conv_init=kaiming_fan_out)
    with pytest.raises(TypeError):
        expand(model, "features.3", ["1x1"], 0.01)  # keyword-only
    assert isinstance(model.features[3], nn.Conv2d)
    grown = TinyNet()
    expand(grown, "features.3", ["1x1"], gamma_init=1.0)
    with pytest.raises(TypeError, match="gamma_init"):
        apply_structure(model, structure(grown))
    assert isinstance(model.features[3], nn.Conv2d)


def test_expand_conv_init():
    """conv_init reaches every new conv (nested and in 1x1-kxk); None keeps PyTorch's init."""
    calls = []

    def const(conv):
        calls.append(conv)
        conv.weight.fill_(-0.5)

    model = TinyNet()
    origin_weight = model.features[3].weight.detach().clone()
    block, added, _ = expand(model, "features.3", BRANCH_KINDS, gamma_init=0.2, conv_init=const)
    new_convs = [m for k in added for m in block.branches[k].modules() if isinstance(m, nn.Conv2d)]
    assert len(calls) == len(new_convs) == 6  # 1x1, 1x1-kxk (2), 1x1-avg, 1xk, kx1; identity has none
    assert all(torch.all(c.weight == -0.5) for c in new_convs)
    assert torch.equal(block.kxk.conv.weight, origin_weight)
    assert all(torch.all(block.branches[k].last_bn.weight == 0.2) for k in added)
    # conv_init=None (the default): PyTorch's nn.Conv2d init, same values and RNG draws
    torch.manual_seed(3)
    model = TinyNet()
    expand(model, "features.0", ["1x1"], gamma_init=1.0)
    torch.manual_seed(3)
    TinyNet()  # the same RNG draws as the model above
    ref = nn.Conv2d(3, 8, 1, bias=False)
    assert torch.equal(model.features[0].branches["1x1"].conv.weight, ref.weight)
    # apply_structure passes both through
    calls.clear()
    rebuilt = apply_structure(TinyNet(), structure(model), gamma_init=0.3, conv_init=const)
    assert len(calls) == 1 and torch.all(rebuilt.features[0].branches["1x1"].conv.weight == -0.5)
    assert torch.all(rebuilt.features[0].branches["1x1"].last_bn.weight == 0.3)


def test_expand_with_compensation_keeps_output():
    torch.manual_seed(1)
    model = TinyNet()
    randomize_bns(model)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    y0 = model(x)
    expand(model, "features.3", BRANCH_KINDS, gamma_init=0.5, conv_init=kaiming_fan_out, compensate=True)
    assert_close(model(x), y0)
    expand(
        model, "features.3.branches.1x1-kxk.conv2", BRANCH_KINDS, gamma_init=0.5, conv_init=kaiming_fan_out,
        compensate=True,
    )
    assert_close(model(x), y0)


def test_deploy_is_origin_architecture_and_equivalent():
    model = grown_tinynet()
    assert nesting_depth(model, "features.3.branches.kxk.conv.branches.1x1.conv") == 2
    x = torch.randn(3, 3, 9, 9)
    y = model(x)
    deployed = deploy(model)
    assert not any(isinstance(m, RepBlock) for m in deployed.modules())
    assert any(isinstance(m, RepBlock) for m in model.modules())  # the input is untouched
    origin = TinyNet()
    ref_sd, dep_sd = origin.state_dict(), deployed.state_dict()
    assert list(dep_sd) == list(ref_sd)
    assert all(dep_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    origin.load_state_dict(dep_sd, strict=True)
    origin.eval()
    assert_close(deployed(x), y)
    assert_close(origin(x), y)
    # fuse_blocks keeps the biases instead
    fused = fuse_blocks(model)
    assert all(fused.features[i].bias is not None for i in (0, 3, 6))
    assert_close(fused(x), y)


def test_deploy_plain_model_is_itself():
    torch.manual_seed(2)
    model = TinyNet()
    randomize_bns(model)
    dep = deploy(model)
    assert dep is not model
    sd, dsd = model.state_dict(), dep.state_dict()
    assert list(sd) == list(dsd) and all(torch.equal(sd[k], dsd[k]) for k in sd)


def test_deploy_bias_without_bn():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU())
    expand(model, "0", ["1x1"], gamma_init=0.01, conv_init=kaiming_fan_out)
    randomize_bns(model)
    with pytest.raises(ValueError, match="'0'"):
        deploy(model)
    # an original conv with a bias keeps it
    model_b = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=True), nn.ReLU())
    keys = list(model_b.state_dict())
    expand(model_b, "0", ["1x1", "identity"], gamma_init=0.01, conv_init=kaiming_fan_out)
    randomize_bns(model_b)
    model_b.eval()
    x = torch.randn(2, 4, 6, 6)
    dep = deploy(model_b)
    assert list(dep.state_dict()) == keys
    assert_close(dep(x), model_b(x))


def test_deploy_root_block():
    torch.manual_seed(9)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=True)
    block = RepBlock.from_conv(conv)
    block.add_branch("1x1", gamma_init=0.01, conv_init=kaiming_fan_out)
    randomize_bns(block)
    block.eval()
    x = torch.randn(2, 4, 5, 5)
    dep = deploy(block)
    assert isinstance(dep, nn.Conv2d) and list(dep.state_dict()) == ["weight", "bias"]
    assert_close(dep(x), block(x))
    assert_close(fuse_blocks(block)(x), block(x))
    with pytest.raises(ValueError, match="no BatchNorm"):
        deploy(_biased_block_without_origin_bias())


def _biased_block_without_origin_bias():
    block = RepBlock.from_conv(nn.Conv2d(4, 4, 3, padding=1, bias=False))
    with torch.no_grad():
        block.kxk.bn.bias.fill_(0.5)
    return block


def test_deploy_residual_with_fallback_pairing():
    torch.manual_seed(4)
    res = Residual(branchy=True)
    expand(res, "conv1", BRANCH_KINDS, gamma_init=1.0, conv_init=kaiming_fan_out)
    expand(res, "conv2", BRANCH_KINDS, gamma_init=1.0, conv_init=kaiming_fan_out)
    randomize_bns(res)
    res.eval()
    x = torch.randn(2, 8, 6, 6)
    dep = deploy(res)
    fresh = Residual(branchy=True)
    fresh.load_state_dict(dep.state_dict(), strict=True)
    assert_close(fresh.eval()(x), res(x))


def test_count_branches_and_structure_roundtrip():
    assert count_branches(TinyNet()) == 3
    model = TinyNet()
    expand(model, "features.3", ["1x1", "1x1-kxk"], gamma_init=0.01, conv_init=kaiming_fan_out)
    assert count_branches(model) == 2 + 3
    model = grown_tinynet(seed=5)
    # features.0: 6 (no identity); features.3: 7 + nested 7; features.6: 6 + nested 3 (padding 0)
    assert count_branches(model) == 6 + 7 + 7 + 6 + 3
    struct = json.loads(json.dumps(structure(model)))
    assert list(struct) == ["features.0", "features.3", "features.6"]
    assert struct["features.6"]["nested"]["branches.1x1-kxk.conv2"]["branches"] == ["kxk", "1x1-kxk", "1x1-avg"]
    rebuilt = apply_structure(TinyNet(), struct, gamma_init=0.01, conv_init=kaiming_fan_out)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 8, 8)
    assert_close(rebuilt.eval()(x), model(x))


def test_collapse_single_branch_blocks():
    torch.manual_seed(6)
    model = TinyNet()
    origin_weight = model.features[3].weight
    expand(model, "features.3", BRANCH_KINDS, gamma_init=1.0, conv_init=kaiming_fan_out)
    randomize_bns(model)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    y0 = model(x)
    block = model.features[3]
    with pytest.raises(ValueError, match="branches"):
        collapse(model, "features.3")
    block.remove_branches(block.kinds[1:])
    conv = collapse(model, "features.3")
    assert isinstance(conv, nn.Conv2d) and model.features[3] is conv
    assert conv.weight is origin_weight and conv.bias is None  # bias went into the following BN
    assert_close(model(x), y0)
    assert list(model.state_dict()) == list(TinyNet().state_dict())
    # nested: the outer block left with kxk alone becomes its inner block
    expand(model, "features.6", ["1x1"], gamma_init=1.0, conv_init=kaiming_fan_out)
    expand(model, "features.6.branches.kxk.conv", ["1x1", "1xk"], gamma_init=1.0, conv_init=kaiming_fan_out)
    randomize_bns(model)
    y1 = model(x)
    outer = model.features[6]
    inner = outer.kxk.conv
    outer.remove_branches(["1x1"])
    assert collapse(model, "features.6") is inner and model.features[6] is inner
    assert_close(model(x), y1)
    # a block nested in a 1x1-kxk branch folds its bias into that branch's last BN
    expand(model, "features.0", ["1x1-kxk"], gamma_init=1.0, conv_init=kaiming_fan_out)
    expand(model, "features.0.branches.1x1-kxk.conv2", ["1x1-avg"], gamma_init=1.0, conv_init=kaiming_fan_out)
    randomize_bns(model)
    y2 = model(x)
    nested = model.features[0].branches["1x1-kxk"]
    w2 = nested.conv2.kxk.conv.weight
    nested.conv2.remove_branches(["1x1-avg"])
    conv2 = collapse(model, "features.0.branches.1x1-kxk.conv2")
    assert nested.conv2 is conv2 and conv2.weight is w2 and conv2.bias is None
    assert_close(model(x), y2)
    with pytest.raises(TypeError):
        collapse(model, "features.3")


def test_deployed_state_dict_saves_with_weights_only(tmp_path):
    model = grown_tinynet(seed=7)
    dep = deploy(model)
    path = tmp_path / "deployed.pt"
    torch.save({"model": "tinynet", "kwargs": {}, "state_dict": dep.state_dict()}, path)
    blob = torch.load(path, weights_only=True)
    fresh = TinyNet()
    fresh.load_state_dict(blob["state_dict"], strict=True)
    x = torch.randn(2, 3, 8, 8)
    assert_close(fresh.eval()(x), model(x))
