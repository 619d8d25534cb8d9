"""``train.compile`` (repsearch/compile.py; issue 16): the compiled training forward trains like the
eager one, is rebuilt (not reused stale) after a structure change, evicts its stale graphs so the
recompile limit is never reached (each build compiles its own code object), does not recompile when RepAn's 0-dim λ buffer changes, and the
recipe field validates and stays out of the study hash.

The logic tests use dynamo with the ``aot_eager`` backend (the private ``CompiledForward._backend``);
one test compiles with inductor (CPU, gcc) on a 2-conv model."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from repsearch.compile import CompiledForward, dynamo_graphs
from repsearch.methods.base import EpochChanges, Method
from repsearch.rep import expand, kaiming_fan_out
from repsearch.spaces import resolve_space
from repsearch.spec import RecipeError, recipe_hash, validate_dict
from repsearch.train import Trainer, seed_everything
from repsearch.spec import TrainSpec

CPU = torch.device("cpu")


def toy_model() -> nn.Sequential:
    """conv3x3(3→8)-BN-ReLU, conv3x3(8→8)-BN-ReLU, global average pool, linear 8→10 (inputs (B, 3, 16, 16))."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


class Batches(list):
    """A fixed list of ``(images (B, 3, 16, 16), labels (B,))`` batches: a loader for the Trainer."""

    crop = 16


def batches(n: int, size: int = 16, seed: int = 0) -> Batches:
    g = torch.Generator().manual_seed(seed)
    return Batches((torch.randn(size, 3, 16, 16, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n))


def spec(**kw) -> TrainSpec:
    base = dict(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-4, amp=False, channels_last=False)
    return TrainSpec(**{**base, **kw})


def test_inductor_compiled_training_matches_eager():
    """Same seed, same batches, 2 epochs x 3 steps of SGD: weights agree within 1e-4 (inductor
    reorders float ops; measured max |difference| 5.1e-7 on 1 CPU thread, torch 2.14)."""
    results = {}
    for mode in ("off", "default"):
        seed_everything(0)
        model = toy_model()
        trainer = Trainer(model, Method(None), batches(3), batches(1, seed=1), spec(compile=mode), CPU)
        history = trainer.fit()
        results[mode] = (model.state_dict(), history, trainer.compiled)
    (eager_sd, eager_hist, _), (comp_sd, comp_hist, compiled) = results["off"], results["default"]
    assert not any(k.startswith("compile_") for k in eager_hist[-1])  # eager runs log no compile measures
    assert [m["compile_count"] for m in comp_hist] == [1.0, 1.0] and compiled.graphs >= 1
    assert comp_hist[-1]["compile_s"] > 0 and comp_hist[-1]["compile_recompiles"] == 0
    for name, value in eager_sd.items():
        if value.is_floating_point():
            torch.testing.assert_close(comp_sd[name], value, rtol=1e-4, atol=1e-4, msg=name)
    assert comp_hist[-1]["train/loss"] == pytest.approx(eager_hist[-1]["train/loss"], rel=1e-4)


class GrowOnce(Method):
    """DyRep-like: at the end of epoch 1 the second conv becomes a RepVGG block (kxk, 1x1, identity)."""

    name = "grow-once"

    def __init__(self):
        super().__init__(None)
        self.block = None

    def on_epoch_end(self, model, epoch, loader, measures):
        if epoch != 1:
            return EpochChanges()
        self.block, _, _ = expand(model, "3", resolve_space("repvgg"), gamma_init=0.5, conv_init=kaiming_fan_out)
        return EpochChanges(structure_changed=True)


def test_structure_change_rebuilds_once_and_trains_the_new_branches():
    seed_everything(0)
    model = toy_model()
    method = GrowOnce()
    trainer = Trainer(model, method, batches(2), batches(1, seed=1), spec(compile="default"), CPU)
    trainer.compiled._backend = "aot_eager"
    rebuilds = []
    real_rebuild = trainer.compiled.rebuild
    trainer.compiled.rebuild = lambda: (rebuilds.append(1), real_rebuild())
    history = trainer.fit()
    assert len(rebuilds) == 1  # exactly one rebuild, after the change at the end of epoch 1
    assert [m["compile_count"] for m in history] == [1.0, 2.0]
    assert trainer.compiled.graphs == 2 and history[-1]["compile_recompiles"] == 0
    assert history[-1]["n_branches"] > history[0]["n_branches"]
    # the compiled forward of epoch 2 ran the new structure: the new branches got gradients
    for kind, branch in method.block.branches.items():
        grads = [p.grad for p in branch.parameters()]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), kind


def test_rebuilds_never_hit_the_recompile_limit():
    """With dynamo's recompile limit at 2, four structures in a row each compile their own graph:
    ``torch.compile(module)`` rebuilt alone would keep the stale graphs on the shared code object
    and fall back to eager (measured: from the first structure, entries of earlier tests count)."""
    torch.manual_seed(0)
    model = toy_model()
    compiled = CompiledForward(model, "default")
    compiled._backend = "aot_eager"
    x = torch.randn(4, 3, 16, 16)
    kinds = resolve_space("dbb")
    paths = ["3", "3.branches.kxk.conv", "0", "0.branches.kxk.conv"]
    codes = []
    with torch._dynamo.config.patch(recompile_limit=2):
        for step in range(4):
            before = dynamo_graphs()
            compiled(x).sum().backward()
            compiled.step_done()
            assert dynamo_graphs() - before == 1, f"structure {step} ran without a compiled graph"
            codes.append(weakref.ref(compiled._code))
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-3, atol=2e-4)  # the current structure (BN batch stats)
            expand(model, paths[step], kinds, gamma_init=0.1)
            compiled.rebuild()
    assert compiled.builds == 4 and compiled.recompiles == 0
    gc.collect()  # dropped builds are freed (their graphs sit in a cycle through the code's extra slot;
    assert sum(r() is not None for r in codes) <= 1  # dynamo's last tracing context may hold one)


def test_attach_rate_buffer_change_does_not_recompile():
    """RepAn's λ is a 0-dim buffer written in place: a graph input, so a new value is read by the
    same graph (output equals eager) and nothing recompiles."""
    torch.manual_seed(0)
    model = toy_model()
    block, _, _ = expand(model, "3", resolve_space("repvgg"), gamma_init=0.5)
    block.set_attach_rate(0.0)
    compiled = CompiledForward(model, "default")
    compiled._backend = "aot_eager"
    x = torch.randn(4, 3, 16, 16)
    compiled(x)
    compiled.step_done()
    graphs = compiled.graphs
    for lam in (0.25, 1.0):
        block.set_attach_rate(lam)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-3, atol=2e-4)
    assert compiled.graphs == graphs == 1 and compiled.recompiles == 0


def test_compile_field_validates_and_stays_out_of_the_study_hash():
    with pytest.raises(RecipeError) as err:
        validate_dict({"train": {"compile": "bogus"}}, "r.yaml")
    msg = str(err.value)
    assert "\n" not in msg and "train.compile" in msg and "off, default, reduce-overhead, max-autotune" in msg
    assert recipe_hash(validate_dict({"train": {"compile": "max-autotune"}}, "r.yaml")) == recipe_hash(validate_dict({}, "r.yaml"))
    with pytest.raises(ValueError, match="not one of"):
        CompiledForward(toy_model(), "fast")
