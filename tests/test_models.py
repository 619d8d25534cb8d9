"""Tests of repsearch.models: VGG-16 (CIFAR) exact size, width multiplier, ResNets, registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from repsearch.measures import count_macs, count_params
from repsearch.models import MODELS, build_model, model_names
from repsearch.models.vgg import VGG16_CFG


def test_vgg16_exact_params_and_macs():
    model = build_model("vgg16", num_classes=10)
    assert count_params(model) == 14_986_698
    macs = count_macs(model)
    assert macs == 313_463_808  # 313.5 M (DyRep Table 2: 313 M)
    assert round(macs / 1e6, 1) == 313.5
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_vgg16_structure_conv_bn_pairs():
    model = build_model("vgg16", num_classes=100)
    layers = list(model.features)
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    for i in convs:
        conv, bn = layers[i], layers[i + 1]
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels
        assert conv.bias is None and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    pools = [m for m in layers if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5 and pools[-1].stride == 1 and pools[-1].kernel_size == 2
    assert [m.out_features for m in model.classifier if isinstance(m, nn.Linear)] == [512, 100]


@pytest.mark.parametrize("width", [0.25, 0.3, 1.5])
def test_vgg16_width_multiplier(width):
    model = build_model("vgg16", num_classes=10, width=width)
    widths = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]
    assert widths == [max(1, round(c * width)) for c in VGG16_CFG if c != "M"]
    hidden = model.classifier[0]
    assert hidden.in_features == widths[-1] and hidden.out_features == max(1, round(512 * width))
    # params by formula: convs (no bias) + BN (gamma, beta) + two linears
    c_in, expected = 3, 0
    for c in widths:
        expected += c_in * c * 9 + 2 * c
        c_in = c
    h = hidden.out_features
    expected += c_in * h + h + h * 10 + 10
    assert count_params(model) == expected
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_tiny_width_keeps_one_channel():
    model = build_model("vgg16", width=0.001)
    assert {m.out_channels for m in model.features if isinstance(m, nn.Conv2d)} == {1}


def test_resnet18_cifar_stem_and_forward():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10)
    assert count_params(model) == 11_173_962
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_width_and_bottleneck():
    half = build_model("resnet18", num_classes=7, width=0.5)
    assert half.conv1.out_channels == 32 and half.fc.in_features == 256
    assert half(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    r50 = build_model("resnet50", num_classes=10, width=0.125)
    assert r50.fc.in_features == 64 * 4
    assert r50(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_registry_errors_and_rebuild_from_artifact():
    assert {"vgg16", "resnet18", "resnet34", "resnet50"} <= set(model_names())
    assert model_names() == sorted(MODELS)
    with pytest.raises(ValueError) as info:
        build_model("vgg19")
    assert "vgg16" in str(info.value) and "resnet18" in str(info.value)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_classes"):
            build_model("vgg16", num_classes=bad)
    for bad in (0, -0.5, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="width"):
            build_model("vgg16", width=bad)
    torch.manual_seed(0)
    model = build_model("vgg16", num_classes=10, width=0.25)
    artifact = {"model": "vgg16", "kwargs": {"num_classes": 10, "width": 0.25}, "state_dict": model.state_dict()}
    rebuilt = build_model(artifact["model"], **artifact["kwargs"])
    rebuilt.load_state_dict(artifact["state_dict"], strict=True)
    model.eval(), rebuilt.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), rebuilt(x))


# --------------------------------------------------------------------------- MobileNet v1, ImageNet stems


def _mobilenet_params_by_formula(width: float, num_classes: int) -> int:
    """Howard et al. Table 1: conv3x3 stem, 13 x (dw3x3 + pw1x1), each conv + BN (γ, β), one linear."""
    from repsearch.models.mobilenet import MOBILENET_V1_CFG

    c = max(1, round(32 * width))
    total = 3 * c * 9 + 2 * c
    for planes, _ in MOBILENET_V1_CFG:
        out = max(1, round(planes * width))
        total += c * 9 + 2 * c + c * out + 2 * out
        c = out
    return total + c * num_classes + num_classes


@pytest.mark.parametrize("width", [1.0, 0.25])
def test_mobilenet_v1_cifar_structure_and_size(width):
    from repsearch.rep import conv_bn_pairs

    model = build_model("mobilenet_v1", num_classes=10, width=width)
    assert count_params(model) == _mobilenet_params_by_formula(width, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 27 and all(c.bias is None for c in convs)
    assert convs[0].stride == (1, 1)  # the CIFAR stem
    depthwise = [c for c in convs if c.groups > 1]
    assert len(depthwise) == 13
    assert all(c.groups == c.in_channels == c.out_channels and c.kernel_size == (3, 3) for c in depthwise)
    assert sum(c.stride == (2, 2) for c in depthwise) == 4
    assert len(conv_bn_pairs(model)) == 27  # every conv paired with its BN by the surgery
    model.eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_mobilenet_v1_imagenet_matches_the_paper():
    """Howard et al. 2017 Table 8: MobileNet-224 1.0 has 4.2 M parameters and 569 M Mult-Adds."""
    model = build_model("mobilenet_v1", num_classes=1000, stem_stride=2)
    assert round(count_params(model) / 1e6, 1) == 4.2
    assert round(count_macs(model, (1, 3, 224, 224)) / 1e6) == 569


def test_mobilenet_v1_options_are_checked():
    from repsearch.models import check_model_options, model_kwargs

    assert model_kwargs("mobilenet_v1", 10) == {"num_classes": 10, "width": 1.0, "stem_stride": 1}
    with pytest.raises(ValueError, match="stem_stride"):
        check_model_options("mobilenet_v1", {"stem_stride": 3})
    with pytest.raises(ValueError, match="stem_stride"):
        build_model("mobilenet_v1", stem_stride=4)


def test_mobilenet_v1_dbb_expansion_deploys_exactly():
    """static with the DBB space expands the depthwise (grouped) and pointwise convs; deploy fuses
    back to the plain MobileNet, loadable strictly, equal within DESIGN.md's tolerance (random BNs)."""
    from equivalence import assert_close, randomize_bns
    from repsearch.methods.static import Static, StaticSpec
    from repsearch.rep import RepBlock

    for seed, (stem_stride, side) in enumerate([(1, 16), (2, 24)]):
        torch.manual_seed(seed)
        plain = build_model("mobilenet_v1", num_classes=10, width=0.125, stem_stride=stem_stride)
        method = Static(StaticSpec(space="dbb"))
        model = method.prepare(plain, [])
        blocks = [m for m in model.modules() if isinstance(m, RepBlock)]
        grouped = [b for b in blocks if b.groups > 1]
        assert len(grouped) == 13 and {b.stride for b in grouped} == {1, 2}
        assert all(len(b.branches) > 1 for b in grouped)  # depthwise convs got DBB branches
        g = torch.Generator().manual_seed(seed)
        randomize_bns(model, g)
        model.eval()
        x = torch.randn(3, 3, side, side, generator=g)
        fresh = build_model("mobilenet_v1", num_classes=10, width=0.125, stem_stride=stem_stride)
        fresh.load_state_dict(method.deploy(model).state_dict(), strict=True)
        fresh.eval()
        with torch.no_grad():
            assert_close(fresh(x), model(x))


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_resnet_imagenet_stem_is_torchvision(name):
    import torchvision

    torch.manual_seed(0)
    ours = build_model(name, num_classes=10, stem="imagenet")
    ref = getattr(torchvision.models, name)(num_classes=10)
    ref.load_state_dict(ours.state_dict(), strict=True)  # same names and shapes
    assert count_params(ours) == count_params(ref)
    ours.eval(), ref.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
    cifar = build_model(name, num_classes=10)
    assert cifar.conv1.kernel_size == (3, 3) and isinstance(cifar.maxpool, nn.Identity)
    assert cifar(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_resnet18_imagenet_size_matches_dyrep_table3():
    """DyRep Table 3, ResNet-18 origin: 1.81 G FLOPs (MACs), 11.7 M params at 224x224, 1000 classes."""
    model = build_model("resnet18", num_classes=1000, stem="imagenet")
    assert round(count_params(model) / 1e6, 1) == 11.7
    assert round(count_macs(model, (1, 3, 224, 224)) / 1e9, 2) == 1.81
    from repsearch.models import check_model_options

    with pytest.raises(ValueError, match="stem"):
        check_model_options("resnet18", {"stem": "tiny"})
