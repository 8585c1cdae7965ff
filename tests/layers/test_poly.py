"""Polynomial activations (afconvert.layers.poly): evaluated at twice the rate, exactly equivariant to fractional
circular shifts where the same polynomial at the input rate is not; least-squares fits (generic and per channel,
from measured inputs); scale-equivariant forms y = s q(x / s); the L4 scale; half-precision inputs computed in float32
(AliasFreeLayerNorm's too); and the in-place inference path, the same map as the autograd one."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import LAYER_SHIFTS, LAYER_SIZES, band_limited_map, equivariance_error
from hypothesis import given, settings
from hypothesis import strategies as st

from afconvert.converter.certify import relative_change
from afconvert.layers.norm import AliasFreeLayerNorm
from afconvert.layers.poly import AliasFreePolyActivation, PolyActivation, PolyFit, fit_polynomial, l4_scale


@pytest.mark.parametrize("degree", [2, 3, 4])
@pytest.mark.parametrize("size", LAYER_SIZES)
def test_poly_activation_alias_free_vs_naive(degree, size):
    torch.manual_seed(degree)
    coef = torch.randn(3, degree + 1) * 0.5
    af = AliasFreePolyActivation(3, degree, coef).double()
    naive = PolyActivation(3, degree, coef).double()
    x = band_limited_map((2, 3, *size))
    for shift in LAYER_SHIFTS[1:]:
        assert equivariance_error(af, x, *shift) < 1e-10
        assert equivariance_error(naive, x, *shift) > 1e-3


def test_poly_activation_channels_last_and_float32():
    coef = torch.randn(6, 3)
    x = band_limited_map((2, 6, 10, 12))
    nchw = AliasFreePolyActivation(6, 2, coef)
    nhwc = AliasFreePolyActivation(6, 2, coef, channel_dim=-1, spatial_dims=(1, 2))
    torch.testing.assert_close(nhwc(x.float().permute(0, 2, 3, 1)), nchw(x.float()).permute(0, 2, 3, 1))
    assert equivariance_error(nchw, x.float(), 0.5, 0.5) < 1e-5


def test_poly_scales_and_fit():
    a = fit_polynomial(lambda t: 1 - 2 * t + 0.5 * t ** 2, 2)
    assert a == pytest.approx([1, -2, 0.5], abs=1e-10)
    p = PolyActivation.fitted(F.gelu, channels=2, in_scale=7.0, out_scale=7.0, train_scale=True)
    t = torch.linspace(-3, 3, 101).reshape(1, 1, 1, -1).expand(1, 2, 1, -1)
    assert (p(t) - F.gelu(t)).abs().max() < 0.3            # a quadratic approximates GELU on [-3, 3]
    assert isinstance(p.in_scale, nn.Parameter) and float(p.in_scale.detach()) == 7.0


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
    x = band_limited_map((2, 4, h, w), seed)
    assert equivariance_error(act, x, *shift) < 1e-10
    at_input_rate = PolyActivation(4, coef=act.coef.detach(), normalize=normalize).double()
    if shift[0] % 1 or shift[1] % 1:   # integer shifts commute with any pointwise map; fractional ones do not
        assert equivariance_error(at_input_rate, x, *shift) > 1e-3


@pytest.mark.parametrize("normalize", ["channel", "sample"])
def test_scale_equivariant_poly_scales_like_relu(normalize):
    """act(a x) = a act(x) for every a > 0 (like ReLU); a plain quadratic grows like a^2."""
    x = band_limited_map((2, 4, 12, 10))
    act, plain = _random_poly(normalize), _random_poly("none")
    with torch.no_grad():
        for a in (1e-3, 0.5, 10.0, 1e4):
            assert relative_change(act(a * x), a * act(x)) < 1e-10
        assert relative_change(plain(10 * x), 10 * plain(x)) > 0.1


def test_scale_equivariant_poly_float32_and_gradients():
    act = _random_poly("channel")
    x = band_limited_map((2, 4, 12, 10))
    # float32: shift error at float32 rounding
    assert equivariance_error(_random_poly("channel", dtype=torch.float32), x.float(), 0.5, 0.5) < 1e-5
    # gradients flow through the polynomial and through s (exact, checked against finite differences)
    xs = band_limited_map((1, 2, 5, 6)).requires_grad_()
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
    x = scale * band_limited_map((2, 4, 8, 6), dtype=torch.float32)
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
    x = 3e9 * band_limited_map((2, 3, 8, 10), dtype=torch.float64)
    ref = (x.pow(4).mean((2, 3), keepdim=True) + 1e-24).pow(0.25)
    assert not torch.isfinite(x.float().pow(4).mean((2, 3))).all()
    got = l4_scale(x.float(), (2, 3))
    assert torch.isfinite(got).all() and torch.allclose(got.double(), ref, rtol=1e-5)
    assert torch.allclose(l4_scale(torch.zeros(1, 2, 4, 4), (2, 3)), torch.full((1, 2, 1, 1), 1e-6))


def test_l4_scale_gradient_is_the_plain_formulas():
    x = band_limited_map((2, 3, 6, 5)).requires_grad_(True)
    w = band_limited_map((2, 3, 1, 1), seed=1)
    (l4_scale(x, (2, 3)) * w).sum().backward()
    got, x.grad = x.grad.clone(), None
    ((x.pow(4).mean((2, 3), keepdim=True) + 1e-24).pow(0.25) * w).sum().backward()
    assert torch.allclose(got, x.grad, atol=1e-14)


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
