"""Pure tensor transforms of repsearch.rep.fuse against the ops they replace (eval mode, fp32)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repsearch.rep.fuse import (
    avg_kernel,
    conv_kernel,
    fuse_bn,
    fuse_bn_module,
    identity_kernel,
    merge_1x1_kxk,
    pad_to_kxk,
)


def assert_close(y, ref):
    tol = 1e-5 * max(1.0, ref.abs().max().item())
    err = (y - ref).abs().max().item()
    assert y.shape == ref.shape
    assert err <= tol, f"max abs err {err:.3e} > {tol:.3e}"


def random_bn(c, eps=1e-5):
    bn = nn.BatchNorm2d(c, eps=eps)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.3, 2.0)
        bn.weight.uniform_(0.5, 1.5).mul_(torch.randint(0, 2, (c,)) * 2 - 1)
        bn.bias.normal_(0, 0.5)
    return bn.eval()


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_fuse_bn_matches_conv_then_bn(groups, bias):
    torch.manual_seed(groups + 10 * bias)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=groups, bias=bias)
    bn = random_bn(12, eps=1e-3)
    x = torch.randn(2, 8, 7, 9)
    w, b = fuse_bn_module(conv.weight, conv.bias, bn)
    assert w.shape == conv.weight.shape and b.shape == (12,)
    assert_close(F.conv2d(x, w, b, 2, 1, 1, groups), bn(conv(x)))
    # the functional form with affine=False defaults (γ = 1, β = 0)
    w2, b2 = fuse_bn(conv.weight, None, bn.running_mean, bn.running_var, None, None, bn.eps)
    ref = (conv(x) - (conv.bias.reshape(1, -1, 1, 1) if bias else 0) - bn.running_mean.reshape(1, -1, 1, 1)) / (
        torch.sqrt(bn.running_var + bn.eps).reshape(1, -1, 1, 1)
    )
    assert_close(F.conv2d(x, w2, b2, 2, 1, 1, groups), ref)


def test_fuse_bn_rejects_size_mismatch():
    with pytest.raises(ValueError, match="channels"):
        fuse_bn(torch.zeros(4, 2, 3, 3), None, torch.zeros(5), torch.ones(5), None, None, 1e-5)
    with pytest.raises(ValueError, match="running statistics"):
        fuse_bn_module(torch.zeros(4, 2, 3, 3), None, nn.BatchNorm2d(4, track_running_stats=False))


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("shape", [(1, 1), (1, "k"), ("k", 1)])
@pytest.mark.parametrize("stride", [1, 2])
def test_pad_to_kxk_matches_small_conv(k, shape, stride):
    torch.manual_seed(k * 7 + stride)
    kh, kw = (k if s == "k" else s for s in shape)
    ph, pw = (k // 2 if s == "k" else 0 for s in shape)
    conv = nn.Conv2d(4, 6, (kh, kw), stride=stride, padding=(ph, pw), groups=2, bias=False)
    x = torch.randn(2, 4, 8, 7)
    w = pad_to_kxk(conv.weight, k)
    assert w.shape == (6, 2, k, k)
    assert_close(F.conv2d(x, w, None, stride, k // 2, 1, 2), conv(x))


def test_pad_to_kxk_errors():
    with pytest.raises(ValueError, match="larger"):
        pad_to_kxk(torch.zeros(2, 2, 5, 5), 3)
    with pytest.raises(ValueError, match="odd"):
        pad_to_kxk(torch.zeros(2, 2, 1, 1), 4)
    w = torch.randn(2, 2, 3, 3)
    assert pad_to_kxk(w, 3) is w


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("k,pad,stride", [(3, 1, 1), (3, 0, 2), (5, 2, 2), (2, 1, 1), (1, 0, 1)])
def test_merge_1x1_kxk_with_value_padding(groups, k, pad, stride):
    torch.manual_seed(groups * 31 + k * 5 + stride)
    cin, mid, cout = 8, 12, 4
    w1 = torch.randn(mid, cin // groups, 1, 1)
    b1 = torch.randn(mid)
    w2 = torch.randn(cout, mid // groups, k, k)
    b2 = torch.randn(cout)
    x = torch.randn(2, cin, 7, 8)
    h = F.conv2d(x, w1, b1, groups=groups)
    # pad the intermediate map with b1 (what a zero input gives), then KxK with padding 0
    h = F.pad(h - b1.reshape(1, -1, 1, 1), (pad,) * 4) + b1.reshape(1, -1, 1, 1)
    ref = F.conv2d(h, w2, b2, stride=stride, groups=groups)
    w, b = merge_1x1_kxk(w1, b1, w2, b2, groups)
    assert w.shape == (cout, cin // groups, k, k)
    assert_close(F.conv2d(x, w, b, stride, pad, 1, groups), ref)
    # without biases
    w0, b0 = merge_1x1_kxk(w1, None, w2, None, groups)
    assert torch.count_nonzero(b0) == 0
    assert_close(w0, w)


def test_merge_1x1_kxk_errors():
    with pytest.raises(ValueError, match="1x1"):
        merge_1x1_kxk(torch.zeros(4, 4, 3, 3), None, torch.zeros(4, 4, 3, 3), None, 1)
    with pytest.raises(ValueError, match="chain"):
        merge_1x1_kxk(torch.zeros(6, 4, 1, 1), None, torch.zeros(4, 4, 3, 3), None, 1)


@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 0), (5, 2, 2), (2, 2, 0)])
def test_avg_kernel_matches_avg_pool(groups, k, stride, pad):
    torch.manual_seed(k + stride + groups)
    x = torch.randn(2, 8, 9, 8)
    w = avg_kernel(8, k, groups)
    assert w.shape == (8, 8 // groups, k, k)
    ref = F.avg_pool2d(x, k, stride, pad, count_include_pad=True)
    assert_close(F.conv2d(x, w, None, stride, pad, 1, groups), ref)


@pytest.mark.parametrize("groups", [1, 4, 8])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_identity_kernel(groups, k):
    x = torch.randn(2, 8, 6, 5)
    w = identity_kernel(8, k, groups)
    assert w.shape == (8, 8 // groups, k, k)
    assert torch.equal(F.conv2d(x, w, None, 1, k // 2, 1, groups), x)


def test_kernel_errors():
    with pytest.raises(ValueError, match="odd"):
        identity_kernel(4, 2)
    with pytest.raises(ValueError, match="divide"):
        identity_kernel(6, 3, groups=4)
    with pytest.raises(ValueError, match="divide"):
        avg_kernel(6, 3, groups=4)


def test_conv_kernel():
    conv = nn.Conv2d(4, 6, 3, bias=False)
    w, b = conv_kernel(conv)
    assert w is conv.weight and b.shape == (6,) and torch.count_nonzero(b) == 0
    conv_b = nn.Conv2d(4, 6, 3)
    assert conv_kernel(conv_b)[1] is conv_b.bias
    with pytest.raises(TypeError):
        conv_kernel(nn.Linear(3, 3))
