"""Properties of the ideal filters and the band-limited shift (afconvert.layers.spectral)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from afconvert.layers.spectral import (
    fractional_shift,
    ideal_downsample,
    ideal_lowpass,
    ideal_resample,
    ideal_upsample,
    zero_nyquist,
)
from afconvert.settings import using

sizes = st.integers(min_value=3, max_value=24)
shifts = st.floats(min_value=-5, max_value=5, allow_nan=False).map(lambda v: round(v, 3))
FAST = settings(max_examples=40, deadline=None)


def _x(h, w, seed=0, dtype=torch.float64, chans=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, chans, h, w, generator=g, dtype=torch.float64).to(dtype)


def _trig_interp_1d(x: np.ndarray, t: float) -> float:
    """Independent reference: the symmetric trigonometric interpolant of x evaluated at real t."""
    n = len(x)
    X = np.fft.fft(x)
    val = 0.0
    for k in range(n):
        kk = k if k < n / 2 else k - n
        if n % 2 == 0 and k == n // 2:
            val += (X[k] * math.cos(math.pi * t)).real
        else:
            val += (X[k] * np.exp(2j * math.pi * kk * t / n)).real
    return val / n


@FAST
@given(n=sizes, d=shifts)
def test_fractional_shift_matches_trigonometric_interpolation(n, d):
    x = _x(1, n)[0, 0, 0]
    y = fractional_shift(x.reshape(1, 1, 1, n), 0, d)[0, 0, 0]
    ref = [_trig_interp_1d(x.numpy(), i - d) for i in range(n)]
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-10)


@FAST
@given(h=sizes, w=sizes, dy=st.integers(-7, 7), dx=st.integers(-7, 7))
def test_integer_shift_is_roll(h, w, dy, dx):
    x = _x(h, w)
    torch.testing.assert_close(fractional_shift(x, dy, dx), torch.roll(x, (dy, dx), (2, 3)))
    # and the FFT path agrees with roll too (shift by d + tiny, then compare loosely)
    torch.testing.assert_close(fractional_shift(x, dy + 1e-12, dx), torch.roll(x, (dy, dx), (2, 3)), atol=1e-9, rtol=0)


@FAST
@given(h=sizes, w=sizes, a=shifts, b=shifts, c=shifts, d=shifts)
def test_shifts_compose_without_nyquist(h, w, a, b, c, d):
    x = zero_nyquist(_x(h, w))
    two = fractional_shift(fractional_shift(x, a, b), c, d)
    torch.testing.assert_close(two, fractional_shift(x, a + c, b + d), atol=1e-10, rtol=0)


def test_nyquist_convention_is_cosine():
    x = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64).reshape(1, 1, 1, 4)  # all Nyquist
    for d in (0.25, 0.5, 1.5):
        torch.testing.assert_close(fractional_shift(x, 0, d), x * math.cos(math.pi * d))


@FAST
@given(n=st.integers(1, 8), f=st.sampled_from([2, 3, 4]), m=st.integers(1, 6))
def test_downsample_is_lowpass_then_subsample(n, f, m):
    N = n * f
    x = _x(N, m * f)
    ref = ideal_lowpass(x, 1.0 / f)[..., ::f, ::f]
    torch.testing.assert_close(ideal_downsample(x, f), ref, atol=1e-12, rtol=0)


@FAST
@given(h=sizes, w=sizes, f=st.sampled_from([2, 3]))
def test_upsample_then_downsample_is_identity_without_nyquist(h, w, f):
    x = zero_nyquist(_x(h, w))
    torch.testing.assert_close(ideal_downsample(ideal_upsample(x, f), f), x, atol=1e-12, rtol=0)
    up = ideal_upsample(x, f)
    torch.testing.assert_close(up[..., ::f, ::f], x, atol=1e-12, rtol=0)  # interpolates: keeps the samples


@FAST
@given(n=st.integers(2, 10), f=st.sampled_from([2, 4]), dy=shifts, dx=shifts)
def test_downsample_is_equivariant(n, f, dy, dx):
    x = zero_nyquist(_x(n * f, (n + 1) * f))
    lhs = ideal_downsample(fractional_shift(x, dy, dx), f)
    rhs = fractional_shift(ideal_downsample(x, f), dy / f, dx / f)
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=0)


def test_naive_subsampling_fails_the_same_check():
    x = zero_nyquist(_x(16, 16))
    lhs = fractional_shift(x, 1, 1)[..., ::2, ::2]
    rhs = fractional_shift(x[..., ::2, ::2], 0.5, 0.5)
    assert (lhs - rhs).abs().max() > 1e-2


@pytest.mark.parametrize("size_in,size_out", [((9, 7), (4, 3)), ((10, 13), (21, 5)), ((12, 12), (12, 12))])
def test_resample_any_size_and_dtype(size_in, size_out):
    for dtype in (torch.float32, torch.float64):
        x = _x(*size_in, dtype=dtype)
        y = ideal_resample(x, size_out)
        assert y.shape[-2:] == size_out and y.dtype == dtype
        # the DC bin (the mean) is always kept
        torch.testing.assert_close(y.mean((-2, -1)), x.mean((-2, -1)), atol=1e-5, rtol=1e-5)


def test_channels_last_dims():
    x = zero_nyquist(_x(8, 12))
    nhwc = x.permute(0, 2, 3, 1)
    torch.testing.assert_close(ideal_downsample(nhwc, 2, dims=(1, 2)), ideal_downsample(x, 2).permute(0, 2, 3, 1))
    torch.testing.assert_close(fractional_shift(nhwc, 0.5, 0.25, dims=(1, 2)),
                               fractional_shift(x, 0.5, 0.25).permute(0, 2, 3, 1))


def test_gradients_flow():
    x = _x(8, 8).requires_grad_()
    ideal_downsample(ideal_upsample(x, 2) ** 2, 2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_errors_are_clear():
    with pytest.raises(TypeError, match="floating point"):
        ideal_upsample(torch.ones(1, 1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="positive"):
        ideal_resample(_x(4, 4), (0, 4))
    for size in ((8, 8), (4, 4)):        # refused even where there is nothing to resample
        with pytest.raises(ValueError, match="auto, fft, matmul"):
            ideal_resample(_x(4, 4), size, method="fast")


@FAST
@given(h=sizes, w=sizes, oh=st.integers(1, 48), ow=st.integers(1, 48), chans_last=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_matmul_path_equals_fft_path(h, w, oh, ow, chans_last, dtype):
    """The dense real form (resample_matrix) is the same operator as the FFT path: forward and backward,
    any sizes (odd, non-square, up or down), NCHW or channels-last, float64 to 1e-12, float32 to 1e-5."""
    x = _x(h, w, dtype=dtype, chans=3)
    dims = (-2, -1)
    if chans_last:
        x, dims = x.permute(0, 2, 3, 1).contiguous(), (1, 2)
    tol = 1e-12 if dtype is torch.float64 else 1e-5
    outs, grads = [], []
    for method in ("fft", "matmul"):
        xi = x.clone().requires_grad_(True)
        y = ideal_resample(xi, (oh, ow), dims, method=method)
        (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).reshape(y.shape)).sum().backward()
        outs.append(y.detach())
        grads.append(xi.grad)
    scale = float(x.abs().max())
    assert outs[0].shape == outs[1].shape
    assert float((outs[0] - outs[1]).abs().max()) <= tol * scale
    assert float((grads[0] - grads[1]).abs().max()) <= tol * max(1.0, float(grads[0].abs().max()))
    assert outs[1].dtype == dtype


@FAST
@given(h=sizes, w=sizes, cutoff=st.sampled_from([1.0, 0.75, 0.5, 1 / 3]),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_lowpass_matmul_equals_fft(h, w, cutoff, dtype):
    """ideal_lowpass (and zero_nyquist) in the dense form (lowpass_matrix) is the FFT form's operator."""
    x = _x(h, w, dtype=dtype)
    tol = 1e-12 if dtype is torch.float64 else 1e-5
    fft, mm = (ideal_lowpass(x, cutoff, method=m) for m in ("fft", "matmul"))
    assert mm.dtype == dtype and float((fft - mm).abs().max()) <= tol * float(x.abs().max())
    assert torch.equal(zero_nyquist(x, method="matmul"), ideal_lowpass(x, 1.0, method="matmul"))


