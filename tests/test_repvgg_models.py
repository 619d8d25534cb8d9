"""Tests of repsearch.models.repvgg: RepVGG / RepOpt-VGG plain bodies and RepAn's CIFAR variants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from equivalence import assert_close, randomize_bns
from repsearch.measures import count_macs
from repsearch.models import MODELS, build_model, check_model_options, model_kwargs
from repsearch.models.repvgg import BlockInfo, ConvBNReLU, RepVGG
from repsearch.rep import conv_bn_pairs, deploy, expand

IMAGENET = ["repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1", "repvgg_b2", "repvgg_b3", "repvgg_l1", "repvgg_l2"]
REPAN = ["repan_repvgg_a0", "repan_repvgg_a1", "repan_repvgg_a2", "repan_repvgg_b0", "repan_repvgg_b1", "repan_repvgg_b2", "repan_repvgg_b3"]

# Stage depths d1..d4 and (a, b) from RepVGG Table 2 / RepOpt Table 1 (L1/L2: main_repopt.py of
# DingXiaoH/RepOptimizers: L1 = B1 widths, L2 = B2 widths).
PAPER_CFG = {
    "repvgg_a0": ((2, 4, 14, 1), 0.75, 2.5), "repvgg_a1": ((2, 4, 14, 1), 1, 2.5),
    "repvgg_a2": ((2, 4, 14, 1), 1.5, 2.75), "repvgg_b0": ((4, 6, 16, 1), 1, 2.5),
    "repvgg_b1": ((4, 6, 16, 1), 2, 4), "repvgg_b2": ((4, 6, 16, 1), 2.5, 5),
    "repvgg_b3": ((4, 6, 16, 1), 3, 5), "repvgg_l1": ((8, 14, 24, 1), 2, 4),
    "repvgg_l2": ((8, 14, 24, 1), 2.5, 5),
}

# Deployed-model parameters (conv with bias, no BN) for 1000 classes: RepVGG paper's table in M with
# 2 decimals, RepOpt Table 1 in M with 1 decimal (L1/L2). The tables truncate rather than round
# (A0: 8,309,384 parameters is printed "8.30"), so the check is on the truncated value.
PAPER_PARAMS = {
    "repvgg_a0": (8.30, 2), "repvgg_a1": (12.78, 2), "repvgg_a2": (25.49, 2), "repvgg_b0": (14.33, 2),
    "repvgg_b1": (51.82, 2), "repvgg_b2": (80.31, 2), "repvgg_b3": (110.96, 2),
    "repvgg_l1": (76.0, 1), "repvgg_l2": (118.1, 1),
}


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_params_match_paper_tables(name):
    with torch.device("meta"):  # no memory, no init cost
        model = build_model(name, num_classes=1000)
    convs = _convs(model)
    deployed = sum(c.weight.numel() + c.out_channels for c in convs) + sum(p.numel() for p in model.linear.parameters())
    value, decimals = PAPER_PARAMS[name]
    scale = 10 ** (6 - decimals)
    assert deployed // scale == round(value * 10**decimals)
    # widths / strides as the paper's formula
    depths, a, b = PAPER_CFG[name]
    stage_widths = [min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b)]
    expected = [(3, stage_widths[0], 2)]
    c_in = stage_widths[0]
    for s, d in enumerate(depths, start=1):
        for i in range(d):
            expected.append((c_in, stage_widths[s], 2 if i == 0 else 1))
            c_in = stage_widths[s]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == expected
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None for c in convs)
    assert model.linear.in_features == stage_widths[-1] and model.linear.out_features == 1000


def test_forward_shapes_cifar_and_imagenet():
    for stem_stride, spatial in ((1, 2), (2, 1)):
        model = build_model("repvgg_a0", num_classes=10, width=0.125, stem_stride=stem_stride).eval()
        feats = []
        model.stage4.register_forward_hook(lambda mod, inp, out: feats.append(out.shape))
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        assert feats[0][-2:] == (spatial, spatial)
        assert model.stage0.conv.stride == (stem_stride, stem_stride)
    with torch.device("meta"):
        model = build_model("repvgg_a0", num_classes=1000).eval()
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
        assert model.stage4(model.stage3(model.stage2(model.stage1(model.stage0(torch.zeros(1, 3, 224, 224)))))).shape[-2:] == (7, 7)


def test_width_multiplier_after_a_b():
    model = build_model("repvgg_b1", width=0.3, stem_stride=1)
    # B1: stem 64, stages 128, 256, 512, 2048 -> max(1, round(c * 0.3))
    assert model.channels == (19, 38, 77, 154, 614)
    assert model.stage0.conv.out_channels == 19 and model.stage4[0].conv.out_channels == 614
    assert model.linear.in_features == 614


@pytest.mark.parametrize("name", ["repvgg_a0", "repvgg_b0", "repan_repvgg_a1"])
def test_blocks_layout(name):
    model = build_model(name, width=0.125)
    blocks = model.blocks()
    assert all(isinstance(b, BlockInfo) for b in blocks)
    assert blocks[0] == BlockInfo("stage0", 0, 0, False)
    assert [sum(b.stage == s for b in blocks) for s in range(model.num_stages)] == list(model.depths)
    assert len(blocks) == sum(model.depths) == len(_convs(model))
    pairs = []
    prev = None
    for b in blocks:
        unit = model.get_submodule(b.path)
        assert isinstance(unit, ConvBNReLU)
        conv, bn = model.get_submodule(f"{b.path}.conv"), model.get_submodule(f"{b.path}.bn")
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        assert b.has_identity == (conv.in_channels == conv.out_channels and conv.stride == (1, 1))
        if prev is not None:
            assert (b.stage, b.index) == ((prev.stage, prev.index + 1) if b.stage == prev.stage else (prev.stage + 1, 0))
        assert b.path == ("stage0" if b.stage == 0 else f"stage{b.stage}.{b.index}")
        pairs.append((f"{b.path}.conv", f"{b.path}.bn"))
        prev = b
    assert conv_bn_pairs(model) == pairs
    # every non-first unit of a stage has an identity; the ImageNet first units (stride 2) never do
    assert all(b.has_identity for b in blocks if b.index > 0)
    if name.startswith("repvgg"):
        assert not any(b.has_identity for b in blocks if b.index == 0)
    else:  # RepAn: stage 1 starts with stride 1 and C_in = C_out
        assert [b.has_identity for b in blocks if b.index == 0] == [False, True, False, False, False]


def test_bn_init_and_model_kwargs_roundtrip():
    model = build_model("repvgg_a1", num_classes=7, width=0.25, stem_stride=1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    kwargs = model_kwargs("repvgg_a1", 7, 0.25, stem_stride=1)
    assert kwargs == {"num_classes": 7, "width": 0.25, "stem_stride": 1}
    assert model_kwargs("repvgg_a1", 7, 0.25)["stem_stride"] == 2  # default filled in
    rebuilt = build_model("repvgg_a1", **kwargs)
    sd, sd2 = model.state_dict(), rebuilt.state_dict()
    assert list(sd) == list(sd2) and all(sd[k].shape == sd2[k].shape for k in sd)
    rebuilt.load_state_dict(sd, strict=True)
    # the default stem stride builds a different (stride-2) stem
    assert build_model("repvgg_a1", num_classes=7, width=0.25).stage0.conv.stride == (2, 2)
    assert model_kwargs("repan_repvgg_b1", 100) == {"num_classes": 100, "width": 1.0}


def test_option_errors_are_one_line_value_errors():
    for call in (
        lambda: check_model_options("repvgg_a0", {"stem_stride": 3}),
        lambda: model_kwargs("repvgg_a0", 10, stem_stride=4),
        lambda: model_kwargs("repvgg_a0", 10, stem=1),
        lambda: model_kwargs("repan_repvgg_a0", 10, stem_stride=1),
        lambda: build_model("repvgg_a0", stem_stride=3),
        lambda: build_model("repvgg_a0", stem_stride=True),
        lambda: RepVGG((2, 1), (8, 8), (1, 1)),
    ):
        with pytest.raises(ValueError) as info:
            call()
        msg = str(info.value)
        assert "\n" not in msg and msg
    with pytest.raises(ValueError, match="stem_stride"):
        build_model("repvgg_a0", stem_stride=3)
    with pytest.raises(ValueError, match="allowed keys: name, width, stem_stride"):
        model_kwargs("repvgg_a0", 10, stem=1)


# xfey/RepAn net/repvgg_cifar.py, functions RepVGG_A0 ... RepVGG_B3: PostRepVGG(filter_depth,
# filter_list, stride, width_factor); channels: stem min(16, 16 * wf[0]), others int(filter_list[i] * wf[i]).
REPAN_OFFICIAL = {
    "repan_repvgg_a0": ([1, 2, 4, 14, 1], [16, 16, 32, 64, 64], [1, 1, 2, 2, 1], [0.75] * 4 + [2.5]),
    "repan_repvgg_a1": ([1, 2, 4, 14, 1], [16, 16, 32, 64, 64], [1, 1, 2, 2, 1], [1] * 4 + [2.5]),
    "repan_repvgg_a2": ([1, 2, 4, 14, 1], [16, 16, 32, 64, 64], [1, 1, 2, 2, 1], [1.5] * 4 + [2.75]),
    "repan_repvgg_b0": ([1, 4, 6, 16, 1], [16, 16, 32, 64, 64], [1, 1, 2, 2, 1], [1] * 4 + [2.5]),
    "repan_repvgg_b1": ([1, 4, 6, 16, 1], [16, 16, 32, 64, 64], [1, 1, 2, 2, 1], [2] * 4 + [4]),
    "repan_repvgg_b2": ([1, 4, 6, 16, 1], [16, 16, 32, 64, 64], [1, 1, 2, 2, 1], [2.5] * 4 + [5]),
    "repan_repvgg_b3": ([1, 4, 6, 16, 1], [16, 16, 32, 64, 64], [1, 1, 2, 2, 1], [3] * 4 + [5]),
}


@pytest.mark.parametrize("name", REPAN)
def test_repan_variants_match_official_file(name):
    depths, filters, strides, wf = REPAN_OFFICIAL[name]
    widths = [int(min(16, 16 * wf[0]))] + [int(filters[i] * wf[i]) for i in range(1, 5)]
    expected, c_in = [], 3
    for s in range(5):
        for i in range(depths[s]):
            expected.append((c_in, widths[s], strides[s] if i == 0 else 1))
            c_in = widths[s]
    model = build_model(name, num_classes=100)
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in _convs(model)] == expected
    assert model.linear.in_features == widths[-1] and model.linear.out_features == 100
    assert model.num_stages == 5 and model.depths == tuple(depths)
    if name == "repan_repvgg_a1":
        assert widths == [16, 16, 32, 64, 160]  # the widths the RepAn supplementary's A1 quotes


def test_macs_counted_by_measures():
    model = build_model("repan_repvgg_a0", width=0.5)
    # analytic: each 3x3 conv C_in*C_out*9 per output pixel, plus the linear layer
    size, expected = 32, 0
    for c in _convs(model):
        size = (size - 1) // c.stride[0] + 1
        expected += c.in_channels * c.out_channels * 9 * size * size
    expected += model.linear.in_features * model.linear.out_features
    assert count_macs(model) == expected
    model2 = build_model("repvgg_a0", width=0.125, stem_stride=2)
    assert count_macs(model2, (1, 3, 64, 64)) > count_macs(model2) > 0


@pytest.mark.parametrize("name,options", [("repvgg_a0", {"stem_stride": 1}), ("repvgg_b0", {"stem_stride": 2}), ("repan_repvgg_a1", {})])
def test_deploy_equivalence_with_repvgg_space(name, options):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, width=0.125, **options)
    before = model.blocks()
    n_branches = 0
    for b in before:
        block, added, skipped = expand(model, f"{b.path}.conv", ["1x1", "identity"], gamma_init=1.0)
        assert ("identity" in added) == b.has_identity  # the space's own eligibility agrees with BlockInfo
        n_branches += len(added)
    assert model.blocks() == before  # still valid once the convs are RepBlocks
    assert any(b.has_identity for b in before) and n_branches > len(before)
    randomize_bns(model, torch.Generator().manual_seed(1))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        plain = deploy(model).eval()
        assert_close(plain(x), ref)
    fresh = build_model(name, **model_kwargs(name, 10, 0.125, **options))
    fresh.load_state_dict(plain.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert_close(fresh(x), ref)


def test_registered_names():
    assert set(IMAGENET) | set(REPAN) <= set(MODELS)
