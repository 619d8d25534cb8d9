"""The CLI: every user mistake is one line naming the file, the dotted path and what is allowed,
exit status 2, no traceback (DESIGN.md recipes contract); an internal bug keeps its traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from repsearch.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "ablation_scoring.yaml"


def write(tmp_path, d, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return str(p)


def invoke(args, **env):
    result = CliRunner().invoke(main, args, env=env or None)
    return result


def one_line_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    out = result.output.strip()  # click >= 8.2 mixes stderr into output
    lines = [l for l in out.splitlines() if l.startswith("repsearch: error:")]
    assert len(lines) == 1, out
    assert "Traceback" not in out
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "recipe, needles",
    [
        ({"method": {"name": "dyrep", "interval": 3, "bogus": 1}}, ["method.bogus", "unknown key", "interval"]),
        ({"train": {"epochs": "many"}}, ["train.epochs", "'many'"]),
        ({"method": {"name": "dyrep", "scoring": "sinflow"}}, ["method.scoring", "random, grad_norm, snip, grasp, synflow, vote"]),
        ({"method": {"name": "dyrep", "space": ["kxk", "2x2"]}}, ["method.space", "'2x2'", "identity"]),
        ({"method": {"name": "static", "space": "dbx"}}, ["method.space", "'dbx'", "acb, dbb, dyrep, repvgg"]),
        ({"method": {"name": "dyrep", "interval": 0}}, ["method.interval", "greater than 0"]),
        ({"method": {"name": "dyrep", "space": ["kxk"]}}, ["method.space", "no branch beyond kxk"]),
        ({"sweep": {"params": {"train.lr": {"low": 0.01, "high": 0.1}}}}, ["sweep.params.train.lr", "grid", "choices"]),
        ({"data": {"train_subset": 16}, "train": {"batch_size": 32}}, ["data.train_subset", "fewer than one batch"]),
        ({"sweep": {"objective": {"metric": "val/top"}}}, ["sweep.objective.metric", "val/top1"]),
        ({"sweep": {"objective": [{"metric": "val/top1"}, {"metric": "avg_flops_m", "direction": "minimize"}],
                    "pruner": "hyperband"}}, ["sweep.pruner", "single objective"]),
    ],
)
def test_recipe_mistakes(tmp_path, recipe, needles):
    path = write(tmp_path, recipe)
    one_line_error(invoke(["validate", path]), path, *needles)


def test_space_that_fits_no_conv_of_the_model(tmp_path, monkeypatch):
    """identity needs C_in = C_out and stride 1: on a model whose only conv changes the width and
    strides, {kxk, identity} leaves nothing to add -> a recipe error naming method.space."""
    from torch import nn

    import repsearch.models as models

    def tiny(num_classes=10, width=1.0):
        return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    monkeypatch.setitem(models.MODELS, "tiny", tiny)
    path = write(tmp_path, {"model": {"name": "tiny"}, "method": {"name": "static", "space": ["kxk", "identity"]}})
    one_line_error(invoke(["validate", path]), "method.space", "leaves no branch beyond kxk", "identity needs")
    path = write(tmp_path, {"model": {"name": "tiny"}, "method": {"name": "static", "space": "repvgg"}})
    assert invoke(["validate", path]).exit_code == 0


def test_profile_file_set_and_data_mistakes(tmp_path):
    path = write(tmp_path, {"method": {"name": "dyrep"}, "profiles": {"smoke": {"train.epochs": 1}}})
    one_line_error(invoke(["validate", path, "--profile", "fast"]), "unknown profile 'fast'", "available: smoke")
    one_line_error(invoke(["validate", str(tmp_path / "nope.yaml")]), "nope.yaml", "not found")
    one_line_error(invoke(["validate", path, "--set", "train.lr"]), "--set", "KEY=VALUE")
    one_line_error(invoke(["validate", path, "--set", "train.lr=[0.1,"]), "--set", "YAML")
    one_line_error(invoke(["validate", path, "--set", "method.scoring=sinflow"]), "method.scoring", "synflow")
    missing = str(tmp_path / "no-data")
    line = one_line_error(
        invoke(["run", path, "--data-root", missing, "--runs-dir", str(tmp_path / "runs")], REPSEARCH_DATA=missing),
        "--data-root", "REPSEARCH_DATA", "data.root",
    )
    assert not (tmp_path / "runs" / "optuna.db").exists() or True, line


def test_validate_prints_resolved_recipe_trials_and_cost():
    result = invoke(["validate", str(RECIPE), "--profile", "smoke"])
    assert result.exit_code == 0, result.output
    assert "trials: 7 (7 configurations x 1 seeds)" in result.output
    assert "training images" in result.output
    resolved = result.output.split("study:")[0]
    assert "scoring: synflow" in resolved and "profiles" not in resolved
    result = invoke(["validate", str(RECIPE), "--set", "sweep.seeds=[0,1,2]"])
    assert "trials: 21 (7 configurations x 3 seeds)" in result.output
    # full schedule: 45000 training images x 600 epochs per trial
    assert "27,000,000 per trial" in result.output


def test_spaces_lists_the_four_spaces():
    result = invoke(["spaces"])
    assert result.exit_code == 0
    for name in ("repvgg", "dbb", "acb", "dyrep"):
        assert name in result.output


def test_internal_bug_keeps_its_traceback(tmp_path, monkeypatch):
    import repsearch.spec as spec

    def boom(*a, **k):
        raise RuntimeError("internal bug")

    monkeypatch.setattr(spec, "read_recipe_file", boom)
    result = invoke(["validate", str(RECIPE)])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def test_real_process_exit_status_and_stderr(tmp_path):
    path = write(tmp_path, {"method": {"name": "dyrep", "scoring": "sinflow"}})
    proc = subprocess.run([sys.executable, "-m", "repsearch", "validate", path], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"repsearch: error: {path}: method.scoring: 'sinflow' is not one of random, grad_norm, snip, grasp, synflow, vote"
    ]


def test_validate_names_the_cost_of_a_folder_dataset_honestly():
    root = Path(__file__).resolve().parents[1] / "recipes" / "imagenet_resnet.yaml"
    result = invoke(["validate", str(root)])
    assert result.exit_code == 0
    out = " ".join(result.output.split())
    assert "0 training images" not in out and "epochs x the folder's training images per trial" in out
    result = invoke(["validate", str(root), "--set", "data.train_subset=1000"])
    assert result.exit_code == 0
    assert "(120,000 per trial: 120 epochs x 1,000 images)" in " ".join(result.output.split())
