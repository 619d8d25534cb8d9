"""Grad Mult and the RepOpt update rules (RepOpt §3.2, Appendix A).

The heart: CSLA ≡ GR. A CSLA model (CSLABlocks with constant s, t of mixed signs, trainable identity
scale, BN + ReLU after the sum, a small head) trained with torch's SGD/AdamW and the plain model (one
conv per block, initialised to the block's equivalent kernel, same BN/head) trained with
RepOptSGD/RepOptAdamW and the Grad Mult give the same train-mode outputs at every step (weight decay
on every parameter, same batches). Run with ``-s`` to see the measured relative errors.

AdamW: each CSLA branch's Adam normalises its own gradient, so CSLA ≡ GR holds up to Adam's eps: the
per-branch denominator is ``√v̂_G + eps/|c|`` (c = s, t or 1) against ``√v̂_G + eps/M`` in GR. The
tight assertion uses ``eps`` with ``eps ≤ 1e-6 · min(|s|, |t|, 1) · min √v̂`` (checked in the test);
the default eps (1e-8) is measured and bounded loosely.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repsearch.gradmult import RepOptAdamW, RepOptSGD, grad_mult
from repsearch.rep import CSLABlock

C = 4
STEPS = 20


# ------------------------------------------------------------------ grad_mult values
def _loop_grad_mult(s, t, identity, cin, k, power, groups=1):
    """RepOpt §3.2 element by element: |s_c|^p everywhere, + |t_c|^p at the centre, + 1 at the
    centre of the diagonal (within a group)."""
    cout = len(s)
    cin_g = cin // groups
    m = torch.zeros(cout, cin_g, k, k, dtype=torch.float64)
    for c in range(cout):
        for d in range(cin_g):
            for p in range(k):
                for q in range(k):
                    v = abs(float(s[c])) ** power
                    centre = p == k // 2 and q == k // 2
                    if centre and t is not None:
                        v += abs(float(t[c])) ** power
                    if centre and identity and d == c % cin_g:
                        v += 1.0
                    m[c, d, p, q] = v
    return m


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize(
    "case",
    [
        dict(cin=3, identity=True, t=True, k=3, groups=1),
        dict(cin=3, identity=False, t=True, k=3, groups=1),
        dict(cin=5, identity=False, t=True, k=3, groups=1),
        dict(cin=3, identity=False, t=False, k=3, groups=1),
        dict(cin=3, identity=True, t=True, k=5, groups=1),
        dict(cin=3, identity=True, t=True, k=1, groups=1),
        dict(cin=3, identity=True, t=True, k=3, groups=3),
    ],
)
def test_grad_mult_matches_loop(case, power):
    s = torch.tensor([0.5, -1.3, 0.8], dtype=torch.float64)
    t = torch.tensor([-0.2, 0.9, -1.1], dtype=torch.float64) if case["t"] else None
    m = grad_mult(
        s, t, identity=case["identity"], in_channels=case["cin"], kernel_size=case["k"], power=power, groups=case["groups"]
    )
    ref = _loop_grad_mult(s, t, case["identity"], case["cin"], case["k"], power, case["groups"])
    assert m.shape == ref.shape and torch.allclose(m, ref, rtol=0, atol=1e-15)
    assert (m > 0).all()


def test_grad_mult_errors():
    s = torch.ones(3)
    with pytest.raises(ValueError, match="power"):
        grad_mult(s, s, identity=False, in_channels=3, power=3)
    with pytest.raises(ValueError, match="C_in == C_out"):
        grad_mult(s, s, identity=True, in_channels=4, power=2)
    with pytest.raises(ValueError, match="shape"):
        grad_mult(s, torch.ones(4), identity=False, in_channels=3, power=2)
    with pytest.raises(ValueError, match="odd kernel"):
        grad_mult(s, s, identity=False, in_channels=3, kernel_size=2, power=2)


# ------------------------------------------------------------------ CSLA ≡ GR
class Net(nn.Module):
    """block1 (C→C, stride 1: identity) - BN - ReLU - block2 (C→2C, stride 2) - BN - ReLU - pool - fc."""

    def __init__(self, conv1: nn.Module, conv2: nn.Module):
        super().__init__()
        self.conv1, self.bn1 = conv1, nn.BatchNorm2d(C)
        self.conv2, self.bn2 = conv2, nn.BatchNorm2d(2 * C)
        self.fc = nn.Linear(2 * C, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _pair(dtype):
    """The CSLA model (constant s, t of mixed signs) and the plain model with W = the CSLA kernels."""
    torch.manual_seed(0)
    b1 = CSLABlock(C, C, 3, 1, scale_init=1.0, trainable_scales=False)
    b2 = CSLABlock(C, 2 * C, 3, 2, scale_init=1.0, trainable_scales=False)
    with torch.no_grad():
        for b in (b1, b2):
            n = b.out_channels
            sign = torch.tensor([1.0, -1.0]).repeat(n // 2)
            b.s.copy_((torch.rand(n) * 1.2 + 0.3) * sign)
            b.t.copy_((torch.rand(n) * 1.2 + 0.3) * -sign)
        b1.scale_identity.copy_(torch.rand(C) + 0.5)
    csla = Net(b1, b2)
    with torch.no_grad():
        for bn in (csla.bn1, csla.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    csla = csla.to(dtype)
    plain = Net(nn.Conv2d(C, C, 3, padding=1, bias=False), nn.Conv2d(C, 2 * C, 3, stride=2, padding=1, bias=False))
    plain = plain.to(dtype)
    with torch.no_grad():
        plain.conv1.weight.copy_(csla.conv1.equivalent_kernel()[0])
        plain.conv2.weight.copy_(csla.conv2.equivalent_kernel()[0])
        for name in ("bn1", "bn2", "fc"):
            getattr(plain, name).load_state_dict(getattr(csla, name).state_dict())
    return csla, plain


def _mults(csla, plain, power, signed=False):
    out = {}
    for name in ("conv1", "conv2"):
        b = getattr(csla, name)
        if signed:  # the official AdamW multiplier: raw s, t (no |.|)
            m = b.s.view(-1, 1, 1, 1).expand(b.out_channels, b.in_channels, 3, 3).clone()
            m[:, :, 1, 1] += b.t.view(-1, 1)
            if b.has_identity:
                m[range(C), range(C), 1, 1] += 1.0
        else:
            m = grad_mult(b.s, b.t, identity=b.has_identity, in_channels=b.in_channels, power=power)
        out[getattr(plain, name).weight] = m
    return out


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _train_both(opt, dtype, *, signed=False, drop_identity=False, **kw):
    """Train both models STEPS steps on the same batches; per-step relative errors of the train-mode
    outputs (step 0 = before any update), then the eval outputs and kernels at the end."""
    csla, plain = _pair(dtype)
    power = 2 if opt == "sgd" else 1
    mults = _mults(csla, plain, power, signed=signed)
    if drop_identity:
        mults[plain.conv1.weight] = grad_mult(csla.conv1.s, csla.conv1.t, identity=False, in_channels=C, power=power)
    if opt == "sgd":
        o_csla = torch.optim.SGD(csla.parameters(), **kw)
        o_gr = RepOptSGD(plain.parameters(), mults, **kw)
    else:
        o_csla = torch.optim.AdamW(csla.parameters(), **kw)
        o_gr = RepOptAdamW(plain.parameters(), mults, **kw)
    gen = torch.Generator().manual_seed(1)
    errs = []
    for k in range(STEPS + 1):
        x = torch.randn(8, C, 6, 6, generator=gen).to(dtype)
        y = torch.randint(0, 5, (8,), generator=gen)
        out_c, out_g = csla(x), plain(x)
        errs.append(_rel(out_c, out_g))
        if k == STEPS:
            break
        for o, out in ((o_csla, out_c), (o_gr, out_g)):
            o.zero_grad()
            F.cross_entropy(out, y).backward()
            o.step()
    csla.eval(), plain.eval()
    x = torch.randn(8, C, 6, 6, generator=gen).to(dtype)
    eval_err = _rel(csla(x), plain(x))
    kernel_err = max(
        _rel(csla.conv1.equivalent_kernel()[0], plain.conv1.weight),
        _rel(csla.conv2.equivalent_kernel()[0], plain.conv2.weight),
    )
    moved = _rel(plain.conv1.weight, _pair(dtype)[1].conv1.weight)  # how far training took the kernel
    return errs, eval_err, kernel_err, moved, o_csla


SGD_CASES = {
    "sgd-nesterov-wd": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "sgd-plain": dict(lr=0.1),
}


def _check(errs, eval_err, kernel_err, dtype, label):
    print(f"\n{label} {dtype}: max per-step rel err {max(errs):.2e}, final {errs[-1]:.2e}, "
          f"eval {eval_err:.2e}, kernel {kernel_err:.2e}")
    for k, e in enumerate(errs):
        bound = 1e-8 if dtype == torch.float64 else 1e-5 * max(k, 1)
        assert e <= bound, f"step {k}: relative output error {e:.3e} > {bound:.1e}"
    bound = 1e-8 if dtype == torch.float64 else 1e-5 * STEPS
    assert eval_err <= bound and kernel_err <= bound


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_csla_equals_gr_sgd(case, dtype):
    errs, eval_err, kernel_err, moved, _ = _train_both("sgd", dtype, **SGD_CASES[case])
    assert moved > 0.02  # training changed the kernel: the equality is not trivial
    _check(errs, eval_err, kernel_err, dtype, case)


def test_gr_without_identity_term_is_not_csla():
    """Negative control: a Grad Mult missing the identity's +1 breaks the equality."""
    errs, *_ = _train_both("sgd", torch.float64, drop_identity=True, **SGD_CASES["sgd-nesterov-wd"])
    print(f"\nsgd without identity term: final rel err {errs[-1]:.2e}")
    assert errs[-1] > 1e-4


