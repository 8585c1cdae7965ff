"""Alias-free up-sampling layers: ``AliasFreeConvTranspose2d`` is the ideal low-pass of the (periodic) original
transposed conv, exactly equivariant (an input shift d moves the output by s d); ``IdealResize`` gives
``F.interpolate``'s output size and moves its output by d H_out / H. The originals fail the same checks."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from afconvert.converter.certify import relative_change
from afconvert.layers.conv import AliasFreeConvTranspose2d
from afconvert.layers.resample import IdealResize
from afconvert.layers.spectral import fractional_shift, ideal_resample, zero_nyquist

SHIFTS = [(1, 0), (0.5, 0.5), (1 / 3, -2 / 3), (2.25, 1.5)]
CONFIGS = [(2, 2, 0, 0, 1), (4, 2, 1, 0, 1), (3, 2, 1, 1, 1), (4, 2, 1, 0, 2), (3, 3, 0, 0, 1), (3, 1, 1, 0, 1)]


@pytest.mark.parametrize("k, s, p, op, g", CONFIGS)
@pytest.mark.parametrize("size", [(9, 10), (8, 7)])
def test_transposed_conv_is_the_lowpass_of_the_periodic_original(k, s, p, op, g, size):
    torch.manual_seed(0)
    m = nn.ConvTranspose2d(4, 6, k, s, p, op, groups=g).double()
    assert AliasFreeConvTranspose2d.matches(m)
    a = AliasFreeConvTranspose2d.from_conv(m)
    h, w = size
    x = zero_nyquist(torch.randn(2, 4, h, w, dtype=torch.float64))
    y = a(x)
    assert y.shape == m(x).shape
    periodic = m(x.repeat(1, 1, 3, 3))[..., s * h:2 * s * h, s * w:2 * s * w]     # the circular original
    lowpass = ideal_resample(ideal_resample(periodic, size), (s * h, s * w))
    assert relative_change(y, lowpass) < 1e-12
    for d in SHIFTS:
        assert relative_change(a(fractional_shift(x, *d)), fractional_shift(y, d[0] * s, d[1] * s)) < 1e-12
    if s > 1:   # the original's zero insertion aliases
        assert max(relative_change(m(fractional_shift(x, *d)), fractional_shift(m(x), d[0] * s, d[1] * s)) for d in SHIFTS) > 0.1


def test_transposed_conv_of_another_output_size_does_not_match():
    assert not AliasFreeConvTranspose2d.matches(nn.ConvTranspose2d(2, 2, 3, 2))           # 2H + 1
    assert not AliasFreeConvTranspose2d.matches(nn.ConvTranspose2d(2, 2, 4, 2, 1, dilation=2))


@pytest.mark.parametrize("kwargs", [dict(scale_factor=2), dict(scale_factor=1.5), dict(size=(13, 9)),
                                    dict(scale_factor=(3, 2))])
def test_ideal_resize_matches_interpolate_sizes_and_is_equivariant(kwargs):
    torch.manual_seed(0)
    x = zero_nyquist(torch.randn(1, 3, 7, 6, dtype=torch.float64))
    stored, called = IdealResize(**kwargs), IdealResize()
    y = stored(x)
    assert y.shape == F.interpolate(x, mode="bilinear", **kwargs).shape
    assert torch.equal(called(x, kwargs.get("size"), kwargs.get("scale_factor"), "bilinear"), y)
    (h, w), (ho, wo) = x.shape[-2:], y.shape[-2:]
    for d in SHIFTS:
        assert relative_change(stored(fractional_shift(x, *d)), fractional_shift(y, d[0] * ho / h, d[1] * wo / w)) < 1e-12
    bilinear = F.interpolate(x, mode="bilinear", **kwargs)
    assert max(relative_change(F.interpolate(fractional_shift(x, *d), mode="bilinear", **kwargs),
                    fractional_shift(bilinear, d[0] * ho / h, d[1] * wo / w)) for d in SHIFTS) > 0.05
