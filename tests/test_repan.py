"""RepAn (CVPR 2024): the attach rate λ in RepBlock (forward, equivalent kernel, fusion), λ schedules
epoch by epoch, per-cycle SGDR restarts, the cycle boundary (lossless fuse, function-preserving and
official re-expansion, the conv's Parameter kept, optimizer state reset), deploy after the last cycle,
KD, carry best_val, model.init_from, recipe errors, and a short end-to-end trial on real CIFAR-10."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from repsearch.errors import UserError
from repsearch.deployed import load_deployed, load_init_from
from repsearch.methods.repan import RepAn, RepAnSpec, attach_rate, cycle_lr_factor
from repsearch.models import build_model, model_kwargs
from repsearch.rep import deploy, repblocks
from repsearch.rep.block import RepBlock
from repsearch.spec import RecipeError, TrainSpec, load_recipe, trial_recipe, validate_dict
from repsearch.train import Trainer
from equivalence import assert_close, randomize_bns

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "repan_cifar.yaml"
MODELS = [("vgg16", 1 / 16), ("resnet18", 1 / 16), ("repan_repvgg_a0", 0.25)]


def batches(n=3, b=8, seed=0, classes=10):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, classes, (b,), generator=g)) for _ in range(n)]


def eval_out(model, x):
    was = model.training
    model.eval()
    with torch.no_grad():
        y = model(x)
    model.train(was)
    return y


# ----------------------------------------------------------------------------------- RepBlock λ
@pytest.mark.parametrize("cin,cout,stride,groups", [(4, 4, 1, 1), (4, 8, 2, 1), (6, 6, 1, 2), (8, 8, 1, 8)])
def test_attach_rate_weighs_the_added_branches_in_forward_kernel_and_fusion(cin, cout, stride, groups):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)
    block = RepBlock.from_conv(conv)
    for kind in ("1x1", "1x1-kxk", "1x1-avg", "identity"):
        if block.eligible(kind):
            block.add_branch(kind, gamma_init=1.0)
    randomize_bns(block, g)
    keys = set(block.state_dict())
    x = torch.randn(2, cin, 9, 9, generator=g)
    block.eval()
    with torch.no_grad():
        kxk = block.branches["kxk"](x)
        others = sum(block.branches[k](x) for k in block.kinds if k != "kxk")
        plain = block(x)
        assert block.attach_rate is None
        block.set_attach_rate(0.3)
        buf = block.attach_lambda
        assert buf.dim() == 0 and set(block.state_dict()) == keys  # non-persistent: keys unchanged
        assert_close(block(x), kxk + 0.3 * others)
        assert_close(block.fuse()(x), kxk + 0.3 * others)
        block.set_attach_rate(0.0)
        assert block.attach_lambda is buf  # written in place: a compiled forward is not re-traced
        assert_close(block(x), kxk)  # λ = 0: the inherited branch alone
        assert_close(block.fuse()(x), kxk)
        block.set_attach_rate(1.0)
        assert_close(block(x), plain)
        block.set_attach_rate(0.6)
        ref = block(x)
        block.remove_branches([k for k in block.kinds if k != "kxk"][:1], absorb=True)
        assert_close(block(x), ref)  # absorbing a λ-weighted branch keeps the output
        w, b = block.equivalent_kernel()
        block.compensate(w * 0.5, b * 0.5)  # compensation subtracts the λ-weighted branches
        assert_close(block(x), 0.5 * ref)
    with pytest.raises(ValueError, match="finite"):
        block.set_attach_rate(float("nan"))


def test_blocks_without_attach_rate_keep_their_keys_and_description():
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    block = RepBlock.from_conv(conv)
    block.add_branch("1x1", gamma_init=1.0)
    assert "attach_rate" not in block.describe() and not any("attach" in k for k in block.state_dict())
    block.set_attach_rate(0.25)
    assert block.describe()["attach_rate"] == 0.25


# ----------------------------------------------------------------------------------- schedules
def test_attach_rate_schedules_epoch_by_epoch():
    assert [attach_rate("paper", e, 5) for e in range(8)] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1, 1, 1])
    assert [attach_rate("official_cifar", e, 5) for e in range(7)] == pytest.approx([1, 2 / 5, 3 / 5, 4 / 5, 1, 1, 1])
    assert [attach_rate("constant", e, 5) for e in range(4)] == [1.0] * 4
    assert [attach_rate(s, e, 0) for s in ("paper", "official_cifar") for e in range(3)] == [1.0] * 6
    with pytest.raises(ValueError, match="unknown attach schedule"):
        attach_rate("cosine", 0, 2)


@pytest.mark.parametrize("schedule", ["paper", "official_cifar", "constant"])
def test_method_sets_lambda_per_cycle_epoch_and_reports_it(schedule):
    model = build_model("vgg16", 10, 1 / 16)
    m = RepAn(RepAnSpec(cycles=2, epochs_per_cycle=4, attach_warmup=2, attach_schedule=schedule))
    model = m.prepare(model, [])
    data = batches(1)
    seen, cycles = [], []
    for epoch in range(1, 9):
        m.on_epoch_start(model, epoch)
        rates = {b.attach_rate for b in repblocks(model).values()}
        assert len(rates) == 1
        seen.append(rates.pop())
        m.on_epoch_end(model, epoch, data, {"val/top1": 10.0})
        meas = m.epoch_measures(epoch)
        assert meas["attach_rate"] == pytest.approx(seen[-1])
        cycles.append(meas["cycle"])
        assert ("repan/fuse_max_abs_err" in meas) == (epoch == 4)  # one boundary: after epoch 4
        assert ("repan/cycle_val_top1" in meas) == (epoch in (4, 8))
    expect = [attach_rate(schedule, e, 2) for e in range(4)] * 2
    assert seen == pytest.approx(expect)
    assert cycles == [1.0] * 4 + [2.0] * 4


def test_per_cycle_cosine_restarts_with_compounding_decay():
    model = build_model("vgg16", 10, 1 / 16)
    m = RepAn(RepAnSpec(cycles=3, epochs_per_cycle=2, attach_warmup=1, cycle_lr_decay=0.5))
    spec = TrainSpec(epochs=6, lr=0.2, min_lr=0.0, warmup_epochs=1)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr)
    sched = m.scheduler(opt, spec, steps_per_epoch=4)
    lrs = []
    for _ in range(24):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2 / 4)  # LR warm-up in the first cycle only
    assert lrs[3] == pytest.approx(0.2)
    # restarts: cycle c starts at its peak 0.2 * 0.5^(c(c+1)/2) (the official code's compounding)
    assert lrs[8] == pytest.approx(0.2 * 0.5) and lrs[16] == pytest.approx(0.2 * 0.125)
    assert cycle_lr_factor(2, 0.5) == pytest.approx(0.125)
    for c in range(3):
        seg = lrs[c * 8 + (4 if c == 0 else 0): (c + 1) * 8]
        assert all(a > b for a, b in zip(seg, seg[1:]))  # cosine decays within a cycle
    assert lrs[7] < lrs[8] and lrs[15] < lrs[16]


# ----------------------------------------------------------------------------------- boundary
@pytest.mark.parametrize("name,width", MODELS)
@pytest.mark.parametrize("reexpand", ["function_preserving", "official"])
def test_boundary_fuses_losslessly_and_reexpands(name, width, reexpand):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    model = build_model(name, 10, width)
    conv_params = {n: p for n, p in model.named_parameters() if p.dim() == 4 and p.shape[-1] == 3}
    m = RepAn(RepAnSpec(cycles=2, epochs_per_cycle=1, attach_warmup=0, reexpand=reexpand))
    model = m.prepare(model, [])
    randomize_bns(model, g)
    for b in repblocks(model).values():
        b.set_attach_rate(0.7)  # fusion must honour λ
    data = batches(1)
    x = data[0][0]
    y_multi = eval_out(model, x)
    # the fused model, as the boundary builds it, on a copy
    fused = deploy(model)
    y_fused = eval_out(fused, x)
    assert_close(y_fused, y_multi)
    changes = m.on_epoch_end(model, 1, data, {"val/top1": 12.0})
    assert changes.structure_changed and changes.reset_optimizer == "all"
    meas = m.epoch_measures(1)
    assert meas["repan/fuse_max_abs_err"] <= 1e-5 * max(1.0, y_multi.abs().max().item())
    y_exp = eval_out(model, x)
    if reexpand == "function_preserving":
        assert_close(y_exp, y_fused)
        assert meas["repan/expand_max_abs_err"] <= 1e-5 * max(1.0, y_fused.abs().max().item())
    else:  # the official re-expansion is not function-preserving
        assert (y_exp - y_fused).abs().max().item() > 1e-3
    # every 3x3 conv of the plain model is a block again, holding the same Parameter (optimizer identity)
    blocks = repblocks(model)
    assert blocks and all(b.kinds[0] == "kxk" and len(b.kinds) > 1 for b in blocks.values())
    kept = {id(b.kxk.conv.weight) for b in blocks.values()}
    assert {id(p) for p in conv_params.values()} >= kept and len(kept) == len(blocks)
    # deploy loads strictly into the plain architecture and equals the training-time model
    plain = build_model(name, 10, width)
    plain.load_state_dict(deploy(model).state_dict(), strict=True)
    assert_close(eval_out(plain, x), y_exp)


def test_official_reexpansion_uses_the_official_init_and_carries_bn_statistics():
    torch.manual_seed(0)
    model = build_model("repan_repvgg_a0", 10, 0.25)
    m = RepAn(RepAnSpec(cycles=2, epochs_per_cycle=1, attach_warmup=0, reexpand="official"))
    model = m.prepare(model, [])
    randomize_bns(model, torch.Generator().manual_seed(0))
    before = {p: b.branches["1x1"].bn.running_var.clone() for p, b in repblocks(model).items()}
    m.on_epoch_end(model, 1, batches(1), {"val/top1": 10.0})
    for p, b in repblocks(model).items():
        br = b.branches["1x1"]
        assert torch.equal(br.bn.running_var, before[p])  # statistics carried over
        assert torch.all(br.bn.weight == 1.0)  # γ = 1
        bound = 0.1 / math.sqrt(br.conv.weight.shape[0])
        assert br.conv.weight.abs().max().item() <= bound  # U(±0.1/√C_out)


def test_optimizer_state_is_reset_at_each_boundary_and_deploy_loads_strictly():
    torch.manual_seed(0)
    model = build_model("repan_repvgg_a0", 10, 0.25)
    m = RepAn(RepAnSpec(cycles=3, epochs_per_cycle=1, attach_warmup=0))
    model = m.prepare(model, [])
    data = batches(2)
    spec = TrainSpec(epochs=3, lr=0.05, warmup_epochs=0, min_lr=0.0, amp=False)
    trainer = Trainer(model, m, data, data[:1], spec, torch.device("cpu"))
    observed = []
    sync = m.sync_optimizer

    def spy(optimizer, mdl, changes):
        n_before = len(optimizer.state)
        out = sync(optimizer, mdl, changes)
        group_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        observed.append((n_before, len(optimizer.state), group_ids == {id(p) for p in mdl.parameters()}))
        return out

    m.sync_optimizer = spy
    history = trainer.fit()
    assert [(a > 0, b, c) for a, b, c in observed] == [(True, 0, True), (True, 0, True)]  # 2 boundaries
    assert [h["cycle"] for h in history] == [1.0, 2.0, 3.0]
    assert all("repan/fuse_max_abs_err" in h for h in history[:2]) and "repan/fuse_max_abs_err" not in history[2]
    plain = build_model("repan_repvgg_a0", 10, 0.25)
    plain.load_state_dict(deploy(model).state_dict(), strict=True)
    assert_close(eval_out(plain, data[0][0]), eval_out(model, data[0][0]))


def test_freeze_inherited_during_warmup_drops_kxk_and_inherited_bn_gradients_after_the_first_cycle(monkeypatch):
    import repsearch.methods.repan as repan_mod

    torch.manual_seed(0)
    model = build_model("vgg16", 10, 1 / 16)
    m = RepAn(RepAnSpec(cycles=2, epochs_per_cycle=4, attach_warmup=2, freeze_inherited_during_warmup=True))
    model = m.prepare(model, [])
    (x, y), = batches(1)
    calls = []
    from repsearch.rep import conv_bn_pairs as real_pairs

    monkeypatch.setattr(repan_mod, "conv_bn_pairs", lambda mdl: calls.append(1) or real_pairs(mdl), raising=False)
    modules = dict(model.named_modules())
    # the model BN that follows each block (vgg16: features.<i> conv, features.<i+1> BN) = the inherited BN
    following = {p: modules[p.rsplit(".", 1)[0] + "." + str(int(p.rsplit(".", 1)[1]) + 1)] for p in repblocks(model)}
    assert following and all(isinstance(bn, nn.BatchNorm2d) for bn in following.values())

    def grads_after_backward(epoch):
        m.on_epoch_start(model, epoch)
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        m.after_backward(model, 0)
        blocks = list(repblocks(model).values())
        kxk = [p.grad for b in blocks for p in b.kxk.parameters()]
        new = [p.grad for b in blocks for k in b.kinds if k != "kxk" for p in b.branches[k].parameters()]
        bn = [p.grad for b in following.values() for p in (b.weight, b.bias)]
        return kxk, new, bn

    kxk, _, bn = grads_after_backward(1)  # first cycle from scratch: nothing frozen
    assert all(g is not None for g in kxk + bn) and not calls
    m.on_epoch_end(model, 4, batches(1), {"val/top1": 10.0})  # boundary
    for epoch in (5, 6):  # cycle 2, λ warm-up epochs: the inherited conv, its BN and the model BN frozen
        kxk, new, bn = grads_after_backward(epoch)
        assert all(g is None for g in kxk) and all(g is None for g in bn) and any(g is not None for g in new)
    assert len(calls) == 1  # the BN pairing is computed once per structure change, not per epoch/step
    kxk, _, bn = grads_after_backward(7)  # after the warm-up: trains again
    assert all(g is not None for g in kxk + bn)


def test_carry_best_val_restores_the_cycles_best_weights():
    torch.manual_seed(0)
    model = build_model("vgg16", 10, 1 / 16)
    m = RepAn(RepAnSpec(cycles=2, epochs_per_cycle=3, attach_warmup=0, carry="best_val"))
    model = m.prepare(model, [])
    data = batches(1)
    x = data[0][0]
    snaps = {}
    for epoch, val in zip((1, 2, 3), (20.0, 40.0, 30.0)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        snaps[epoch] = eval_out(model, x)
        m.on_epoch_end(model, epoch, data, {"val/top1": val})
    assert m.cycle_vals == [40.0] and m.epoch_measures(3)["repan/cycle_val_top1"] == 40.0
    assert_close(eval_out(model, x), snaps[2])  # boundary fused and re-expanded epoch 2's weights
    assert [e["from_epoch"] for e in m.events if e["kind"] == "carry"] == [2]


def test_carry_best_val_restores_lambda_with_the_weights_at_the_boundary_and_before_deploy():
    """Best epochs inside the λ warm-up (paper schedule, w = 2: λ = 1/3, 2/3, 1): the restored model
    must be the validated one, λ included (λ is not in state_dict)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(7)
    model = build_model("repan_repvgg_a0", 10, 0.25)
    m = RepAn(RepAnSpec(cycles=2, epochs_per_cycle=3, attach_warmup=2, carry="best_val"))
    model = m.prepare(model, [])
    data = batches(1)
    x = data[0][0]
    vals = {1: 40.0, 2: 20.0, 3: 30.0, 4: 10.0, 5: 50.0, 6: 45.0}  # best: epoch 1 (λ 1/3), epoch 5 (λ 2/3)
    snaps = {}
    for epoch in range(1, 7):
        m.on_epoch_start(model, epoch)
        randomize_bns(model, g)  # new weights every epoch; the added branches' γ ≠ 0, so λ matters
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 4:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        snaps[epoch] = eval_out(model, x)  # what validation saw
        m.on_epoch_end(model, epoch, data, {"val/top1": vals[epoch], "val/loss": 100.0 / vals[epoch]})
        if epoch == 3:  # boundary: epoch 1's weights at λ = 1/3, fused and re-expanded
            assert_close(eval_out(model, x), snaps[1])
            assert (snaps[3] - snaps[1]).abs().max().item() > 1e-3  # the restore changed something
    assert {round(b.attach_rate, 6) for b in repblocks(model).values()} == {round(2 / 3, 6)}
    assert_close(eval_out(model, x), snaps[5])
    assert_close(eval_out(deploy(model), x), snaps[5])  # deployed = validated
    assert [(e["from_epoch"], e["attach_rate"]) for e in m.events if e["kind"] == "carry"] == [
        (1, pytest.approx(1 / 3)), (5, pytest.approx(2 / 3))]
    assert m.final_measures() == {"val/top1": 50.0, "val/loss": pytest.approx(2.0), "repan/carried_epoch": 5.0}