@settings(max_examples=25, deadline=None)
@given(h=st.integers(3, 20), w=st.integers(3, 20), cutoff=st.sampled_from([1.0, 0.5, 0.75]),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_lowpass_matmul_gradient_equals_fft(h, w, cutoff, dtype):
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


def test_method_choice_auto_and_forced():
    """auto: float32 and float64 maps up to 512 px take the matmul form, larger ones the FFT form, bit for bit;
    the ``resample`` setting forces one form inside its block only; an unknown name is refused."""
    x64 = _x(10, 14, seed=2)
    x32 = x64.float()
    assert torch.equal(ideal_resample(x32, (5, 21)), ideal_resample(x32, (5, 21), method="matmul"))
    assert torch.equal(ideal_resample(x64, (5, 21)), ideal_resample(x64, (5, 21), method="matmul"))
    big = _x(4, 513, seed=3)
    assert torch.equal(ideal_resample(big, (4, 300)), ideal_resample(big, (4, 300), method="fft"))
    assert torch.equal(zero_nyquist(x32), zero_nyquist(x32, method="matmul"))
    with using(resample="matmul"):
        assert torch.equal(ideal_resample(x64, (5, 21)), ideal_resample(x64, (5, 21), method="matmul"))
        assert torch.equal(ideal_lowpass(x64, 0.5), ideal_lowpass(x64, 0.5, method="matmul"))
    with using(resample="fft"):
        assert torch.equal(ideal_resample(x32, (5, 21)), ideal_resample(x32, (5, 21), method="fft"))
        assert torch.equal(ideal_resample(x64, (5, 21)), ideal_resample(x64, (5, 21), method="fft"))
    assert torch.equal(ideal_resample(x64, (5, 21)), ideal_resample(x64, (5, 21), method="matmul"))
    with pytest.raises(ValueError, match="auto, fft, matmul"):
        with using(resample="fast"):
            pass


def test_matmul_path_ignores_autocast():
    """Under bfloat16 autocast the resampling matrices still multiply in float32 (no bf16 products)."""
    x = _x(12, 9, dtype=torch.float32)
    ref = ideal_resample(x, (24, 18), method="fft")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ideal_resample(x, (24, 18), method="matmul")
    assert y.dtype == torch.float32 and float((y - ref).abs().max()) < 1e-5 * float(x.abs().max())


def test_matmul_path_is_alias_free_and_naive_resampling_is_not():
    """The fast path keeps the property, not only the numbers: down-sampling commutes with shifts by f
    pixels (f the factor) exactly; nearest-neighbour sub-sampling does not."""
    x = zero_nyquist(_x(24, 18, seed=3))
    lhs = ideal_resample(fractional_shift(x, 1.5, -0.75), (12, 9), method="matmul")
    rhs = fractional_shift(ideal_resample(x, (12, 9), method="matmul"), 0.75, -0.375)
    assert float((lhs - rhs).abs().max()) < 1e-10 * float(x.abs().max())
    naive = lambda t: t[..., ::2, ::2]  # noqa: E731
    assert float((naive(fractional_shift(x, 1.5, -0.75)) - fractional_shift(naive(x), 0.75, -0.375)).abs().max()) \
        > 1e-2 * float(x.abs().max())


@pytest.mark.parametrize("shape", [(0, 3, 30, 30), (2, 0, 30, 30), (0, 3, 5, 6)])
def test_empty_batches_resample(shape):
    """No maps at all (an empty batch or no channels): an empty result of the right shape, as torch.matmul gives
    (a convolution over zero rows is refused)."""
    from afconvert.layers.quadratic import band_limited_square
    x = torch.randn(shape)
    assert ideal_resample(x, (45, 44)).shape == (*shape[:2], 45, 44)
    assert band_limited_square(x).shape == shape


def test_conv_products_gradient_twice():
    """The products' custom gradient (the same convolutions, transposed matrices), and its own gradient
    (create_graph), against float64 autograd of torch.matmul's products, on maps that take the swapped path."""
    x64 = _x(30, 33, seed=4).requires_grad_()
    x32 = x64.detach().float().requires_grad_()
    grads = []
    for x in (x64, x32):
        g, = torch.autograd.grad(ideal_resample(x, (45, 29)).square().sum(), x, create_graph=True)
        gg, = torch.autograd.grad(g.square().sum(), x)
        grads.append((g.detach().double(), gg.double()))
    for a, b in zip(*grads):
        assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
