"""Strided alias-free convolutions: the low-pass-first form D_s(w (*) x) = (w (*) LP x)[::s] equals the
stride-1-then-down-sample form, forward and backward, and is the one taken where it costs less."""
import pytest
import torch
import torch.nn as nn

from afconvert.converter.certify import relative_change
from afconvert.layers.conv import AliasFreeConv2d, SampledConv2d
from afconvert.layers.spectral import fractional_shift

# (in, out, groups, kernel, stride, padding, dilation)
CONVS = [(3, 16, 1, 7, 2, 3, 1), (8, 8, 1, 3, 2, 1, 1), (8, 16, 1, 1, 2, 0, 1), (8, 8, 8, 3, 2, 1, 1),
         (3, 8, 1, 4, 4, 0, 1), (6, 4, 2, 3, (2, 1), 1, 2), (4, 8, 1, 2, 2, 0, 1), (4, 6, 1, 3, (1, 2), 1, 1)]
SIZES = [(16, 24), (17, 13), (8, 8)]


def _pair(spec, input_filter=False):
    cin, cout, groups, k, s, p, d = spec
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, s, p, d, groups).double()
    return cin, AliasFreeConv2d.from_conv(conv, input_filter=input_filter)


def _reference(layer, x):
    """The defining form: stride-1 circular conv at the full rate, then ideal down-sampling."""
    return SampledConv2d.forward(layer, x)


@pytest.mark.parametrize("spec", CONVS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("input_filter", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_every_form_equals_the_definition(spec, size, input_filter, dtype, tol):
    cin, layer = _pair(spec, input_filter)
    x = torch.randn(2, cin, *size, dtype=torch.float64, requires_grad=True)
    ref = _reference(layer, x)
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    ref_grad, x.grad = x.grad, None
    layer = layer.to(dtype)
    xd = x.detach().to(dtype).requires_grad_()
    got = layer(xd)
    assert got.shape == ref.shape
    assert relative_change(got.double(), ref) < tol
    (got * g.to(dtype)).sum().backward()
    assert relative_change(xd.grad.double(), ref_grad) < tol


@pytest.mark.parametrize("spec,size,fast", [
    ((3, 64, 1, 7, 2, 3, 1), (64, 64), True),      # a stem: low-pass 3 channels, run the conv at stride 2
    ((64, 64, 1, 3, 2, 1, 1), (56, 56), True),     # a dense strided 3x3
    ((64, 64, 64, 3, 2, 1, 1), (56, 56), False),   # depthwise: the conv is cheap, down-sampling its output is too
    ((64, 64, 1, 3, 2, 1, 1), (57, 57), False),    # a size the stride does not divide: the defining form
])
def test_the_cheaper_form_is_taken(spec, size, fast):
    _, layer = _pair(spec)
    h, w = size
    assert layer._lowpass_first(h, w, layer.output_size(h, w)) is fast


@pytest.mark.parametrize("spec", [CONVS[0], CONVS[2]])
def test_fast_forms_are_alias_free_and_plain_strided_convs_are_not(spec):
    cin, layer = _pair(spec)
    x = torch.randn(2, cin, 16, 24, dtype=torch.float64)
    plain = nn.Conv2d(*[spec[i] for i in (0, 1, 3, 4, 5, 6, 2)], padding_mode="circular").double()
    plain.load_state_dict(layer.state_dict())

    def err(f, d):
        with torch.no_grad():
            y = f(x)
            return relative_change(f(fractional_shift(x, d, d)), fractional_shift(y, d / 2, d / 2))
    assert err(layer, 0.5) < 1e-12 and err(layer, 2 / 3) < 1e-12
    assert err(plain, 1.0) > 1e-2
