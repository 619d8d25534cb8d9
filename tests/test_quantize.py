"""INT8 PTQ (torchao PT2E, X86InductorQuantizer) of deployed models and the deployed kernels' std
(RepOptimizers §4.4, Tables 8 and 10): the library on tiny random models, the recipe section, the
end-of-trial step on tiny real CIFAR-10, ``repsearch quantize RUN_ID`` and the table columns."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from optuna.trial import TrialState
from rich.console import Console
from torch import nn

from repsearch.cli import main
from repsearch.errors import UserError
from repsearch.models.vgg import VGG
from repsearch.quantize import (
    QUANTIZER,
    QuantizeError,
    calibration_batches,
    kernel_std,
    ptq_int8,
    qdq_ops,
    require_torchao,
)
from repsearch.report import COLUMNS, comparison_table, rows_from_trials
from repsearch.spec import RecipeError, hashed_recipe, recipe_hash, validate_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from equivalence import randomize_bns  # noqa: E402

TINY_CFG = (8, "M", 16, "M", 16, "M", 16, "M", 16)


def tiny_vgg(seed: int = 0) -> VGG:
    """5 conv-BN-ReLU layers, 32x32 input, random BN statistics (γ of both signs)."""
    torch.manual_seed(seed)
    m = VGG(cfg=TINY_CFG, hidden=32).eval()
    randomize_bns(m, torch.Generator().manual_seed(seed + 1))
    return m


def batches(n: int, b: int = 8, scale: float = 1.0, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 32, 32, generator=g) * scale for _ in range(n)]


def input_scale(qmodel) -> float:
    """The scale of the quantize op applied to the graph's input (the calibrated input range / 255)."""
    (x,) = [n for n in qmodel.graph.nodes if n.op == "placeholder"]
    (q,) = [u for u in x.users if "quantize_per_tensor" in str(u.target)]
    return float(q.args[1])


@pytest.fixture(scope="module")
def model_and_q():
    m = tiny_vgg()
    return m, ptq_int8(m, batches(4), example_input=batches(1, b=4, seed=9)[0])


# ------------------------------------------------------------------------------------ PTQ
def test_int8_outputs_close_to_fp32_and_model_untouched(model_and_q):
    m, q = model_and_q
    assert all(isinstance(p, torch.Tensor) for p in m.parameters())
    assert any(isinstance(x, nn.BatchNorm2d) for x in m.modules())  # the caller's model keeps its BNs
    x = batches(1, b=64, seed=5)[0]
    with torch.no_grad():
        y, yq = m(x), q(x)
    rel = ((yq - y).abs().max() / y.abs().max()).item()
    assert 0 < rel < 0.1, rel  # int8 is not bit-exact, but close (measured 0.03; a mis-scaled quantizer gives ~0.8)
    assert (yq.argmax(1) == y.argmax(1)).float().mean().item() >= 0.9


def test_dynamic_batch_and_rows_independent(model_and_q):
    _, q = model_and_q
    x = batches(1, b=3, seed=6)[0]  # exported with a batch of 4
    with torch.no_grad():
        y3 = q(x)
        y1 = torch.cat([q(x[i : i + 1]) for i in range(3)])
    assert y3.shape == (3, 10)
    torch.testing.assert_close(y1, y3, rtol=1e-4, atol=1e-4)  # static per-tensor scales: no batch coupling


def test_graph_holds_quantize_dequantize_ops_and_no_batchnorm(model_and_q):
    _, q = model_and_q
    counts = qdq_ops(q)
    assert counts["quantize"] >= 5 and counts["dequantize"] >= 5
    targets = [str(n.target) for n in q.graph.nodes if n.op == "call_function"]
    per_channel = [t for t in targets if "dequantize_per_channel" in t]
    assert len(per_channel) >= 5  # every conv kernel int8 per channel (5 convs)
    assert not [t for t in targets if "batch_norm" in t]  # BN folded into the convs
    assert qdq_ops(tiny_vgg()) == {"quantize": 0, "dequantize": 0}


def test_calibration_uses_only_the_given_batches():
    m = tiny_vgg()
    huge_example = batches(1, b=4, scale=1000.0, seed=7)[0]  # never observed: tracing only
    seen = []

    def gen(scale):
        for b in batches(3, scale=scale):
            seen.append(scale)
            yield b

    q1 = ptq_int8(m, gen(1.0), example_input=huge_example)
    q10 = ptq_int8(m, gen(10.0), example_input=huge_example)
    assert seen == [1.0] * 3 + [10.0] * 3  # each batch drawn once
    s1, s10 = input_scale(q1), input_scale(q10)
    assert s1 < 2 * 6.0 / 255  # |N(0,1)| samples stay below 6: the 1000x example input is not in the range
    assert 5.0 < s10 / s1 < 20.0  # the input range follows the calibration batches (x10)
    with pytest.raises(QuantizeError, match="no calibration batch"):
        ptq_int8(m, [], example_input=huge_example)


