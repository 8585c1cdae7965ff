"""The converter on timm's ConvNeXt: exact invariance after conversion, failure before, the report."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import FRACTIONAL, INTEGER, randomize_

import afconvert
from afconvert import NotAliasFreeError, UntraceableModelError
from afconvert.converter.certify import random_input, relative_change, relative_logit_change
from afconvert.converter.rule import Verdict
from afconvert.converter.tracing import trace

SIZES = [(64, 64), (96, 96), (64, 96)]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.fixture(scope="module")
def source():
    return randomize_(timm.create_model("convnext_atto", num_classes=10, conv_mlp=False)).eval()


@pytest.fixture(scope="module")
def converted(source):
    out = {recipe: afconvert.convert(source, recipe) for recipe in ("afc", "afc-paper")}
    out["afc-l4"] = afconvert.convert(source, options={"activation": {"scale": "l4"}})
    out["afc-fused"] = afconvert.convert(source, options={"activation": {"fuse_linear": True, "scale": "l4"}})
    return out


def _with_stem_gamma(model):
    """The paper recipe's residual stem activation starts at gamma = 0: switch it on for the test."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.stem[0].pre_down.gamma.fill_(0.3)
    return model


@pytest.mark.parametrize("recipe", ["afc", "afc-paper"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_converted_logits_invariant(converted, source, recipe, size, dtype):
    model = converted[recipe]
    if recipe == "afc-paper":
        model = _with_stem_gamma(model)
    model = copy.deepcopy(model).to(dtype)
    x = random_input(2, 3, size, dtype)
    change = relative_logit_change(model, x, INTEGER + FRACTIONAL)
    assert max(change.values()) < TOL[dtype], change
    # the same check fails on the unconverted model
    before = relative_logit_change(copy.deepcopy(source).to(dtype), x, INTEGER + FRACTIONAL)
    assert min(before.values()) > 1e-2, before


def test_odd_sizes_run_and_stay_invariant(converted):
    model = copy.deepcopy(converted["afc"]).double()
    x = random_input(1, 3, (67, 75), torch.float64)
    assert max(relative_logit_change(model, x, [(1, 0), (0.5, 0.5), (1 / 3, 2 / 3)]).values()) < 1e-10


def test_model_keeps_class_and_weights(source, converted):
    model = converted["afc"]
    assert type(model) is type(source) and model.pretrained_cfg == source.pretrained_cfg
    src_sd, new_sd = source.state_dict(), model.state_dict()
    for key, value in src_sd.items():
        torch.testing.assert_close(new_sd[key], value)
    new_keys = set(new_sd) - set(src_sd)
    assert new_keys and all(k.endswith((".coef", ".in_scale", ".out_scale")) for k in new_keys)
    # an original checkpoint loads strictly: kept weights by their keys, the polynomials keep their fit
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if name in src_sd:
                p.zero_()
    fresh.load_state_dict(src_sd, strict=True)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, (src_sd if key in src_sd else new_sd)[key])
    # a checkpoint with part of a polynomial is still refused
    broken = dict(new_sd)
    broken.pop(next(k for k in new_keys if k.endswith(".coef")))
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(broken, strict=True)
    assert not any("rect" in k or "mask" in k for k in new_sd)  # filters are never state


def test_report_says_what_was_replaced(converted):
    report = converted["afc-fused"].afconvert_report
    assert report.verdict is Verdict.EXACT and not report.offenders
    replaced = {(f.op, f.replaced_by) for f in report.replaced}
    assert ("Conv2d", "AliasFreeConv2d") in replaced and ("GELU", "HighRatePolyActivation") in replaced
    assert ("Linear", "UpsampledLinear") in replaced and ("Linear", "DownsampledLinear") in replaced
    assert ("LayerNorm2d", "AliasFreeLayerNorm") in replaced and ("LayerNorm", "AliasFreeLayerNorm") in replaced
    assert len([f for f in report.replaced if f.replaced_by == "AliasFreeConv2d"]) == 4  # stem + 3 down-samplers
    assert "certified" in report.summary()
    assert report.to_dict()["verdict"] == "exact"


def test_fusing_the_mlp_linears_is_exact(converted):
    """Up-sampling before fc1 and down-sampling after fc2 computes what the activation alone would (with the same,
    L4, scale: the fused form has no other)."""
    unfused = converted["afc-l4"]
    kinds = {f.replaced_by for f in unfused.afconvert_report.replaced}
    assert "AliasFreePolyActivation" in kinds and "UpsampledLinear" not in kinds
    x = random_input(2, 3, (64, 96), torch.float64)
    with torch.no_grad():
        a, b = copy.deepcopy(unfused).double()(x), copy.deepcopy(converted["afc-fused"]).double()(x)
    assert relative_change(b, a) < 1e-12


def test_high_rate_polynomial_without_its_neighbours_is_not_certified(converted):
    broken = copy.deepcopy(converted["afc-fused"])
    block = broken.stages[0].blocks[0].mlp
    for name in ("fc1", "fc2"):  # plain linears: the polynomial now runs at the input rate
        fc = getattr(block, name)
        plain = nn.Linear(fc.in_features, fc.out_features)
        plain.weight, plain.bias = fc.weight, fc.bias
        setattr(block, name, plain)
    report = afconvert.audit(broken, check=False)
    assert [f.node for f in report.offenders] == ["stages.0.blocks.0.mlp.act"]
    assert "without its up-/down-sampling" in report.offenders[0].reason


def test_audit_of_unconverted_model_lists_aliasing_sources(source):
    report = afconvert.audit(source, check=False)
    assert report.verdict is Verdict.NOT
    reasons = " ".join(f.reason for f in report.offenders)
    for needle in ("sub-samples below Nyquist", "zero padding", "pointwise nonlinearity", "per-pixel normalisation"):
        assert needle in reasons
    assert {f.node for f in report.offenders} >= {"stem.0", "stem.1", "stages.0.blocks.0.mlp.act"}


def test_audit_check_backs_the_verdict(converted):
    report = afconvert.audit(converted["afc"], input_size=(64, 64), shifts=[(1, 0), (0.5, 0.5), (1 / 3, 2 / 3)])
    assert report.verdict is Verdict.EXACT
    assert [c["input_size"] for c in report.checks] == [[64, 64], [224, 224]]  # probe and native size
    assert all(max(c["models"]["model"].values()) < 1e-5 for c in report.checks)
    assert report.stable and set(report.numerics["max_abs_logit"]) == {"64x64", "224x224"}


class FlattenHead(nn.Module):
    """VGG-style: a fully connected head over the flattened map is not shift-invariant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.act(self.conv(x)), 1))


def test_strict_refuses_flatten_head_and_names_it():
    with pytest.raises(NotAliasFreeError, match="flatten"):
        afconvert.convert(FlattenHead(), input_size=(16, 16), strict=True)
    model = afconvert.convert(FlattenHead(), input_size=(16, 16))
    assert {f.node for f in model.afconvert_report.offenders} >= {"flatten"}


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Branchy()

    def forward(self, x):
        return self.body(x)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


class BranchyTop(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_untraceable_submodule_is_kept_whole_and_reported():
    model = afconvert.convert(Untraceable(), input_size=(8, 8))
    report = model.afconvert_report
    assert report.verdict is Verdict.UNKNOWN
    assert [f.node for f in report.offenders] == ["body"]
    assert "opaque" in report.offenders[0].reason and "control flow" in report.offenders[0].reason
    assert any("'body' (Branchy) kept whole" in n for n in report.notes)
    with pytest.raises(NotAliasFreeError, match="body"):
        afconvert.convert(Untraceable(), input_size=(8, 8), strict=True)
    with pytest.raises(UntraceableModelError, match=r"module 'body' \(Branchy\).*control flow.*fix"):
        trace(Untraceable(), fallback=False)


def test_untraceable_top_level_forward_is_a_clear_error():
    with pytest.raises(UntraceableModelError, match=r"its forward \(BranchyTop\).*control flow.*fix"):
        afconvert.convert(BranchyTop(), input_size=(8, 8))


def test_wrong_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match="does not run at input size.*fix"):
        afconvert.convert(FlattenHead(), input_size=(8, 8))


def test_unknown_op_is_never_certified():
    class Weird(nn.Module):
        def forward(self, x):
            return torch.sort(x, dim=-1).values.mean((2, 3))

    report = afconvert.audit(Weird(), input_size=(8, 8), in_chans=3, check=False)
    assert report.verdict is Verdict.UNKNOWN and "no rule knows" in report.verdict_text


def test_dead_branches_do_not_count():
    class DeadBranch(nn.Module):
        def forward(self, x):
            torch.sort(x, dim=-1)  # computed, never used: cannot reach the logits
            return x.mean((2, 3))

    report = afconvert.audit(DeadBranch(), input_size=(8, 8), in_chans=3, check=False)
    assert report.verdict is Verdict.EXACT


def test_unknown_recipe_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean afc"):
        afconvert.convert(FlattenHead(), recipe="afcc", input_size=(16, 16))


def test_training_mode_is_kept_and_gradients_flow(source):
    model = afconvert.convert(source.train(), input_size=(64, 64))
    source.eval()
    assert model.training
    model(random_input(2, 3, (64, 64))).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


class FunctionalPools(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.conv(x)
        y = F.interpolate(F.max_pool2d(x, 3, 2, 1), scale_factor=2, mode="nearest") + \
            F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear")
        return self.fc(F.gelu(y).mean((2, 3)))


def test_functional_pools_and_interpolation_are_rewritten():
    source = randomize_(FunctionalPools()).double().eval()
    model = afconvert.convert(source, input_size=(16, 16))
    report = model.afconvert_report
    replaced = {(f.op, f.replaced_by) for f in report.replaced}
    assert {("max_pool2d", "AliasFreePool2d"), ("avg_pool2d", "AliasFreePool2d"),
            ("interpolate", "IdealUpsample"), ("gelu", "AliasFreePolyActivation")} <= replaced
    assert report.verdict is Verdict.EXACT, report.verdict_text
    x = random_input(2, 3, (16, 20), torch.float64)
    assert max(relative_logit_change(model, x, FRACTIONAL + INTEGER).values()) < 1e-10
    assert max(relative_logit_change(source, x, FRACTIONAL + INTEGER).values()) > 1e-3


def test_conversion_info_is_typed_and_round_trips():
    from afconvert.converter.info import ConversionInfo
    model = afconvert.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2, 1), torch.nn.ReLU()), input_size=(16, 16))
    info = model.afconvert_info
    assert isinstance(info, ConversionInfo) and info.input_size == (16, 16) and info.in_chans == 3
    assert info.replaced == ["0", "1"] and info.recipe == "afc" and not info.graph_module
    assert ConversionInfo.from_dict(info.to_dict()) == info
