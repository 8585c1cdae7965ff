"""Convolutions (afconvert.layers.conv): circular padding and stride-1 circular convolutions, exactly
equivariant where zero padding is not; strided alias-free convolutions, whose low-pass-first form
D_s(w (*) x) = (w (*) LP x)[::s] equals the stride-1-then-down-sample form, forward and backward, and is the one
taken where it costs less; the depthwise tap sum; a kernel folded onto a map smaller than it (the same conv);
transposed convolutions, the ideal low-pass of the periodic original (an input shift d moves the output by s d),
where the original's zero insertion aliases."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import LAYER_SHIFTS, LAYER_SIZES, UPSAMPLING_SHIFTS, band_limited_map, equivariance_error
from hypothesis import given, settings
from hypothesis import strategies as st

from afconvert.converter.certify import relative_change
from afconvert.layers.conv import (
    AliasFreeConv2d,
    AliasFreeConvTranspose2d,
    CircularConv2d,
    SampledConv2d,
    circular_pad,
    depthwise_taps,
    folded_kernel,
)
from afconvert.layers.spectral import fractional_shift, ideal_resample, zero_nyquist

# (in, out, groups, kernel, stride, padding, dilation)
CONVS = [(3, 16, 1, 7, 2, 3, 1), (8, 8, 1, 3, 2, 1, 1), (8, 16, 1, 1, 2, 0, 1), (8, 8, 8, 3, 2, 1, 1),
         (3, 8, 1, 4, 4, 0, 1), (6, 4, 2, 3, (2, 1), 1, 2), (4, 8, 1, 2, 2, 0, 1), (4, 6, 1, 3, (1, 2), 1, 1)]
SIZES = [(16, 24), (17, 13), (8, 8)]
# transposed convs: (kernel, stride, padding, output_padding, groups)
CONFIGS = [(2, 2, 0, 0, 1), (4, 2, 1, 0, 1), (3, 2, 1, 1, 1), (4, 2, 1, 0, 2), (3, 3, 0, 0, 1), (3, 1, 1, 0, 1)]


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


# -- circular padding and convolution, the strided alias-free form -------------------------------------------

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


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 4), w=st.integers(1, 4), kh=st.integers(1, 6), kw=st.integers(1, 6),
       dh=st.integers(1, 2), dw=st.integers(1, 2), top=st.integers(0, 10), left=st.integers(0, 10),
       groups=st.sampled_from([1, 2]), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_a_kernel_folded_onto_a_small_map_is_the_same_circular_conv(h, w, kh, kw, dh, dw, top, left, groups, dtype):
    """The folded kernel (as many taps as the map has samples, per dim) gives the wrapped-padding conv's output and
    gradients; it folds only where the map is smaller than the kernel."""
    top, left = min(top, dh * (kh - 1)), min(left, dw * (kw - 1))
    pad = (left, dw * (kw - 1) - left, top, dh * (kh - 1) - top)
    gen = torch.Generator().manual_seed(h * 7 + kw)
    x = torch.randn(2, 4, h, w, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(6, 4 // groups, kh, kw, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    ref = F.conv2d(circular_pad(x, pad), weight, None, 1, 0, (dh, dw), groups)
    folded, fpad, fdil = folded_kernel(weight, (h, w), pad, (dh, dw))
    got = F.conv2d(circular_pad(x, fpad), folded, None, 1, 0, fdil, groups)
    assert folded.shape[-2:] == (h if h < kh else kh, w if w < kw else kw)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(dtype)
    tol = 1e-12 if dtype is torch.float64 else 1e-5
    assert got.shape == ref.shape == x.shape[:1] + (6, h, w) and relative_change(got, ref) < tol
    for a, b in zip(torch.autograd.grad(got, (x, weight), g), torch.autograd.grad(ref, (x, weight), g)):
        assert relative_change(a, b) < tol


@pytest.mark.parametrize("size", LAYER_SIZES)
@pytest.mark.parametrize("shift", LAYER_SHIFTS)
def test_circular_conv_is_equivariant_and_zero_padding_is_not(size, shift):
    conv = nn.Conv2d(4, 5, 3, padding=1).double()
    x = band_limited_map((2, 4, *size))
    assert equivariance_error(CircularConv2d.from_conv(conv), x, *shift) < 1e-12
    assert equivariance_error(conv, x, *shift) > 1e-3


@pytest.mark.parametrize("stride,kernel,padding", [(2, 3, 1), (2, 2, 0), (4, 4, 0), (2, 5, 2)])
@pytest.mark.parametrize("shift", LAYER_SHIFTS)
def test_alias_free_strided_conv(stride, kernel, padding, shift):
    conv = nn.Conv2d(3, 4, kernel, stride, padding).double()
    af = AliasFreeConv2d.from_conv(conv)
    x = band_limited_map((2, 3, 8 * stride, 6 * stride))
    assert af(x).shape == conv(x).shape
    assert equivariance_error(af, x, *shift, out_scale=1 / stride) < 1e-10
    assert af.state_dict().keys() == conv.state_dict().keys()
    naive = CircularConv2d.from_conv(conv)
    strided = lambda t: naive(t)[..., ::stride, ::stride]  # noqa: E731  circular but aliasing
    assert equivariance_error(strided, x, *shift, out_scale=1 / stride) > 1e-3


def test_alias_free_conv_keeps_source_output_size_on_odd_inputs():
    conv = nn.Conv2d(3, 4, 3, 2, 1).double()
    af = AliasFreeConv2d.from_conv(conv)
    for size in [(9, 7), (11, 16), (5, 5)]:
        x = band_limited_map((1, 3, *size))
        assert af(x).shape == conv(x).shape


@pytest.mark.parametrize("spec", CONVS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("input_filter", [False, True])
def test_a_deferred_conv_and_its_downsampling_are_the_conv(spec, size, input_filter):
    """``deferred()``: the conv at stride 1, then its ``IdealDownsample2d``, is the layer it was (any size)."""
    cin, layer = _pair(spec, input_filter)
    x = band_limited_map((2, cin, *size))
    want = layer(x)
    down = layer.deferred()
    full = layer(x)
    assert full.shape[-2:] == x.shape[-2:] and layer.down == (1, 1)
    assert relative_change(down(full), want) < 1e-12


@pytest.mark.parametrize("k,d,bias", [(7, 1, True), (3, 2, False), (5, 1, True)])
def test_depthwise_taps_equal_grouped_conv(k, d, bias):
    """The float64 CPU path of depthwise circular convolutions (a sum over taps) is F.conv2d's map,
    forward and backward, and a CircularConv2d takes it only there."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, 6, 9 + d * (k - 1), 11 + d * (k - 1), generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 1, k, k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    ref, out = F.conv2d(x, w, b, 1, 0, (d, d), 6), depthwise_taps(x, w, b, (d, d))
    assert out.shape == ref.shape and float((out - ref).detach().abs().max()) < 1e-12
    grads = [torch.autograd.grad(y.square().sum(), [x, w]) for y in (ref, out)]
    assert all(float((a - c).abs().max()) < 1e-10 for a, c in zip(*grads))
    conv = CircularConv2d(6, 6, k, groups=6, padding=d * (k - 1) // 2, dilation=d).double()
    xs = torch.randn(1, 6, 8, 10, generator=g, dtype=torch.float64)
    plain = F.conv2d(F.pad(xs, conv.pad, mode="circular"), conv.weight, conv.bias, 1, 0, conv.dilation, 6)
    assert float((conv(xs) - plain).detach().abs().max()) < 1e-12
    assert torch.equal(conv(torch.roll(xs, (3, -2), (2, 3))), torch.roll(conv(xs), (3, -2), (2, 3)))


# -- transposed convolutions ---------------------------------------------------------------------------------

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
    for d in UPSAMPLING_SHIFTS:
        assert relative_change(a(fractional_shift(x, *d)), fractional_shift(y, d[0] * s, d[1] * s)) < 1e-12
    if s > 1:   # the original's zero insertion aliases
        assert max(relative_change(m(fractional_shift(x, *d)), fractional_shift(m(x), d[0] * s, d[1] * s))
                   for d in UPSAMPLING_SHIFTS) > 0.1


def test_transposed_conv_of_another_output_size_does_not_match():
    assert not AliasFreeConvTranspose2d.matches(nn.ConvTranspose2d(2, 2, 3, 2))           # 2H + 1
    assert not AliasFreeConvTranspose2d.matches(nn.ConvTranspose2d(2, 2, 4, 2, 1, dilation=2))