ADAMW = dict(lr=1e-2, weight_decay=1e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_csla_equals_gr_adamw_small_eps(dtype):
    """CSLA ≡ GR for AdamW when eps ≪ min(|s|, |t|, 1)·√v̂ element-wise (asserted below)."""
    eps = 1e-16
    errs, eval_err, kernel_err, moved, o_csla = _train_both("adamw", dtype, eps=eps, **ADAMW)
    assert moved > 0.05
    # the condition, on the CSLA side's final second moments (bias-corrected) and scales
    beta2 = o_csla.param_groups[0]["betas"][1]
    min_sqrt_v = min(
        (st["exp_avg_sq"] / (1 - beta2 ** float(st["step"]))).sqrt().min().item() for st in o_csla.state.values()
    )
    assert eps <= 1e-6 * min(0.3, 1.0) * min_sqrt_v  # |s|, |t| ≥ 0.3 by construction
    _check(errs, eval_err, kernel_err, dtype, f"adamw eps={eps:g}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_csla_vs_gr_adamw_default_eps(dtype):
    """With torch's default eps (1e-8) the equality is approximate; measured, loosely bounded."""
    errs, eval_err, kernel_err, _, _ = _train_both("adamw", dtype, eps=1e-8, **ADAMW)
    print(f"\nadamw eps=1e-8 {dtype}: max per-step rel err {max(errs):.2e}, eval {eval_err:.2e}, kernel {kernel_err:.2e}")
    assert max(errs) <= 1e-4 and eval_err <= 1e-4


def test_adamw_signed_scales_break_equivalence():
    """The official raw-s AdamW multiplier with negative scales: CSLA ≠ GR (why grad_mult uses |s|)."""
    errs, eval_err, *_ = _train_both("adamw", torch.float64, eps=1e-16, signed=True, **ADAMW)
    print(f"\nadamw raw signed s: final rel err {errs[-1]:.2e}, eval {eval_err:.2e}")
    assert errs[-1] > 1e-2 and eval_err > 1e-2


# ------------------------------------------------------------------ the optimizers against torch's
def _model(dtype=torch.float64):
    torch.manual_seed(0)
    # no conv bias before the BN: its gradient is 0 up to rounding, and Adam's m/√v of rounding noise
    # differs between any two correct implementations
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).to(dtype)


def _groups(model, wd):
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def _run(model, opt, steps=8, sched=True, start=0):
    """``steps`` training steps on fixed batches (the first ``start`` batches drawn but skipped)."""
    gen = torch.Generator().manual_seed(2)
    s = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5) if sched else None
    for k in range(steps):
        x = torch.randn(4, 3, 4, 4, generator=gen).to(next(model.parameters()).dtype)
        y = torch.randint(0, 3, (4,), generator=gen)
        if k < start:
            continue
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if s is not None:
            s.step()
    return [p.detach().clone() for p in model.parameters()]