def test_carry_last_reports_the_last_epoch_as_carried_and_keeps_its_val_measures():
    model = build_model("vgg16", 10, 1 / 16)
    m = RepAn(RepAnSpec(cycles=1, epochs_per_cycle=2, attach_warmup=1))
    model = m.prepare(model, [])
    for epoch, val in ((1, 50.0), (2, 10.0)):
        m.on_epoch_start(model, epoch)
        assert m.final_measures() == {}
        m.on_epoch_end(model, epoch, batches(1), {"val/top1": val, "val/loss": 1.0})
    assert m.final_measures() == {"repan/carried_epoch": 2.0}  # the trial keeps the last epoch's val/top1


def test_boundary_probe_batch_leaves_the_device_loaders_epoch_alone():
    from repsearch.data import DeviceLoader

    g = torch.Generator().manual_seed(0)
    loader = DeviceLoader(torch.randint(0, 256, (24, 32, 32, 3), dtype=torch.uint8, generator=g),
                          torch.randint(0, 10, (24,), generator=g), 8, mean=(0.5,) * 3, std=(0.25,) * 3, train=True)
    loader.set_epoch(3)
    m = RepAn(RepAnSpec(cycles=2, epochs_per_cycle=1, attach_warmup=0))
    model = m.prepare(build_model("vgg16", 10, 1 / 16), [])
    randomize_bns(model, g)
    out = m.boundary(model, 1, loader)
    assert loader.epoch == 3  # no epoch planned or consumed by the probe
    assert set(out) == {"repan/fuse_max_abs_err", "repan/expand_max_abs_err"}
    assert out["repan/fuse_max_abs_err"] <= 1e-4 and out["repan/expand_max_abs_err"] <= 1e-4
    assert m.boundary(model, 2, []) == {}  # an empty loader: no probe, no error measures


