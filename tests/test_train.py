"""The training loop: per-epoch measures (DESIGN.md measures contract), NaN loss, seeding."""

import math

import pytest
import torch

from repsearch.methods.base import Method
from repsearch.methods.static import Static
from repsearch.models import build_model
from repsearch.methods.static import StaticSpec
from repsearch.spec import TrainSpec
from repsearch.train import NonFiniteLoss, Trainer, evaluate, seed_everything

MEASURES = {"train/loss", "train/top1", "val/loss", "val/top1", "lr", "epoch_time_s", "train_images_per_s",
            "mem_peak_mb", "flops_m", "params_m", "avg_flops_m", "avg_params_m", "n_branches", "cost_gpu_hours"}


def test_trainer_reports_every_measure_each_epoch(tiny_data):
    seed_everything(0)
    model = build_model("vgg16", width=1 / 16)
    seen = []
    trainer = Trainer(model, Method(None), tiny_data.train, tiny_data.val, TrainSpec(epochs=2, batch_size=32, lr=0.05),
                      torch.device("cpu"), on_epoch=lambda e, m: seen.append(e))
    history = trainer.fit()
    assert seen == [1, 2] and len(history) == 2
    for m in history:
        assert set(m) == MEASURES
        assert all(math.isfinite(v) for v in m.values())
        assert 0 <= m["val/top1"] <= 100 and m["n_branches"] == 13
    assert history[1]["cost_gpu_hours"] > history[0]["cost_gpu_hours"] > 0
    assert history[0]["lr"] > history[1]["lr"]
    # the reported val top-1 is the model's accuracy on the validation loader
    assert evaluate(model, tiny_data.val, torch.device("cpu"))[1] == pytest.approx(history[-1]["val/top1"])


def test_static_dbb_counts_more_flops_and_params(tiny_data):
    seed_everything(0)
    origin = Trainer(build_model("vgg16", width=1 / 16), Method(None), tiny_data.train, tiny_data.val,
                     TrainSpec(epochs=1), torch.device("cpu"))
    model = Static(StaticSpec(space="dbb")).prepare(build_model("vgg16", width=1 / 16), [])
    dbb = Trainer(model, Method(None), tiny_data.train, tiny_data.val, TrainSpec(epochs=1), torch.device("cpu"))
    assert dbb.flops_m > origin.flops_m and dbb.params_m > origin.params_m
    assert dbb.n_branches == 13 * 4


class NaNLoss(Method):
    def loss(self, logits, target, images):
        return super().loss(logits, target, images) * float("nan")


def test_nan_loss_fails_the_epoch(tiny_data):
    model = build_model("vgg16", width=1 / 16)
    trainer = Trainer(model, NaNLoss(None), tiny_data.train, tiny_data.val, TrainSpec(epochs=2), torch.device("cpu"))
    with pytest.raises(NonFiniteLoss, match="epoch 1"):
        trainer.fit()


def test_seed_makes_training_reproducible(tiny_data):
    def run():
        seed_everything(7)
        model = build_model("vgg16", width=1 / 16)
        tiny_data.train.set_epoch(0)
        return Trainer(model, Method(None), tiny_data.train, tiny_data.val, TrainSpec(epochs=1, lr=0.05),
                       torch.device("cpu")).fit()[0]["train/loss"]

    assert run() == run()


def test_deterministic_flag_is_set_both_ways():
    seed_everything(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    seed_everything(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()


class GradNormSpy(Method):
    """Records the global gradient norm before clipping (after_backward) and as the optimizer sees it."""

    def __init__(self, spec=None):
        super().__init__(spec)
        self.before: list[torch.Tensor] = []
        self.at_step: list[torch.Tensor] = []

    def after_backward(self, model, step):
        self.before.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])))

    def optimizer(self, model, train_spec):
        opt = super().optimizer(model, train_spec)
        spy = self

        def pre_hook(optimizer, args, kwargs):
            grads = [p.grad.norm() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            spy.at_step.append(torch.linalg.vector_norm(torch.stack(grads)))

        opt.register_step_pre_hook(pre_hook)
        return opt


@pytest.mark.parametrize("clip", [None, 0.05])
def test_grad_clip_bounds_the_global_norm_between_after_backward_and_step(tiny_data, clip):
    seed_everything(0)
    method = GradNormSpy()
    Trainer(build_model("vgg16", width=1 / 16), method, tiny_data.train, tiny_data.val,
            TrainSpec(epochs=1, lr=0.05, grad_clip=clip), torch.device("cpu")).fit()
    before, at_step = torch.stack(method.before), torch.stack(method.at_step)
    assert len(before) == len(at_step) == len(tiny_data.train)
    assert (before > 0.05).all()  # the gradients are larger than the clip
    if clip is None:
        assert torch.allclose(at_step, before)
    else:
        assert (at_step <= clip * (1 + 1e-5)).all() and torch.allclose(at_step, torch.full_like(at_step, clip), rtol=1e-4)


def test_on_epoch_end_runs_after_validation_with_the_epochs_measures(tiny_data):
    from repsearch.methods.base import EpochChanges

    seen = {}

    class Watch(Method):
        def on_epoch_end(self, model, epoch, loader, measures):
            seen[epoch] = dict(measures)
            return EpochChanges()

    model = build_model("vgg16", width=1 / 16)
    history = Trainer(model, Watch(None), tiny_data.train, tiny_data.val, TrainSpec(epochs=2, lr=0.05),
                      torch.device("cpu")).fit()
    for epoch, m in enumerate(history, start=1):
        assert seen[epoch]["val/top1"] == m["val/top1"] and seen[epoch]["train/loss"] == m["train/loss"]
