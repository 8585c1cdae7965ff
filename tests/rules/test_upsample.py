"""The up-sampling rules (afconvert.rules.upsample): nearest up-sampling in an HRNet-style fusion becomes ideal
up-sampling, exactly invariant where the original is not."""
import torch
import torch.nn as nn
from conftest import FRACTIONAL, randomize_

import afconvert
from afconvert.converter.certify import random_input, relative_logit_change
from afconvert.converter.rule import Verdict


class Fusion(nn.Module):
    """HRNet-style fusion: a low-resolution branch up-sampled (nearest) and added to the high one."""

    def __init__(self):
        super().__init__()
        self.high = nn.Conv2d(3, 4, 3, padding=1)
        self.low = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.act = nn.GELU()
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.act(self.high(x) + self.up(self.low(x))).mean((2, 3)))


def test_nearest_upsampling_becomes_ideal():
    source = randomize_(Fusion()).double().eval()
    model = afconvert.convert(source, input_size=(16, 16))
    assert ("Upsample", "IdealUpsample") in {(f.op, f.replaced_by) for f in model.afconvert_report.replaced}
    assert model.afconvert_report.verdict is Verdict.EXACT
    x = random_input(2, 3, (16, 24), torch.float64)
    assert max(relative_logit_change(model, x, FRACTIONAL).values()) < 1e-10
    assert max(relative_logit_change(source, x, FRACTIONAL).values()) > 1e-3
