"""Optimizer groups, the in-place update after a structure change, and the LR schedule."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from repsearch.optim import build_sgd, cosine_warmup, split_decay, sync_param_groups


def spec(**kw):
    base = dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4, wd_on_norm=True, epochs=10,
                warmup_epochs=0, min_lr=1e-6)
    base.update(kw)
    return SimpleNamespace(**base)


def small():
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def test_split_decay_respects_wd_on_norm():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    d, nd = split_decay(m, wd_on_norm=True)
    assert len(d) == 5 and nd == []
    d, nd = split_decay(m, wd_on_norm=False)
    assert {id(p) for p in d} == {id(m[0].weight), id(m[3].weight)}
    assert {id(p) for p in nd} == {id(m[1].weight), id(m[1].bias), id(m[3].bias)}


def test_sync_keeps_momentum_of_survivors_and_drops_removed():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
    opt = build_sgd(m, spec())
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    kept = m[0].weight
    buf = opt.state[kept]["momentum_buffer"].clone()
    removed = m[2].weight
    assert removed in opt.state
    m[2] = nn.Conv2d(4, 4, 3, padding=1)  # structure change: new params, old ones gone
    counts = sync_param_groups(opt, m, wd_on_norm=True)
    assert counts == {"added": 2, "removed": 2}
    assert removed not in opt.state
    assert torch.equal(opt.state[kept]["momentum_buffer"], buf)
    assert m[2].weight not in opt.state
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in m.parameters()}
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1) and opt.param_groups[0]["weight_decay"] == 1e-4
    m.zero_grad()
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()  # new params get fresh state
    assert "momentum_buffer" in opt.state[m[2].weight]


def test_cosine_warmup_schedule():
    m = nn.Linear(2, 2)
    s = spec(epochs=10, warmup_epochs=2, lr=0.1, min_lr=0.001)
    opt = build_sgd(m, s)
    sched = cosine_warmup(opt, s, steps_per_epoch=5)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1 / 10)  # warm-up: (step + 1) / warm_steps
    assert lrs[9] == pytest.approx(0.1)
    assert max(lrs) == pytest.approx(0.1)
    t = (30 - 10) / 40
    assert lrs[30] == pytest.approx(0.001 + (0.1 - 0.001) * 0.5 * (1 + math.cos(math.pi * t)))
    assert lrs[-1] > 0.001 and lrs[-1] < 0.0015
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]


def test_adamw_groups_sync_and_reset_policies():
    from repsearch.optim import build_optimizer, reset_state

    m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
    opt = build_optimizer(m, spec(optimizer="adamw", betas=(0.8, 0.95), eps=1e-7, wd_on_norm=False))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
    assert opt.param_groups[0]["betas"] == (0.8, 0.95) and opt.param_groups[0]["eps"] == 1e-7
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    exp_avg = opt.state[m[0].weight]["exp_avg"].clone()
    m[2] = nn.Conv2d(4, 4, 3)  # a structure change: new params, the old 1x1 gone
    counts = sync_param_groups(opt, m, wd_on_norm=False)
    assert counts == {"added": 2, "removed": 2}
    assert torch.equal(opt.state[m[0].weight]["exp_avg"], exp_avg)
    # "changed": only the named parameters forget their moments; "all": every one
    assert reset_state(opt, "changed", [m[0].weight]) == 1 and m[0].weight not in opt.state
    assert m[1].weight in opt.state
    assert reset_state(opt, "none") == 0 and m[1].weight in opt.state
    assert reset_state(opt, "all") == 2 and len(opt.state) == 0
    with pytest.raises(ValueError, match="reset policy"):
        reset_state(opt, "some")
