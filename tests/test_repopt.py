"""RepOpt (RepOptimizers, ICLR 2023) through the method interface: Hyper-Search (CSLA model, scale
init, scales.pt), target training (Rule of Initialization, Grad Mult optimizers, Table 4 ablations),
recipe errors, and the study dependency target <- Hyper-Search (resolution, hashing, --no-deps,
mismatched scales) through the real CLI on tiny real-data runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from equivalence import assert_close, randomize_bns
from repsearch.gradmult import RepOptAdamW, RepOptSGD
from repsearch.methods.repopt import RepOpt, RepOptSpec, hs_init_scale, rule_of_initialization
from repsearch.methods.scales import ScalesError, build_scales, check_compatible, load_scales, save_scales
from repsearch.models import build_model
from repsearch.rep import deploy
from repsearch.rep.csla import CSLABlock
from repsearch.spec import RecipeError, hashed_recipe, study_name, validate_dict
from repsearch.trial import run_trial

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "data": {"val_size": 64, "train_subset": 128, "test_subset": 64},
    "model": {"name": "repvgg_a0", "width": 0.125},
    "train": {"epochs": 1, "batch_size": 32, "eval_batch_size": 64, "lr": 0.05, "min_lr": 0.0},
}


def recipe(method: dict, **train) -> object:
    d = json.loads(json.dumps(TINY))
    d["method"] = method
    d["train"].update(train)
    return validate_dict(d, "test")


# ---------------------------------------------------------------------------------- Hyper-Search
def test_hs_init_follows_the_official_depth_rule():
    assert hs_init_scale(0, 0) == 1.0  # stem
    assert [hs_init_scale(2, i) for i in range(4)] == [1.0, math.sqrt(2.0), 1.0, math.sqrt(2 / 3)]


def test_hyper_search_replaces_every_block_conv_with_a_csla_block():
    r = recipe({"name": "repopt", "stage": "hyper_search"})
    model = build_model("repvgg_a0", width=0.125)
    blocks = model.blocks()
    m = RepOpt(r.method, recipe=r).prepare(model, [])
    for b in blocks:
        blk = m.get_submodule(f"{b.path}.conv")
        assert isinstance(blk, CSLABlock) and blk.trainable_scales
        v = hs_init_scale(b.stage, b.index)
        assert torch.all(blk.s == v) and torch.all(blk.t == v)
        assert blk.has_identity == b.has_identity
        if b.has_identity:
            assert torch.all(blk.scale_identity == 1.0)
    # the Hyper-Search model deploys exactly to the plain architecture
    randomize_bns(m, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in blocks:
            blk = m.get_submodule(f"{b.path}.conv")
            blk.s.uniform_(-1.5, 1.5)
            blk.t.uniform_(-1.5, 1.5)
    m.eval()
    x = torch.randn(4, 3, 32, 32)
    dep = deploy(m).eval()
    fresh = build_model("repvgg_a0", width=0.125)
    fresh.load_state_dict(dep.state_dict(), strict=True)
    with torch.no_grad():
        assert_close(fresh.eval()(x), m(x))


def test_hyper_search_identity_scales_decay_without_wd_on_norm():
    r = recipe({"name": "repopt", "stage": "hyper_search"}, wd_on_norm=False, weight_decay=4e-5)
    method = RepOpt(r.method, recipe=r)
    m = method.prepare(build_model("repvgg_a0", width=0.125), [])
    opt = method.optimizer(m, r.train)
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    for blk in (x for x in m.modules() if isinstance(x, CSLABlock)):
        assert id(blk.s) in no_decay and id(blk.t) in no_decay
        if blk.has_identity:
            assert id(blk.scale_identity) in decay  # the official set_weight_decay
        assert id(blk.conv.weight) in decay


def test_hyper_search_trial_writes_a_verified_scales_file(tmp_path, data_root):
    r = recipe({"name": "repopt", "stage": "hyper_search"}, grad_clip=5.0)
    res = run_trial(r, data_root=str(data_root), device="cpu", out_dir=tmp_path, progress=False)
    path = tmp_path / "scales.pt"
    assert path in res.artifacts
    payload = load_scales(path)
    model = build_model("repvgg_a0", width=0.125)
    check_compatible(payload, "repvgg_a0", 0.125, model.blocks())
    assert payload["sha256"] == res.tags["repopt.scales_sha256"]
    assert res.final["repopt/s_abs_mean"] == pytest.approx(payload["summary"]["s_abs_mean"])
    # the scales trained: not the init any more
    b = payload["blocks"][2]
    assert not torch.allclose(b["s"], torch.full_like(b["s"], hs_init_scale(b["stage"], b["index"])))
    # altering the content is detected
    payload["blocks"][0]["s"][0] += 1.0
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ScalesError, match="sha256"):
        load_scales(tmp_path / "bad.pt")


# ---------------------------------------------------------------------------------- target
def _scales_file(tmp_path: Path, model_name="repvgg_a0", width=0.125, seed=0) -> Path:
    g = torch.Generator().manual_seed(seed)
    model = build_model(model_name, width=width)
    blocks = []
    for b in model.blocks():
        c = model.get_submodule(f"{b.path}.conv").out_channels
        blocks.append({"path": b.path, "stage": b.stage, "index": b.index, "has_identity": b.has_identity,
                       "s": torch.rand(c, generator=g) * 2 - 0.5, "t": torch.rand(c, generator=g) * 2 - 0.5,
                       "identity": torch.rand(c, generator=g) + 0.5 if b.has_identity else None})
    return save_scales(build_scales(model_name, width, {}, blocks), tmp_path / f"scales_{model_name}_{width}.pt")


def test_rule_of_initialization_is_the_csla_kernel():
    conv = nn.Conv2d(6, 6, 3, padding=1, bias=False)
    s, t, ident = torch.randn(6), torch.randn(6), torch.rand(6)
    torch.manual_seed(0)
    w = rule_of_initialization(conv, s, t, ident)
    torch.manual_seed(0)  # the same draws for the CSLA block's two convs
    w3 = torch.empty(6, 6, 3, 3)
    w1 = torch.empty(6, 6, 1, 1)
    nn.init.kaiming_uniform_(w3, a=math.sqrt(5))
    nn.init.kaiming_uniform_(w1, a=math.sqrt(5))
    blk = CSLABlock(6, 6, 3, 1, 1, scale_init=1.0, trainable_scales=False)
    with torch.no_grad():
        blk.conv.weight.copy_(w3)
        blk.conv_1x1.weight.copy_(w1)
        blk.s.copy_(s)
        blk.t.copy_(t)
        blk.scale_identity.copy_(ident)
    ref, b = blk.equivalent_kernel()
    assert torch.allclose(w, ref, atol=1e-6) and torch.all(b == 0)
    with pytest.raises(ValueError, match="C_in = C_out"):
        rule_of_initialization(nn.Conv2d(4, 6, 3, padding=1), s, t, ident)


@pytest.mark.parametrize("mode", ["searched", "channel_mean", "hs_init", "ones"])
def test_target_constants_and_grad_mult(tmp_path, mode):
    path = _scales_file(tmp_path)
    payload = load_scales(path)
    method_d = {"name": "repopt", "stage": "target", "scales": mode}
    if mode in ("searched", "channel_mean"):
        method_d.update(scales_from=str(path), scales_sha256=payload["sha256"])
    r = recipe(method_d, nesterov=True)
    method = RepOpt(r.method, recipe=r)
    torch.manual_seed(0)
    model = method.prepare(build_model("repvgg_a0", width=0.125), [])
    opt = method.optimizer(model, r.train)
    assert isinstance(opt, RepOptSGD)
    by_path = {b["path"]: b for b in payload["blocks"]}
    mults = opt.grad_mults
    for b in model.blocks():
        conv = model.get_submodule(f"{b.path}.conv")
        s, t, ident = method.constants[b.path]
        if mode == "searched":
            assert torch.equal(s, by_path[b.path]["s"]) and torch.equal(t, by_path[b.path]["t"])
        elif mode == "channel_mean":
            assert torch.allclose(s, torch.full_like(s, float(by_path[b.path]["s"].mean())))
        elif mode == "hs_init":
            assert torch.all(s == hs_init_scale(b.stage, b.index))
        else:
            assert torch.all(s == 1) and torch.all(t == 1)
        assert (ident is not None) == b.has_identity
        m = mults[conv.weight]
        # Appendix A: s^2 off-centre, s^2 + t^2 at the centre, + 1 on the diagonal's centre
        c = 0
        assert torch.allclose(m[c, (c + 1) % conv.in_channels, 0, 0], s[c] ** 2)
        exp_centre = s[c] ** 2 + t[c] ** 2 + (1.0 if b.has_identity else 0.0)
        assert torch.allclose(m[c, c, 1, 1], exp_centre)


def test_target_adamw_uses_power_one_and_no_grad_mult_is_plain(tmp_path):
    path = _scales_file(tmp_path)
    sha = load_scales(path)["sha256"]
    r = recipe({"name": "repopt", "scales_from": str(path), "scales_sha256": sha}, optimizer="adamw", weight_decay=0.05)
    method = RepOpt(r.method, recipe=r)
    model = method.prepare(build_model("repvgg_a0", width=0.125), [])
    opt = method.optimizer(model, r.train)
    assert isinstance(opt, RepOptAdamW)
    b = model.blocks()[3]
    s, t, _ = method.constants[b.path]
    m = opt.grad_mults[model.get_submodule(f"{b.path}.conv").weight]
    assert torch.allclose(m[0, 1 % m.shape[1], 0, 0], s[0].abs())  # |s|, power 1
    r2 = recipe({"name": "repopt", "scales_from": str(path), "scales_sha256": sha, "grad_mult": False})
    method2 = RepOpt(r2.method, recipe=r2)
    opt2 = method2.optimizer(method2.prepare(build_model("repvgg_a0", width=0.125), []), r2.train)
    assert type(opt2) is torch.optim.SGD


def test_target_without_reinit_keeps_the_plain_init(tmp_path):
    path = _scales_file(tmp_path)
    sha = load_scales(path)["sha256"]
    torch.manual_seed(0)
    plain = build_model("repvgg_a0", width=0.125)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    r = recipe({"name": "repopt", "scales_from": str(path), "scales_sha256": sha, "reinit": False})
    RepOpt(r.method, recipe=r).prepare(plain, [])
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    r = recipe({"name": "repopt", "scales_from": str(path), "scales_sha256": sha})
    RepOpt(r.method, recipe=r).prepare(plain, [])
    assert not torch.equal(before["stage1.0.conv.weight"], plain.state_dict()["stage1.0.conv.weight"])


def test_target_refuses_scales_of_another_content(tmp_path):
    path = _scales_file(tmp_path)
    r = recipe({"name": "repopt", "scales_from": str(path), "scales_sha256": "0" * 64})
    with pytest.raises(ScalesError, match="sha256"):
        RepOpt(r.method, recipe=r).prepare(build_model("repvgg_a0", width=0.125), [])


def test_target_trial_deploys_without_conversion(tmp_path, data_root):
    path = _scales_file(tmp_path)
    sha = load_scales(path)["sha256"]
    r = recipe({"name": "repopt", "scales_from": str(path), "scales_sha256": sha, "scales_run_id": "abc"}, nesterov=True)
    res = run_trial(r, data_root=str(data_root), device="cpu", out_dir=tmp_path / "t", progress=False)
    assert res.final["deploy/max_abs_err"] == 0.0  # already plain: deploy is a copy
    assert res.tags["repopt.scales_run_id"] == "abc" and res.tags["repopt.scales_sha256"] == sha
    ckpt = torch.load(tmp_path / "t" / "deployed.pt", weights_only=True)
    build_model(ckpt["model"], **ckpt["kwargs"]).load_state_dict(ckpt["state_dict"], strict=True)


# ---------------------------------------------------------------------------------- recipe errors
def _err(d: dict) -> str:
    with pytest.raises(RecipeError) as exc:
        validate_dict(d, "r")
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_recipe_errors_are_one_line():
    base = {"model": {"name": "repvgg_a0"}}
    assert "grad_clip" in _err({**base, "method": {"name": "repopt", "scales_from": "x.pt"}, "train": {"grad_clip": 5.0}})
    assert "scales_from" in _err({**base, "method": {"name": "repopt", "stage": "target"}})
    assert "RepVGG-family" in _err({"model": {"name": "vgg16"}, "method": {"name": "repopt", "stage": "hyper_search"}})
    assert "repvgg_z9" in _err({"model": {"name": "repvgg_z9"}, "method": {"name": "repopt", "stage": "hyper_search"}})
    # hs_init / ones need no file; grad_clip is fine while searching
    validate_dict({**base, "method": {"name": "repopt", "scales": "ones"}}, "r")
    validate_dict({**base, "method": {"name": "repopt", "stage": "hyper_search"}, "train": {"grad_clip": 5.0}}, "r")


def test_hash_uses_the_scales_content_not_their_source(tmp_path):
    a = validate_dict({"model": {"name": "repvgg_a0"}, "method": {"name": "repopt", "scales_from": "/x/a.pt", "scales_sha256": "ab" * 32, "scales_run_id": "r1"}}, "r")
    b = validate_dict({"model": {"name": "repvgg_a0"}, "method": {"name": "repopt", "scales_from": "/y/b.pt", "scales_sha256": "ab" * 32, "scales_run_id": "r2"}}, "r")
    c = validate_dict({"model": {"name": "repvgg_a0"}, "method": {"name": "repopt", "scales_from": "/x/a.pt", "scales_sha256": "cd" * 32}}, "r")
    assert study_name("t.yaml", None, a) == study_name("t.yaml", None, b) != study_name("t.yaml", None, c)
    assert "scales_from" not in hashed_recipe(a)["method"]


# ---------------------------------------------------------------------------------- dependency, CLI
HS_TINY = ["data.train_subset=96", "data.val_size=32", "data.test_subset=32", "model.width=0.0625",
           "train.epochs=1", "train.batch_size=32", "train.eval_batch_size=64", "train.warmup_epochs=0"]


def _run(args, cwd):
    return subprocess.run([sys.executable, "-m", "repsearch", *args], capture_output=True, text=True, cwd=cwd, timeout=900)


def _write_recipes(tmp: Path) -> tuple[Path, Path]:
    """Copies of the two shipped recipes with the tiny settings as a `tiny` profile (profiles are how
    the target names the Hyper-Search study it depends on)."""
    import yaml

    hs = yaml.safe_load((ROOT / "recipes" / "repopt_hyper_search.yaml").read_text())
    tg = yaml.safe_load((ROOT / "recipes" / "repopt_vs_repvgg.yaml").read_text())
    tiny = dict(s.split("=", 1) for s in HS_TINY)
    tiny = {k: yaml.safe_load(v) for k, v in tiny.items()}
    hs["profiles"]["tiny"] = {**hs["profiles"]["smoke"], **tiny}
    tg["profiles"]["tiny"] = {**tg["profiles"]["smoke"], **tiny, "quantize.calib_batches": 1,
                              "method.scales_from": {"recipe": "repopt_hyper_search.yaml", "profile": "tiny"}}
    tg["sweep"]["baselines"] = [{"method.name": "static", "method.space": "repvgg", "method.post_bn": "absorb"},
                                {"method.scales": "ones"}]
    (tmp / "repopt_hyper_search.yaml").write_text(yaml.safe_dump(hs))
    (tmp / "repopt_vs_repvgg.yaml").write_text(yaml.safe_dump(tg))
    return tmp / "repopt_hyper_search.yaml", tmp / "repopt_vs_repvgg.yaml"


def test_target_runs_the_hyper_search_study_first_then_adds_nothing(tmp_path, data_root):
    hs, tg = _write_recipes(tmp_path)
    common = ["--runs-dir", str(tmp_path / "runs"), "--data-root", str(data_root), "--device", "cpu", "--no-progress"]
    refused = _run(["run", str(tg), "-p", "tiny", "--no-deps", *common], tmp_path)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "incomplete" in refused.stderr and "Traceback" not in refused.stderr
    first = _run(["run", str(tg), "-p", "tiny", *common], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    assert "running it first" in out and "repopt_hyper_search.tiny" in out
    assert out.index("repopt_hyper_search.tiny") < out.index("repopt_vs_repvgg.tiny")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exps = {e.name: e.experiment_id for e in client.search_experiments()}
    hs_runs = [r for r in client.search_runs([exps["repopt_hyper_search"]]) if "mlflow.parentRunId" in r.data.tags]
    assert len(hs_runs) == 1
    hs_run = hs_runs[0].info.run_id
    assert "scales.pt" in [a.path for a in client.list_artifacts(hs_run)]
    tg_runs = [r for r in client.search_runs([exps["repopt_vs_repvgg"]]) if "mlflow.parentRunId" in r.data.tags]
    assert len(tg_runs) == 3
    target_runs = [r for r in tg_runs if r.data.tags.get("repopt.stage") == "target"]
    assert len(target_runs) == 2
    searched = [r for r in target_runs if r.data.tags.get("repopt.scales") == "searched"]
    assert searched and searched[0].data.tags["repopt.scales_run_id"] == hs_run
    for r in tg_runs:  # INT8 next to fp32 on every arm
        assert "int8/test_top1" in r.data.metrics and "test/top1" in r.data.metrics
    n_before = sum(len(client.search_runs([e])) for e in exps.values())
    assert n_before == 1 + 1 + 1 + 3  # two parents, one HS trial, three target arms
    again = _run(["run", str(tg), "-p", "tiny", *common], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to run" in again.stdout and "running it first" not in again.stdout
    assert sum(len(client.search_runs([e])) for e in exps.values()) == n_before  # nothing added


def test_mismatched_or_missing_scales_are_one_line(tmp_path, data_root):
    _, tg = _write_recipes(tmp_path)
    common = ["--runs-dir", str(tmp_path / "runs"), "--data-root", str(data_root), "--device", "cpu", "--no-progress"]
    other = _scales_file(tmp_path, "repvgg_a0", 0.125)
    for source, expect in ((str(other), "are for repvgg_a0 width 0.125"), (str(tmp_path / "nope.pt"), "neither an existing file")):
        proc = _run(["run", str(tg), "-p", "tiny", "--set", f"method.scales_from={source}", *common], tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert expect in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    width = _scales_file(tmp_path, "repvgg_b1", 0.125)  # the recipe trains repvgg_b1 at width 0.0625
    proc = _run(["run", str(tg), "-p", "tiny", "--set", f"method.scales_from={width}", *common], tmp_path)
    assert proc.returncode == 2 and "are for repvgg_b1 width 0.125" in proc.stderr and "Traceback" not in proc.stderr


def test_a_dependency_that_cannot_fit_is_refused_before_it_runs(tmp_path, data_root):
    _, tg = _write_recipes(tmp_path)
    common = ["--runs-dir", str(tmp_path / "runs"), "--data-root", str(data_root), "--device", "cpu", "--no-progress"]
    for sets, expect in (
        (["model.width=0.25"], "that Hyper-Search trains repvgg_b1 width 0.0625, this recipe repvgg_b1 width 0.25"),
        ([f"method.scales_from={{recipe: {ROOT / 'recipes' / 'repan_cifar.yaml'}}}"], "not a RepOpt Hyper-Search"),
    ):
        args = ["run", str(tg), "-p", "tiny", *common]
        for x in sets:
            args += ["--set", x]
        proc = _run(args, tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert expect in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert "running it first" not in proc.stdout  # refused before anything trained
    assert not list((tmp_path / "runs").glob("artifacts/*"))


def test_every_sweep_arm_must_find_its_dependency_resolved(tmp_path):
    from repsearch.dependencies import DependencyError, resolve_dependencies
    from repsearch.tracking import resolve_stores

    path = _scales_file(tmp_path)
    d = {**json.loads(json.dumps(TINY)), "method": {"name": "repopt", "scales": "ones", "scales_from": str(path)},
         "sweep": {"baselines": [{"method.scales": "searched"}]}}
    r = validate_dict(d, "r")
    stores = resolve_stores(r, tmp_path / "r.yaml", runs_dir=tmp_path / "runs")
    with pytest.raises(DependencyError, match="sweep arm baseline:method.scales=searched: needs method.scales_from"):
        resolve_dependencies(r, tmp_path / "r.yaml", stores)
    # a resolved base: every arm shares it, and an arm over another width is refused
    d["method"]["scales"] = "searched"
    d["sweep"]["baselines"] = [{"method.scales": "ones"}, {"model.width": 0.25}]
    r = validate_dict(d, "r")
    with pytest.raises(ScalesError, match="are for repvgg_a0 width 0.125"):
        resolve_dependencies(r, tmp_path / "r.yaml", stores)
    d["sweep"]["baselines"] = [{"method.scales": "ones"}]
    resolved = resolve_dependencies(validate_dict(d, "r"), tmp_path / "r.yaml", stores)
    assert resolved.method.scales_sha256 == load_scales(path)["sha256"] and resolved.method.scales_run_id is None


def test_a_run_id_lookup_creates_no_store(tmp_path):
    from repsearch.deployed import fetch_run_artifact
    from repsearch.errors import UserError

    r = validate_dict({**json.loads(json.dumps(TINY)), "tracking": {"runs_dir": str(tmp_path / "nowhere")}}, "r")
    with pytest.raises(UserError, match="no runs folder"):
        fetch_run_artifact("0" * 32, "deployed.pt", r)
    assert not (tmp_path / "nowhere").exists()
