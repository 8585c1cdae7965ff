"""Ideal resizing (afconvert.layers.resample): ``IdealResize`` gives ``F.interpolate``'s output size and moves its
output by d H_out / H for an input shift d, exactly; bilinear interpolation fails the same check."""
import pytest
import torch
import torch.nn.functional as F
from conftest import UPSAMPLING_SHIFTS

from afconvert.converter.certify import relative_change
from afconvert.layers.resample import IdealResize
from afconvert.layers.spectral import fractional_shift, zero_nyquist


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
    for d in UPSAMPLING_SHIFTS:
        assert relative_change(stored(fractional_shift(x, *d)), fractional_shift(y, d[0] * ho / h, d[1] * wo / w)) < 1e-12
    bilinear = F.interpolate(x, mode="bilinear", **kwargs)
    assert max(relative_change(F.interpolate(fractional_shift(x, *d), mode="bilinear", **kwargs),
                    fractional_shift(bilinear, d[0] * ho / h, d[1] * wo / w)) for d in UPSAMPLING_SHIFTS) > 0.05
