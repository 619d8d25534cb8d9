"""DyRep (Algorithm 1 as METHODS.md settles it): schedule, Rep with BN re-calibration and
compensation (Eq. 6), Dep with folding (Eq. 10) over every block, nested ones included."""

import json

import pytest
import torch
from torch import nn

from repsearch.methods.dyrep import DyRep, DyRepSpec, dyrep_importance
from repsearch.methods.recalibrate import recalibrate_bn
from repsearch.models import build_model
from repsearch.rep import RepBlock, candidate_convs, deploy, expand, get_module, kaiming_fan_out, repblocks
from repsearch.spec import TrainSpec
from repsearch.train import Trainer
from equivalence import assert_close, randomize_bns







def tiny_vgg():
    return build_model("vgg16", num_classes=10, width=1 / 16)


def batches(n=4, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g)) for _ in range(n)]


def test_schedule_contract():
    m = DyRep(DyRepSpec(interval=15, grow_until=500))
    adjust = [e for e in range(1, 601) if m.adjusts_at(e)]
    assert adjust[0] == 15 and adjust[-1] == 495 and len(adjust) == 33
    m = DyRep(DyRepSpec(interval=2, grow_until=6))
    assert [e for e in range(1, 10) if m.adjusts_at(e)] == [2, 4, 6]


