"""The closed-form alias-free quadratic: equal to the 2x-grid definition, exactly shift-invariant, its custom
gradient equal to autograd's, and its saved state a fraction of what autograd keeps for the 2x form."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from afconvert.converter.certify import relative_change
from afconvert.layers.poly import AliasFreePolyActivation, scale_dims
from afconvert.layers.quadratic import (
    band_limited_quadratic,
    band_limited_square,
    drop_nyquist,
    inband_scale,
)
from afconvert.layers.spectral import (
    fractional_shift,
    ideal_resample,
    resample_adjoint,
    zero_nyquist,
)
from afconvert.settings import using

SIZES = [(8, 8), (12, 10), (9, 7), (6, 11)]
LAYOUTS = {"nchw": ((2, 3), 1), "nhwc": ((1, 2), -1)}
SHIFTS = [(1, -2), (0.5, 0.5), (1 / 3, -2 / 3), (0.37, -1.21)]


def _map(h, w, layout="nchw", seed=0, dtype=torch.float64, nyquist=True, channels=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, h, w, generator=g, dtype=torch.float64)
    x = x if nyquist else zero_nyquist(x)
    return (x if layout == "nchw" else x.permute(0, 2, 3, 1).contiguous()).to(dtype)


def _reference(x, coef, dims, channel_dim, sdims, eps=1e-6):
    """The definition on the 2x grid, through FFTs: a0 s + a1 D(U x) + (a2 / s) D((U x)^2)."""
    with using(resample="fft"):
        n = [x.shape[d] for d in dims]
        u = ideal_resample(x, [2 * v for v in n], dims)
        lin, sq = ideal_resample(u, n, dims), ideal_resample(u * u, n, dims)
    view = [1] * x.ndim
    view[channel_dim] = -1
    a0, a1, a2 = (coef[:, k].reshape(view) for k in range(3))
    if sdims is None:
        return a0 + a1 * lin + a2 * sq
    s = ((sq * sq).mean(sdims, keepdim=True) + eps ** 4) ** 0.25
    return a0 * s + a1 * lin + a2 * sq / s


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 13), w=st.integers(1, 13), nyquist=st.booleans())
def test_square_on_the_three_halves_grid_is_the_2x_square(h, w, nyquist):
    """D((U x)^2) from the ceil(3N/2) grid equals it from the 2x grid, with or without Nyquist content."""
    x = _map(h, w, nyquist=nyquist)
    with using(resample="fft"):
        u = ideal_resample(x, (2 * h, 2 * w))
        ref = ideal_resample(u * u, (h, w))
    for method in ("fft", "matmul"):
        assert torch.allclose(band_limited_square(x, method=method), ref, atol=1e-12 * float(ref.abs().max()))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalize", ["none", "channel", "sample"])
@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_closed_form_equals_the_definition(layout, normalize, h, w, dtype, tol):
    dims, cdim = LAYOUTS[layout]
    x = _map(h, w, layout, dtype=torch.float64)     # Nyquist content included: P x is exactly D(U x)
    coef = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sdims = scale_dims(normalize, dims, cdim % 4)
    ref = _reference(x, coef, dims, cdim, sdims)
    got = band_limited_quadratic(x.to(dtype), coef.to(dtype), dims, cdim, sdims).double()
    assert relative_change(got, ref) < tol


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalize", ["none", "channel", "sample"])
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("degree", [2, 3])
def test_exactly_shift_invariant_and_pointwise_is_not(layout, normalize, shift, degree):
    """Degree 2 in closed form; degree 3 on its 2x grid, with the in-band scale when normalising."""
    dims, cdim = LAYOUTS[layout]
    x = _map(9, 12, layout, nyquist=False)
    layer = AliasFreePolyActivation(3, degree, [0.1, 0.5, 0.3, 0.05][:degree + 1], channel_dim=cdim,
                                    spatial_dims=dims, normalize=normalize).double()
    assert layer.scale == "inband"

    def err(f):
        with torch.no_grad():
            y = f(x)
            return relative_change(f(fractional_shift(x, *shift, dims)), fractional_shift(y, *shift, dims))
    assert err(layer) < 1e-12
    pointwise = lambda t: 0.1 + 0.5 * t + 0.3 * t * t  # noqa: E731  a quadratic at the input rate
    if shift[0] != int(shift[0]):
        assert err(pointwise) > 1e-3
    sdims = scale_dims(normalize if normalize != "none" else "channel", dims, cdim % 4)
    s = inband_scale(x, dims, sdims)
    assert torch.allclose(inband_scale(fractional_shift(x, *shift, dims), dims, sdims), s, rtol=1e-13)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalize", ["none", "channel", "sample"])
@pytest.mark.parametrize("method", ["matmul", "fft"])
@pytest.mark.parametrize("h,w", [(6, 5), (4, 7)])
def test_gradient_is_autograds(layout, normalize, method, h, w):
    """float64 gradcheck of the custom backward, for x and for the coefficients, odd and non-square."""
    dims, cdim = LAYOUTS[layout]
    x = _map(h, w, layout).requires_grad_()
    coef = torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    sdims = scale_dims(normalize, dims, cdim % 4)
    with using(resample=method):
        assert torch.autograd.gradcheck(lambda t, c: band_limited_quadratic(t, c, dims, cdim, sdims), (x, coef))


DOWN = [((28, 28), (14, 14)), ((9, 12), (5, 6)), ((7, 7), (4, 4)), ((8, 6), (3, 5)), ((9, 12), (5, 12)),
        ((8, 6), (8, 3))]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalize", ["none", "channel", "sample"])
@pytest.mark.parametrize("size,out", DOWN)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fused_down_sampling_is_the_resampled_output(layout, normalize, size, out, dtype, tol):
    """With ``out`` = n: R_n of (a0 s + a1 P x + (a2 / s) B(x)) with s from R_n B, computed on the smaller grid
    N + ceil(n / 2); the reference resamples the 2x-grid definition. Odd, non-square, Nyquist content, and
    sizes kept along one dim (a stride (2, 1): P still drops that dim's Nyquist bin)."""
    dims, cdim = LAYOUTS[layout]
    x = _map(*size, layout)
    coef = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sdims = scale_dims(normalize, dims, cdim % 4)
    with using(resample="fft"):
        b = ideal_resample(ideal_resample(ideal_resample(x, [2 * v for v in size], dims) ** 2, size, dims), out, dims)
        lin = ideal_resample(zero_nyquist(x, dims), out, dims)      # R_n P x: what a down-sampling after the layer sees
    view = [1] * x.ndim
    view[cdim] = -1
    a0, a1, a2 = (coef[:, k].reshape(view) for k in range(3))
    s = 1.0 if sdims is None else ((b * b).mean(sdims, keepdim=True) + 1e-24) ** 0.25
    ref = a0 * s + a1 * lin + a2 * b / s
    for method in ("matmul", "fft"):
        got = band_limited_quadratic(x.to(dtype), coef.to(dtype), dims, cdim, sdims, method=method, out=out)
        assert got.shape == ref.shape and relative_change(got.double(), ref) < tol


@pytest.mark.parametrize("normalize", ["none", "channel", "sample"])
@pytest.mark.parametrize("method", ["matmul", "fft"])
@pytest.mark.parametrize("layout,size,out", [("nchw", (7, 6), (4, 3)), ("nhwc", (6, 5), (3, 3)),
                                             ("nchw", (6, 4), (3, 4))])
def test_fused_gradient_is_autograds(normalize, method, layout, size, out):
    dims, cdim = LAYOUTS[layout]
    x = _map(*size, layout).requires_grad_()
    coef = torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    sdims = scale_dims(normalize, dims, cdim % 4)
    with using(resample=method):
        assert torch.autograd.gradcheck(lambda t, c: band_limited_quadratic(t, c, dims, cdim, sdims, out=out),
                                        (x, coef))


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("degree", [2, 3])
def test_outband_scale_fuses_the_deferred_down_sampling_and_stays_equivariant(shift, degree):
    """An activation with a stride-2 ``post_down`` and scale "outband": shifting its input by 2 d shifts its output
    by d, fractional d included (float64, non-square); sampling a pointwise quadratic by 2 does not (d fractional). Without a
    ``post_down`` "outband" is "inband"."""
    from afconvert.layers.conv import IdealDownsample2d
    x = _map(12, 16, nyquist=False)

    def layer(scale, down=True):
        act = AliasFreePolyActivation(3, degree, [0.1, 0.5, 0.3, 0.05][:degree + 1], normalize="channel",
                                      scale=scale).double()
        if down:
            act.post_down = IdealDownsample2d((2, 2))
        return act

    fused = layer("outband")

    def err(f):
        with torch.no_grad():
            moved = f(fractional_shift(x, 2 * shift[0], 2 * shift[1]))
            return relative_change(moved, fractional_shift(f(x), *shift))
    assert fused(x).shape[-2:] == (6, 8) and err(fused) < 1e-12
    if shift[0] != int(shift[0]):       # 2 d integer: plain sampling by 2 would be invariant too
        assert err(lambda t: (0.1 + 0.5 * t + 0.3 * t * t)[..., ::2, ::2]) > 1e-3
    with torch.no_grad():
        assert relative_change(layer("outband", down=False)(x), layer("inband", down=False)(x)) < 1e-14
        assert relative_change(fused(x), layer("inband")(x)) > 1e-6    # the scale differs: a form of its own


@pytest.mark.parametrize("h,w", [(12, 10), (28, 31)])   # 28 px and up: the swapped products (CPU float32)
def test_float32_gradient_matches_the_definitions_autograd(h, w):
    dims, cdim = LAYOUTS["nchw"]
    x64 = _map(h, w, nyquist=False)
    coef = torch.tensor([[0.1, 0.5, 0.3]] * 3, dtype=torch.float64)
    g = torch.randn(x64.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref_x = x64.clone().requires_grad_()
    (_reference(ref_x, coef, dims, cdim, (2, 3)) * g).sum().backward()
    x32 = x64.float().requires_grad_()
    (band_limited_quadratic(x32, coef.float(), dims, cdim, (2, 3)) * g.float()).sum().backward()
    assert relative_change(x32.grad.double(), ref_x.grad) < 1e-5


def _saved_bytes(fn, x):
    """Bytes of the distinct tensors autograd saves for backward while ``fn(x)`` runs (x included)."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


@pytest.mark.parametrize("scale", ["inband", "l4"])
def test_backward_keeps_about_two_maps(scale):
    """The closed form saves x and B (two maps of x's size, small per-channel scales aside); the 2x-grid
    form's autograd keeps several maps of four times x's size."""
    x = _map(16, 16, channels=8).float().requires_grad_()
    layer = AliasFreePolyActivation(8, 2, [0.1, 0.5, 0.3], normalize="channel", scale=scale)
    saved = _saved_bytes(layer, x) / (x.numel() * x.element_size())
    if scale == "inband":
        assert saved <= 2.1, saved
    else:
        assert saved > 6, saved


def test_huge_and_zero_inputs_stay_finite():
    layer = AliasFreePolyActivation(3, 2, [0.1, 0.5, 0.3], normalize="channel")
    x = _map(8, 10, nyquist=False).float()
    for scale in (1e30, 1.0, 0.0):
        y = layer(x * scale)
        assert torch.isfinite(y).all()
        if scale:
            assert torch.allclose(y / scale, layer(x), rtol=1e-4, atol=1e-6)   # scale-equivariant


@pytest.mark.parametrize("h,w", SIZES + [(1, 4)])
def test_drop_nyquist_is_zero_nyquist(h, w):
    x = _map(h, w)
    assert torch.allclose(drop_nyquist(x, (2, 3)), zero_nyquist(x, method="fft"), atol=1e-14)


@pytest.mark.parametrize("method", ["matmul", "fft"])
@pytest.mark.parametrize("size_in,size_out", [((6, 5), (9, 8)), ((9, 8), (6, 5)), ((7, 7), (3, 11))])
def test_resample_adjoint_is_the_gradient(method, size_in, size_out):
    x = torch.randn(2, 3, *size_in, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, *size_out, dtype=torch.float64)
    with using(resample=method):
        (ideal_resample(x, size_out) * g).sum().backward()
        got = resample_adjoint(g, size_in)
    assert torch.allclose(got, x.grad, atol=1e-13)
    x = x.detach()        # <R^T g, x> = <g, R x>
    assert math.isclose(float((got * x).sum()), float((g * ideal_resample(x, size_out)).sum()), rel_tol=1e-12)


@pytest.mark.parametrize("size", [(60, 63), (29, 30)])
def test_large_channels_last_maps_equal_the_definition(size):
    """Channels-last float32 maps, large and medium (the products may move them to the last two dims and back):
    the same values and gradient as the float64 definition, and the result laid out channels-last."""
    dims, cdim = LAYOUTS["nhwc"]
    x64 = _map(*size, layout="nhwc", nyquist=False)
    coef = torch.tensor([[0.1, 0.5, 0.3]] * 3, dtype=torch.float64)
    g = torch.randn(x64.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref_x = x64.clone().requires_grad_()
    ref = _reference(ref_x, coef, dims, cdim, (1, 2))
    (ref * g).sum().backward()
    x32 = x64.float().requires_grad_()
    y = band_limited_quadratic(x32, coef.float(), dims, cdim, (1, 2))
    (y * g.float()).sum().backward()
    assert y.is_contiguous() and relative_change(y.detach().double(), ref.detach()) < 1e-5
    assert relative_change(x32.grad.double(), ref_x.grad) < 1e-5
