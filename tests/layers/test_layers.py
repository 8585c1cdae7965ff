"""Alias-free layers: exact equivariance to fractional circular shifts, and the naive forms failing."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from afconvert import (
    AliasFreeConv2d,
    AliasFreeLayerNorm,
    AliasFreePolyActivation,
    CircularConv2d,
    PolyActivation,
    circular_pad,
    fit_polynomial,
    fractional_shift,
    zero_nyquist,
)
from afconvert.converter.certify import relative_change
from afconvert.layers.poly import PolyFit

SHIFTS = [(1, 0), (0.5, 0.5), (1 / 3, 2 / 3), (2.25, 0.75)]
SIZES = [(8, 8), (12, 10), (9, 7)]


def _x(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return zero_nyquist(torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


@torch.no_grad()
def _equivariance_error(layer, x, dy, dx, out_scale=1.0, dims=(-2, -1)):
    lhs = layer(fractional_shift(x, dy, dx, dims))
    rhs = fractional_shift(layer(x), dy * out_scale, dx * out_scale, dims)
    return relative_change(lhs, rhs)


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
    fit = PolyFit(degree=2, channel_dim=1)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        seen = (mean + std * torch.randn(2000, 3, generator=g)).T.reshape(1, 3, 1, 2000)
        fit.update(seen, F.relu(seen))
    p = PolyActivation.fitted(F.relu, channels=3, fit=fit)
    x = (mean + std * torch.randn(2000, 3)).T.reshape(1, 3, 1, 2000)
    err_fit = (p(x) - F.relu(x)).pow(2).mean((0, 2, 3))
    generic = PolyActivation.fitted(F.relu, channels=3)
    err_generic = (generic(x) - F.relu(x)).pow(2).mean((0, 2, 3))
    assert (err_fit < err_generic).all() and err_fit[2] < 1e-8  # channel 2 lives where ReLU is linear


# -- scale-equivariant polynomial activations (normalize) --------------------------------------------------

def _random_poly(normalize, channels=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    coef = torch.randn(channels, 3, generator=g, dtype=torch.float64)
    return AliasFreePolyActivation(channels, coef=coef, normalize=normalize).to(dtype)


@settings(max_examples=25, deadline=None)
@given(h=st.integers(5, 14), w=st.integers(5, 14), normalize=st.sampled_from(["channel", "sample"]),
       shift=st.sampled_from([(1, 0), (-2, 3), (0.5, 0), (0.5, 0.5), (1 / 3, 2 / 3), (2.25, -0.75), (0.1, 0.7)]),
       seed=st.integers(0, 1000))
def test_scale_equivariant_poly_is_exactly_alias_free(h, w, normalize, shift, seed):
    """y = s D(q(U x / s)) commutes with integer and fractional shifts (float64, odd and non-square sizes);
    the same normalised polynomial evaluated at the input rate does not."""
    act = _random_poly(normalize, seed=seed)
    x = _x((2, 4, h, w), seed)
    assert _equivariance_error(act, x, *shift) < 1e-10
    at_input_rate = PolyActivation(4, coef=act.coef.detach(), normalize=normalize).double()
    if shift[0] % 1 or shift[1] % 1:   # integer shifts commute with any pointwise map; fractional ones do not
        assert _equivariance_error(at_input_rate, x, *shift) > 1e-3


@pytest.mark.parametrize("normalize", ["channel", "sample"])
def test_scale_equivariant_poly_scales_like_relu(normalize):
    """act(a x) = a act(x) for every a > 0 (like ReLU); a plain quadratic grows like a^2."""
    x = _x((2, 4, 12, 10))
    act, plain = _random_poly(normalize), _random_poly("none")
    with torch.no_grad():
        for a in (1e-3, 0.5, 10.0, 1e4):
            assert relative_change(act(a * x), a * act(x)) < 1e-10
        assert relative_change(plain(10 * x), 10 * plain(x)) > 0.1


def test_scale_equivariant_poly_float32_and_gradients():
    act = _random_poly("channel")
    x = _x((2, 4, 12, 10))
    # float32: shift error at float32 rounding
    assert _equivariance_error(_random_poly("channel", dtype=torch.float32), x.float(), 0.5, 0.5) < 1e-5
    # gradients flow through the polynomial and through s (exact, checked against finite differences)
    xs = _x((1, 2, 5, 6)).requires_grad_()
    small = _random_poly("channel", channels=2)
    assert torch.autograd.gradcheck(small, (xs,), eps=1e-6, atol=1e-7)
    act(x.requires_grad_()).square().sum().backward()
    assert act.coef.grad is not None and torch.isfinite(act.coef.grad).all()


def test_scaled_fit_matches_the_source_activation_on_its_inputs():
    """PolyFit with a scale: least squares of s q(x / s) to f(x) over measured maps of very different scales."""
    g = torch.Generator().manual_seed(0)
    maps = [scale * torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) + 0.3 * scale
            for scale in (0.1, 1.0, 30.0)]
    fit = PolyFit(degree=2, channel_dim=1, scale_dims=(2, 3))
    for m in maps:
        fit.update(m, F.relu6(m))
    fitted = PolyActivation.fitted(F.relu6, 3, fit=fit, normalize="channel").double()
    generic = PolyActivation.fitted(F.relu6, 3, normalize="channel").double()
    with torch.no_grad():
        err = [float((fitted(m) - F.relu6(m)).pow(2).mean()) for m in maps]
        err_generic = [float((generic(m) - F.relu6(m)).pow(2).mean()) for m in maps]
    assert sum(err) < 0.5 * sum(err_generic), (err, err_generic)


def test_normalize_is_validated():
    with pytest.raises(ValueError, match="normalize must be one of"):
        PolyActivation(3, normalize="rms")
    with pytest.raises(ValueError, match="degree >= 2"):
        PolyActivation(3, degree=1, normalize="channel")


@pytest.mark.parametrize("layer,scale", [
    (AliasFreePolyActivation(4, coef=[0.1, 0.5, 0.3], normalize="channel"), 300),
    (AliasFreePolyActivation(4, coef=[0.1, 0.5, 0.3]), 100),      # its output ~ 0.3 x^2: float16 holds x ~ 100
    (PolyActivation(4, coef=[0.1, 0.5, 0.3], normalize="channel"), 300),
    (AliasFreeLayerNorm(4), 300),
], ids=["alias-free-scaled", "alias-free-plain", "pointwise-scaled", "layernorm"])
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_float32(layer, scale, half):
    """Mixed precision: a float16 map whose squares overflow float16 (values up to ~1000 for scale 300,
    x^2 > 65504) still gives the float32 result, in the input's dtype, under autocast too."""
    x = scale * _x((2, 4, 8, 6), dtype=torch.float32)
    ref = layer(x).detach()
    for out in (layer(x.to(half)), _autocast(layer, x.to(half))):
        assert out.dtype == half and torch.isfinite(out).all()
        assert torch.allclose(out.float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
    if half is torch.float16 and scale == 300:
        assert not torch.isfinite(x.to(half).square()).all()     # what the float32 promotion avoids


def _autocast(layer, x):
    with torch.autocast("cpu", dtype=x.dtype):
        return layer(x)


def test_l4_scale_does_not_overflow_float32():
    """x^4 overflows float32 above ~1e9, which source models that themselves explode reach (see docs/models.md):
    the scale is still the float64 value, and zero maps give eps."""
    from afconvert.layers.poly import l4_scale
    x = 3e9 * _x((2, 3, 8, 10), dtype=torch.float64)
    ref = (x.pow(4).mean((2, 3), keepdim=True) + 1e-24).pow(0.25)
    assert not torch.isfinite(x.float().pow(4).mean((2, 3))).all()
    got = l4_scale(x.float(), (2, 3))
    assert torch.isfinite(got).all() and torch.allclose(got.double(), ref, rtol=1e-5)
    assert torch.allclose(l4_scale(torch.zeros(1, 2, 4, 4), (2, 3)), torch.full((1, 2, 1, 1), 1e-6))


def test_l4_scale_gradient_is_the_plain_formulas():
    from afconvert.layers.poly import l4_scale
    x = _x((2, 3, 6, 5)).requires_grad_(True)
    w = _x((2, 3, 1, 1), seed=1)
    (l4_scale(x, (2, 3)) * w).sum().backward()
    got, x.grad = x.grad.clone(), None
    ((x.pow(4).mean((2, 3), keepdim=True) + 1e-24).pow(0.25) * w).sum().backward()
    assert torch.allclose(got, x.grad, atol=1e-14)


@pytest.mark.parametrize("k,d,bias", [(7, 1, True), (3, 2, False), (5, 1, True)])
def test_depthwise_taps_equal_grouped_conv(k, d, bias):
    """The float64 CPU path of depthwise circular convolutions (a sum over taps) is F.conv2d's map,
    forward and backward, and a CircularConv2d takes it only there."""
    from afconvert.layers.conv import CircularConv2d, depthwise_taps
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


@settings(max_examples=25, deadline=None)
@given(h=st.integers(3, 13), w=st.integers(3, 13), degree=st.sampled_from([2, 3]),
       normalize=st.sampled_from(["none", "channel", "sample"]), chans_last=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_inference_path_equals_training_path(h, w, degree, normalize, chans_last, dtype):
    """The in-place polynomial (no gradient recorded) is the same map as the autograd one, on any sizes,
    NCHW or NHWC, every normalisation, float64 to 1e-12 and float32 to 1e-6 (relative)."""
    g = torch.Generator().manual_seed(h * 31 + w)
    coef = torch.randn(3, degree + 1, generator=g, dtype=torch.float64) * 0.5
    dims, cd = ((1, 2), -1) if chans_last else ((2, 3), 1)
    act = AliasFreePolyActivation(3, degree, coef=coef, normalize=normalize, channel_dim=cd,
                                  spatial_dims=dims).to(dtype)
    x = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64).to(dtype) * 3
    if chans_last:
        x = x.permute(0, 2, 3, 1).contiguous()
    xg = x.clone().requires_grad_(True)
    y_train = act(xg)
    with torch.no_grad():
        y_eval = act(x)
    tol = 1e-12 if dtype is torch.float64 else 1e-6
    assert float((y_train.detach() - y_eval).abs().max()) <= tol * max(1.0, float(y_eval.abs().max()))
    assert torch.equal(x, xg.detach())     # the input itself is never written


@settings(max_examples=25, deadline=None)
@given(h=st.integers(3, 20), w=st.integers(3, 20), cutoff=st.sampled_from([1.0, 0.5, 0.75]),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_lowpass_matmul_gradient_equals_fft(h, w, cutoff, dtype):
    from afconvert.layers.spectral import ideal_lowpass
    g = torch.Generator().manual_seed(h + 100 * w)
    x = torch.randn(1, 2, h, w, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.randn(1, 2, h, w, generator=g, dtype=torch.float64).to(dtype)
    grads = []
    for method in ("fft", "matmul"):
        xi = x.clone().requires_grad_(True)
        (ideal_lowpass(xi, cutoff, method=method) * weight).sum().backward()
        grads.append(xi.grad)
    tol = 1e-12 if dtype is torch.float64 else 1e-5
    assert float((grads[0] - grads[1]).abs().max()) <= tol * float(weight.abs().max())
