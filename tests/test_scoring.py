"""Tests for repsearch.scoring: saliency metrics (DyRep main Eq. 3-4, supp. Eq. 11-15).

Expected values are computed independently: by hand (closed forms on a one-conv model) or from
first principles with torch.autograd.grad / finite differences, never through repsearch.scoring.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repsearch import scoring
from repsearch.scoring import (
    DEFAULT_VOTERS,
    FREE_METRICS,
    METRICS,
    STEP_METRICS,
    VOTE_RULE,
    SaliencyAccumulator,
    check_voters,
    grasp_scores,
    random_scores,
    register_metric,
    select_op,
    step_metrics_for,
    vote_scores,
)

#: The pre-DEFAULT_VOTERS rule: grasp votes too (it duplicates grad_norm on conv-BN nets).
FOUR_VOTERS = ["grad_norm", "snip", "grasp", "synflow"]


# ------------------------------------------------------------------------------------------------
# Tiny models and independent references
# ------------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    """conv1 - BN - act - conv2 - BN - act - conv3 - act - GAP - linear; plus an unused conv.

    conv1 and conv2 feed a BN (train mode: L is invariant to their scale, so Σ g⊙θ ≈ 0 up to the
    BN eps); conv3 does not, so its synflow score is far from 0.
    """

    def __init__(self, act: type[nn.Module] = nn.ReLU, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.conv3 = nn.Conv2d(3, 3, 3, padding=1, bias=True)  # no BN after it
        self.unused = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.act = act()
        self.head = nn.Linear(3, 4)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        x = self.act(self.conv3(x))
        return self.head(x.mean((2, 3)))

    def ops(self) -> dict[str, nn.Conv2d]:
        return {"conv1": self.conv1, "conv2": self.conv2, "conv3": self.conv3, "unused": self.unused}


def make_batches(n: int, dtype: torch.dtype = torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 2, 5, 5, generator=g, dtype=dtype), torch.randint(0, 4, (4,), generator=g))
        for _ in range(n)
    ]


def ref_free(model: Tiny, batch) -> dict[str, dict[str, float]]:
    """grad_norm / snip / synflow of each used op, from torch.autograd.grad (not .grad)."""
    x, y = batch
    ws = [model.conv1.weight, model.conv2.weight, model.conv3.weight]
    gs = torch.autograd.grad(F.cross_entropy(model(x), y), ws)
    out: dict[str, dict[str, float]] = {"grad_norm": {}, "snip": {}, "synflow": {}}
    for name, w, g in zip(("conv1", "conv2", "conv3"), ws, gs):
        g, w = g.detach().double(), w.detach().double()
        out["grad_norm"][name] = math.sqrt(float((g**2).sum()))
        out["snip"][name] = float((g * w).abs().sum())
        out["synflow"][name] = float((g * w).sum())
    for m in out:
        out[m]["unused"] = 0.0
    return out


def close(got: float, ref: float, scale: float, rel: float = 1e-5) -> bool:
    """fp32 comparison; ``scale`` bounds the summands (snip for synflow's cancelling sum)."""
    return abs(got - ref) <= rel * max(abs(ref), scale) + 1e-12


def assert_scores(got: dict, ref: dict, factor: float = 1.0) -> None:
    """Every metric/op of ``ref`` (times ``factor``) matches ``got`` to fp32 accuracy."""
    for m in ref:
        for op in ref[m]:
            assert close(got[m][op], ref[m][op] * factor, ref["snip"][op] * factor if m == "synflow" else 0.0), (
                m, op, got[m][op], ref[m][op] * factor)


def train_backward(model: nn.Module, batch, scale: float = 1.0) -> None:
    model.zero_grad(set_to_none=True)
    x, y = batch
    (F.cross_entropy(model(x), y) * scale).backward()


class OneConv(nn.Module):
    """out = Σ θ ⊙ x for a 3x3 input and a 3x3 kernel (no padding): a scalar per image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, bias=False).double()
        self.spare = nn.Conv2d(1, 1, 3, bias=False).double()  # never used in forward
        with torch.no_grad():
            self.conv.weight.copy_((torch.arange(9.0, dtype=torch.float64) / 10 - 0.3).view(1, 1, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(1)


def half_square(out: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out**2).sum()


# ------------------------------------------------------------------------------------------------
# Hand-computed closed forms
# ------------------------------------------------------------------------------------------------


def test_closed_form_one_conv():
    # L = ½ s², s = Σθ (input all ones) -> g = s·1, H = 1 1ᵀ, H g = 9 s · 1.
    model = OneConv()
    theta = model.conv.weight.detach().flatten().tolist()  # -0.3 .. 0.5
    s = sum(theta)  # 0.9
    x = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    ops = {"conv": model.conv, "spare": model.spare}

    acc = SaliencyAccumulator(ops, ("grad_norm", "snip", "synflow"))
    half_square(model(x), None).backward()
    acc.step()
    avg = acc.averages()
    assert avg["grad_norm"]["conv"] == pytest.approx(abs(s) * 3.0, rel=1e-6)
    assert avg["snip"]["conv"] == pytest.approx(abs(s) * sum(abs(t) for t in theta), rel=1e-6)
    assert avg["synflow"]["conv"] == pytest.approx(s * s, rel=1e-6)
    for m in ("grad_norm", "snip", "synflow"):
        assert avg[m]["spare"] == 0.0

    gr = grasp_scores(model, ops, [(x, torch.zeros(1))], half_square)
    assert gr["conv"] == pytest.approx(-9.0 * s * s, rel=1e-9)
    assert gr["spare"] == 0.0


# ------------------------------------------------------------------------------------------------
# Accumulator
# ------------------------------------------------------------------------------------------------


def test_accumulator_matches_autograd_and_averages_steps():
    torch.manual_seed(0)
    model = Tiny()
    batches = make_batches(3)
    acc = SaliencyAccumulator(model.ops(), ("grad_norm", "snip", "synflow", "synflow"))
    assert acc.metrics == ("grad_norm", "snip", "synflow")
    refs = []
    for i, b in enumerate(batches):
        refs.append(ref_free(model, b))
        train_backward(model, b)
        acc.step()
        assert acc.n_steps == i + 1
        if i == 0:
            assert_scores(acc.averages(), refs[0])
    avg = acc.averages()
    assert list(avg["synflow"]) == ["conv1", "conv2", "conv3", "unused"]
    mean = {m: {op: sum(r[m][op] for r in refs) / 3 for op in refs[0][m]} for m in refs[0]}
    assert_scores(avg, mean)
    # the batches differ, so the per-step values do (the average is not one step's value)
    assert not close(refs[0]["synflow"]["conv3"], refs[1]["synflow"]["conv3"], 0.0, rel=1e-3)
    assert not close(refs[0]["grad_norm"]["conv1"], refs[1]["grad_norm"]["conv1"], 0.0, rel=1e-3)
    # conv3 (no BN after it) has a clearly non-zero signed synflow score
    assert abs(avg["synflow"]["conv3"]) > 1e-3 * avg["snip"]["conv3"]
    assert acc.n_counted() == 3


@pytest.mark.parametrize("as_tensor", [False, True])
def test_grad_scale_unscales(as_tensor):
    torch.manual_seed(1)
    model = Tiny()
    batches = make_batches(2)
    ref = SaliencyAccumulator(model.ops(), ("grad_norm", "snip", "synflow"))
    scaled = SaliencyAccumulator(model.ops(), ("grad_norm", "snip", "synflow"))
    scale = 1024.0
    for b in batches:
        train_backward(model, b)
        ref.step()
        train_backward(model, b, scale=scale)
        scaled.step(grad_scale=torch.tensor(scale) if as_tensor else scale)
    a, b = ref.averages(), scaled.averages()
    assert_scores(b, a)
    assert a["snip"]["conv1"] > 0


def test_step_does_not_sync_with_host(monkeypatch):
    torch.manual_seed(2)
    model = Tiny()
    acc = SaliencyAccumulator(model.ops(), ("grad_norm", "snip", "synflow"))
    train_backward(model, make_batches(1)[0])

    def boom(*_a, **_k):
        raise AssertionError("host sync inside SaliencyAccumulator.step")

    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    acc.step()
    acc.step(grad_scale=2.0)
    acc.step(grad_scale=torch.tensor(2.0))
    monkeypatch.undo()
    assert acc.n_steps == 3
    avg = acc.averages()
    assert avg["snip"]["conv1"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_no_sync_cuda():
    torch.manual_seed(3)
    model = Tiny().cuda()
    acc = SaliencyAccumulator(model.ops(), ("grad_norm", "snip", "synflow"), device="cuda")
    x, y = make_batches(1)[0]
    train_backward(model, (x.cuda(), y.cuda()))
    scale = torch.tensor(4.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        acc.step()
        acc.step(grad_scale=scale)
        acc.step(grad_scale=4.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert acc.averages()["snip"]["conv1"] > 0


def test_no_grad_ops_contribute_zero_and_do_not_crash():
    torch.manual_seed(4)
    model = Tiny()
    acc = SaliencyAccumulator(model.ops(), ("grad_norm", "snip", "synflow"))
    acc.step()  # nothing has a gradient yet: a zero step
    b = make_batches(1)[0]
    r = ref_free(model, b)
    train_backward(model, b)
    acc.step()
    avg = acc.averages()
    assert_scores(avg, r, factor=0.5)
    for m in r:
        assert avg[m]["unused"] == 0.0


def test_non_finite_step_is_skipped():
    torch.manual_seed(5)
    model = Tiny()
    b = make_batches(1)[0]
    r = ref_free(model, b)
    acc = SaliencyAccumulator(model.ops(), ("synflow", "snip"))
    train_backward(model, b)
    acc.step()
    model.conv2.weight.grad[0, 0, 0, 0] = float("inf")  # a GradScaler overflow step
    acc.step()
    assert acc.n_steps == 2 and acc.n_counted() == 1
    avg = acc.averages()
    assert close(avg["synflow"]["conv3"], r["synflow"]["conv3"], r["snip"]["conv3"])
    assert close(avg["snip"]["conv1"], r["snip"]["conv1"], 0.0)
    assert all(math.isfinite(v) for v in avg["snip"].values())


def test_reset_and_new_ops():
    torch.manual_seed(6)
    model = Tiny()
    acc = SaliencyAccumulator(model.ops(), ("synflow",))
    train_backward(model, make_batches(1)[0])
    acc.step()
    acc.reset()
    assert acc.n_steps == 0
    assert acc.averages() == {"synflow": {"conv1": 0.0, "conv2": 0.0, "conv3": 0.0, "unused": 0.0}}
    acc.reset({"conv3": model.conv3})
    b = make_batches(1, seed=9)[0]
    r = ref_free(model, b)
    train_backward(model, b)
    acc.step()
    assert list(acc.averages()["synflow"]) == ["conv3"]
    assert close(acc.averages()["synflow"]["conv3"], r["synflow"]["conv3"], r["snip"]["conv3"])
    # state round trip
    acc2 = SaliencyAccumulator({"conv3": model.conv3}, ("synflow",))
    acc2.load_state_dict(acc.state_dict())
    assert acc2.averages() == acc.averages() and acc2.n_steps == 1


def test_accumulator_rejects_unknown_metric_and_ignores_random():
    model = Tiny()
    with pytest.raises(ValueError, match="grad_norm"):
        SaliencyAccumulator(model.ops(), ("sinflow",))
    with pytest.raises(ValueError):
        SaliencyAccumulator(model.ops(), ("grasp",))  # not a per-step metric
    acc = SaliencyAccumulator(model.ops(), ("random",))
    acc.step()
    assert acc.metrics == () and acc.averages() == {} and acc.n_steps == 1


# ------------------------------------------------------------------------------------------------
# GraSP
# ------------------------------------------------------------------------------------------------


def _grads(model, ws, batch):
    x, y = batch
    return torch.autograd.grad(F.cross_entropy(model(x), y), ws)


def test_grasp_matches_finite_differences_and_keeps_bn_stats():
    torch.manual_seed(7)
    model = Tiny(act=nn.Tanh, dtype=torch.float64).train()
    batches = make_batches(2, dtype=torch.float64)
    ops = model.ops()
    ws = [model.conv1.weight, model.conv2.weight, model.conv3.weight]

    # Independent reference: H g by central differences of the gradient along g (float64).
    ref_model = copy.deepcopy(model)
    rws = [ref_model.conv1.weight, ref_model.conv2.weight, ref_model.conv3.weight]
    eps = 1e-6
    expected = {"conv1": 0.0, "conv2": 0.0, "conv3": 0.0}
    for b in batches:
        g = [t.detach() for t in _grads(ref_model, rws, b)]
        orig = [w.detach().clone() for w in rws]
        with torch.no_grad():
            for w, gi in zip(rws, g):
                w.add_(eps * gi)
        gp = _grads(ref_model, rws, b)
        with torch.no_grad():
            for w, o, gi in zip(rws, orig, g):
                w.copy_(o - eps * gi)
        gm = _grads(ref_model, rws, b)
        with torch.no_grad():
            for w, o in zip(rws, orig):
                w.copy_(o)
        for name, w, a, c in zip(("conv1", "conv2", "conv3"), orig, gp, gm):
            hg = (a - c) / (2 * eps)
            expected[name] += float(-(hg * w).sum()) / len(batches)

    buffers = {k: v.clone() for k, v in model.named_buffers()}
    got = grasp_scores(model, ops, batches, F.cross_entropy)

    assert list(got) == ["conv1", "conv2", "conv3", "unused"]
    for name in ("conv1", "conv2", "conv3"):
        assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-9), name
        assert abs(expected[name]) > 1e-6, name
    assert got["unused"] == 0.0
    # running statistics untouched (the model ran in train mode), mode and .grad too
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert model.training
    assert all(w.grad is None for w in ws)


def test_grasp_single_batch_vs_average_and_frozen_op():
    torch.manual_seed(8)
    model = Tiny(act=nn.Tanh, dtype=torch.float64)
    batches = make_batches(2, dtype=torch.float64, seed=3)
    ops = model.ops()
    one = [grasp_scores(model, ops, [b], F.cross_entropy) for b in batches]
    both = grasp_scores(model, ops, iter(batches), F.cross_entropy)  # a one-shot iterator is fine
    for k in ops:
        assert both[k] == pytest.approx((one[0][k] + one[1][k]) / 2, rel=1e-9, abs=1e-12)
    model.conv1.weight.requires_grad_(False)
    frozen = grasp_scores(model, ops, batches, F.cross_entropy)
    assert frozen["conv1"] == 0.0 and frozen["conv2"] != 0.0
    with pytest.raises(ValueError):
        grasp_scores(model, ops, [], F.cross_entropy)


# ------------------------------------------------------------------------------------------------
# Vote and random
# ------------------------------------------------------------------------------------------------


def _argmax(d):
    return max(d, key=d.get)


def test_vote_majority():
    ops = ["a", "b", "c", "d"]
    pm = {
        "grad_norm": dict(zip(ops, [4.0, 1.0, 2.0, 3.0])),  # a
        "snip": dict(zip(ops, [9.0, 1.0, 2.0, 3.0])),  # a
        "grasp": dict(zip(ops, [0.0, 5.0, 2.0, 3.0])),  # b
        "synflow": dict(zip(ops, [0.0, 1.0, 7.0, 3.0])),  # c
    }
    scores, winners = vote_scores(pm)
    assert winners == {"grad_norm": "a", "snip": "a", "grasp": "b", "synflow": "c"}
    assert _argmax(scores) == "a"
    assert math.floor(scores["a"]) == 2 and math.floor(scores["b"]) == 1 and math.floor(scores["d"]) == 0


def test_vote_ties_go_to_synflow_rank():
    ops = ["a", "b", "c", "d"]
    # four different winners, 1 vote each -> synflow's own top (d) wins
    pm = {
        "grad_norm": dict(zip(ops, [4.0, 1.0, 2.0, 3.0])),
        "snip": dict(zip(ops, [1.0, 9.0, 2.0, 3.0])),
        "grasp": dict(zip(ops, [0.0, 1.0, 5.0, 3.0])),
        "synflow": dict(zip(ops, [0.0, 1.0, 2.0, 7.0])),
    }
    scores, _ = vote_scores(pm)
    assert _argmax(scores) == "d"
    # a and b tie at 2 votes, c (synflow's top) has 1; synflow ranks b above a -> b
    pm5 = {
        "m1": dict(zip(ops, [5.0, 0.0, 0.0, 0.0])),
        "m2": dict(zip(ops, [5.0, 0.0, 0.0, 0.0])),
        "m3": dict(zip(ops, [0.0, 5.0, 0.0, 0.0])),
        "m4": dict(zip(ops, [0.0, 5.0, 0.0, 0.0])),
        "synflow": dict(zip(ops, [1.0, 2.0, 3.0, 0.0])),
    }
    scores, winners = vote_scores(pm5)
    assert winners["synflow"] == "c"
    assert _argmax(scores) == "b"
    assert scores["b"] > scores["a"] > scores["c"] > scores["d"]
    # ties with the tie-break fraction never outweigh a vote: fraction in (0, 1)
    for op in ops:
        assert 0 < scores[op] - math.floor(scores[op]) < 1
    with pytest.raises(ValueError):
        vote_scores({"snip": {"a": 1.0}})


def test_random_reproducible():
    ops = {f"op{i}": None for i in range(6)}
    a = random_scores(ops, torch.Generator().manual_seed(123))
    b = random_scores(ops, torch.Generator().manual_seed(123))
    c = random_scores(ops, torch.Generator().manual_seed(124))
    assert a == b and a != c
    assert list(a) == list(ops) and all(0.0 <= v < 1.0 for v in a.values())


# ------------------------------------------------------------------------------------------------
# select_op and the registry
# ------------------------------------------------------------------------------------------------


def test_step_metrics_table():
    assert METRICS == ("random", "grad_norm", "snip", "grasp", "synflow", "vote")
    assert FREE_METRICS == ("random", "grad_norm", "snip", "synflow")
    assert STEP_METRICS("random") == () and STEP_METRICS("grasp") == ()
    assert STEP_METRICS("synflow") == ("synflow",)
    assert set(STEP_METRICS("vote")) == {"grad_norm", "snip", "synflow"}
    with pytest.raises(ValueError) as e:
        STEP_METRICS("sinflow")
    for m in METRICS:
        assert m in str(e.value)


def _trained_accumulator(model, metrics, n=2):
    acc = SaliencyAccumulator(model.ops(), metrics)
    for b in make_batches(n, dtype=next(model.parameters()).dtype, seed=11):
        train_backward(model, b)
        acc.step()
    return acc


def test_select_op_free_metrics_and_random():
    torch.manual_seed(9)
    model = Tiny()
    acc = _trained_accumulator(model, ("grad_norm", "snip", "synflow"))
    avg = acc.averages()

    def no_probe():
        raise AssertionError("free metrics must not ask for probe batches")

    for m in ("grad_norm", "snip", "synflow"):
        best, scores, details = select_op(m, acc, model, model.ops(), no_probe, F.cross_entropy, None)
        assert scores == avg[m]
        assert best == _argmax(avg[m])
        assert details["metric"] == m and details["n_steps"] == 2
    best1, s1, _ = select_op("random", None, model, model.ops(), no_probe, None, torch.Generator().manual_seed(5))
    best2, s2, _ = select_op("random", None, model, model.ops(), no_probe, None, torch.Generator().manual_seed(5))
    assert (best1, s1) == (best2, s2) and best1 == _argmax(s1)
    with pytest.raises(ValueError) as e:
        select_op("sinflow", acc, model, model.ops(), no_probe, None, None)
    assert all(m in str(e.value) for m in METRICS)
    with pytest.raises(ValueError):  # accumulator lacks the metric
        select_op("snip", _trained_accumulator(model, ("synflow",), 1), model, model.ops(), no_probe, None, None)


def test_select_op_grasp_and_vote():
    torch.manual_seed(10)
    model = Tiny(act=nn.Tanh, dtype=torch.float64)
    acc = _trained_accumulator(model, step_metrics_for("vote", FOUR_VOTERS))
    probes = make_batches(2, dtype=torch.float64, seed=12)
    calls = []

    def probe_fn():
        calls.append(1)
        return iter(probes)

    best, scores, details = select_op("grasp", acc, model, model.ops(), probe_fn, F.cross_entropy, None)
    assert len(calls) == 1 and details["n_probe_batches"] == 2
    assert scores == grasp_scores(model, model.ops(), probes, F.cross_entropy)
    assert best == _argmax(scores)

    avg = acc.averages()
    for voters in (FOUR_VOTERS, None):  # None: DEFAULT_VOTERS (no grasp, no probe batches)
        calls.clear()
        best, scores, details = select_op(
            "vote", acc, model, model.ops(), probe_fn, F.cross_entropy, None, voters=voters
        )
        expected_voters = FOUR_VOTERS if voters else list(DEFAULT_VOTERS)
        assert len(calls) == (1 if voters else 0)
        assert list(details["winners"]) == expected_voters
        assert details["vote"]["voters"] == expected_voters
        for m in ("grad_norm", "snip", "synflow"):
            assert details["winners"][m] == _argmax(avg[m])
        votes = {op: sum(w == op for w in details["winners"].values()) for op in model.ops()}
        assert details["vote"]["votes"] == votes
        top = max(votes.values())
        tied = [op for op in model.ops() if votes[op] == top]
        assert best == max(tied, key=lambda op: avg["synflow"][op])
        assert best == _argmax(scores)
        json.dumps(details)  # the event log must be able to store it


def test_register_metric(monkeypatch):
    monkeypatch.setattr(scoring, "REGISTRY", dict(scoring.REGISTRY))

    @register_metric("neg_synflow", ("synflow",))
    def _neg(ctx):
        return {k: -v for k, v in ctx.step_scores("synflow").items()}, {"note": "test"}

    assert "neg_synflow" in scoring.available_metrics()
    assert STEP_METRICS("neg_synflow") == ("synflow",)
    with pytest.raises(ValueError):
        register_metric("neg_synflow")(_neg)
    with pytest.raises(ValueError):
        register_metric("x", ("no_such_step_metric",))
    torch.manual_seed(11)
    model = Tiny()
    acc = _trained_accumulator(model, ("synflow",), 1)
    best, scores, details = select_op("neg_synflow", acc, model, model.ops(), None, None, None)
    assert best == min(acc.averages()["synflow"], key=acc.averages()["synflow"].get)
    assert details["note"] == "test"


def test_bf16_weights_accumulate_in_fp32():
    torch.manual_seed(12)
    model = Tiny().to(torch.bfloat16)
    x, y = make_batches(1)[0]
    acc = SaliencyAccumulator(model.ops(), ("grad_norm", "snip", "synflow"))
    train_backward(model, (x.to(torch.bfloat16), y))
    acc.step()
    avg = acc.averages()
    w, g = model.conv3.weight.detach().double(), model.conv3.weight.grad.double()
    assert avg["snip"]["conv3"] == pytest.approx(float((g * w).abs().sum()), rel=2e-2)
    assert avg["grad_norm"]["conv3"] == pytest.approx(float(g.norm()), rel=2e-2)
    assert all(math.isfinite(v) for m in avg.values() for v in m.values())


# ------------------------------------------------------------------------------------------------
# Configurable voters (grasp duplicates grad_norm on conv-BN, so it is not a default voter)
# ------------------------------------------------------------------------------------------------


def _abc_scores(ops):
    """grad_norm and grasp top A, snip top B, synflow top C (ranking C > B > A > rest)."""
    a, b, c = ops[:3]
    rest = ops[3:]

    def mk(top, second=None):
        d = {p: 0.1 for p in ops}
        if second is not None:
            d[second] = 0.5
        d[top] = 1.0
        return d

    return {
        "grad_norm": mk(a),
        "snip": mk(b),
        "grasp": mk(a),
        "synflow": {a: 0.2, b: 0.3, c: 0.9, **{p: -1.0 for p in rest}},
    }


def test_default_voters_do_not_count_grad_norm_twice():
    assert DEFAULT_VOTERS == ("grad_norm", "snip", "synflow")
    ops = ["a", "b", "c", "d"]
    pm = _abc_scores(ops)
    # the old 4-voter rule: grad_norm and grasp give A two votes, A wins
    old, winners = vote_scores({m: pm[m] for m in FOUR_VOTERS})
    assert winners == {"grad_norm": "a", "snip": "b", "grasp": "a", "synflow": "c"}
    assert _argmax(old) == "a"
    # the default voters: 1-1-1, broken by synflow's rank -> C
    new, winners = vote_scores({m: pm[m] for m in DEFAULT_VOTERS})
    assert winners == {"grad_norm": "a", "snip": "b", "synflow": "c"}
    assert _argmax(new) == "c"
    assert new["c"] > new["b"] > new["a"] > new["d"]


def test_default_voters_end_to_end_with_accumulator_and_real_grasp():
    """select_op on a real SaliencyAccumulator (averages set through its state) and real grasp."""
    torch.manual_seed(13)
    model = Tiny(act=nn.Tanh, dtype=torch.float64)
    ops = model.ops()
    probes = make_batches(2, dtype=torch.float64, seed=14)
    grasp = grasp_scores(model, ops, probes, F.cross_entropy)
    a = _argmax(grasp)
    b, c = [p for p in ops if p != a][:2]
    order = [a, b, c] + [p for p in ops if p not in (a, b, c)]
    pm = _abc_scores(order)
    assert _argmax(pm["grad_norm"]) == a == _argmax(grasp)

    acc = SaliencyAccumulator(ops, step_metrics_for("vote", FOUR_VOTERS))
    assert acc.metrics == ("grad_norm", "snip", "synflow")
    n = 3
    rows = [[pm[m][p] * n for p in ops] for m in acc.metrics]  # sums over n steps
    acc.load_state_dict(
        {"paths": list(ops), "metrics": list(acc.metrics), "sum": torch.tensor(rows, dtype=torch.float64),
         "count": torch.tensor(float(n), dtype=torch.float64), "n_steps": n}
    )

    def probe_fn():
        return iter(probes)

    best, scores, details = select_op(
        "vote", acc, model, ops, probe_fn, F.cross_entropy, None, voters=FOUR_VOTERS
    )
    assert best == a and details["winners"]["grasp"] == a and details["winners"]["grad_norm"] == a
    assert details["per_metric"]["grasp"] == grasp

    def no_probe():
        raise AssertionError("the default voters need no probe batches")

    best, scores, details = select_op("vote", acc, model, ops, no_probe, F.cross_entropy, None)
    assert best == c
    assert details["winners"] == {"grad_norm": a, "snip": b, "synflow": c}
    assert details["vote"]["voters"] == ["grad_norm", "snip", "synflow"]
    assert details["vote"]["tiebreak"] == "synflow" and details["vote"]["rule"] == VOTE_RULE
    assert details["vote"]["votes"] == {p: int(p in (a, b, c)) for p in ops}
    assert details["per_metric"]["synflow"] == pytest.approx(pm["synflow"])
    assert details["n_steps"] == n
    json.dumps(details)


def test_synflow_breaks_ties_even_when_not_a_voter():
    ops = ["a", "b", "c", "d"]
    pm = {"grad_norm": dict(zip(ops, [5.0, 1.0, 0.0, 0.0])), "snip": dict(zip(ops, [1.0, 5.0, 0.0, 0.0]))}
    synflow = dict(zip(ops, [0.1, 0.2, 0.9, 0.0]))  # top is c (no votes); ranks b above a
    scores, winners = vote_scores(pm, tiebreak_scores=synflow)
    assert winners == {"grad_norm": "a", "snip": "b"}
    assert _argmax(scores) == "b"
    assert scores["b"] > scores["a"] > scores["c"] > scores["d"]
    # without synflow scores there is no tie-break
    with pytest.raises(ValueError, match="synflow"):
        vote_scores(pm)

    # through select_op with a real accumulator: synflow accumulated (step_metrics_for adds it)
    # although it does not vote. Averages set through the accumulator's state:
    torch.manual_seed(15)
    model = Tiny()
    voters = ["grad_norm", "snip"]
    metrics = step_metrics_for("vote", voters)
    assert metrics == ("grad_norm", "snip", "synflow")
    acc = SaliencyAccumulator(model.ops(), metrics)
    avg = {
        "grad_norm": {"conv1": 5.0, "conv2": 1.0, "conv3": 0.0, "unused": 0.0},  # conv1
        "snip": {"conv1": 1.0, "conv2": 5.0, "conv3": 0.0, "unused": 0.0},  # conv2
        "synflow": {"conv1": 1e-7, "conv2": 2e-7, "conv3": 0.03, "unused": 0.0},  # conv3 > conv2 > conv1
    }
    acc.load_state_dict(
        {"paths": list(model.ops()), "metrics": list(metrics),
         "sum": torch.tensor([list(avg[m].values()) for m in metrics], dtype=torch.float64),
         "count": torch.tensor(1.0, dtype=torch.float64), "n_steps": 1}
    )
    best, scores, details = select_op("vote", acc, model, model.ops(), None, None, None, voters=voters)
    assert details["winners"] == {"grad_norm": "conv1", "snip": "conv2"}
    assert list(details["per_metric"]) == voters
    assert details["vote"]["voters"] == voters
    assert details["vote"]["tiebreak_scores"] == avg["synflow"]
    assert best == "conv2" == _argmax(scores)  # 1-1 tie, synflow ranks conv2 above conv1
    # with synflow voting too it is 1-1-1 and synflow's own top wins
    best3, _, _ = select_op("vote", acc, model, model.ops(), None, None, None, voters=voters + ["synflow"])
    assert best3 == "conv3"
    # an accumulator without synflow cannot break ties: a clear error, not a silent choice
    acc2 = _trained_accumulator(model, ("grad_norm", "snip"), 1)
    with pytest.raises(ValueError, match="synflow"):
        select_op("vote", acc2, model, model.ops(), None, None, None, voters=voters)


def test_random_and_grasp_may_vote():
    torch.manual_seed(16)
    model = Tiny(act=nn.Tanh, dtype=torch.float64)
    acc = _trained_accumulator(model, step_metrics_for("vote", ["random", "grasp"]))
    assert acc.metrics == ("synflow",)
    probes = make_batches(1, dtype=torch.float64, seed=17)
    runs = [
        select_op("vote", acc, model, model.ops(), lambda: probes, F.cross_entropy,
                  torch.Generator().manual_seed(3), voters=("random", "grasp"))
        for _ in range(2)
    ]
    assert runs[0][:2] == runs[1][:2]
    assert runs[0][2]["vote"]["voters"] == ["random", "grasp"]


def test_check_voters():
    assert check_voters(None) == DEFAULT_VOTERS
    assert check_voters(["synflow", "grasp"]) == ("synflow", "grasp")
    assert check_voters(("random",)) == ("random",)
    cases = {
        "empty": ([], "empty"),
        "duplicate": (["snip", "grad_norm", "snip"], "duplicate"),
        "unknown": (["snip", "sinflow"], "sinflow"),
        "vote": (["snip", "vote"], "vote"),
        "string": ("snip", "list"),
    }
    for name, (voters, word) in cases.items():
        with pytest.raises(ValueError) as e:
            check_voters(voters)
        msg = str(e.value)
        assert word in msg and "\n" not in msg, (name, msg)
    with pytest.raises(ValueError) as e:
        check_voters(["sinflow"])
    for m in ("random", "grad_norm", "snip", "grasp", "synflow"):
        assert m in str(e.value)
    # the same validation guards select_op, step_metrics_for and SelectionContext
    model = Tiny()
    acc = _trained_accumulator(model, STEP_METRICS("vote"), 1)
    for bad in ([], ["vote"], ["snip", "snip"]):
        with pytest.raises(ValueError):
            select_op("vote", acc, model, model.ops(), None, None, None, voters=bad)
        with pytest.raises(ValueError):
            step_metrics_for("vote", bad)
        with pytest.raises(ValueError):
            scoring.SelectionContext(acc, model, model.ops(), None, None, None, voters=bad)


def test_step_metrics_for():
    gg = step_metrics_for("vote", ["grad_norm", "grasp"])
    assert "synflow" in gg and "grad_norm" in gg and "snip" not in gg
    assert gg == ("grad_norm", "synflow")
    assert step_metrics_for("vote") == STEP_METRICS("vote") == ("grad_norm", "snip", "synflow")
    assert step_metrics_for("vote", ["synflow"]) == ("synflow",)
    for m in METRICS:
        assert step_metrics_for(m) == STEP_METRICS(m)
    assert step_metrics_for("snip", ["grasp"]) == ("snip",)  # voters only matter for vote
    with pytest.raises(ValueError):
        step_metrics_for("sinflow")


# ------------------------------------------------------------------------------------------------
# Conv-BN identities (float64): synflow is BN's ε term, grasp is ‖g‖²
# ------------------------------------------------------------------------------------------------


class ConvBN(nn.Module):
    """conv(bias=False) - BN(train, eps) - act [- conv - BN - act] - GAP - linear, float64."""

    def __init__(self, eps: float, n_convs: int = 1, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        chans = [3, 4, 5, 6][: n_convs + 1]
        self.convs = nn.ModuleList(
            nn.Conv2d(i, o, 3, padding=1, bias=False) for i, o in zip(chans, chans[1:])
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(o, eps=eps) for o in chans[1:])
        self.act = act()
        self.head = nn.Linear(chans[-1], 5)
        with torch.no_grad():
            for bn in self.bns:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
        self.double().train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns):
            x = self.act(bn(conv(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("eps", [1e-3, 1e-5])
def test_synflow_is_bn_eps_term(eps):
    # y = γ(x−μ)/sqrt(σ²+ε)+β, x = conv(θ): dy/dα(θ→αθ) at α=1 = (y−β)·ε/(σ²+ε), hence
    # Σ θ⊙g = Σ_c ε/(σ_c²+ε) Σ_{n,h,w} ∂L/∂y·(y−β) = Σ_c ε/(σ_c²+ε)·γ_c·∂L/∂γ_c (exact).
    torch.manual_seed(18)
    model = ConvBN(eps)
    conv, bn = model.convs[0], model.bns[0]
    g = torch.Generator().manual_seed(19)
    x = torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (8,), generator=g)
    var = conv(x).detach().var(dim=(0, 2, 3), unbiased=False)  # BN's biased batch variance
    g_theta, g_gamma = torch.autograd.grad(F.cross_entropy(model(x), y), [conv.weight, bn.weight])
    theta, gamma = conv.weight.detach(), bn.weight.detach()
    lhs = float((g_theta * theta).sum())
    rhs = float((eps / (var + eps) * gamma * g_gamma).sum())
    snip = float((g_theta * theta).abs().sum())
    assert abs(rhs) > 1e-3 * eps * snip  # the identity is not a trivial 0 = 0
    # 1e-10 relative; plus float64 rounding of the cancelling sum (~1e-16 of snip, which matters
    # only at the smaller eps, where the term is ~2e-6 of snip)
    tol = 1e-10 * abs(rhs) + 1e-14 * snip
    assert abs(lhs - rhs) <= tol, (lhs, rhs, snip)
    # the accumulator's synflow (float64 sum) is the same number
    acc = SaliencyAccumulator({"conv": conv}, ("synflow",))
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    acc.step()
    assert abs(acc.averages()["synflow"]["conv"] - rhs) <= tol


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_grasp_is_grad_norm_squared_on_conv_bn(act):
    # BN makes L invariant to each kernel's scale (ε -> 0): H_oo θ_o = −g_o, H_o'o θ_o = 0, so
    # GraSP's −θ_o·(Hg)_o = ‖g_o‖² (why grasp is not a default voter).
    torch.manual_seed(20)
    model = ConvBN(1e-8, n_convs=3, act=act)
    ops = {f"conv{i}": c for i, c in enumerate(model.convs)}
    g = torch.Generator().manual_seed(21)
    x = torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64)
    batch = (x, torch.randint(0, 5, (8,), generator=g))
    grads = torch.autograd.grad(F.cross_entropy(model(batch[0]), batch[1]), [c.weight for c in ops.values()])
    sq = {p: float((gr**2).sum()) for p, gr in zip(ops, grads)}
    got = grasp_scores(model, ops, [batch], F.cross_entropy)
    for p in ops:
        assert sq[p] > 0
        assert got[p] == pytest.approx(sq[p], rel=1e-4), (p, got[p], sq[p])
    assert _argmax(got) == _argmax(sq)
