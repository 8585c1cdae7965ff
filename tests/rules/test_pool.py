"""The pooling rules (afconvert.rules.pool): a strided max pool becomes ideal down-sampling (exact, the default)
or, with ``pool.max = "max"``, a circular max then ideal down-sampling (approximate: measurably not exact)."""
import timm
import torch
from conftest import FRACTIONAL, randomize_

import afconvert
from afconvert.converter.certify import random_input, relative_logit_change
from afconvert.converter.rule import Verdict


def test_max_pool_options_exact_and_approximate():
    source = randomize_(timm.create_model("resnet18", num_classes=5)).double().eval()
    exact = afconvert.convert(source)
    approx = afconvert.convert(source, options={"pool": {"max": "max"}})
    assert exact.afconvert_report.verdict is Verdict.EXACT
    assert approx.afconvert_report.verdict is Verdict.APPROX
    assert [f.node for f in approx.afconvert_report.offenders] == ["maxpool"]
    x = random_input(2, 3, (64, 64), torch.float64)
    assert max(relative_logit_change(exact, x, FRACTIONAL).values()) < 1e-10
    assert max(relative_logit_change(approx, x, FRACTIONAL).values()) > 1e-10  # measurably not exact
