"""Typed recipes: every option declared once per family, unknown names refused with the close valid ones;
strategies, per-module overrides and a user's rules through the public API."""
import ast
import dataclasses
import inspect

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import randomize_

import afconvert
from afconvert.converter import engine
from afconvert.converter.certify import random_input, relative_logit_change
from afconvert.converter.engine import RuleConflictError
from afconvert.converter.recipe import RecipeError, families, list_recipes, load_recipe
from afconvert.converter.rule import Judgement, Rule, Verdict
from afconvert.layers.poly import AliasFreePolyActivation


@pytest.mark.parametrize("data,message", [
    ({"pooling": {"max": "max"}}, r"unknown section '\[pooling\]': did you mean pool"),
    ({"upsampling": {}}, r"unknown section '\[upsampling\]': did you mean upsample"),
    ({"activation": {"degre": 3}}, r"\[activation\]: unknown option 'degre': did you mean degree"),
    ({"activation": {"normalize": "rms"}}, r"'normalize' = 'rms': valid: channel, none, sample"),
    ({"activation": {"degree": "two"}}, r"'degree' = 'two' is not a int"),
    ({"activation": {"scale": "rms"}}, r"'scale' = 'rms': valid: inband, l4"),
    ({"activation": {"fuse_linear": True}}, r"\[activation\]: fuse_linear .* fix: scale = \"l4\""),
    ({"conv": {"replace": "magic"}}, r"replace = 'magic' is no strategy of family 'conv'"),
    ({"conv": {"stem_activation": {"cutof": 0.5}}}, r"stem_activation: unknown option 'cutof': did you mean cutoff"),
    ({"overrides": {"stem.*": {"replace": "poly"}}}, r"only \"keep\" is"),
    ({"overrides": {"stem.*": {"activaton": {"replace": "keep"}}}}, r"unknown key 'activaton': did you mean activation"),
])
def test_unknown_names_are_refused_with_close_valid_names(data, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe({"name": "bad", **data})


def test_a_toml_file_error_names_the_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n[norm]\nlayernorm = "chw"\n')
    with pytest.raises(RecipeError, match=r"mine.toml \[norm\]: unknown option 'layernorm'"):
        load_recipe(str(path))


def test_afc_fullband_is_afc_with_the_stem_down_sampling_deferred():
    afc, fullband = load_recipe("afc").to_dict(), load_recipe("afc-fullband").to_dict()
    assert (afc["conv"].pop("defer"), fullband["conv"].pop("defer")) == ("none", "input")
    assert (afc["activation"].pop("scale"), fullband["activation"].pop("scale")) == ("inband", "outband")
    assert afc == fullband


def test_a_recipe_starts_from_its_base_and_merges_its_own_tables_on_top(tmp_path):
    (tmp_path / "mid.toml").write_text('base = "afc"\nname = "mid"\n[activation]\ndegree = 3\n'
                                       '[overrides."stem.*".activation]\nreplace = "keep"\n')
    (tmp_path / "top.toml").write_text('base = "mid.toml"\nname = "top"\nsummary = "mine"\n[conv]\ndefer = "all"\n'
                                       '[overrides."stem.*".activation]\ndegree = 4\n')
    top, afc = load_recipe(str(tmp_path / "top.toml")), load_recipe("afc")
    got, want = top.to_dict(), afc.to_dict()
    assert (top.name, top.summary) == ("top", "mine")
    assert got["activation"].pop("degree") == 3 and got["conv"].pop("defer") == "all"
    assert got.pop("overrides") == {"stem.*": {"activation": {"replace": "keep", "degree": 4}}}
    del want["activation"]["degree"], want["conv"]["defer"]
    assert got == want
    assert load_recipe({"base": "afc", "name": "mine", "conv": {"defer": "input"},
                        "activation": {"scale": "outband"}}).to_dict() == load_recipe("afc-fullband").to_dict()


@pytest.mark.parametrize("text,message", [
    ('base = "afcc"', r"unknown recipe 'afcc': did you mean afc"),
    ('base = 3', r"base = 3 must be a recipe name or a .toml path"),
    ('base = "loop.toml"', r"loop.toml: base recipes form a cycle"),
])
def test_a_bad_base_is_refused_in_one_line(tmp_path, text, message):
    path = tmp_path / "loop.toml"
    path.write_text(text + "\n")
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(str(path))
    assert "\n" not in str(err.value)


def test_shipped_recipes_load_and_every_option_is_read():
    """Every option a family declares is read by its rules (or a graph pass): no documented key is inert."""
    assert {"afc", "afc-paper"} <= set(list_recipes())
    for fam in families().values():
        read = _names_read(fam.module)
        for f in dataclasses.fields(fam.options):
            if f.name != "replace":
                assert f.name in read, (fam.name, f.name)


def _names_read(module) -> set[str]:
    """Attribute names the module's code reads (``opts.degree``) and its string constants, docstrings and
    comments left out: a name that only a docstring mentions is not read."""
    tree = ast.parse(inspect.getsource(module))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    options_classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "Options"]
    declared = {id(c) for cls in options_classes for c in ast.walk(cls)}      # the declarations are not reads
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)} | \
        {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
         and id(n) not in docstrings and id(n) not in declared}


