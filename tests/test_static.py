"""``static`` baselines: the RepVGG form with the model's BN absorbed into the kxk branch
(``post_bn: absorb``, RepOpt's RepVGG baseline) vs the DBB form that keeps it (``keep``)."""

import torch
from torch import nn

from equivalence import assert_close, randomize_bns
from repsearch.methods.static import Static, StaticSpec
from repsearch.models import build_model
from repsearch.rep import RepBlock, conv_bn_pairs, count_branches


def _prepared(post_bn: str, space="repvgg", seed=0):
    torch.manual_seed(seed)
    plain = build_model("vgg16", width=1 / 16)
    method = Static(StaticSpec(space=space, post_bn=post_bn))
    return method, method.prepare(plain, [])


def test_absorb_moves_the_model_bn_into_the_kxk_branch():
    method, model = _prepared("absorb")
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, RepBlock)]
    assert len(blocks) == 13 and len(method.absorbed) == 13
    for conv_path, bn_path in method.absorbed.items():
        assert isinstance(model.get_submodule(bn_path), nn.Identity)  # nothing normalises the sum
        block = model.get_submodule(conv_path)
        assert isinstance(block.kxk.bn, nn.BatchNorm2d)
    # no BN is left after any block: a block's output goes straight to ReLU
    assert conv_bn_pairs(model) == []
    _, kept = _prepared("keep")
    assert len(conv_bn_pairs(kept)) == 13
    # the same branches in both forms; absorb has 13 BNs fewer
    n_bn = lambda m: sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    assert n_bn(kept) - n_bn(model) == 13 and count_branches(kept) == count_branches(model)


def test_absorb_training_forward_is_relu_of_sum_of_branch_bns():
    """Train mode: the first layer's output is ReLU(BN3(conv3 x) + BN1(conv1 x)) (no post-sum BN)."""
    _, model = _prepared("absorb")
    x = torch.randn(4, 3, 32, 32)
    block = model.features[0]
    ref = torch.relu(block.branches["kxk"](x) + block.branches["1x1"](x))
    out = model.features[2](model.features[1](block(x)))
    assert torch.equal(out, ref)


def test_absorb_deploys_exactly_and_loads_strictly():
    for space in ("repvgg", "dbb"):
        method, model = _prepared("absorb", space=space, seed=1)
        g = torch.Generator().manual_seed(3)
        randomize_bns(model, g)
        model.eval()
        x = torch.randn(8, 3, 32, 32, generator=g)
        deployed = method.deploy(model).eval()
        assert not any(isinstance(m, RepBlock) for m in deployed.modules())
        fresh = build_model("vgg16", width=1 / 16)
        fresh.load_state_dict(deployed.state_dict(), strict=True)
        fresh.eval()
        with torch.no_grad():
            assert_close(fresh(x), model(x))


def test_keep_is_still_the_default_and_deploys():
    assert StaticSpec().post_bn == "keep"
    method, model = _prepared("keep", seed=2)
    randomize_bns(model, torch.Generator().manual_seed(0))
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert_close(method.deploy(model).eval()(x), model(x))


def test_absorbed_paths_survive_the_method_state():
    method, _ = _prepared("absorb")
    other = Static(StaticSpec(space="repvgg", post_bn="absorb"))
    other.load_state_dict(method.state_dict())
    assert other.absorbed == method.absorbed
