"""Alias-free layers: exact equivariance to fractional circular shifts, and the naive forms failing."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from afconvert import (AliasFreeConv2d, AliasFreeLayerNorm, AliasFreePolyActivation, CircularConv2d, PolyActivation,
                       circular_pad, fit_polynomial, fractional_shift, zero_nyquist)

SHIFTS = [(1, 0), (0.5, 0.5), (1 / 3, 2 / 3), (2.25, 0.75)]
SIZES = [(8, 8), (12, 10), (9, 7)]


def _x(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return zero_nyquist(torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


@torch.no_grad()
def _equivariance_error(layer, x, dy, dx, out_scale=1.0, dims=(-2, -1)):
    lhs = layer(fractional_shift(x, dy, dx, dims))
    rhs = fractional_shift(layer(x), dy * out_scale, dx * out_scale, dims)
    return float((lhs - rhs).abs().max() / layer(x).abs().max())


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), pad=st.tuples(*[st.integers(0, 9)] * 4))
def test_circular_pad_wraps_any_width(h, w, pad):
    x = torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)
    left, right, top, bottom = pad
    y = circular_pad(x, pad)
    assert y.shape[-2:] == (h + top + bottom, w + left + right)
    for i in range(y.shape[-2]):
        for j in range(y.shape[-1]):
            assert y[0, 0, i, j] == x[0, 0, (i - top) % h, (j - left) % w]


def test_circular_conv_on_map_smaller_than_kernel():
    conv = nn.Conv2d(3, 3, 7, padding=3, groups=3).double()
    c = CircularConv2d.from_conv(conv)
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    tiled = x.repeat(1, 1, 5, 5)  # a 2x2 periodic map, seen through a wide window
    ref = F.conv2d(tiled, conv.weight, conv.bias, groups=3)[..., 1:3, 1:3]
    torch.testing.assert_close(c(x), ref)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("shift", SHIFTS)
def test_circular_conv_is_equivariant_and_zero_padding_is_not(size, shift):
    conv = nn.Conv2d(4, 5, 3, padding=1).double()
    x = _x((2, 4, *size))
    assert _equivariance_error(CircularConv2d.from_conv(conv), x, *shift) < 1e-12
    assert _equivariance_error(conv, x, *shift) > 1e-3


@pytest.mark.parametrize("stride,kernel,padding", [(2, 3, 1), (2, 2, 0), (4, 4, 0), (2, 5, 2)])
@pytest.mark.parametrize("shift", SHIFTS)
def test_alias_free_strided_conv(stride, kernel, padding, shift):
    conv = nn.Conv2d(3, 4, kernel, stride, padding).double()
    af = AliasFreeConv2d.from_conv(conv)
    x = _x((2, 3, 8 * stride, 6 * stride))
    assert af(x).shape == conv(x).shape
    assert _equivariance_error(af, x, *shift, out_scale=1 / stride) < 1e-10
    assert af.state_dict().keys() == conv.state_dict().keys()
    naive = CircularConv2d.from_conv(conv)
    strided = lambda t: naive(t)[..., ::stride, ::stride]  # noqa: E731  circular but aliasing
    assert _equivariance_error(strided, x, *shift, out_scale=1 / stride) > 1e-3


def test_alias_free_conv_keeps_source_output_size_on_odd_inputs():
    conv = nn.Conv2d(3, 4, 3, 2, 1).double()
    af = AliasFreeConv2d.from_conv(conv)
    for size in [(9, 7), (11, 16), (5, 5)]:
        x = _x((1, 3, *size))
        assert af(x).shape == conv(x).shape


@pytest.mark.parametrize("degree", [2, 3, 4])
@pytest.mark.parametrize("size", SIZES)
def test_poly_activation_alias_free_vs_naive(degree, size):
    torch.manual_seed(degree)
    coef = torch.randn(3, degree + 1) * 0.5
    af = AliasFreePolyActivation(3, degree, coef).double()
    naive = PolyActivation(3, degree, coef).double()
    x = _x((2, 3, *size))
    for shift in SHIFTS[1:]:
        assert _equivariance_error(af, x, *shift) < 1e-10
        assert _equivariance_error(naive, x, *shift) > 1e-3


def test_poly_activation_channels_last_and_float32():
    coef = torch.randn(6, 3)
    x = _x((2, 6, 10, 12))
    nchw = AliasFreePolyActivation(6, 2, coef)
    nhwc = AliasFreePolyActivation(6, 2, coef, channel_dim=-1, spatial_dims=(1, 2))
    torch.testing.assert_close(nhwc(x.float().permute(0, 2, 3, 1)), nchw(x.float()).permute(0, 2, 3, 1))
    assert _equivariance_error(nchw, x.float(), 0.5, 0.5) < 1e-5


def test_poly_scales_and_fit():
    a = fit_polynomial(lambda t: 1 - 2 * t + 0.5 * t ** 2, 2)
    assert a == pytest.approx([1, -2, 0.5], abs=1e-10)
    p = PolyActivation.fitted(F.gelu, channels=2, in_scale=7.0, out_scale=7.0, train_scale=True)
    t = torch.linspace(-3, 3, 101).reshape(1, 1, 1, -1).expand(1, 2, 1, -1)
    assert (p(t) - F.gelu(t)).abs().max() < 0.3            # a quadratic approximates GELU on [-3, 3]
    assert isinstance(p.in_scale, nn.Parameter) and float(p.in_scale.detach()) == 7.0


@pytest.mark.parametrize("size", SIZES)
def test_alias_free_layernorm(size):
    ln = nn.LayerNorm(5, eps=1e-6).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5), ln.bias.uniform_(-0.5, 0.5)
    af = AliasFreeLayerNorm.from_layernorm(ln, channel_dim=1, spatial_dims=(2, 3))
    x = _x((2, 5, *size))
    # the paper's formula, written out
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean((1, 2, 3), keepdim=True)
    ref = ln.weight[:, None, None] * (x - u) / torch.sqrt(s + 1e-6) + ln.bias[:, None, None]
    torch.testing.assert_close(af(x), ref)
    per_pixel = lambda t: ln(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # noqa: E731
    for shift in SHIFTS[1:]:
        assert _equivariance_error(af, x, *shift) < 1e-10
        assert _equivariance_error(per_pixel, x, *shift) > 1e-3
    assert set(af.state_dict()) == {"weight", "bias"}


def test_per_channel_fit_follows_the_measured_distribution():
    mean, std = torch.tensor([-2.0, 0.0, 3.0]), torch.tensor([0.5, 1.0, 0.2])
    p = PolyActivation.fitted(F.relu, channels=3, stats=(mean, std))
    x = (mean + std * torch.randn(2000, 3)).T.reshape(1, 3, 1, 2000)
    err_fit = (p(x) - F.relu(x)).pow(2).mean((0, 2, 3))
    generic = PolyActivation.fitted(F.relu, channels=3)
    err_generic = (generic(x) - F.relu(x)).pow(2).mean((0, 2, 3))
    assert (err_fit < err_generic).all() and err_fit[2] < 1e-8  # channel 2 lives where ReLU is linear