def test_example_batch_of_one_and_tuple_batches():
    m = tiny_vgg()
    calib = [(b, torch.zeros(b.shape[0], dtype=torch.long)) for b in batches(2)]
    q = ptq_int8(m, calib, example_input=batches(1, b=1)[0])
    assert q(batches(1, b=5)[0]).shape == (5, 10)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow: torch.export cannot capture it
            return y
        return -y


def test_export_failure_is_one_line_user_error():
    with pytest.raises(QuantizeError) as info:
        ptq_int8(DataDependent(), batches(1), example_input=batches(1)[0])
    msg = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in msg
    assert "torch.export of DataDependent failed" in msg


def test_missing_torchao_is_one_line_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e.quantize_pt2e", None)
    with pytest.raises(QuantizeError) as info:
        require_torchao()
    assert "torchao" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(QuantizeError):
        ptq_int8(tiny_vgg(), batches(1), example_input=batches(1)[0])


def test_ptq_trial_without_torchao_fails_before_training(monkeypatch, tmp_path):
    from repsearch.trial import run_trial

    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e.quantize_pt2e", None)
    rec = validate_dict({"quantize": {"mode": "ptq"}}, "r.yaml")
    with pytest.raises(QuantizeError, match="torchao"):  # no data root needed: it fails first
        run_trial(rec, data_root=str(tmp_path / "missing"), device="cpu", out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- kernel std
class ConvBNAndPlain(nn.Module):
    """conv-BN-ReLU, then a conv with bias and no BN (as a RepOpt-VGG / deployed RepVGG layer)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 1, bias=True)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn1(self.conv1(x))))


def test_kernel_std_equals_hand_computation():
    torch.manual_seed(0)
    m = ConvBNAndPlain().eval()
    randomize_bns(m, torch.Generator().manual_seed(3))
    stats = kernel_std(m)
    bn = m.bn1
    folded = m.conv1.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
    expected = [folded.detach().std().item(), m.conv2.weight.detach().std().item()]
    assert [layer["layer"] for layer in stats.layers] == ["conv1", "conv2"]
    assert [layer["bn_folded"] for layer in stats.layers] == [True, False]
    assert [layer["shape"] for layer in stats.layers] == [[6, 3, 3, 3], [4, 6, 1, 1]]
    assert [layer["std"] for layer in stats.layers] == pytest.approx(expected, rel=1e-6)
    assert stats.mean == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert stats.max == pytest.approx(max(expected), rel=1e-6)
    assert stats.measures == {"int8/kernel_std_mean": stats.mean, "int8/kernel_std_max": stats.max}
    assert json.loads(stats.to_json())["layers"][0]["std"] == pytest.approx(expected[0])


def test_large_bn_gamma_widens_the_deployed_kernels():
    """RepOpt Table 8 / Appendix C: folding a BN with large γ/σ widens the kernel the quantizer sees."""
    m = tiny_vgg()
    base = kernel_std(m)
    with torch.no_grad():
        for bn in (x for x in m.modules() if isinstance(x, nn.BatchNorm2d)):
            bn.weight.mul_(10.0)
    wide = kernel_std(m)
    assert wide.mean == pytest.approx(10.0 * base.mean, rel=1e-5)
    assert wide.max > base.max
    assert all(w["std"] > b["std"] for w, b in zip(wide.layers, base.layers))


# ---------------------------------------------------------------------------------- recipe
def test_quantize_defaults_keep_the_study_hash():
    plain = validate_dict({"train": {"epochs": 3}}, "r.yaml")
    explicit = validate_dict({"train": {"epochs": 3}, "quantize": {"mode": "none", "calib_batches": 32}}, "r.yaml")
    assert "quantize" not in hashed_recipe(plain)
    assert hashed_recipe(explicit) == hashed_recipe(plain) == {"train": {"epochs": 3}}
    ptq = validate_dict({"train": {"epochs": 3}, "quantize": {"mode": "ptq"}}, "r.yaml")
    assert ptq.quantize.calib_batches == 32
    assert recipe_hash(ptq) != recipe_hash(plain)


@pytest.mark.parametrize(
    "section, needles",
    [
        ({"mode": "int4"}, ["quantize.mode", "'int4'", "none", "ptq"]),
        ({"calib_batches": 0}, ["quantize.calib_batches"]),
        ({"mode": "ptq", "bits": 4}, ["quantize.bits"]),
    ],
)
def test_bad_quantize_section_is_one_line(section, needles):
    with pytest.raises(RecipeError) as info:
        validate_dict({"quantize": section}, "r.yaml")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("r.yaml")
    for needle in needles:
        assert needle in msg, msg


# ------------------------------------------------------------------------------ data helper
def test_calibration_batches_are_unaugmented_training_images(tiny_data):
    got = calibration_batches(tiny_data, 3, seed=0)
    assert len(got) == 3 and all(b.shape == (32, 3, 32, 32) and b.device.type == "cpu" for b in got)
    # every calibration image is one training image exactly as the eval loaders normalise it: no crop,
    # flip or cutout (compared with a non-augmented view of the whole training split) ...
    from repsearch.data import DeviceLoader

    plain = DeviceLoader(tiny_data.train.images, tiny_data.train.labels, 1000, mean=tiny_data.mean, std=tiny_data.std)
    ((all_train, _),) = list(plain)
    held_out = torch.cat([x for x, _ in tiny_data.val] + [x for x, _ in tiny_data.test])

    def nearest(img, pool):  # max |difference| to the closest image of the pool
        return (pool - img).abs().flatten(1).amax(1).min().item()

    for img in torch.cat(got):
        assert nearest(img, all_train) < 1e-5
        assert nearest(img, held_out) > 1e-2  # ... and never a validation or test image
    assert len(calibration_batches(tiny_data, 50)) == 200 // 32  # capped at the full batches available
    assert torch.equal(calibration_batches(tiny_data, 2, seed=1)[0], calibration_batches(tiny_data, 2, seed=1)[0])


# ------------------------------------------------------------------- trial, CLI, report
TINY = {
    "data": {"val_size": 64, "train_subset": 128, "test_subset": 64},
    "model": {"name": "vgg16", "width": 0.0625},
    "train": {"epochs": 2, "batch_size": 32, "eval_batch_size": 64, "lr": 0.05, "warmup_epochs": 1},
    "quantize": {"mode": "ptq", "calib_batches": 2},
}


@pytest.fixture(scope="module")
def ptq_study(tmp_path_factory, data_root):
    from mlflow.tracking import MlflowClient

    from repsearch.sweep import run_study
    from repsearch.tracking import resolve_stores

    tmp = tmp_path_factory.mktemp("ptq")
    rec = validate_dict(json.loads(json.dumps(TINY)), "ptq.yaml")
    stores = resolve_stores(rec, tmp / "ptq.yaml", runs_dir=tmp / "runs")
    summary = run_study(rec, tmp / "ptq.yaml", None, stores, device="cpu", data_root=str(data_root), progress=False)
    assert summary.n_complete == 1, summary.failures
    client = MlflowClient(tracking_uri=stores.tracking_uri)
    exp = client.get_experiment_by_name(stores.experiment)
    (child,) = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    return SimpleNamespace(tmp=tmp, stores=stores, summary=summary, client=client, run=child, exp=exp)


def test_trial_logs_int8_metrics_tags_and_kernel_std(ptq_study):
    run, client = ptq_study.run, ptq_study.client
    m = run.data.metrics
    for key in ("int8/val_top1", "int8/test_top1"):
        assert 0.0 <= m[key] <= 100.0
    assert 0 < m["int8/kernel_std_mean"] <= m["int8/kernel_std_max"]
    assert run.data.tags["int8.quantizer"] == QUANTIZER
    assert run.data.tags["int8.calib_batches"] == "2" and run.data.tags["int8.calib_images"] == "64"
    assert "per_channel_symmetric" in run.data.tags["int8.weights"]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"kernel_std.json", "deployed.pt"} <= names
    local = client.download_artifacts(run.info.run_id, "kernel_std.json", str(ptq_study.tmp))
    layers = json.loads(Path(local).read_text())["layers"]
    assert len(layers) == 13 and all(layer["bn_folded"] for layer in layers)  # VGG-16: 13 conv-BN pairs
    assert max(layer["std"] for layer in layers) == pytest.approx(m["int8/kernel_std_max"])
    # the study's comparison table shows the int8 columns
    buf = io.StringIO()
    Console(file=buf, width=250).print(comparison_table(ptq_study.summary.rows))
    assert "int8 val top-1" in buf.getvalue() and "kernel std" in buf.getvalue()


def test_quantize_run_rebuilds_the_trials_data_and_calibration(ptq_study, data_root):
    """Same recipe, data, deployed model and calibration batches: the trial's numbers come back."""
    from repsearch.quantize import quantize_run

    m = ptq_study.run.data.metrics
    run_id = ptq_study.run.info.run_id
    n_logged = len(ptq_study.client.get_metric_history(run_id, "int8/test_top1"))
    report = quantize_run(run_id, runs_dir=str(ptq_study.stores.runs_dir), data_root=str(data_root),
                          log_to_run=False)
    assert report.fp32 == pytest.approx({"val/top1": m["deploy/val_top1"], "test/top1": m["test/top1"]})
    assert report.int8 == pytest.approx({"int8/val_top1": m["int8/val_top1"], "int8/test_top1": m["int8/test_top1"]})
    assert report.kernel.measures == pytest.approx({k: m[k] for k in ("int8/kernel_std_mean", "int8/kernel_std_max")})
    assert report.tags["int8.calib_batches"] == "2"  # the recipe's quantize.calib_batches
    assert len(ptq_study.client.get_metric_history(run_id, "int8/test_top1")) == n_logged  # log_to_run=False


def test_cli_quantize_run_logs_onto_the_run(ptq_study, data_root):
    run_id = ptq_study.run.info.run_id
    args = ["quantize", run_id, "--runs-dir", str(ptq_study.stores.runs_dir), "--data-root", str(data_root),
            "--calib-batches", "1"]
    before = len(ptq_study.client.get_metric_history(run_id, "int8/test_top1"))
    result = CliRunner().invoke(main, args, env={"MLFLOW_TRACKING_URI": None})
    assert result.exit_code == 0, (result.output, result.exception)
    assert "int8 PTQ" in result.output and "test top-1" in result.output and "kernel std" in result.output
    assert "Downloading artifacts" not in result.output  # MLflow's progress bar is off
    after = ptq_study.client.get_run(run_id)
    assert after.data.tags["int8.calib_batches"] == "1" and after.data.tags["int8.source"] == "repsearch quantize"
    hist = ptq_study.client.get_metric_history(run_id, "int8/test_top1")
    assert len(hist) == before + 1  # logged next to the trial's own value
    assert 0.0 <= after.data.metrics["int8/val_top1"] <= 100.0
    # the kernel std of the same deployed model is the same
    assert after.data.metrics["int8/kernel_std_mean"] == pytest.approx(ptq_study.run.data.metrics["int8/kernel_std_mean"])


def _one_line_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.strip().splitlines() if line.startswith("repsearch: error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_quantize_unknown_run_and_run_without_deployed_model(ptq_study, tmp_path):
    runs = str(ptq_study.stores.runs_dir)
    env = {"MLFLOW_TRACKING_URI": None}
    _one_line_error(CliRunner().invoke(main, ["quantize", "0123abcd", "--runs-dir", runs], env=env), "no MLflow run", "0123abcd")
    bare = ptq_study.client.create_run(ptq_study.exp.experiment_id, run_name="bare").info.run_id
    _one_line_error(CliRunner().invoke(main, ["quantize", bare, "--runs-dir", runs], env=env), "deployed.pt")
    _one_line_error(
        CliRunner().invoke(main, ["quantize", "x", "--runs-dir", str(tmp_path / "none")], env=env), "no MLflow store"
    )
    _one_line_error(CliRunner().invoke(main, ["quantize", bare, "--calib-batches", "0", "--runs-dir", runs], env=env),
                    "--calib-batches must be >= 1")
    assert not (tmp_path / "none").exists()


def _trial(number, point, seed, **final):
    return SimpleNamespace(number=number, state=TrialState.COMPLETE, user_attrs={"point": point, "seed": seed, "final": final})


def _headers(table) -> list[str]:
    return [str(c.header) for c in table.columns]


def test_comparison_table_shows_int8_columns_only_when_present():
    base = {"val/top1": 90.0, "test/top1": 89.0, "avg_flops_m": 10.0, "avg_params_m": 1.0, "cost_gpu_hours": 0.1}
    plain_rows = rows_from_trials([_trial(0, "a", 0, **base), _trial(1, "b", 0, **base)])
    assert _headers(comparison_table(plain_rows)) == ["configuration"] + [c[0] for c in COLUMNS] + ["n"]

    q = {**base, "int8/val_top1": 88.0, "int8/test_top1": 87.0, "int8/kernel_std_mean": 0.0234}
    rows = rows_from_trials([_trial(0, "a", 0, **base), _trial(1, "b", 0, **q), _trial(2, "b", 1, **{**q, "int8/val_top1": 86.0})])
    table = comparison_table(rows)
    headers = _headers(table)
    assert headers[:6] == ["configuration", "val top-1 (%)", "test top-1 (%)", "int8 val top-1 (%)",
                           "int8 test top-1 (%)", "kernel std"]
    cells = {h: list(col.cells) for h, col in zip(headers, table.columns)}
    assert cells["int8 val top-1 (%)"] == ["—", "87.00 ± 1.41"]
    assert cells["kernel std"] == ["—", "0.0234"]
