"""The recipe contract: validation, profiles, --set, sweep points, hashing (DESIGN.md)."""

import pytest
import yaml

from repsearch.methods.dyrep import DyRepSpec
from repsearch.spec import (
    RecipeError,
    apply_overrides,
    load_recipe,
    parse_set,
    recipe_hash,
    study_name,
    trial_recipe,
    validate_dict,
)


def err(d, source="recipes/x.yaml"):
    with pytest.raises(RecipeError) as info:
        validate_dict(d, source)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(source + ": ")
    return msg


def test_defaults_are_the_papers():
    m = DyRepSpec()
    assert (m.interval, m.gamma_init, m.dep_threshold, m.dep_floor, m.recal_batches) == (15, 0.01, 0.02, 0.1, 20)
    assert (m.grow_until, m.max_depth, m.probe_batches, m.scoring, m.space) == (500, 2, 4, "synflow", "dyrep")


def test_unknown_metric_names_path_and_allowed_values():
    msg = err({"method": {"name": "dyrep", "scoring": "sinflow"}})
    assert "method.scoring: 'sinflow' is not one of random, grad_norm, snip, grasp, synflow, vote" in msg
    assert "method.dyrep" not in msg


def test_unknown_key_lists_allowed_keys():
    msg = err({"method": {"name": "dyrep", "intervall": 3}})
    assert "method.intervall: unknown key 'intervall'" in msg and "interval" in msg and "scoring" in msg
    msg = err({"trian": {}})
    assert "trian: unknown key" in msg and "train" in msg


def test_wrong_type_and_bounds():
    assert "train.lr: 'fast'" in err({"train": {"lr": "fast"}})
    msg = err({"method": {"name": "dyrep", "interval": 0}})
    assert "method.interval: 0" in msg and "greater than 0" in msg
    assert "method.interval" in err({"method": {"name": "dyrep", "interval": -3}})


def test_yaml_1_1_float_strings_are_converted():
    r = validate_dict({"train": {"weight_decay": "1e-4"}}, "x")
    assert r.train.weight_decay == pytest.approx(1e-4) and isinstance(r.train.weight_decay, float)


def test_unknown_method_space_and_branch():
    from repsearch.methods import method_specs

    names = ", ".join(method_specs())  # origin first, then alphabetical
    assert names.startswith("origin, dyrep, ") and "static" in names
    assert f"method.name: 'dyrop' is not one of {names}" in err({"method": {"name": "dyrop"}})
    msg = err({"method": {"name": "dyrep", "space": "dbbb"}})
    assert "method.space" in msg and "dbb" in msg and "repvgg" in msg
    msg = err({"method": {"name": "dyrep", "space": ["kxk", "3x3"]}})
    assert "method.space" in msg and "'3x3'" in msg and "1x1-kxk" in msg


def test_grid_over_range_and_pruner_on_multiobjective():
    msg = err({"sweep": {"params": {"train.lr": {"low": 0.01, "high": 0.1}}}})
    assert "sweep.params.train.lr" in msg and "grid" in msg and "tpe" in msg
    msg = err({"sweep": {"objective": [{"metric": "val/top1"}, {"metric": "avg_flops_m", "direction": "minimize"}],
                         "pruner": "median"}})
    assert "sweep.pruner" in msg and "single objective" in msg


def test_sweep_choices_are_validated_against_the_recipe():
    msg = err({"method": {"name": "dyrep"}, "sweep": {"params": {"method.scoring": {"choices": ["snip", "sinflow"]}}}})
    assert "sweep.params.method.scoring: 'sinflow' is not one of random" in msg
    msg = err({"sweep": {"baselines": [{"method.name": "static", "method.space": "nope"}]}})
    assert "sweep.baselines[0]" in msg and "method.space" in msg


def test_non_grid_needs_n_trials_and_test_is_never_an_objective():
    assert "sweep.n_trials" in err({"sweep": {"sampler": "tpe", "params": {"train.lr": {"low": 0.01, "high": 0.1}}}})
    assert "never optimised" in err({"sweep": {"objective": {"metric": "test/top1"}}})