def test_repopt_sgd_with_ones_equals_sgd():
    kw = dict(lr=0.05, momentum=0.9, nesterov=True)
    ref = _run(m := _model(), torch.optim.SGD(_groups(m, 1e-3), **kw))
    m2 = _model()
    ones = {p: torch.ones_like(p) for p in m2.parameters()}
    got = _run(m2, RepOptSGD(_groups(m2, 1e-3), ones, **kw))
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_ones", [False, True])
def test_repopt_adamw_equals_adamw(with_ones, dtype):
    kw = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-8)
    ref = _run(m := _model(dtype), torch.optim.AdamW(_groups(m, 0.05), **kw))
    m2 = _model(dtype)
    mults = {p: torch.ones_like(p) for p in m2.parameters()} if with_ones else {}
    got = _run(m2, RepOptAdamW(_groups(m2, 0.05), mults, **kw))
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


def test_grad_mult_applied_once_per_step():
    """RepOptSGD multiplies the gradient (in .grad) and SGD's step runs once, hooks included."""
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)  # torch has wrapped SGD.step by now
    p = nn.Parameter(torch.zeros(2, 2))
    m = torch.tensor([[2.0, 3.0], [0.5, 1.0]])
    opt = RepOptSGD([p], {p: m}, lr=1.0)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    p.grad = torch.ones(2, 2)
    opt.step()
    assert calls == ["pre", "post"]
    assert torch.equal(p.grad, m) and torch.equal(p.detach(), -m)