@pytest.mark.parametrize("metric", ["synflow", "grasp", "vote", "random"])
def test_rep_keeps_the_eval_output(metric):
    """Rep (expand + re-calibrate the new BNs + compensate) leaves the eval-mode model unchanged."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = tiny_vgg()
    randomize_bns(model, gen)
    method = DyRep(DyRepSpec(scoring=metric, interval=1, recal_batches=3, probe_batches=2), seed=0)
    model = method.prepare(model, [])
    data = batches()
    x = data[0][0]
    for images, labels in data:  # a few training steps so that scores exist
        loss = nn.functional.cross_entropy(model(images), labels)
        model.zero_grad()
        loss.backward()
        method.after_backward(model, 0)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    model.train()
    bn_stats = {n: b.detach().clone() for n, b in model.named_buffers()}
    path = method.rep(model, epoch=1, loader=data)
    assert isinstance(get_module(model, path), RepBlock)
    ev = method.events[-1]
    assert ev["kind"] == "rep" and ev["path"] == path and set(ev["scores"]) >= {path}
    assert ev["compensation_max_err"] < 1e-5
    # the new branches' BNs were re-calibrated (not the default 0/1 statistics)
    block = get_module(model, path)
    new_last = block.branches["1x1"].last_bn
    assert not torch.allclose(new_last.running_var, torch.ones_like(new_last.running_var))
    assert torch.allclose(new_last.weight, torch.full_like(new_last.weight, 0.01))
    # and no other BN statistics moved
    for n, b in model.named_buffers():
        if n in bn_stats:
            assert torch.equal(b, bn_stats[n]), n
    model.eval()
    with torch.no_grad():
        assert_close(model(x), ref)


def test_recalibrate_only_touches_given_bns():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    before = model[1].running_mean.clone()
    used = recalibrate_bn(model, [model[3]], batches(n=5), 3)
    assert used == 3 and torch.equal(model[1].running_mean, before)
    assert model[3].num_batches_tracked.item() == 3 and model[3].momentum == 0.1
    assert model.training


def grown(seed=0):
    torch.manual_seed(seed)
    model = tiny_vgg()
    randomize_bns(model, torch.Generator().manual_seed(seed + 1))
    kinds = ("kxk", "1x1", "1x1-kxk", "1x1-avg", "1xk", "kx1", "identity")
    expand(model, "features.3", kinds, gamma_init=0.01, conv_init=kaiming_fan_out)
    expand(model, "features.7", kinds, gamma_init=0.01, conv_init=kaiming_fan_out)
    expand(model, "features.3.branches.kxk.conv", kinds, gamma_init=0.01, conv_init=kaiming_fan_out)  # nested
    randomize_bns(model, torch.Generator().manual_seed(seed + 2))
    return model


def old_branch_importance(block):
    """The former ``RepBlock.branch_importance()`` (DyRep's rule baked into rep/), verbatim."""
    with torch.no_grad():
        ref = block.kxk.bn.weight.abs().mean().item()
        out = {}
        for kind in block.kinds:
            if kind == "kxk":
                continue
            g = block.branches[kind].last_bn.weight.abs().mean().item()
            out[kind] = g / ref if ref > 0 else float("inf")
        return out


def test_dyrep_importance_matches_the_former_rule():
    """dyrep_importance (DyRep Eq. 9 as the official code reads it) gives exactly the numbers the
    former built-in RepBlock.branch_importance() gave, on blocks with random γs (nested included)."""
    model = grown(seed=4)
    blocks = repblocks(model)
    assert len(blocks) == 3
    for path, block in blocks.items():
        imp = block.branch_importance(dyrep_importance)
        assert imp == old_branch_importance(block), path  # bit-identical floats, same order
        assert list(imp) == list(block.kinds[1:])
        assert all(v > 0 for v in imp.values())
    block = blocks["features.3"]
    with torch.no_grad():
        block.kxk.bn.weight.fill_(-2.0)
        block.branches["1x1"].last_bn.weight.fill_(0.01)
        block.branches["1x1"].last_bn.weight[:2] = 0.5
        block.branches["identity"].last_bn.weight.fill_(-0.01)
    c = block.out_channels
    imp = block.branch_importance(dyrep_importance)
    assert imp == old_branch_importance(block)
    assert abs(imp["identity"] - 0.005) < 1e-7  # identity: its bare BN's γ, as before
    assert abs(imp["1x1"] - (2 * 0.5 + (c - 2) * 0.01) / c / 2) < 1e-6
    with torch.no_grad():
        block.kxk.bn.weight.zero_()
    imp = block.branch_importance(dyrep_importance)
    assert imp == old_branch_importance(block) and all(v == float("inf") for v in imp.values())


def test_dep_uses_dyrep_importance():
    model = grown(seed=5)
    scanned = {p: old_branch_importance(b) for p, b in repblocks(model).items()}
    method = DyRep(DyRepSpec(dep_threshold=1e9))  # never cut: only the scan
    method.dep(model, epoch=1, exempt=set())
    assert method.events[-1]["kind"] == "dep_scan" and method.events[-1]["importances"] == scanned


def set_importance(block, values):
    kxk_gamma = block.branches["kxk"].last_bn.weight.abs().mean().item()
    for kind, v in values.items():
        block.branches[kind].last_bn.weight.data.fill_(v * kxk_gamma)


def test_dep_cuts_below_mean_and_floor_and_keeps_output():
    model = grown()
    a = get_module(model, "features.3")
    nested = get_module(model, "features.3.branches.kxk.conv")
    b = get_module(model, "features.7")
    set_importance(a, {"1x1": 0.5, "1x1-kxk": 0.05, "1x1-avg": 0.4, "1xk": 0.02, "kx1": 0.6, "identity": 0.45})
    set_importance(nested, {"1x1": 0.3, "1x1-kxk": 0.01, "1x1-avg": 0.3, "1xk": 0.3, "kx1": 0.3, "identity": 0.3})
    set_importance(b, {"1x1": 0.011, "1x1-kxk": 0.01, "1x1-avg": 0.01, "1xk": 0.012, "kx1": 0.01})
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    method = DyRep(DyRepSpec(dep_threshold=0.02, dep_floor=0.1))
    cut = method.dep(model, epoch=3, exempt=set())
    assert sorted(get_module(model, "features.3").kinds) == sorted(["kxk", "1x1", "1x1-avg", "kx1", "identity"])
    assert "1x1-kxk" not in get_module(model, "features.3.branches.kxk.conv").kinds
    assert len(get_module(model, "features.7").kinds) == 6  # std 0.0008 < lambda: nothing cut (no identity: C_in != C_out)
    assert cut == 3
    deps = [e for e in method.events if e["kind"] == "dep"]
    assert {e["path"] for e in deps} == {"features.3", "features.3.branches.kxk.conv"}
    for e in deps:
        assert e["std"] > 0.02 and set(e["removed"]) <= set(e["importances"])
        assert all(e["importances"][k] < e["mean"] and e["importances"][k] < 0.1 for k in e["removed"])
    json.dumps(method.events)
    with torch.no_grad():
        assert_close(model(x), ref)


def test_dep_exempts_the_new_block_and_collapses_empty_blocks():
    model = grown(seed=3)
    a = get_module(model, "features.3")
    set_importance(a, {"1x1": 0.01, "1x1-kxk": 0.01, "1x1-avg": 0.01, "1xk": 0.01, "kx1": 0.3, "identity": 0.3})
    method = DyRep(DyRepSpec())
    method.dep(model, epoch=1, exempt={"features.3"})
    assert len(get_module(model, "features.3").kinds) == 7  # exempt: nothing cut
    # a block whose every extra branch is cut becomes a plain conv again (official code)
    others = {"features.3", "features.3.branches.kxk.conv"}
    b = get_module(model, "features.7")
    for kind in ("1x1", "1x1-kxk", "1x1-avg"):
        b.remove_branches([kind])
    set_importance(b, {"kx1": 0.01, "1xk": 0.01})
    assert method.dep(model, epoch=2, exempt=others) == 0  # two equal values: std 0
    b.remove_branches(["1xk"])
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    set_importance(b, {"kx1": 0.01})
    assert method.dep(model, epoch=3, exempt=others) == 0  # one value: never cut (torch.std is NaN)
    b.remove_branches(["kx1"])
    from repsearch.rep import collapse

    collapse(model, "features.7")
    assert isinstance(get_module(model, "features.7"), nn.Conv2d)
    with torch.no_grad():
        assert_close(model(x), ref)


def test_dyrep_in_the_trainer_grows_cuts_and_deploys(tiny_data):
    """Two adjustments through the real Trainer: optimizer groups follow the structure, the grown
    model deploys to the origin architecture with the same eval outputs."""
    torch.manual_seed(0)
    model = tiny_vgg()
    method = DyRep(DyRepSpec(interval=1, grow_until=2, recal_batches=2), seed=0)
    model = method.prepare(model, tiny_data.train)
    spec = TrainSpec(epochs=3, batch_size=32, lr=0.05)
    trainer = Trainer(model, method, tiny_data.train, tiny_data.val, spec, torch.device("cpu"))
    history = trainer.fit()
    reps = [e for e in method.events if e["kind"] == "rep"]
    assert [e["epoch"] for e in reps] == [1, 2]
    assert history[0]["n_branches"] < history[-1]["n_branches"]
    assert history[-1]["avg_flops_m"] == pytest.approx(sum(h["flops_m"] for h in history) / 3)
    params = {id(p) for p in model.parameters()}
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert params == in_opt
    plain = deploy(model)
    origin = tiny_vgg()
    origin.load_state_dict(plain.state_dict(), strict=True)
    model.eval()
    origin.eval()
    x, _ = next(iter(tiny_data.val))
    with torch.no_grad():
        assert_close(origin(x), model(x))


def test_candidates_leave_out_convs_the_space_cannot_grow():
    """With {kxk, identity}, only convs with C_in = C_out and stride 1 can gain a branch."""
    model = tiny_vgg()
    method = DyRep(DyRepSpec(space=["kxk", "identity"]))
    ops = method._ops(model)
    assert ops and all(c.in_channels == c.out_channels and c.stride == (1, 1) for c in ops.values())
    assert "features.0" not in ops  # 3 -> 4 channels


def test_scoring_stops_after_the_last_adjustment_and_synflow_wants_fp32():
    m = DyRep(DyRepSpec(interval=3, grow_until=10, scoring="synflow"))
    assert m.last_adjustment == 9
    assert m.fp32_gradients(9) and not m.fp32_gradients(10)
    assert not DyRep(DyRepSpec(scoring="snip")).fp32_gradients(1)
    model = m.prepare(tiny_vgg(), [])
    assert m.accumulator is not None
    data = batches(n=2)
    assert m.on_epoch_end(model, 9, data)
    assert m.accumulator is None
    m.after_backward(model, 0)  # no scoring any more: a no-op
    assert not m.on_epoch_end(model, 12, data)


def test_state_round_trips_through_a_weights_only_checkpoint_after_rep(tiny_data, tmp_path):
    """DyRep's state (counters, events, RNG, saliency sums) reloads into a DyRep prepared on a model
    rebuilt with the same grown structure (the checkpoint contract of the method interface v2)."""
    from repsearch.rep import apply_structure, structure

    torch.manual_seed(0)
    spec = DyRepSpec(scoring="snip", interval=1, grow_until=5, recal_batches=1, dep_threshold=0.0)
    method = DyRep(spec, seed=3)
    model = method.prepare(build_model("vgg16", width=1 / 16), tiny_data.train)
    Trainer(model, method, tiny_data.train, tiny_data.val, TrainSpec(epochs=5, lr=0.05), torch.device("cpu")).fit(stop_after=2)
    assert method.n_rep == 2
    x, y = next(iter(tiny_data.train))
    nn.functional.cross_entropy(model(x), y).backward()
    method.after_backward(model, 0)  # non-zero saliency sums since the last adjustment
    path = tmp_path / "dyrep_state.pt"
    torch.save(method.state_dict(), path)

    clone = build_model("vgg16", width=1 / 16)
    apply_structure(clone, structure(model), gamma_init=spec.gamma_init)
    clone.load_state_dict(model.state_dict(), strict=True)
    again = DyRep(spec, seed=0)
    again.prepare(clone, tiny_data.train)
    again.load_state_dict(torch.load(path, weights_only=True))
    assert (again.n_rep, again.n_dep, again.n_cut) == (method.n_rep, method.n_dep, method.n_cut)
    assert again.events == json.loads(json.dumps(method.events, default=str)) or again.events == method.events
    assert again.accumulator.averages() == method.accumulator.averages()
    assert torch.equal(torch.rand(4, generator=again.generator), torch.rand(4, generator=method.generator))
    with pytest.raises(ValueError, match="prepare"):
        DyRep(spec).load_state_dict(torch.load(path, weights_only=True))


def test_dep_switch_off_is_rep_only(tiny_data):
    """``dep: false`` (DyRep Table 6 "w/o Dep"): the adjustment still grows one op (Rep) but no block
    loses a branch, where the same model and scores with ``dep: true`` cut the unimportant ones."""
    import copy

    base = grown(seed=3)
    set_importance(get_module(base, "features.3"),
                   {"1x1": 0.01, "1x1-kxk": 0.01, "1x1-avg": 0.01, "1xk": 0.01, "kx1": 0.3, "identity": 0.3})
    kinds_before = {p: sorted(b.kinds) for p, b in repblocks(base).items()}
    cut = {}
    for dep in (True, False):
        model = copy.deepcopy(base)
        spec = DyRepSpec(scoring="random", interval=1, grow_until=2, recal_batches=1, dep=dep)
        method = DyRep(spec, seed=0)
        model = method.prepare(model, tiny_data.train)
        assert method.on_epoch_end(model, 1, tiny_data.train).structure_changed
        kinds_after = {p: sorted(b.kinds) for p, b in repblocks(model).items()}
        assert method.n_rep == 1 and len(kinds_after) >= len(kinds_before)
        cut[dep] = method.n_cut
        kinds = [e["kind"] for e in method.events]
        if dep:
            assert "dep_scan" in kinds and method.n_dep >= 1
            assert set(get_module(model, "features.3").kinds) == {"kxk", "kx1", "identity"}
        else:
            assert kinds == ["rep"] and method.final_measures() == {"n_rep": 1, "n_dep": 0, "n_branches_cut": 0}
            assert all(kinds_after[p] == k for p, k in kinds_before.items())  # every old block kept whole
    assert cut[True] >= 4 and cut[False] == 0  # the four branches set at 0.01, at least


def test_dep_switch_keeps_existing_study_names_and_drops_unused_fields_from_the_hash():
    """The study hash drops fields equal to their defaults: adding ``dep`` (default true) renames no
    study; with ``dep: false`` Dep's λ and floor are unused and leave the hash."""
    from repsearch.spec import hashed_recipe, recipe_hash, validate_dict

    plain = validate_dict({"method": {"name": "dyrep", "dep_threshold": 0.0005}}, "x")
    explicit = validate_dict({"method": {"name": "dyrep", "dep_threshold": 0.0005, "dep": True}}, "x")
    assert "dep" not in hashed_recipe(plain)["method"] and recipe_hash(plain) == recipe_hash(explicit)
    off = [validate_dict({"method": {"name": "dyrep", "dep": False, "dep_threshold": t, "dep_floor": f}}, "x")
           for t, f in ((0.02, 0.1), (0.0005, 0.3))]
    assert hashed_recipe(off[0])["method"] == {"name": "dyrep", "dep": False}
    assert recipe_hash(off[0]) == recipe_hash(off[1]) != recipe_hash(plain)