# ----------------------------------------------------------------------------------- KD, init_from
def _save_deployed(path: Path, name="vgg16", width=1 / 16, classes=10) -> nn.Module:
    model = build_model(name, classes, width)
    randomize_bns(model, torch.Generator().manual_seed(5))
    kwargs = model_kwargs(name, classes, width)
    torch.save({"model": name, "kwargs": kwargs, "state_dict": model.state_dict()}, path)
    return model.eval()


def test_kd_loss_and_teacher_outside_the_counted_model(tmp_path):
    teacher = _save_deployed(tmp_path / "t.pt")
    rec = validate_dict(
        {"model": {"name": "vgg16", "width": 1 / 16}, "train": {"epochs": 2},
         "method": {"name": "repan", "cycles": 2, "epochs_per_cycle": 1, "attach_warmup": 0,
                    "kd": {"teacher": str(tmp_path / "t.pt"), "alpha": 0.9, "temperature": 4.0}}},
        "test",
    )
    m = RepAn(rec.method, recipe=rec)
    model = m.prepare(build_model("vgg16", 10, 1 / 16), [])
    (x, y), = batches(1)
    s = model(x)
    with torch.no_grad():
        t = teacher(x)
    T = 4.0
    p_t = torch.softmax(t / T, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, 1))).sum(1).mean()
    ref = 0.9 * T * T * kl + 0.1 * nn.functional.cross_entropy(s, y)
    assert torch.allclose(m.loss(s, y, x), ref, rtol=1e-5, atol=1e-6)
    assert m.teacher is not None and not any(p.requires_grad for p in m.teacher.parameters())
    assert all(p is not q for p in model.parameters() for q in m.teacher.parameters())
    plain = RepAn(RepAnSpec(cycles=2, epochs_per_cycle=1, attach_warmup=0))
    model2 = plain.prepare(build_model("vgg16", 10, 1 / 16), [])
    spec = TrainSpec(epochs=2, lr=0.01, warmup_epochs=0, min_lr=0.0)
    t_kd = Trainer(model, m, batches(1), batches(1), spec, torch.device("cpu"))
    t_plain = Trainer(model2, plain, batches(1), batches(1), spec, torch.device("cpu"))
    assert t_kd.flops_m == t_plain.flops_m  # the teacher's forward is not in flops_m


