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