def test_profile_then_set_last_wins(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"train": {"lr": 0.1}, "profiles": {"smoke": {"train.lr": 0.2, "train.epochs": 3}}}))
    r, resolved = load_recipe(p, "smoke", ("train.lr=0.05", "train.lr=0.01"))
    assert r.train.lr == 0.01 and r.train.epochs == 3 and "profiles" not in resolved
    with pytest.raises(RecipeError, match="unknown profile 'fast'; available: smoke"):
        load_recipe(p, "fast")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_bad_set_and_bad_yaml(tmp_path):
    for bad in ("train.lr", "=1", "a..b=1", "train.lr=[1,"):
        with pytest.raises(RecipeError, match="--set"):
            parse_set(bad)
    assert parse_set("method.space=[kxk,1x1]") == ("method.space", ["kxk", "1x1"])
    p = tmp_path / "bad.yaml"
    p.write_text("train: {lr: 0.1\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(p)


def test_switching_method_starts_from_its_defaults():
    base = {"method": {"name": "dyrep", "scoring": "snip", "interval": 3}}
    d = apply_overrides(base, {"method.name": "static", "method.space": "repvgg"})
    assert d["method"] == {"name": "static", "space": "repvgg"}
    r = validate_dict(base, "x")
    t = trial_recipe(r, {"method.name": "origin"}, seed=3)
    assert t.method.name == "origin" and t.seed == 3 and t.sweep is None
    t = trial_recipe(r, {"method.scoring": "grasp"}, seed=1)
    assert t.method.scoring == "grasp" and t.method.interval == 3


def test_hash_ignores_what_does_not_change_results():
    a = validate_dict({"sweep": {"seeds": [0]}, "data": {"root": "/a"}}, "x")
    b = validate_dict({"sweep": {"seeds": [0, 1], "workers": 2}, "data": {"root": "/b"},
                       "tracking": {"runs_dir": "elsewhere"}}, "x")
    c = validate_dict({"sweep": {"seeds": [0]}, "train": {"lr": 0.2}}, "x")
    assert recipe_hash(a) == recipe_hash(b) != recipe_hash(c)
    assert study_name("recipes/abl.yaml", "smoke", a) == f"abl.smoke-{recipe_hash(a)[:8]}"
    assert study_name("recipes/abl.yaml", None, a) == f"abl-{recipe_hash(a)[:8]}"


def test_shipped_recipes_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "recipes"
    from repsearch.sweep import plan_points

    from repsearch.spec import read_recipe_file

    for path in sorted(root.glob("*.yaml")):
        profiles = read_recipe_file(path).get("profiles", {})
        assert "smoke" in profiles, path.name  # every recipe: the paper's schedule + a smoke profile
        for profile in [None, *profiles]:
            r, _ = load_recipe(path, profile)
            # a sweep, or one configuration (e.g. RepOpt's Hyper-Search): at least one trial
            assert len(plan_points(r)) >= 1 and (r.sweep is not None or len(plan_points(r)) == 1)


def test_min_lr_above_lr_and_unknown_objective_are_rejected():
    msg = err({"train": {"lr": 0.01, "min_lr": 0.1}})
    assert msg.startswith("recipes/x.yaml: train: min_lr (0.1) must not exceed lr (0.01)")
    msg = err({"sweep": {"objective": {"metric": "val/top"}}})
    assert "sweep.objective.metric" in msg and "'val/top' is not one of val/top1" in msg


def test_grid_across_methods_drops_the_other_methods_fields():
    r = validate_dict({"method": {"name": "dyrep"},
                       "sweep": {"params": {"method.name": {"choices": ["origin", "dyrep"]},
                                            "method.scoring": {"choices": ["snip", "synflow"]}}}}, "x")
    t = trial_recipe(r, {"method.name": "origin", "method.scoring": "snip"}, seed=0)
    assert t.method.name == "origin"
    t = trial_recipe(r, {"method.name": "static", "method.space": "acb", "method.scoring": "snip"}, seed=0)
    assert t.method.name == "static" and t.method.space == "acb"
    # a typo is still an error, not dropped
    msg = err({"sweep": {"baselines": [{"method.name": "static", "method.spcae": "acb"}]}})
    assert "sweep.baselines[0]" in msg and "spcae" in msg


def test_adding_a_field_with_a_default_keeps_every_study_name():
    """DESIGN.md sweeps contract: the hash leaves out fields equal to their defaults, so a release that
    adds a field with a default renames no study."""
    from pathlib import Path

    from pydantic import Field

    from repsearch.spec import DataSpec, Recipe, TrainSpec, resolve_dict, read_recipe_file

    class TrainPlus(TrainSpec):
        fp64_master_weights: bool = False

    class DataPlus(DataSpec):
        jitter: float = 0.0

    class RecipePlus(Recipe):
        train: TrainPlus = Field(default_factory=TrainPlus)
        data: DataPlus = Field(default_factory=DataPlus)

    root = Path(__file__).resolve().parents[1] / "recipes"
    names = set()
    for path in sorted(root.glob("*.yaml")):
        raw = read_recipe_file(path)
        for profile in [None, *raw.get("profiles", {})]:
            d = resolve_dict(raw, str(path), profile)
            old, new = Recipe.model_validate(d), RecipePlus.model_validate(d)
            assert new.train.fp64_master_weights is False
            assert study_name(path, profile, old) == study_name(path, profile, new)
            names.add(study_name(path, profile, old))
            d["train"] = {**d.get("train", {}), "fp64_master_weights": True}
            assert study_name(path, profile, RecipePlus.model_validate(d)) != study_name(path, profile, old)
    assert len(names) >= 4


def test_hash_keeps_the_method_name_and_non_default_values():
    origin = validate_dict({"method": {"name": "origin"}}, "x")
    dyrep = validate_dict({"method": {"name": "dyrep"}}, "x")
    static = validate_dict({"method": {"name": "static"}}, "x")
    assert len({recipe_hash(origin), recipe_hash(dyrep), recipe_hash(static)}) == 3
    # writing a default explicitly is the same recipe
    assert recipe_hash(validate_dict({"method": {"name": "dyrep", "interval": 15}, "train": {"lr": 0.1}}, "x")) == recipe_hash(dyrep)
    assert recipe_hash(validate_dict({"method": {"name": "dyrep", "interval": 14}}, "x")) != recipe_hash(dyrep)


def test_empty_recipe_is_one_line_error(tmp_path):
    for text in ("", "# only a comment\n# and another\n", "{}\n"):
        p = tmp_path / "empty.yaml"
        p.write_text(text)
        with pytest.raises(RecipeError) as info:
            load_recipe(p)
        assert str(info.value) == f"{p}: the recipe is empty; a recipe is a mapping of sections (data, model, method, train, sweep, ...)"


def test_train_optimizer_clip_and_precision_fields():
    r = validate_dict({"train": {"optimizer": "adamw", "betas": [0.8, 0.99], "eps": 1.0e-6, "grad_clip": 5.0, "tf32": True}}, "x")
    assert r.train.optimizer == "adamw" and r.train.betas == (0.8, 0.99) and r.train.grad_clip == 5.0 and r.train.tf32
    d = validate_dict({}, "x").train
    assert d.tf32 is False and d.grad_clip is None and d.optimizer == "sgd"
    assert "train.optimizer: 'adam' is not one of sgd, adamw" in err({"train": {"optimizer": "adam"}})
    assert "betas" in err({"train": {"betas": [0.9, 1.5]}})
    assert "train.grad_clip" in err({"train": {"grad_clip": -1}})


def test_model_options_are_checked_against_the_constructor(monkeypatch):
    import repsearch.models as models
    from torch import nn

    def toy(num_classes: int = 10, width: float = 1.0, stem_stride: int = 2) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3, stem_stride), nn.Flatten(), nn.LazyLinear(num_classes))

    monkeypatch.setitem(models.MODELS, "toy", toy)
    r = validate_dict({"model": {"name": "toy", "stem_stride": "1"}}, "x")
    assert r.model.stem_stride == 1 and r.model.options == {"stem_stride": 1}
    assert models.model_kwargs("toy", 10, 0.5, **r.model.options) == {"num_classes": 10, "width": 0.5, "stem_stride": 1}
    # every constructor argument is stored, defaults included
    assert models.model_kwargs("toy", 10) == {"num_classes": 10, "width": 1.0, "stem_stride": 2}
    msg = err({"model": {"name": "toy", "stem": 1}})
    assert "model: unknown key 'stem' for model toy; allowed keys: name, width, stem_stride" in msg
    assert "stem_stride" in err({"model": {"name": "toy", "stem_stride": "two"}})
    assert "unknown key 'stem_stride' for model vgg16" in err({"model": {"name": "vgg16", "stem_stride": 1}})
    # an option changes the study hash; its default value written out does not
    assert recipe_hash(validate_dict({"model": {"name": "toy", "stem_stride": 1}}, "x")) != recipe_hash(
        validate_dict({"model": {"name": "toy"}}, "x"))
    assert recipe_hash(validate_dict({"model": {"name": "toy", "stem_stride": 2}}, "x")) == recipe_hash(
        validate_dict({"model": {"name": "toy"}}, "x"))


