"""CSLABlock (RepOpt §3.2): forward equals the conv with its equivalent kernel (several geometries,
scales of both signs, trainable and constant); surgery treats it as a block (deploy to the plain
model that loads strictly, structure, count_branches, conv→BN pairs); RepBlocks unchanged beside it."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repsearch.rep import (
    CSLABlock,
    KxkBranch,
    RepBlock,
    apply_structure,
    conv_bn_pairs,
    count_branches,
    deploy,
    expand,
    fuse_blocks,
    get_module,
    is_rep_block,
    nesting_depth,
    set_module,
    structure,
)
from repsearch.rep.surgery import _pairs_registration
from equivalence import assert_close, randomize_bns


def _random_scales(block: CSLABlock, gen: torch.Generator) -> None:
    """Scales of both signs, magnitudes in [0.2, 1.7)."""
    with torch.no_grad():
        for name in ("s", "t", "scale_identity"):
            v = getattr(block, name)
            if v is None:
                continue
            sign = torch.randint(0, 2, v.shape, generator=gen) * 2 - 1
            v.copy_((torch.rand(v.shape, generator=gen) * 1.5 + 0.2) * sign)


# (C_in, C_out, K, stride, groups)
GEOMETRIES = [
    (4, 4, 3, 1, 1),
    (3, 8, 3, 1, 1),
    (6, 6, 3, 2, 1),
    (5, 7, 3, 2, 1),
    (8, 8, 3, 1, 2),
    (6, 12, 3, 2, 3),
    (4, 4, 5, 1, 1),
    (4, 4, 1, 1, 1),
]


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_forward_equals_equivalent_kernel(geom, trainable):
    cin, cout, k, stride, groups = geom
    gen = torch.Generator().manual_seed(hash(geom) % 1000)
    torch.manual_seed(0)
    block = CSLABlock(cin, cout, k, stride, k // 2, groups, scale_init=0.5, trainable_scales=trainable)
    _random_scales(block, gen)
    assert block.has_identity == (cin == cout and stride == 1)
    for mode in (True, False):  # no BN inside: train and eval mode are the same function
        block.train(mode)
        x = torch.randn(2, cin, 9, 9, generator=gen)
        w, b = block.equivalent_kernel()
        assert w.shape == (cout, cin // groups, k, k) and b.shape == (cout,)
        assert not b.any()
        assert_close(F.conv2d(x, w, b, stride, k // 2, 1, groups), block(x))


def test_identity_can_be_left_out_and_kernel_terms():
    torch.manual_seed(0)
    block = CSLABlock(4, 4, 3, scale_init=1.0, trainable_scales=False, identity=False)
    assert not block.has_identity and block.kinds == ("kxk", "1x1")
    # W = s·W3 + t·pad(W1) (+ diag(scale_identity)) term by term
    b2 = CSLABlock(4, 4, 3, scale_init=1.0, identity_init=0.7, trainable_scales=False)
    with torch.no_grad():
        b2.conv.weight.zero_()
        b2.conv_1x1.weight.zero_()
    w, _ = b2.equivalent_kernel()
    expected = torch.zeros(4, 4, 3, 3)
    expected[range(4), range(4), 1, 1] = 0.7
    assert torch.equal(w, expected)


def test_scales_parameters_or_buffers():
    hs = CSLABlock(4, 4, 3, scale_init=2.0, trainable_scales=True)
    names = {n for n, _ in hs.named_parameters()}
    assert names == {"s", "t", "scale_identity", "conv.weight", "conv_1x1.weight"}
    const = CSLABlock(4, 4, 3, scale_init=2.0, trainable_scales=False)
    assert {n for n, _ in const.named_parameters()} == {"scale_identity", "conv.weight", "conv_1x1.weight"}
    assert {n for n, _ in const.named_buffers()} == {"s", "t"}
    assert set(const.state_dict()) == names  # constants are saved too
    assert torch.equal(const.s, torch.full((4,), 2.0)) and torch.equal(const.scale_identity, torch.ones(4))
    no_id = CSLABlock(4, 8, 3, 2, scale_init=1.0, trainable_scales=True)
    assert no_id.scale_identity is None and "scale_identity" not in no_id.state_dict()


def test_equivalent_kernel_is_differentiable():
    torch.manual_seed(0)
    block = CSLABlock(4, 4, 3, scale_init=0.8, trainable_scales=True)
    r = torch.randn(4, 4, 3, 3)
    (block.equivalent_kernel()[0] * r).sum().backward()
    # d/ds_c Σ W⊙R = Σ W3[c]⊙R[c];  d/dt_c = Σ W1[c]⊙R[c, :, centre];  d/dscale_id_c = R[c, c, centre]
    assert torch.allclose(block.s.grad, (block.conv.weight * r).sum((1, 2, 3)), atol=1e-6)
    assert torch.allclose(block.t.grad, (block.conv_1x1.weight[:, :, 0, 0] * r[:, :, 1, 1]).sum(1), atol=1e-6)
    assert torch.allclose(block.scale_identity.grad, r[range(4), range(4), 1, 1])
    assert torch.allclose(block.conv.weight.grad, r * block.s.view(-1, 1, 1, 1).detach())


def test_from_conv_geometry_and_errors():
    conv = nn.Conv2d(6, 6, 3, stride=1, padding=1, groups=2, bias=True).double().eval()
    block = CSLABlock.from_conv(conv, scale_init=1.5, trainable_scales=False)
    assert block.geometry() == (6, 6, 3, 1, 1, 2) and block.origin_bias and not block.training
    assert block.conv.weight.dtype == torch.float64 and block.conv.weight is not conv.weight
    assert torch.equal(block.t, torch.full((6,), 1.5, dtype=torch.float64))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        CSLABlock.from_conv(nn.Linear(3, 3), scale_init=1.0, trainable_scales=False)
    with pytest.raises(ValueError, match="1x1 needs padding"):
        CSLABlock.from_conv(nn.Conv2d(4, 4, 3, padding=0), scale_init=1.0, trainable_scales=False)
    with pytest.raises(ValueError, match="odd kernel"):
        CSLABlock.from_conv(nn.Conv2d(4, 4, 2, padding=1), scale_init=1.0, trainable_scales=False)
    with pytest.raises(ValueError, match="groups"):
        CSLABlock(4, 6, 3, groups=4, scale_init=1.0, trainable_scales=False)


@pytest.mark.parametrize("origin_bias", [False, True])
def test_fuse_scales_describe(origin_bias):
    torch.manual_seed(0)
    block = CSLABlock(4, 4, 3, scale_init=0.9, trainable_scales=True, origin_bias=origin_bias)
    _random_scales(block, torch.Generator().manual_seed(1))
    conv = block.fuse()
    assert isinstance(conv, nn.Conv2d) and (conv.bias is not None) == origin_bias
    x = torch.randn(2, 4, 6, 6)
    assert_close(conv(x), block(x))
    sc = block.scales()
    assert set(sc) == {"s", "t", "identity"} and sc["identity"].shape == (4,)
    sc["s"].zero_()  # a detached copy
    assert block.s.abs().min() > 0 and not sc["s"].requires_grad
    assert CSLABlock(4, 8, 3, 2, scale_init=1.0, trainable_scales=False).scales()["identity"] is None
    d = json.loads(json.dumps(block.describe()))
    assert d["type"] == "CSLABlock" and d["branches"] == ["kxk", "1x1", "identity"]
    assert (d["in_channels"], d["out_channels"], d["kernel_size"], d["stride"], d["origin_bias"]) == (4, 4, 3, 1, origin_bias)


# ------------------------------------------------------------------ surgery
class Plain(nn.Module):
    """conv-BN-ReLU ×3 (3→c, c→c, c→2c stride 2), pool, linear; ``bias`` on the second conv."""

    def __init__(self, c=6, bias=False):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1, bias=bias), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
        )
        self.fc = nn.Linear(2 * c, 5)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def _csla_model(bias=False, trainable=False):
    torch.manual_seed(0)
    model = Plain(bias=bias)
    gen = torch.Generator().manual_seed(3)
    for path in ("features.3", "features.6"):
        block = CSLABlock.from_conv(get_module(model, path), scale_init=0.7, trainable_scales=trainable)
        _random_scales(block, gen)
        set_module(model, path, block)
    randomize_bns(model, gen)
    return model.eval()


def test_is_rep_block():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    assert is_rep_block(CSLABlock.from_conv(conv, scale_init=1.0, trainable_scales=False))
    assert is_rep_block(RepBlock.from_conv(conv))
    assert not is_rep_block(conv)
    assert not is_rep_block(RepBlock.from_conv(conv).kxk) and isinstance(RepBlock.from_conv(conv).kxk, KxkBranch)
    assert not is_rep_block(nn.Sequential(conv))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("trainable", [False, True])
def test_deploy_equals_model_and_loads_strictly(bias, trainable):
    model = _csla_model(bias=bias, trainable=trainable)
    x = torch.randn(3, 3, 10, 10)
    ref = model(x)
    dep = deploy(model)
    assert not any(isinstance(m, CSLABlock) for m in dep.modules())
    assert_close(dep(x), ref)
    fresh = Plain(bias=bias)
    fresh.load_state_dict(dep.state_dict(), strict=True)
    assert_close(fresh.eval()(x), ref)
    assert_close(fuse_blocks(model)(x), ref)
    assert isinstance(get_module(model, "features.3"), CSLABlock)  # deploy copies


def test_deploy_mixed_with_repblock():
    """A RepBlock beside CSLA blocks deploys as before (its bias folded into the following BN)."""
    model = _csla_model()
    expand(model, "features.0", ["1x1", "1x1-kxk", "1x1-avg"], gamma_init=0.5)
    randomize_bns(model, torch.Generator().manual_seed(5))
    model.eval()
    x = torch.randn(3, 3, 10, 10)
    dep = deploy(model)
    assert_close(dep(x), model(x))
    Plain().load_state_dict(dep.state_dict(), strict=True)
    assert count_branches(model) == 4 + 3 + 2
    assert set(structure(model)) == {"features.0", "features.3", "features.6"}


def test_structure_count_pairs_depth():
    model = _csla_model()
    assert count_branches(Plain()) == 3
    assert count_branches(model) == 1 + 3 + 2  # plain conv, CSLA with identity, CSLA stride 2
    struct = json.loads(json.dumps(structure(model)))
    assert list(struct) == ["features.3", "features.6"]
    assert struct["features.3"]["branches"] == ["kxk", "1x1", "identity"]
    assert struct["features.6"]["branches"] == ["kxk", "1x1"] and struct["features.6"]["type"] == "CSLABlock"
    pairs = [("features.0", "features.1"), ("features.3", "features.4"), ("features.6", "features.7")]
    assert conv_bn_pairs(model) == pairs
    assert _pairs_registration(model) == pairs
    assert nesting_depth(model, "features.3.conv") == 1 and nesting_depth(model, "features.3") == 0
    with pytest.raises(ValueError, match="RepBlocks only"):
        apply_structure(Plain(), struct, gamma_init=1.0)
