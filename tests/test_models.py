"""Every common timm and torchvision family converts and certifies (random weights, small inputs).

Like timm's tests/test_models.py: one parametrised test per property, over the model list.
"""
import copy

import pytest
import torch

import afconvert
from afconvert.models import create_source_model
from afconvert.rule import Verdict
from afconvert.shift_check import random_input
from afconvert.spectral import fractional_shift

from conftest import calibrate_norms_, randomize_

MODELS = [
    "timm:resnet18", "timm:resnet50", "timm:resnet18d", "timm:resnext50_32x4d", "timm:seresnet50",
    "timm:efficientnet_b0", "timm:efficientnet_lite0", "timm:mobilenetv2_100", "timm:mobilenetv3_large_100",
    "timm:regnety_002", "timm:convnext_tiny", "timm:convnextv2_atto", "timm:densenet121", "timm:ghostnet_100",
    "timm:repvgg_a0", "timm:tf_efficientnet_lite0",
    "torchvision:resnet18", "torchvision:mobilenet_v3_small", "torchvision:efficientnet_b0",
    "torchvision:convnext_tiny", "torchvision:regnet_y_400mf",
]
SHIFTS = [(1, 0), (-2, 3), (0.5, 0.5), (1 / 3, 2 / 3), (2.25, 0.75)]
SIZE = (64, 64)


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    source, _ = create_source_model(request.param, pretrained=False, num_classes=10)
    calibrate_norms_(randomize_(source, seed=sum(map(ord, request.param))), SIZE)
    return request.param, source.eval(), afconvert.convert(source, input_size=SIZE)


@torch.no_grad()
def shift_change(model, x, shifts=SHIFTS) -> float:
    """max |f(shift x) - f(x)|, in units of how much the logits vary between the batch's images."""
    y0 = model(x)
    return max(float((model(fractional_shift(x, *s)) - y0).abs().max() / y0.std(0).mean()) for s in shifts)


def test_certified_and_invariant(pair):
    name, source, converted = pair
    report = converted.afconvert_report
    assert report.verdict is Verdict.EXACT, report.verdict_text
    x = random_input(4, 3, SIZE, torch.float64)
    f64 = copy.deepcopy(converted).double()
    assert shift_change(f64, x) < 1e-10
    # the very same check fails before conversion
    assert shift_change(copy.deepcopy(source).double(), x) > 1e-1


# known limit (README): its 33 stacked quadratics overflow float32 with these random weights
FLOAT32_OVERFLOW = {"timm:tf_efficientnet_lite0"}


def test_float32_residual_is_rounding_not_aliasing(pair):
    """In float32 the converted logits move by rounding alone: no more than float32 itself moves them
    (deep stacks of quadratics amplify rounding; see README, known limits)."""
    name, _, converted = pair
    x = random_input(4, 3, SIZE, torch.float64)
    f32, f64 = copy.deepcopy(converted).float(), copy.deepcopy(converted).double()
    with torch.no_grad():
        y64 = f64(x)
        if name in FLOAT32_OVERFLOW:  # stays a documented failure until fixed; then this line tells us
            assert not torch.isfinite(f32(x.float())).all()
            return
        rounding = float((f32(x.float()).double() - y64).abs().max() / y64.std(0).mean())
    change = shift_change(f32, x.float(), SHIFTS[2:4])
    assert change < max(4 * rounding, 1e-5), (change, rounding)


def test_unconverted_audit_lists_aliasing_sources(pair):
    name, source, _ = pair
    report = afconvert.audit(source, input_size=SIZE, check=False)
    assert report.verdict is not Verdict.EXACT
    reasons = " ".join(f.reason for f in report.offenders)
    assert "sub-samples below Nyquist" in reasons or "pooling" in reasons
    assert "nonlinearity" in reasons


@pytest.mark.parametrize("name,opaque", [("timm:vgg11", "pre_logits"), ("timm:mobilevit_xs", "stages.2.1")])
def test_untraceable_parts_are_named_never_certified(name, opaque):
    """Plain torch.fx cannot trace these; we convert around the untraceable modules and name them."""
    source, _ = create_source_model(name, pretrained=False, num_classes=10)
    report = afconvert.convert(source, input_size=SIZE).afconvert_report
    assert report.verdict is Verdict.UNKNOWN
    assert opaque in {f.node for f in report.offenders}
    assert any(f"'{opaque}'" in n and "kept whole" in n for n in report.notes)
