"""The conv rules' down-sampling deferral (afconvert.rules.conv, ``defer``): a strided conv's ideal down-sampling
moves past the BatchNorm and activation after it. The model stays exactly alias-free, the activation reads the
conv's full band (the input's fine detail reaches the logits), and a checkpoint rebuilds it exactly."""
import functools

import pytest
import timm
import torch
import torchvision
from conftest import FRACTIONAL, INTEGER, randomize_

import afconvert
from afconvert.converter.certify import random_input, relative_change, relative_logit_change
from afconvert.converter.rule import Verdict
from afconvert.layers.conv import IdealDownsample2d
from afconvert.layers.spectral import ideal_lowpass

SHIFTS = INTEGER + FRACTIONAL


@functools.cache
def _resnet(defer: str, double: bool = True) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(source, converted), built once per setting: the tests that share them only read them."""
    source = randomize_(timm.create_model("resnet18", num_classes=5)).eval()
    source = source.double() if double else source
    return source, afconvert.convert(source, input_size=(32, 32), options={"conv": {"defer": defer}}).eval()


def _deferred(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, IdealDownsample2d)]


@pytest.mark.parametrize("defer, expected", [("none", []), ("input", ["act1.post_down"]),
                                             ("all", ["act1.post_down", "layer2.0.act1.post_down",
                                                      "layer3.0.act1.post_down", "layer4.0.act1.post_down"])])
@pytest.mark.parametrize("size", [(32, 32), (40, 24), (33, 31)])
def test_deferred_models_stay_exactly_alias_free(defer, expected, size):
    source, model = _resnet(defer)
    assert _deferred(model) == expected
    report = model.afconvert_report
    assert report.verdict is Verdict.EXACT, report.verdict_text
    if expected:
        conv1 = next(f for f in report.findings if f.node == "conv1")
        assert "deferred" in conv1.reason and conv1.verdict is Verdict.EXACT
    x = random_input(2, 3, size, torch.float64)
    assert max(relative_logit_change(model, x, SHIFTS).values()) < 1e-9
    assert max(relative_logit_change(source, x, SHIFTS).values()) > 1e-3     # the check can fail


@pytest.mark.parametrize("name, expected", [("mobilenetv3_small_050", ["bn1.act.post_down"]),
                                            ("regnetx_002", ["stem.bn.act.post_down"])])
def test_norm_act_layers_take_the_deferred_sampling(name, expected):
    """timm's BatchNormAct2d (traced: a rank check, F.batch_norm, drop, act) passes the sampling to its act; the blend
    at lambda = 1 is still the source network."""
    from afconvert.train.blend import blend
    source = randomize_(timm.create_model(name, num_classes=5)).double().eval()
    model = afconvert.convert(source, "afc-fullband", input_size=(32, 32)).eval()
    assert _deferred(model) == expected and model.afconvert_report.verdict is Verdict.EXACT
    x = random_input(2, 3, (32, 40), torch.float64)
    assert max(relative_logit_change(model, x, SHIFTS).values()) < 1e-9
    with torch.no_grad():
        blend(model, source)
        assert relative_change(model(x), source(x)) < 1e-12


def test_the_deferred_activation_reads_the_full_band():
    """Without deferral the first stride-2 conv keeps |k| < N/4 of the image: the logits cannot see the rest.
    Deferred, the activation folds the rest into the kept band: perturbing only |k| >= N/4 moves the logits."""
    _, plain = _resnet("none")
    _, deferred = _resnet("input")
    x = random_input(2, 3, (32, 32), torch.float64)
    noise = random_input(2, 3, (32, 32), torch.float64, seed=5)
    fine = noise - ideal_lowpass(noise, 0.5)        # the bins the stride-2 conv's down-sampling drops
    with torch.no_grad():
        assert relative_change(plain(x + fine), plain(x)) < 1e-10
        assert relative_change(deferred(x + fine), deferred(x)) > 1e-3


def test_a_shared_activation_keeps_the_down_sampling_at_the_conv():
    """torchvision's blocks call one ReLU module twice: its polynomial cannot carry one call's sampling. Its stem's
    ReLU is called once: that one takes the stem's."""
    source = randomize_(torchvision.models.resnet18(num_classes=5)).eval()
    model = afconvert.convert(source, input_size=(32, 32), options={"conv": {"defer": "all"}})
    assert _deferred(model) == ["relu.post_down"]
    assert model.conv1.down == (1, 1) and model.layer2[0].conv1.down == (2, 2)
    assert model.afconvert_report.verdict is Verdict.EXACT


def test_checkpoint_rebuilds_the_deferred_model_exactly(tmp_path):
    built = afconvert.build("resnet18", pretrained=False, num_classes=5, input_size=(32, 32),
                            options={"conv": {"defer": "input"}})
    randomize_(built.converted, seed=2)
    path = tmp_path / "m.pt"
    afconvert.save(built.converted, path)
    loaded = afconvert.load(path)
    assert _deferred(loaded) == ["act1.post_down"]
    x = random_input(2, 3, (32, 32))
    with torch.no_grad():
        assert torch.equal(loaded(x), built.converted.eval()(x))