def test_missing_or_incompatible_teacher_is_one_line(tmp_path):
    _save_deployed(tmp_path / "c100.pt", classes=100)
    base = {"model": {"name": "vgg16", "width": 1 / 16}, "train": {"epochs": 2},
            "method": {"name": "repan", "cycles": 2, "epochs_per_cycle": 1, "attach_warmup": 0}}
    for teacher, msg in ((str(tmp_path / "nope.pt"), "no such file"), (str(tmp_path / "c100.pt"), "100 classes")):
        d = {**base, "method": {**base["method"], "kd": {"teacher": teacher}}}
        with pytest.raises(RecipeError, match=msg) as exc:
            validate_dict(d, "r.yaml")
        assert "\n" not in str(exc.value) and "method.kd.teacher" in str(exc.value)


def test_init_from_loads_a_finished_runs_weights_and_rejects_another_architecture(tmp_path):
    src = _save_deployed(tmp_path / "d.pt")
    model = build_model("vgg16", 10, 1 / 16)
    load_init_from(model, str(tmp_path / "d.pt"), None, "vgg16", model_kwargs("vgg16", 10, 1 / 16))
    x = batches(1)[0][0]
    assert_close(eval_out(model, x), eval_out(src, x))
    other = build_model("vgg16", 10, 1 / 8)
    with pytest.raises(UserError, match="width"):
        load_init_from(other, str(tmp_path / "d.pt"), None, "vgg16", model_kwargs("vgg16", 10, 1 / 8))


