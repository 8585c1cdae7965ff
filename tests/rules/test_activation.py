"""The activation rules (afconvert.rules.activation): with calibration images, each channel's polynomial is fitted
to that channel's measured inputs; functional activations (no module to swap) are rewritten, exactly invariant."""
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import FRACTIONAL, INTEGER, randomize_

import afconvert
from afconvert.converter.certify import random_input, relative_logit_change
from afconvert.converter.rule import Verdict


def test_calibration_fits_each_channel_to_its_measured_inputs():
    source = randomize_(timm.create_model("resnet18", num_classes=5)).eval()
    images = random_input(8, 3, (64, 64), seed=7)
    model = afconvert.convert(source, calibration=images)
    coef = model.act1.coef  # the stem activation: one polynomial per channel, no two alike
    assert coef.shape[0] == 64 and torch.unique(coef[:, 2]).numel() == 64
    generic = afconvert.convert(source).act1.coef
    assert torch.unique(generic[:, 2]).numel() == 1
    assert any("fitted per channel by least squares on 8 calibration images" in n for n in model.afconvert_report.notes)
    assert model.afconvert_report.stable  # fitted at 64 px: still bounded at the native 224 px


class FunctionalNet(nn.Module):
    """A user model with functional activations (no module to swap)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.leaky_relu(self.conv1(x), 0.1)
        x = self.conv2(x).tanh() + torch.sigmoid(x)
        return self.fc(x.mean((2, 3)))


def test_functional_activations_are_rewritten():
    source = randomize_(FunctionalNet()).double().eval()
    model = afconvert.convert(source, input_size=(16, 16))
    report = model.afconvert_report
    assert report.verdict is Verdict.EXACT, report.verdict_text
    assert {(f.op, f.replaced_by) for f in report.replaced} >= {
        ("leaky_relu", "AliasFreePolyActivation"), ("tanh", "AliasFreePolyActivation"),
        ("sigmoid", "AliasFreePolyActivation")}
    assert isinstance(model, torch.fx.GraphModule) and any("GraphModule" in n for n in report.notes)
    assert set(source.state_dict()) <= set(model.state_dict())
    x = random_input(2, 3, (16, 24), torch.float64)
    assert max(relative_logit_change(model, x, FRACTIONAL + INTEGER).values()) < 1e-10
    assert max(relative_logit_change(source, x, FRACTIONAL + INTEGER).values()) > 1e-3