def test_voters_field():
    r = validate_dict({"method": {"name": "dyrep", "scoring": "vote"}}, "x")
    assert r.method.voters == ["grad_norm", "snip", "synflow"]
    r = validate_dict({"method": {"name": "dyrep", "scoring": "vote", "voters": ["grad_norm", "snip", "grasp", "synflow"]}}, "x")
    assert "grasp" in r.method.voters
    # the order of voters does not matter; voters do not matter unless scoring is vote
    a = validate_dict({"method": {"name": "dyrep", "scoring": "vote", "voters": ["synflow", "snip", "grasp"]}}, "x")
    b = validate_dict({"method": {"name": "dyrep", "scoring": "vote", "voters": ["grasp", "snip", "synflow"]}}, "x")
    assert a.method.voters == ["snip", "grasp", "synflow"] and recipe_hash(a) == recipe_hash(b)
    c = validate_dict({"method": {"name": "dyrep", "scoring": "snip", "voters": ["grasp", "snip"]}}, "x")
    assert recipe_hash(c) == recipe_hash(validate_dict({"method": {"name": "dyrep", "scoring": "snip"}}, "x"))
    assert recipe_hash(a) != recipe_hash(validate_dict({"method": {"name": "dyrep", "scoring": "vote"}}, "x"))
    assert "method.voters" in err({"method": {"name": "dyrep", "voters": ["snip", "sinflow"]}})
    assert "method.voters" in err({"method": {"name": "dyrep", "voters": ["vote"]}})