# ----------------------------------------------------------------------------------- recipe errors
@pytest.mark.parametrize(
    "sets,msg",
    [
        (("method.attach_warmup=30",), "attach_warmup \\(30\\) must be smaller than method.epochs_per_cycle"),
        (("train.epochs=100",), "train.epochs \\(100\\) must equal method.cycles x method.epochs_per_cycle"),
        (("sweep.pruner=median",), "cannot be used with RepAn"),
        (("method.space=[kxk]",), "gives no conv of repan_repvgg_a0 a branch beyond kxk"),
    ],
)
def test_recipe_mistakes_are_one_line(sets, msg):
    with pytest.raises(RecipeError, match=msg) as exc:
        load_recipe(RECIPE, None, sets)
    assert "\n" not in str(exc.value)


def test_cli_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "repsearch", "validate", str(RECIPE), "--set", "train.epochs=7"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.epochs (7) must equal" in lines[0]


def test_recipe_profiles_validate_with_equal_epochs_for_every_arm():
    for profile in (None, "smoke", "short"):
        rec, _ = load_recipe(RECIPE, profile)
        assert rec.method.name == "repan" and rec.sweep.pruner == "none"
        for b in rec.sweep.baselines:
            t = trial_recipe(rec, b, 0)
            assert t.train.epochs == rec.train.epochs == rec.method.cycles * rec.method.epochs_per_cycle