def test_defaults_live_in_the_options_only():
    rec = load_recipe({"name": "empty"})
    assert rec.for_family("activation").normalize == "channel" and rec.for_family("conv").input_filter is True
    assert rec.to_dict() == {}


def test_the_engine_names_no_family():
    """No string in the engine's code (docstrings aside) is a family name: families are the rules' business."""
    tree = ast.parse(inspect.getsource(engine))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
               and id(n) not in docstrings}
    assert not strings & set(families()), strings & set(families())


@pytest.fixture(scope="module")
def resnet():
    return randomize_(timm.create_model("resnet18", num_classes=5)).eval()


def test_override_keeps_the_stem_and_the_certificate_says_so(resnet):
    model = afconvert.convert(resnet, overrides={"conv1": {"replace": "keep"}, "act1": {"replace": "keep"}})
    report = model.afconvert_report
    assert type(model.conv1) is nn.Conv2d and type(model.act1) is nn.ReLU
    assert isinstance(model.layer1[0].act1, AliasFreePolyActivation)
    offenders = {f.node: f.reason for f in report.offenders}
    assert set(offenders) == {"conv1", "act1"} and report.verdict is Verdict.NOT
    assert all("kept by recipe override 'conv1'" in offenders["conv1"] for _ in [0])
    assert any("2 node(s) kept as they are by recipe override(s) 'act1', 'conv1'" in n for n in report.notes)


def test_family_override_by_pattern_from_a_toml(resnet, tmp_path):
    path = tmp_path / "keep_last.toml"
    path.write_text('name = "keep-last"\n[overrides."layer4.*".activation]\nreplace = "keep"\n')
    model = afconvert.convert(resnet, recipe=str(path))
    assert type(model.layer4[1].act2) is nn.ReLU and isinstance(model.layer3[1].act2, AliasFreePolyActivation)
    assert type(model.layer4[0].conv1).__name__ == "AliasFreeConv2d"   # other families still convert there


class Softsign(nn.Module):
    """An activation no shipped rule knows."""

    def forward(self, x):
        return F.softsign(x)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.act = Softsign()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def _softsign_rule(targets=(Softsign,)):
    def judge(site, options):
        if isinstance(site.module, AliasFreePolyActivation):
            return Judgement(Verdict.EXACT, "polynomial at 2x rate")
        return Judgement(Verdict.NOT, "softsign is a pointwise nonlinearity")

    def poly(site, options):
        x = site.x
        return AliasFreePolyActivation.fitted(F.softsign, x.channels, options.degree, options.fit_range,
                                              channel_dim=x.channel_dim, spatial_dims=x.spatial_dims,
                                              normalize=options.normalize)
    return Rule(name="softsign", family="activation", targets=targets, judge=judge, strategies={"poly": poly})


def test_a_user_rule_through_the_public_api():
    source = randomize_(Tiny()).double().eval()
    plain = afconvert.convert(source, input_size=(16, 16), leaf_modules=[Softsign])
    assert plain.afconvert_report.verdict is not Verdict.EXACT
    model = afconvert.convert(source, input_size=(16, 16), rules=[_softsign_rule()])
    assert isinstance(model.act, AliasFreePolyActivation) and model.afconvert_report.verdict is Verdict.EXACT
    x = random_input(2, 3, (16, 16), torch.float64)
    assert max(relative_logit_change(model.double(), x, [(0.5, 0.5), (1 / 3, 2 / 3)]).values()) < 1e-10


def test_two_rules_claiming_one_target_is_an_error(resnet):
    with pytest.raises(RuleConflictError, match=r"rules 'activation' \(activation\) and 'softsign' \(activation\) "
                                                r"both claim ReLU"):
        afconvert.convert(resnet, rules=[_softsign_rule(targets=(nn.ReLU,))])