@pytest.mark.parametrize("opt_cls", [RepOptSGD, RepOptAdamW])
def test_no_host_sync_in_step(opt_cls, monkeypatch):
    model = _model(torch.float32)
    mults = {model[0].weight: torch.rand_like(model[0].weight) + 0.5}
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3) if opt_cls is RepOptSGD else dict(lr=0.01)
    opt = opt_cls(model.parameters(), mults, **kw)
    gen = torch.Generator().manual_seed(0)

    def boom(*a, **k):
        raise AssertionError("host sync inside step()")

    for _ in range(3):
        x = torch.randn(4, 3, 4, 4, generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 3, (4,), generator=gen)).backward()
        with monkeypatch.context() as mp:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
                mp.setattr(torch.Tensor, name, boom)
            opt.step()


@pytest.mark.parametrize("opt_cls", [RepOptSGD, RepOptAdamW])
def test_multiplier_checks_and_placement(opt_cls):
    model = _model(torch.float32)
    w = model[0].weight
    with pytest.raises(ValueError, match=r"grad mult of shape \(4, 3, 3\) does not match"):
        opt_cls(model.parameters(), {w: torch.ones(4, 3, 3)}, lr=0.1)
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt_cls(model.parameters(), {nn.Parameter(torch.ones(2)): torch.ones(2)}, lr=0.1)
    opt = opt_cls(model.parameters(), {w: torch.full(w.shape, 2.0)}, lr=0.1)
    model.double().to(memory_format=torch.channels_last)  # same Parameter objects, new dtype/strides
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    opt.step()
    m = opt.grad_mults[w]
    assert m.dtype == torch.float64 and m.stride() == w.stride() and torch.equal(m, torch.full(w.shape, 2.0, dtype=torch.float64))


@pytest.mark.parametrize("opt_cls,torch_cls", [(RepOptSGD, torch.optim.SGD), (RepOptAdamW, torch.optim.AdamW)])
def test_state_dict_round_trip(opt_cls, torch_cls):
    """Resume from state_dict (multipliers passed again) equals an uninterrupted run; the state also
    loads into torch's own optimizer."""
    kw = dict(lr=0.05, momentum=0.9) if opt_cls is RepOptSGD else dict(lr=0.01)
    m_full = _model()
    mk = lambda m: {m[0].weight: torch.rand(m[0].weight.shape, generator=torch.Generator().manual_seed(7)) + 0.5}
    o_full = opt_cls(m_full.parameters(), mk(m_full), **kw)
    ref = _run(m_full, o_full, steps=6, sched=False)

    m_a = _model()
    o_a = opt_cls(m_a.parameters(), mk(m_a), **kw)
    _run(m_a, o_a, steps=3, sched=False)
    sd = o_a.state_dict()
    assert all("grad" not in k for st in sd["state"].values() for k in st)  # no multiplier in the state
    m_b = _model()
    m_b.load_state_dict(m_a.state_dict())
    o_b = opt_cls(m_b.parameters(), mk(m_b), **kw)
    o_b.load_state_dict(sd)
    got = _run(m_b, o_b, steps=6, sched=False, start=3)  # the batches continue from step 3
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    torch_cls(_model().parameters(), **kw).load_state_dict(sd)