# ----------------------------------------------------------------------------------- end to end
class _Spy:
    """Wraps a loader and records how many training epochs had ended when it was first iterated."""

    def __init__(self, inner, epochs_done):
        self.inner, self.epochs_done, self.reads = inner, epochs_done, []

    def __iter__(self):
        self.reads.append(len(self.epochs_done))
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_trial_end_to_end_and_test_split_never_read_before_the_end(tmp_path, data_root, monkeypatch):
    """KD off, carry: best_val: 2 cycles x 1 epoch on a tiny real CIFAR-10 subset through run_trial;
    the test split is read only after the last epoch, and the cycle structure is in the measures."""
    import repsearch.trial as trial_mod

    rec, _ = load_recipe(
        RECIPE, "smoke",
        ("data.train_subset=256", "data.val_size=64", "data.test_subset=64", "model.width=0.125",
         "train.batch_size=32", "train.eval_batch_size=64", "train.epochs=2", "method.cycles=2",
         "method.epochs_per_cycle=1", "method.attach_warmup=0", "train.warmup_epochs=0", "method.carry=best_val",
         "sweep.params={}"),
    )
    rec = trial_recipe(rec, {}, 0)
    epochs_done: list[int] = []
    spies = {}
    real_build = trial_mod.build_data

    def build_data(*a, **kw):
        bundle = real_build(*a, **kw)
        bundle.test = spies["test"] = _Spy(bundle.test, epochs_done)
        return bundle

    monkeypatch.setattr(trial_mod, "build_data", build_data)
    result = trial_mod.run_trial(
        rec, data_root=str(data_root), device="cpu", out_dir=tmp_path / "t", progress=False,
        on_epoch=lambda e, m: epochs_done.append(e),
    )
    assert spies["test"].reads == [2]  # read once, after both epochs
    h = result.history
    assert [m["cycle"] for m in h] == [1.0, 2.0] and [m["attach_rate"] for m in h] == [1.0, 1.0]
    assert "repan/fuse_max_abs_err" in h[0] and "repan/expand_max_abs_err" in h[0]
    assert "repan/cycle_val_top1" in h[0] and "repan/cycle_val_top1" in h[1]
    assert result.final["deploy/rel_err"] <= 1e-5 and math.isfinite(result.final["test/top1"])
    assert any(e["kind"] == "boundary" for e in result.events)


