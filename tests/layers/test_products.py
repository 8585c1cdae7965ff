"""afconvert.layers.products: every way the dense resampling products run computes the float64 FFT definition.

The paths (one Kronecker product on small maps, two products on medium ones, two last-dim products with a
transpose between on large ones, channels-last maps moved and back, grid maps computed in slices of a large
batch) are reached by the sizes and layouts chosen here, each under both CPU backends of the ``products``
setting; each is checked against the FFT form in float64, forward and backward, float32 to 1e-5 and float64 to
1e-10 of the largest value."""
import pytest
import torch

from afconvert.layers import products
from afconvert.layers.quadratic import band_limited_square
from afconvert.layers.spectral import ideal_lowpass, ideal_resample, resample_adjoint, resample_through
from afconvert.settings import using

# (batch, channels, size in, size out): small (Kronecker), medium, large (last-dim products), odd and non-square;
# the last a batch whose grid maps are computed in slices
CASES = [(2, 3, (5, 7), (9, 4)), (2, 3, (20, 13), (11, 24)), (1, 4, (31, 29), (45, 44)), (2, 2, (60, 57), (29, 30)),
         (6, 16, (48, 48), (72, 72))]
IDS = ["small", "medium", "large", "large-down", "sliced"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _maps(n, c, size, layout, dtype, seed=0):
    x = torch.randn(n, c, *size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if layout == "nhwc":
        return x.permute(0, 2, 3, 1).contiguous().to(dtype), (1, 2)
    return x.to(dtype), (2, 3)


def _close(a: torch.Tensor, ref: torch.Tensor, dtype) -> bool:
    return a.shape == ref.shape and float((a.double() - ref).abs().max()) <= TOL[dtype] * float(ref.abs().max())


def _fwd_bwd(fn, x, g):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    (grad,) = torch.autograd.grad(y, x, g.to(y.dtype))
    return y.detach(), grad


@pytest.mark.parametrize("backend", ["onednn", "matmul"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES[:4], ids=IDS[:4])
def test_resampling_products_equal_the_fft_definition(case, dtype, layout, backend):
    """ideal_resample, its adjoint and the low-pass in the dense form, forward and backward."""
    n, c, size, out = case
    x, dims = _maps(n, c, size, layout, dtype)
    x64 = x.double()
    gshape = list(x.shape)
    gshape[dims[0]], gshape[dims[1]] = out
    g = torch.randn(gshape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    adjoint_ref = (resample_adjoint(g, size, dims, "fft"), ideal_resample(x64, out, dims, "fft"))  # R^T g; its VJP
    maps = {"resample": (lambda v, m: ideal_resample(v, out, dims, m), x, g, None),
            "adjoint": (lambda v, m: resample_adjoint(v, size, dims, m), g.to(dtype), x64, adjoint_ref),
            "lowpass": (lambda v, m: ideal_lowpass(v, 0.5, dims, m), x, x64, None)}
    with using(products=backend):
        for name, (fn, arg, cot, ref) in maps.items():
            y, grad = _fwd_bwd(lambda v: fn(v, "matmul"), arg, cot)
            ref_y, ref_grad = ref or _fwd_bwd(lambda v: fn(v, "fft"), arg.double(), cot)
            assert y.dtype == dtype and y.is_contiguous(), name
            assert _close(y, ref_y, dtype) and _close(grad, ref_grad, dtype), name


def _square_reference(x, dims, grid, out):
    with using(resample="fft"):
        return ideal_resample(ideal_resample(x, grid, dims).square(), out, dims)


@pytest.mark.parametrize("backend", ["onednn", "matmul"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_through_a_grid_equals_the_fft_definition(case, dtype, layout, backend):
    """R(f(R_1 x_1, R_2 x_2)) with a square and a product between two resamplings (the pointwise activation's
    pattern, one input resampled and one through an adjoint), forward and backward, in every layout and size;
    the largest batch's grid maps (2.7 MB in float32, 5.4 MB in float64, over the 2 MB bound) are computed in slices."""
    n, c, size, out = case
    x, dims = _maps(n, c, size, layout, dtype)
    grid = tuple(s + (o + 1) // 2 for s, o in zip(size, out))
    gshape = list(x.shape)
    gshape[dims[0]], gshape[dims[1]] = out
    h = torch.randn(gshape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with using(products=backend, resample="matmul"):
        y, grad = _fwd_bwd(lambda v: resample_through([(v, False)], grid, torch.square, out, dims), x, h)
        with torch.no_grad():
            inplace = band_limited_square(x, dims, out=out)
            vjp = resample_through([(h.to(dtype), True), (x, False)], grid, torch.Tensor.mul_, size, dims,
                                   adjoint=True)
    ref_y, ref_grad = _fwd_bwd(lambda v: _square_reference(v, dims, grid, out), x.double(), h)
    with using(resample="fft"):
        ref_vjp = resample_adjoint(resample_adjoint(h, grid, dims) * ideal_resample(x.double(), grid, dims), size,
                                   dims)
    assert y.dtype == dtype and y.is_contiguous() and inplace.is_contiguous() and vjp.is_contiguous()
    assert _close(y, ref_y, dtype) and _close(inplace, ref_y, dtype)
    assert _close(grad, ref_grad, dtype) and _close(vjp, ref_vjp, dtype)


def test_the_matrix_cache_is_bounded_and_keeps_what_is_used():
    """Past its bound the cache drops the least recently used matrix: one used all along survives a flood of
    new keys, the first untouched one is built again."""
    built = []

    def build(tag):
        return lambda: built.append(tag) or torch.zeros(1)
    products.cached(("test", "kept"), build("kept"))
    products.cached(("test", "dropped"), build("dropped"))
    for i in range(products.CACHE_SIZE + 5):
        products.cached(("test", "kept"), build("kept"))
        products.cached(("test", i), build(i))
    products.cached(("test", "kept"), build("kept"))
    products.cached(("test", "dropped"), build("dropped"))
    assert built.count("kept") == 1 and built.count("dropped") == 2
    assert len(products._CACHE) <= products.CACHE_SIZE


def test_an_empty_batch_resamples_through_a_grid():
    x = torch.randn(0, 3, 30, 31)
    assert resample_through([(x, False)], (45, 46), torch.square, (30, 31), method="matmul").shape == x.shape
