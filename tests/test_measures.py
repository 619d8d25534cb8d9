"""Tests of repsearch.measures: MACs, parameter counts, running averages, peak memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from repsearch.measures import RunningAverage, count_macs, count_params, peak_memory_mb, reset_peak_memory


def test_count_macs_conv_linear_formula():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True),  # 16x16 out: 8*3*9*256 MACs
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False),  # grouped: 8*2*9*256
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),  # 40
    )
    assert count_macs(model) == 8 * 3 * 9 * 256 + 8 * 2 * 9 * 256 + 40
    assert count_macs(model, (2, 3, 32, 32)) == 2 * (8 * 3 * 9 * 256 + 8 * 2 * 9 * 256 + 40)
    assert count_macs(model, (1, 3, 16, 16)) == 8 * 3 * 9 * 64 + 8 * 2 * 9 * 64 + 40


def test_count_macs_restores_modes_and_leaves_bn_stats():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    model.train()
    model[2].eval()  # a deliberately frozen submodule keeps its flag
    before = model[1].running_mean.clone(), int(model[1].num_batches_tracked)
    count_macs(model)
    assert model.training and model[1].training and not model[2].training and not model[2][0].training
    assert torch.equal(model[1].running_mean, before[0]) and int(model[1].num_batches_tracked) == before[1]


def test_count_params_includes_bn_and_counts_shared_once():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    model = nn.Sequential(conv, nn.BatchNorm2d(4))
    assert count_params(model) == 4 * 3 * 9 + 8
    lin = nn.Linear(4, 4)
    assert count_params(nn.Sequential(lin, lin)) == 20


def test_running_average():
    avg = RunningAverage()
    assert avg.mean == 0.0
    for v in (10.0, 20.0, 60.0):
        avg.update(v)
    assert avg.mean == pytest.approx(30.0) and avg.count == 3
    avg.update(130.0, weight=2.0)
    assert avg.mean == pytest.approx((10 + 20 + 60 + 260) / 5)
    clone = RunningAverage()
    clone.load_state_dict(avg.state_dict())
    assert clone.mean == avg.mean and clone.count == 4
    with pytest.raises(ValueError):
        avg.update(1.0, weight=-1)


def test_peak_memory_cpu_is_rss():
    big = torch.ones(4 * 2**20)  # 16 MiB
    peak = peak_memory_mb("cpu")
    assert peak >= 16 and peak < 1e6
    reset_peak_memory("cpu")  # a no-op off CUDA
    del big
    assert peak_memory_mb(torch.device("cpu")) >= peak