def test_a_repan_arm_of_another_methods_sweep_rejects_pruners_too():
    d = {"model": {"name": "repan_repvgg_a0", "width": 0.25}, "method": {"name": "origin"}, "train": {"epochs": 4},
         "sweep": {"pruner": "median", "baselines": [
             {"method.name": "repan", "method.cycles": 2, "method.epochs_per_cycle": 2, "method.attach_warmup": 1}]}}
    with pytest.raises(RecipeError, match=r"sweep.baselines\[0\].*cannot be used with RepAn"):
        validate_dict(d, "x")
    d["sweep"]["pruner"] = "none"
    validate_dict(d, "x")


def test_trial_with_carry_best_val_reports_the_carried_epochs_validation(tmp_path, data_root, monkeypatch):
    """2 cycles x 2 epochs (λ warm-up 1: λ = 1/2, 1) through run_trial, with the even epochs' validation
    reported as 0 % so that the best epoch of each cycle is its first (inside the λ warm-up): the final
    val/top1 and val/loss are the carried epoch's, and the deployed model is the validated one (same
    top-1, loss and logits). The official re-expansion (new branches at γ = 1) makes λ matter from the
    first epoch of cycle 2, so deploying the restored weights with the last epoch's λ = 1 would show."""
    import repsearch.train as train_mod
    import repsearch.trial as trial_mod

    rec, _ = load_recipe(
        RECIPE, "smoke",
        ("data.train_subset=256", "data.val_size=64", "data.test_subset=64", "model.width=0.125",
         "train.batch_size=32", "train.eval_batch_size=64", "train.epochs=4", "method.cycles=2",
         "method.epochs_per_cycle=2", "method.attach_warmup=1", "train.warmup_epochs=0", "method.carry=best_val",
         "method.reexpand=official", "train.lr=0.02", "sweep.params={}"),
    )
    rec = trial_recipe(rec, {}, 0)
    real_evaluate = train_mod.evaluate
    calls = []

    def evaluate(model, loader, *a, **kw):  # the Trainer's validation, once per epoch
        calls.append(eval_out(model, next(iter(loader))[0]))  # what validation saw: logits (B, 10)
        loss, top1 = real_evaluate(model, loader, *a, **kw)
        return (loss + 5.0, 0.0) if len(calls) % 2 == 0 else (loss, top1)

    bundles = []
    real_build = trial_mod.build_data
    monkeypatch.setattr(trial_mod, "build_data", lambda *a, **kw: bundles.append(real_build(*a, **kw)) or bundles[-1])
    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    result = trial_mod.run_trial(rec, data_root=str(data_root), device="cpu", out_dir=tmp_path / "t", progress=False)
    h, final = result.history, result.final
    deployed, _ = load_deployed(tmp_path / "t" / "deployed.pt", "cpu", 10)
    dep_loss, dep_top1 = real_evaluate(deployed, bundles[0].val, torch.device("cpu"))
    assert dep_loss == pytest.approx(h[2]["val/loss"], rel=1e-5) and dep_top1 == h[2]["val/top1"]
    assert_close(eval_out(deployed, next(iter(bundles[0].val))[0]), calls[2])  # the validated model, λ included
    assert len(calls) == 4 and h[3]["val/top1"] == 0.0
    assert [e["from_epoch"] for e in result.events if e["kind"] == "carry"] == [1, 3]
    assert final["val/top1"] == h[2]["val/top1"] and final["val/loss"] == h[2]["val/loss"]
    assert final["deploy/val_top1"] == final["train_model/val_top1"] == h[2]["val/top1"]
    assert final["repan/carried_epoch"] == 3.0
    assert final["deploy/rel_err"] <= 1e-5


