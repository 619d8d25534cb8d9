"""Mid-trial checkpoints and resume (DESIGN.md "Checkpoints and resume — contract"): the structure of a
grown model rebuilt exactly, every method's state, the files (atomic, last 2 kept, removed at the
end, weights_only), a trial stopped and resumed in process ending bit for bit as the uninterrupted
one, and the sweep's resume (tags, MLflow history, --no-resume). The CLI run killed with SIGKILL and
resumed is in tests/test_e2e.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from equivalence import randomize_bns
from repsearch.checkpoint import (
    DIRNAME,
    KEEP,
    CheckpointError,
    Checkpointer,
    checkpoint_epoch,
    default_every,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    model_record,
    plain,
    resolve_every,
    restore_model,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from repsearch.gradmult import RepOptSGD
from repsearch.methods import build_method
from repsearch.methods.dyrep import DyRep, DyRepSpec
from repsearch.methods.repan import RepAn, RepAnSpec
from repsearch.models import build_model
from repsearch.rep import RepBlock, collapse, expand, get_module, kaiming_fan_out, repblocks, structure
from repsearch.spec import TrainSpec, validate_dict
from repsearch.train import Trainer, seed_everything
from repsearch.trial import run_trial

#: Measures that time the run (wall clock, throughput, memory, device-hours): a resumed run differs
#: there by construction, so they are left out of every equality below.
TIMING = {"epoch_time_s", "train_images_per_s", "mem_peak_mb", "cost_gpu_hours", "trial_time_s"}

TINY = {
    "data": {"val_size": 32, "train_subset": 64, "test_subset": 32},
    "model": {"name": "vgg16", "width": 0.0625},
    "train": {"epochs": 6, "batch_size": 32, "eval_batch_size": 64, "lr": 0.02, "warmup_epochs": 1, "min_lr": 0.0,
              "deterministic": True},
}


def recipe(method: dict, model: dict | None = None, **train):
    d = json.loads(json.dumps(TINY))
    d["method"] = method
    if model is not None:
        d["model"] = model
    d["train"].update(train)
    return validate_dict(d, "test")


@torch.no_grad()
def perturb(model: nn.Module, seed: int) -> None:
    """Random BN statistics (DESIGN.md conventions) and every parameter moved off its init."""
    g = torch.Generator().manual_seed(seed)
    randomize_bns(model, g)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.05)


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    """Same structure, same parameter/buffer names in the same order, equal tensors, equal eval outputs."""
    assert structure(a) == structure(b)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert [n for n, _ in a.named_buffers()] == [n for n, _ in b.named_buffers()]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for (pa, ba), (pb, bb) in zip(repblocks(a).items(), repblocks(b).items()):
        assert pa == pb and list(ba.branches) == list(bb.branches) and ba.attach_rate == bb.attach_rate
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def round_trip(tmp_path: Path, model: nn.Module, method, fresh_method, build) -> nn.Module:
    """Save model + method state through a real checkpoint file, rebuild on a fresh plain model."""
    ck = Checkpointer(tmp_path / DIRNAME, every=1)
    path = ck.save(3, {"model": model_record(model, method), "method": method.state_dict()})
    data = load_checkpoint(path)
    assert data["epoch"] == 3 and checkpoint_epoch(path) == 3
    torch.manual_seed(12345)  # other init draws: everything must come from the file
    plain_model = fresh_method.prepare(build(), [])
    restored = restore_model(plain_model, fresh_method, data["model"])
    fresh_method.load_state_dict(data["method"])
    return restored


# ------------------------------------------------------------------------------------ structure
def grown_dyrep(seed: int = 0) -> tuple[nn.Module, DyRep]:
    """A VGG-16 (width 1/16) grown as DyRep's Rep and Dep steps grow it: every kind of the dyrep space,
    nested blocks (in a kxk conv and in a 1x1-kxk's inner conv), a block cut back to a plain conv, a
    block whose nested block was promoted by a collapse, and a block whose branches are in a
    non-canonical order (a kind re-added after a cut)."""
    torch.manual_seed(seed)
    model = build_model("vgg16", width=1 / 16)
    method = DyRep(DyRepSpec(space="dyrep"))
    method.prepare(model, [])
    grow = dict(gamma_init=0.01, conv_init=kaiming_fan_out)
    kinds = method.kinds
    expand(model, "features.3", kinds, **grow)  # all 7 kinds (identity: 4 -> 4 channels)
    expand(model, "features.3.branches.kxk.conv", kinds, **grow)  # nested in the kxk conv
    expand(model, "features.3.branches.1x1-kxk.conv2", kinds, **grow)  # nested, padding 0: 3 kinds
    expand(model, "features.10", ["1x1", "identity", "1xk"], **grow)
    get_module(model, "features.10").remove_branches(["1x1"])
    expand(model, "features.10", ["1x1"], **grow)  # re-added: order kxk, 1xk, identity, 1x1
    expand(model, "features.14", ["1x1", "1x1-avg"], **grow)
    get_module(model, "features.14").remove_branches(["1x1", "1x1-avg"])
    collapse(model, "features.14")  # a plain conv again
    expand(model, "features.24", ["1x1", "kx1"], **grow)
    expand(model, "features.24.branches.kxk.conv", ["1x1-kxk", "1x1"], **grow)
    get_module(model, "features.24").remove_branches(["1x1", "kx1"])
    collapse(model, "features.24")  # the nested block takes the outer block's place
    perturb(model, seed + 1)
    method._reset_scores(model)  # as after an adjustment: score the new candidates
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for step in range(2):
        model.train()
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        method.after_backward(model, step)
    method.n_rep, method.n_dep, method.n_cut = 5, 3, 4
    method.events = [{"epoch": 2, "kind": "rep", "path": "features.3", "scores": {"features.3": 0.5}, "added": ("1x1",)}]
    torch.rand(3, generator=method.generator)  # the random metric's generator moved on
    return model, method


def test_grown_dyrep_model_rebuilds_exactly(tmp_path):
    model, method = grown_dyrep()
    blocks = repblocks(model)
    assert isinstance(blocks["features.3.branches.kxk.conv"], RepBlock)
    assert isinstance(blocks["features.3.branches.1x1-kxk.conv2"], RepBlock)
    assert list(blocks["features.10"].branches) == ["kxk", "1xk", "identity", "1x1"]
    assert isinstance(get_module(model, "features.14"), nn.Conv2d)
    assert set(blocks["features.24"].branches) == {"kxk", "1x1-kxk", "1x1"}
    assert len(blocks["features.3"].branches) == 7
    fresh = DyRep(DyRepSpec(space="dyrep"))
    restored = round_trip(tmp_path, model, method, fresh, lambda: build_model("vgg16", width=1 / 16))
    assert_same_model(model, restored)
    # the method's state: counters, events, generator, and the saliency sums over the same ops
    assert (fresh.n_rep, fresh.n_dep, fresh.n_cut) == (5, 3, 4) and fresh.events == method.events
    assert torch.equal(fresh.generator.get_state(), method.generator.get_state())
    assert list(fresh.accumulator.ops) == list(method.accumulator.ops)
    assert fresh.accumulator.averages() == method.accumulator.averages() and fresh.accumulator.n_steps == 2
    assert any(v != 0 for m in method.accumulator.averages().values() for v in m.values())


def test_rebuild_refuses_a_model_that_does_not_fit(tmp_path):
    model, method = grown_dyrep()
    record = model_record(model, method)
    other = build_model("vgg16", width=1 / 8)  # other widths: the weights cannot load
    with pytest.raises(CheckpointError, match="load"):
        restore_model(DyRep(DyRepSpec()).prepare(other, []), DyRep(DyRepSpec()), record)
    bad = dict(record, parameters=list(reversed(record["parameters"])))
    with pytest.raises(CheckpointError, match="parameters differ"):
        restore_model(build_model("vgg16", width=1 / 16), DyRep(DyRepSpec()), bad)
    static = build_method(recipe({"name": "static", "space": "dbb"}), "cpu")  # prepare builds other blocks
    with pytest.raises(CheckpointError, match="structure"):
        restore_model(static.prepare(build_model("vgg16", width=1 / 16), []), static, record)


def test_repan_mid_cycle_keeps_lambda_and_the_cycles_best_snapshot(tmp_path):
    spec = RepAnSpec(cycles=2, epochs_per_cycle=4, attach_warmup=3, carry="best_val")
    torch.manual_seed(0)
    model = build_model("vgg16", width=1 / 16)
    method = RepAn(spec)
    method.prepare(model, [])
    method.on_epoch_start(model, 6)  # cycle 2, epoch 1 of it: λ = min(2/4, 1)
    perturb(model, 3)
    method.on_epoch_end(model, 6, None, {"val/top1": 42.5, "val/loss": 1.5})  # the cycle's best so far
    method.cycle_vals = [37.5]
    assert method._lam == 0.5 and all(b.attach_rate == 0.5 for b in repblocks(model).values())
    fresh = RepAn(spec)
    restored = round_trip(tmp_path, model, method, fresh, lambda: build_model("vgg16", width=1 / 16))
    assert_same_model(model, restored)  # λ = 0.5 on every block, not the prepare's λ
    assert fresh._lam == 0.5 and fresh.cycle_vals == [37.5] and fresh.events == method.events
    best, mine = fresh._best, method._best
    assert (best.val_top1, best.val_loss, best.epoch, best.lams) == (mine.val_top1, mine.val_loss, 6, mine.lams)
    assert all(torch.equal(best.state[k], mine.state[k]) for k in mine.state)
    # λ matters: the same weights at λ = 1 compute something else
    for b in repblocks(restored).values():
        b.set_attach_rate(1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model.eval()(x), restored.eval()(x))


@pytest.mark.parametrize(
    "method_d, model_name, width",
    [
        ({"name": "origin"}, "vgg16", 1 / 16),
        ({"name": "static", "space": "dbb"}, "vgg16", 1 / 16),
        ({"name": "static", "space": "repvgg", "post_bn": "absorb"}, "vgg16", 1 / 16),
        ({"name": "repopt", "stage": "hyper_search"}, "repvgg_a0", 0.125),
    ],
    ids=["origin", "static-dbb", "static-absorb", "repopt-hyper-search"],
)
def test_prepared_structures_round_trip(tmp_path, method_d, model_name, width):
    r = recipe(method_d, {"name": model_name, "width": width})
    method = build_method(r, "cpu")
    torch.manual_seed(0)
    model = method.prepare(build_model(model_name, width=width), [])
    perturb(model, 7)
    fresh = build_method(r, "cpu")
    restored = round_trip(tmp_path, model, method, fresh, lambda: build_model(model_name, width=width))
    assert_same_model(model, restored)
    assert fresh.events == method.events
    if method_d.get("post_bn") == "absorb":
        assert fresh.absorbed == method.absorbed and fresh.absorbed


def test_repopt_target_resumes_its_grad_mult_optimizer(tmp_path, tiny_data):
    """Trainer level, with ``fit(stop_after=1)``: RepOptSGD's momentum (the optimizer state) and its
    Grad Mults (rebuilt by the method's optimizer hook) continue; the second epoch then ends bit for
    bit as in the uninterrupted run."""
    r = recipe({"name": "repopt", "stage": "target", "scales": "hs_init"}, {"name": "repvgg_a0", "width": 0.125},
               epochs=2, warmup_epochs=0)

    def trainer(method, model, checkpointer=None):
        return Trainer(model, method, tiny_data.train, tiny_data.val, r.train, torch.device("cpu"), checkpointer=checkpointer)

    def fresh(seed):
        seed_everything(seed, True)
        method = build_method(r, "cpu")
        return method, method.prepare(build_model("repvgg_a0", width=0.125), [])

    method, model = fresh(0)
    straight = trainer(method, model)
    straight.fit()

    method, model = fresh(0)
    ck = Checkpointer(tmp_path / DIRNAME, every=1)
    first = trainer(method, model, ck)
    first.fit(stop_after=1)
    data = load_checkpoint(latest_checkpoint(ck.folder))
    assert data["epoch"] == 1
    method2, model2 = fresh(99)  # other draws everywhere: the file alone must decide
    model2 = restore_model(model2, method2, data["model"])
    method2.load_state_dict(data["method"])
    second = trainer(method2, model2)
    second.load_state_dict(data["trainer"])
    assert isinstance(second.optimizer, RepOptSGD)
    names = dict(model2.named_parameters())
    mults = {n: m for n, p in names.items() for q, m in second.optimizer.grad_mults.items() if q is p}
    ref = {n: m for n, p in model.named_parameters() for q, m in first.optimizer.grad_mults.items() if q is p}
    assert mults.keys() == ref.keys() and all(torch.equal(mults[n], ref[n]) for n in ref)
    state = {n: second.optimizer.state[p]["momentum_buffer"] for n, p in names.items() if p in second.optimizer.state}
    want = {n: first.optimizer.state[p]["momentum_buffer"] for n, p in model.named_parameters() if p in first.optimizer.state}
    assert state.keys() == want.keys() and state and all(torch.equal(state[n], want[n]) for n in want)
    assert second.optimizer.param_groups[0]["lr"] == first.optimizer.param_groups[0]["lr"]
    second.fit()
    sa, sb = straight.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [{k: v for k, v in m.items() if k not in TIMING} for m in straight.history] == \
        [{k: v for k, v in m.items() if k not in TIMING} for m in second.history]


def test_trainer_refuses_optimizer_groups_of_another_model(tiny_data):
    r = recipe({"name": "origin"}, epochs=2)
    a = Trainer(build_model("vgg16", width=1 / 16), build_method(r, "cpu"), tiny_data.train, tiny_data.val, r.train, "cpu")
    state = a.state_dict()
    model = build_model("vgg16", width=1 / 16)
    expand(model, "features.3", ["1x1"], gamma_init=1.0)
    b = Trainer(model, build_method(r, "cpu"), tiny_data.train, tiny_data.val, r.train, "cpu")
    with pytest.raises(CheckpointError, match="parameter groups"):
        b.load_state_dict(state)
    with pytest.raises(CheckpointError, match="does not fit"):
        a.load_state_dict(dict(state, epoch=3, history=[{}] * 3))


# ------------------------------------------------------------------------------------ files
def test_policy_default_every_and_due():
    assert [default_every(e) for e in (1, 4, 8, 15, 600)] == [1, 1, 1, 2, 60]
    assert resolve_every(TrainSpec(epochs=600)) == 60 and resolve_every(TrainSpec(epochs=20, checkpoint_every=3)) == 3
    ck = Checkpointer("unused", every=3)
    changed = {4}  # the end of epoch 4 changed the structure: epoch 5 is due too
    assert [e for e in range(1, 10) if ck.due(e, e - 1 in changed)] == [3, 5, 6, 9]
    off = Checkpointer("unused", every=0)
    assert not any(off.due(e, True) for e in range(1, 10))


def test_the_sweep_looks_for_checkpoints_where_trials_write_them():
    from repsearch.sweep.worker import CHECKPOINTS

    assert CHECKPOINTS == DIRNAME


def test_only_the_last_two_are_kept_and_clear_removes_them(tmp_path):
    ck = Checkpointer(tmp_path / DIRNAME, every=1)
    for e in range(1, 6):
        ck.save(e, {"x": torch.full((3,), float(e))})
        assert len(list_checkpoints(ck.folder)) == min(e, KEEP)
    assert [checkpoint_epoch(p) for p in list_checkpoints(ck.folder)] == [4, 5]
    assert torch.equal(load_checkpoint(latest_checkpoint(ck.folder))["x"], torch.full((3,), 5.0))
    ck.clear()
    assert not ck.folder.exists() and latest_checkpoint(ck.folder) is None


def test_a_write_that_fails_midway_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "epoch_0001.pt"
    save_checkpoint({"format": 1, "x": torch.ones(4)}, path)

    def torn(obj, f, *a, **k):  # writes half a file, then the disk is full
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError, match="no space"):
        save_checkpoint({"format": 1, "x": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0001.pt"]
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(4))


class NotPlain:
    pass


def test_loading_is_weights_only_and_saving_refuses_what_would_not_load(tmp_path, monkeypatch):
    path = tmp_path / "epoch_0001.pt"
    torch.save({"format": 1, "obj": NotPlain()}, path)  # a pickle that needs arbitrary code to load
    assert isinstance(torch.load(path, weights_only=False)["obj"], NotPlain)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"\['obj'\]\[1\]: a NotPlain"):
        save_checkpoint({"format": 1, "obj": [1, NotPlain()]}, tmp_path / "epoch_0002.pt")
    assert not (tmp_path / "epoch_0002.pt").exists()
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    save_checkpoint({"format": 1, "x": [np_float()]}, tmp_path / "epoch_0003.pt")
    assert load_checkpoint(tmp_path / "epoch_0003.pt")["x"] == [0.5]
    assert calls and all(k.get("weights_only") is True for k in calls)
    save_checkpoint({"format": 99}, tmp_path / "epoch_0004.pt")
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(tmp_path / "epoch_0004.pt")


def np_float():
    import numpy as np

    return np.float64(0.5)


def test_rng_states_round_trip(tmp_path):
    import random

    import numpy as np

    state = rng_state()
    path = save_checkpoint({"format": 1, "rng": state}, tmp_path / "epoch_0001.pt")
    want = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(load_checkpoint(path)["rng"])
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert want[:2] == got[:2] and torch.equal(want[2], got[2])
    kept = (1, [2.0, "x"], {"k": None}, torch.float64, torch.device("cpu"), torch.Size([2, 3]))
    assert plain(kept) == kept
    path = save_checkpoint({"format": 1, "kept": kept, "path": tmp_path}, tmp_path / "epoch_0002.pt")
    back = load_checkpoint(path)
    assert back["kept"] == kept and back["path"] == str(tmp_path)


# ------------------------------------------------------------------------------------ in process
class Stop(Exception):
    """Stands for a kill: raised from on_epoch after the given epoch's checkpoint was written."""


def _cmp_histories(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        assert {k: v for k, v in x.items() if k not in TIMING} == {k: v for k, v in y.items() if k not in TIMING}


@pytest.mark.parametrize(
    "method_d, every, stop_at",
    [
        # adjustments (Rep then Dep, which cuts at threshold 0) at the ends of epochs 1-5: stopped after
        # the 3rd one, the resumed run grows twice more (new branches drawn from the restored RNG,
        # chosen from the restored saliency sums)
        ({"name": "dyrep", "scoring": "synflow", "interval": 1, "grow_until": 5, "recal_batches": 1,
          "probe_batches": 1, "dep_threshold": 0.0}, 100, 3),
        # mid-cycle 2 with carry best_val: λ, the cycle's best snapshot and the per-cycle schedule continue
        ({"name": "repan", "cycles": 2, "epochs_per_cycle": 3, "attach_warmup": 1, "carry": "best_val"}, 1, 5),
    ],
    ids=["dyrep", "repan"],
)
def test_trial_stopped_then_resumed_equals_the_uninterrupted_trial(tmp_path, data_root, method_d, every, stop_at):
    r = recipe(method_d, checkpoint_every=every)  # DyRep: 100, only the structure-change rule writes
    seen_files: dict[int, list[str]] = {}

    def spy(epoch, m):
        seen_files[epoch] = [p.name for p in list_checkpoints(tmp_path / "a" / DIRNAME)]

    straight = run_trial(r, data_root=str(data_root), device="cpu", out_dir=tmp_path / "a", progress=False, on_epoch=spy)
    assert not (tmp_path / "a" / DIRNAME).exists()  # removed when the trial finished
    assert any(seen_files.values()) and all(len(v) <= KEEP for v in seen_files.values())

    def stop(epoch, m):
        if epoch == stop_at:
            raise Stop

    with pytest.raises(Stop):
        run_trial(r, data_root=str(data_root), device="cpu", out_dir=tmp_path / "b", progress=False, on_epoch=stop)
    ckpt = latest_checkpoint(tmp_path / "b" / DIRNAME)
    assert checkpoint_epoch(ckpt) == stop_at
    replayed: list[int] = []
    resumed = run_trial(r, data_root=str(data_root), device="cpu", out_dir=tmp_path / "c", progress=False,
                        resume_from=ckpt, on_epoch=lambda e, m: replayed.append(e))
    assert replayed == list(range(1, r.train.epochs + 1)) and resumed.resumed_epoch == stop_at
    a = torch.load(tmp_path / "a" / "deployed.pt", weights_only=True)["state_dict"]
    c = torch.load(tmp_path / "c" / "deployed.pt", weights_only=True)["state_dict"]
    assert list(a) == list(c) and all(torch.equal(a[k], c[k]) for k in a)
    _cmp_histories(straight.history, resumed.history)
    assert {k: v for k, v in straight.final.items() if k not in TIMING} == \
        {k: v for k, v in resumed.final.items() if k not in TIMING}
    (resume_event,) = [e for e in resumed.events if e["kind"] == "resume"]
    assert resume_event["epoch"] == stop_at and resume_event["checkpoint"] == str(ckpt)
    assert [e for e in resumed.events if e["kind"] != "resume"] == straight.events
    assert (tmp_path / "a" / "structure.json").read_text() == (tmp_path / "c" / "structure.json").read_text()
    if method_d["name"] == "dyrep":
        assert straight.final["n_rep"] == 5 and any(e["kind"] == "dep" and e["epoch"] > stop_at for e in straight.events)
    else:
        assert [e["kind"] for e in straight.events].count("boundary") == 1


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path, data_root):
    r = recipe({"name": "origin"}, epochs=2, checkpoint_every=1)
    with pytest.raises(Stop):
        run_trial(r, data_root=str(data_root), device="cpu", out_dir=tmp_path / "a", progress=False,
                  on_epoch=lambda e, m: (_ for _ in ()).throw(Stop()))
    other = validate_dict({**json.loads(json.dumps(TINY)), "method": {"name": "origin"}, "seed": 1,
                           "train": {**TINY["train"], "epochs": 2}}, "test")
    with pytest.raises(CheckpointError, match="another configuration or seed"):
        run_trial(other, data_root=str(data_root), device="cpu", out_dir=tmp_path / "b", progress=False,
                  resume_from=latest_checkpoint(tmp_path / "a" / DIRNAME))


# ------------------------------------------------------------------------------------ sweep
def _crash_after(epoch_to_crash: int, calls: list):
    """A trial function that crashes (a plain error: FAIL) at the end of its first call's given epoch
    and runs normally afterwards; every call's keyword arguments are recorded."""

    def trial_fn(rec, **kw):
        calls.append({k: v for k, v in kw.items() if k != "on_epoch"})
        outer = kw.pop("on_epoch")

        def on_epoch(e, m):
            outer(e, m)
            if len(calls) == 1 and e == epoch_to_crash:
                raise RuntimeError("crash")

        return run_trial(rec, on_epoch=on_epoch, **kw)

    return trial_fn


@pytest.mark.parametrize("resume", [True, False], ids=["resume", "no-resume"])
def test_sweep_resumes_a_failed_point_from_its_checkpoint(tmp_path, data_root, resume):
    from mlflow.tracking import MlflowClient

    from repsearch.sweep import run_study
    from repsearch.tracking import resolve_stores

    d = json.loads(json.dumps(TINY))
    d["method"] = {"name": "dyrep", "interval": 1, "grow_until": 2, "recal_batches": 1, "probe_batches": 1}
    d["train"].update(epochs=4, checkpoint_every=2)
    d["sweep"] = {"params": {"method.scoring": {"choices": ["snip"]}}, "seeds": [0], "sampler": "grid"}
    rec = validate_dict(d, "test")
    stores = resolve_stores(rec, tmp_path / "ck.yaml", runs_dir=tmp_path / "runs")
    calls: list = []
    fn = _crash_after(3, calls)
    first = run_study(rec, tmp_path / "ck.yaml", None, stores, device="cpu", data_root=str(data_root), trial_fn=fn,
                      progress=False)
    assert first.n_failed == 1 and "crash" in first.failures[0][2]
    folder = stores.runs_dir / "trials" / first.study_name / "0000" / DIRNAME
    assert [checkpoint_epoch(p) for p in list_checkpoints(folder)] == [2, 3]  # every 2 + after the epoch-2 change
    second = run_study(rec, tmp_path / "ck.yaml", None, stores, device="cpu", data_root=str(data_root), trial_fn=fn,
                       progress=False, resume=resume)
    assert second.n_complete == 1
    assert ("resume_from" in calls[1]) == resume and "resume_from" not in calls[0]
    import optuna

    study = optuna.load_study(study_name=first.study_name, storage=stores.storage)
    old, new = study.get_trials(deepcopy=False)
    client = MlflowClient(tracking_uri=stores.tracking_uri)
    run = client.get_run(new.user_attrs["mlflow_run_id"])
    if resume:
        assert calls[1]["resume_from"] == folder / "epoch_0003.pt"
        assert new.user_attrs["resumed_from"] == "trial 0 epoch 3" == run.data.tags["resumed_from"]
        assert run.data.tags["resumed_from_run"] == old.user_attrs["mlflow_run_id"]
        events = json.loads(Path(client.download_artifacts(run.info.run_id, "events.json", str(tmp_path / "ev"))).read_text())
        assert [e["epoch"] for e in events if e["kind"] == "resume"] == [3]
    else:
        assert "resumed_from" not in new.user_attrs and "resumed_from" not in run.data.tags
    # one complete metric history on the FINISHED run (epochs 1-3 replayed from the checkpoint)
    hist = client.get_metric_history(run.info.run_id, "val/top1")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4]
    assert client.get_run(old.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    assert DIRNAME not in {a.path for a in client.list_artifacts(old.user_attrs["mlflow_run_id"])}
    assert not folder.exists()  # the slot is done: its checkpoints are gone


def test_cli_no_resume_reaches_the_study_and_the_worker(monkeypatch, tmp_path, data_root):
    from click.testing import CliRunner

    import repsearch.sweep
    import repsearch.sweep.worker
    from repsearch.cli import main
    from repsearch.spec import recipe_yaml
    from repsearch.sweep import StudySummary

    seen: dict[str, list] = {"run": [], "work": []}

    def fake_run_study(*a, **k):
        seen["run"].append(k["resume"])
        return StudySummary(study_name="s", n_total=0, n_complete=0, n_failed=0, n_pruned=0, ran_now=0,
                            nothing_to_run=True, rows=[], pareto=None, failures=[], n_running=0, parent_run_id=None,
                            warnings=[])

    def fake_work(*a, **k):
        seen["work"].append(k["resume"])
        return 0

    rec = recipe({"name": "origin"})
    monkeypatch.setattr(repsearch.sweep, "run_study", fake_run_study)
    monkeypatch.setattr(repsearch.sweep, "work", fake_work)
    monkeypatch.setattr(repsearch.sweep.worker, "study_stores", lambda *a, **k: (None, {"recipe_yaml": recipe_yaml(rec)}))
    path = tmp_path / "r.yaml"
    path.write_text(recipe_yaml(rec))
    base = ["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--data-root", str(data_root), "--device", "cpu",
            "--no-progress"]
    for extra in ([], ["--no-resume"]):
        out = CliRunner().invoke(main, base + extra)
        assert out.exit_code == 0, out.output
        out = CliRunner().invoke(main, ["worker", "s", "--storage", "sqlite:///x.db", "--device", "cpu",
                                        "--data-root", str(data_root)] + extra)
        assert out.exit_code == 0, out.output
    assert seen == {"run": [True, False], "work": [True, False]}