def test_teacher_and_init_from_run_ids_are_resolved_by_the_parent_from_the_studys_store(tmp_path):
    """A teacher (or init_from) named by run id comes from the depending study's own MLflow store,
    before the study is named; an unknown run id is one line (exit 2 in the CLI)."""
    from repsearch.dependencies import resolve_dependencies
    from repsearch.errors import UserError
    from repsearch.tracking import Tracker, resolve_stores

    _save_deployed(tmp_path / "deployed.pt")
    base = {"model": {"name": "vgg16", "width": 1 / 16}, "train": {"epochs": 2},
            "method": {"name": "repan", "cycles": 2, "epochs_per_cycle": 1, "attach_warmup": 0}}
    stores = resolve_stores(validate_dict(base, "r"), tmp_path / "teacher.yaml", runs_dir=tmp_path / "runs")
    tracker = Tracker(stores)
    run_id = tracker.start_trial(None, run_name="teacher", tags={})
    tracker.log_artifacts(run_id, [tmp_path / "deployed.pt"])
    d = {**base, "method": {**base["method"], "kd": {"teacher": run_id}}, "model": {**base["model"], "init_from": run_id}}
    rec = validate_dict(d, "r")
    assert rec.method.dependencies() == {"kd.teacher": "deployed.pt"}
    resolved = resolve_dependencies(rec, tmp_path / "r.yaml", stores)
    local = tmp_path / "runs" / "deps" / run_id / "deployed.pt"
    assert Path(resolved.method.kd.teacher) == local.resolve() and Path(resolved.model.init_from) == local.resolve()
    assert resolved.method.dependencies() == {}
    d["method"]["kd"]["teacher"] = "f" * 32
    with pytest.raises(UserError, match="no MLflow run") as exc:
        resolve_dependencies(validate_dict(d, "r"), tmp_path / "r.yaml", stores)
    assert "\n" not in str(exc.value)
