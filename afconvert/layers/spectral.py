"""Ideal (rectangular, FFT-domain) resampling and band-limited shifts.

Every function works on any two dims of a tensor (``dims``, default the last two), on any
sizes (odd, non-square), and builds its masks per call from the sizes, so nothing here is
tied to the first shape it sees and nothing enters a ``state_dict``.

Conventions (they match the official AFC code, ``models/ideal_lpf.py``, where that code is
defined): a periodic signal of length N has bins k = -floor(N/2) .. ceil(N/2) - 1; for even N
the bin k = N/2 is the *Nyquist bin*, which a real signal shares between +N/2 and -N/2.

* Low-pass to a target length n keeps |k| < n/2 and **zeroes** the edge bin |k| = n/2 (even
  n): the output has an empty Nyquist bin, so its fractional shifts are unique.
* Up-sampling embeds the spectrum in a longer one and **splits** an even input's Nyquist bin
  in half between +N/2 and -N/2 (the symmetric, real interpolant).
* ``fractional_shift`` samples that same symmetric interpolant at n - d: bins |k| < N/2 get
  the phase exp(-2 pi i k d / N), the Nyquist bin is multiplied by cos(pi d). It is exact and
  composes (shift(shift(x, a), b) == shift(x, a + b)) for signals whose Nyquist bins are zero;
  for integer d it equals ``torch.roll``.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ideal_resample",
    "resample_adjoint",
    "ideal_downsample",
    "ideal_upsample",
    "ideal_lowpass",
    "fractional_shift",
    "zero_nyquist",
    "promote_half",
    "as_dtype",
    "resample_matrix",
    "lowpass_matrix",
    "resample_method",
]

Dims = Sequence[int]


def _norm_dims(x: torch.Tensor, dims: Dims) -> tuple[int, int]:
    if len(dims) != 2:
        raise ValueError(f"expected two spatial dims, got {tuple(dims)}")
    d0, d1 = [d % x.ndim for d in dims]
    if d0 == d1:
        raise ValueError(f"spatial dims must differ, got {tuple(dims)}")
    return d0, d1


def _real_dtype(x: torch.Tensor) -> torch.dtype:
    if not x.is_floating_point():
        raise TypeError(f"spectral ops need a floating point tensor, got {x.dtype}")
    # half precision FFTs only exist for powers of two on CUDA: compute in float32
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def promote_half(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is float16 / bfloat16, else as it is.

    For the layers whose maths needs range under mixed precision (autocast): FFTs (half precision
    only for powers of two on CUDA), polynomials and fourth powers (an L4 scale of a value above 16
    overflows float16), variances. They compute in float32 and return the input's dtype."""
    return as_dtype(x, _real_dtype(x))


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in ``dtype``, x itself when it already is (a no-op ``.to`` still costs a node in a traced graph)."""
    return x if x.dtype == dtype else x.to(dtype)


def _crop_or_pad_full(spec: torch.Tensor, dim: int, n_in: int, n_out: int) -> torch.Tensor:
    """Re-size a full (two-sided) spectrum along ``dim`` from n_in to n_out bins.

    Keeps |k| < min(n_in, n_out) / 2; an edge bin |k| = n/2 of the smaller size is zeroed when
    cropping (n = n_out even) and split in half when padding (n = n_in even)."""
    if n_out == n_in:
        return spec
    n = min(n_in, n_out)
    pos = (n + 1) // 2          # bins 0 .. pos-1
    neg = n // 2                # bins -neg .. -1 (includes the edge bin -n/2 when n is even)
    head = spec.narrow(dim, 0, pos)
    tail = spec.narrow(dim, n_in - neg, neg) if neg else spec.narrow(dim, 0, 0)
    if n_out < n_in:
        if n % 2 == 0 and neg:  # edge bin -n/2 of the output: zero it (low-pass convention)
            tail = torch.cat([torch.zeros_like(tail.narrow(dim, 0, 1)), tail.narrow(dim, 1, neg - 1)], dim)
        return torch.cat([head, tail], dim)
    # padding: split the input's Nyquist bin (-n/2) between +n/2 and -n/2
    gap = n_out - n
    if n % 2 == 0 and neg:
        nyq = tail.narrow(dim, 0, 1) * 0.5
        zeros = torch.zeros_like(head.narrow(dim, 0, 1)).expand(
            *[gap - 1 if i == dim else s for i, s in enumerate(head.shape)])
        return torch.cat([head, nyq, zeros, nyq, tail.narrow(dim, 1, neg - 1)], dim)
    zeros = torch.zeros_like(head.narrow(dim, 0, 1)).expand(
        *[gap if i == dim else s for i, s in enumerate(head.shape)])
    return torch.cat([head, zeros, tail], dim)


def _crop_or_pad_half(spec: torch.Tensor, dim: int, n_in: int, n_out: int) -> torch.Tensor:
    """The same for the one-sided (rfft) dim, which holds bins 0 .. n//2."""
    if n_out == n_in:
        return spec
    n = min(n_in, n_out)
    if n_out < n_in:
        out = spec.narrow(dim, 0, n_out // 2 + 1)
        if n_out % 2 == 0:  # output Nyquist bin: zero it
            out = torch.cat([out.narrow(dim, 0, n_out // 2), torch.zeros_like(out.narrow(dim, 0, 1))], dim)
        return out
    keep = spec
    if n % 2 == 0:  # input Nyquist bin: half of it here, irfft supplies the mirrored half
        keep = torch.cat([spec.narrow(dim, 0, n // 2), spec.narrow(dim, n // 2, 1) * 0.5], dim)
    gap = n_out // 2 + 1 - keep.shape[dim]
    zeros = torch.zeros_like(keep.narrow(dim, 0, 1)).expand(
        *[gap if i == dim else s for i, s in enumerate(keep.shape)])
    return torch.cat([keep, zeros], dim)


def _from_impulses(op_1d, n_in: int, dtype, device) -> torch.Tensor:
    """The real matrix of a 1-D linear map, from its float64 FFT form applied to the n_in unit impulses."""
    mat = op_1d(torch.eye(n_in, dtype=torch.float64))
    return mat.to(dtype=dtype, device=device)


def _resample_op(n_in: int, n_out: int):
    def op(eye):
        spec = _crop_or_pad_half(torch.fft.rfft(eye, dim=0), 0, n_in, n_out)
        return torch.fft.irfft(spec, n=n_out, dim=0) * (n_out / n_in)
    return op


def _lowpass_op(n: int, cutoff: float):
    def op(eye):
        mask = _lowpass_mask(n, cutoff, True, None, torch.float64)
        return torch.fft.irfft(torch.fft.rfft(eye, dim=0) * mask[:, None], n=n, dim=0)
    return op


# Built matrices by (kind, sizes, dtype, device). A plain dict, not functools.lru_cache: torch.compile reads a
# dict entry as a constant tensor, but traces through lru_cache into the FFTs that build the matrix.
_MATRICES: dict = {}


def _cached(key: tuple, build) -> torch.Tensor:
    mat = _MATRICES.get(key)
    if mat is None:
        if len(_MATRICES) >= 1024:
            _MATRICES.clear()
        mat = _MATRICES[key] = build()
    return mat


def _matrix(key: tuple, op, n_in: int, dtype: torch.dtype, device) -> torch.Tensor:
    return _cached(key, lambda: _from_impulses(op, n_in, dtype, device))


def resample_matrix(n_in: int, n_out: int, dtype: torch.dtype = torch.float64,
                    device: torch.device | None = None) -> torch.Tensor:
    """The (n_out, n_in) real matrix of 1-D ideal resampling: column j is unit impulse j resampled.

    The same operator as the FFT path (same crop / pad and Nyquist conventions), built from it in
    float64 once per (sizes, dtype, device) and cached: ``ideal_resample`` on a map is A_0 X A_1^T."""
    return _matrix(("resample", n_in, n_out, dtype, device), _resample_op(n_in, n_out), n_in, dtype, device)


def lowpass_matrix(n: int, cutoff: float, dtype: torch.dtype = torch.float64,
                   device: torch.device | None = None) -> torch.Tensor:
    """The (n, n) real matrix of the 1-D ideal low-pass of ``ideal_lowpass`` (bins |k| < cutoff n / 2)."""
    cutoff = float(cutoff)
    return _matrix(("lowpass", n, cutoff, dtype, device), _lowpass_op(n, cutoff), n, dtype, device)


# How ideal_resample / ideal_lowpass compute when no method is passed: "auto", "fft" or "matmul".
_METHOD = ["auto"]
METHODS = ("auto", "fft", "matmul")
# In "auto", float32 and float64 maps up to this size (in and out, each dim) take the dense matmul form, larger
# ones the FFT form; float64 takes it too, so the certificates check the form a float32 user runs. CUDA keeps the
# FFT form for float32 when its products may use TF32 (torch.set_float32_matmul_precision below "highest": 10-bit
# mantissas). Timings behind the threshold: see docs/performance.md.
MATMUL_MAX_SIZE = 512
# Maps on the last two dims with at most this many samples (in and out) take one product with the Kronecker
# matrix A_0 (x) A_1 (vec Y = (A_0 (x) A_1) vec X) instead of two: more multiply-adds, but one large GEMM
# instead of a batched product of tiny matrices (2.5-8x faster on 2-11 px maps of 128 x 64-256 channels, 2 CPU
# threads; slower from about 14 px up).
KRON_MAX_SAMPLES = 128


@contextlib.contextmanager
def resample_method(method: str) -> Iterator[None]:
    """Within the block, resampling and low-pass filters with no explicit ``method`` use ``method``.

    ``"matmul"`` makes a converted model free of complex numbers (what ONNX export needs);
    ``"fft"`` the reference form; ``"auto"`` picks per call (see ``MATMUL_MAX_SIZE``)."""
    _check_method(method)
    old, _METHOD[0] = _METHOD[0], method
    try:
        yield
    finally:
        _METHOD[0] = old


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got '{method}'")


def _use_matmul(x: torch.Tensor, method: str | None, sizes: Sequence[int]) -> bool:
    method = _METHOD[0] if method is None else method
    _check_method(method)
    if method != "auto":
        return method == "matmul"
    dtype = _real_dtype(x)
    if dtype not in (torch.float32, torch.float64) or max(sizes) > MATMUL_MAX_SIZE:
        return False
    return dtype is torch.float64 or x.device.type != "cuda" or torch.get_float32_matmul_precision() == "highest"


def _matmul_dim(x: torch.Tensor, a: torch.Tensor, d: int, n_out: int) -> torch.Tensor:
    """A (n_out, n_in) applied along dim d of x: (..., n_in, ...) -> (..., n_out, ...), as one (batched) product
    over a view of x: (P, n_in, Q) for the dims before and after d (no copy of a contiguous x)."""
    shape = x.shape
    p, q = math.prod(shape[:d]), math.prod(shape[d + 1:])
    if q == 1:
        y = torch.matmul(x.reshape(p, shape[d]), a.T)
    else:
        y = torch.matmul(a, x.reshape(p, shape[d], q))
    return y.view(*shape[:d], n_out, *shape[d + 1:])


# On a CPU, float32 products along the last dim run as 1 x 1 convolutions: oneDNN picks its kernels by the CPU's
# instruction set, where MKL's GEMM (torch.matmul) takes its AVX2 kernels on non-Intel CPUs. With a transpose
# between the two products (instead of a batched product of small matrices), 1.3-1.9x faster resampling on an
# AMD EPYC with AVX-512, 1.1-1.3x with oneDNN held to AVX2 (docs/performance.md). False: torch.matmul throughout
# (the environment's AFCONVERT_PRODUCTS=matmul).
PRODUCTS_ENV = "AFCONVERT_PRODUCTS"


def _products_from_env() -> bool:
    value = os.environ.get(PRODUCTS_ENV, "onednn").strip().lower()
    if value not in ("onednn", "matmul"):
        raise ValueError(f"{PRODUCTS_ENV}={value!r}: unknown; fix: onednn (the default on a CPU) or matmul")
    return value == "onednn" and torch.backends.mkldnn.is_available()


CONV_PRODUCTS = [_products_from_env()]
# Maps of at least this many samples per dim (in and out) take both products along the last dim, with a transpose
# between; smaller ones keep the batched product for the other dim, which is faster there (16 -> 24 px: 2.1
# against 4.6 ms for 8 x 1024 maps; 28 -> 42 px: 15.2 against 14.2 ms).
SWAP_MIN_SIZE = 28


def _conv_products(x: torch.Tensor) -> bool:
    return CONV_PRODUCTS[0] and x.device.type == "cpu" and _real_dtype(x) == torch.float32 and x.numel() > 0


def _conv_product(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(1, -1, 1, x.shape[-1]).permute(0, 3, 1, 2)         # (1, n_in, P, 1), channels-last
    y = F.conv2d(rows, a.reshape(*a.shape, 1, 1))
    return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], a.shape[0])


class _ConvProduct(torch.autograd.Function):
    """X A^T as ``_conv_product``, its gradient G A as another (a convolution's own backward is slower here)."""

    @staticmethod
    def forward(ctx, x, a):
        ctx.save_for_backward(a)
        return _conv_product(x, a)

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return _conv_product(g, a.T.contiguous()), None


def _last_dim_product(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """X A^T for X (..., n_in), A (n_out, n_in) a constant: -> (..., n_out); a 1 x 1 convolution over X's rows
    (channels-last, no copy of a contiguous X) where ``_conv_products``, else one matrix product."""
    if not _conv_products(x):
        return torch.matmul(x, a.T)
    if torch.is_grad_enabled() and x.requires_grad:
        return _ConvProduct.apply(x, a)
    return _conv_product(x, a)


def _swapped_products(x: torch.Tensor, a_last: torch.Tensor, a_other: torch.Tensor) -> torch.Tensor:
    """(A_other X A_last^T)^T for maps X (..., R, C) on the last two dims: both as products along the last dim
    (``_last_dim_product``) with one transpose between them; the result is stored transposed: (..., c, r)."""
    return _last_dim_product(_swap(_last_dim_product(x, a_last)), a_other)


def _separable_matmul(x: torch.Tensor, a0: torch.Tensor, a1: torch.Tensor, d0: int, d1: int,
                      n_out: Sequence[int], key: tuple, transposed: tuple[bool, bool] = (False, False)
                      ) -> torch.Tensor:
    """A_0 X A_1^T over dims (d0, d1), in the matrices' dtype and outside autocast (no bf16 / fp16 products).
    ``key`` names the pair (A_0, A_1) (with dtype and device) for the cached Kronecker matrix. ``transposed``
    (in, out): X, and the result, stored with their two dims swapped (d0, d1 the last two dims).

    Small maps on the last two dims (``KRON_MAX_SAMPLES``): X flattened to (..., N_0 N_1) times
    (A_0 (x) A_1)^T. Maps on the last two dims of at least ``SWAP_MIN_SIZE`` where ``_conv_products``:
    ``_swapped_products``, which flips the layout (a caller that resamples twice keeps the map between transposed
    and saves two copies; elsewhere ``transposed`` costs a copy each way). Otherwise two products (the one along
    the last dim by ``_last_dim_product``); order: the dim that shrinks most goes first (less work for the second
    product); at equal ratios the last dim runs on the smaller map: first when growing, last when shrinking."""
    if torch.is_autocast_enabled(x.device.type):   # enter the context only when needed (graph capture splits at it)
        with torch.autocast(x.device.type, enabled=False):
            return _separable_matmul(x, a0, a1, d0, d1, n_out, key, transposed)
    x, n_in = as_dtype(x, _real_dtype(x)), _sizes(x, d0, d1, transposed)
    last_two = (d0, d1) == (x.ndim - 2, x.ndim - 1)
    if last_two and _swapped(x, n_in, n_out):
        t_in, t_out = transposed
        y = _swapped_products(x, a0, a1) if t_in else _swapped_products(x, a1, a0)
        return y if t_out != t_in else _swap(y)
    if any(transposed):
        return _in_plain_layout(lambda v: _separable_matmul(v, a0, a1, d0, d1, n_out, key), x, transposed)
    if last_two and _kron(n_in, n_out):
        kron = _cached(("kron", *key), lambda: (a0[:, None, :, None] * a1[None, :, None, :]).reshape(
            n_out[0] * n_out[1], n_in[0] * n_in[1]))
        y = _last_dim_product(x.reshape(-1, n_in[0] * n_in[1]), kron)
        return y.reshape(*x.shape[:-2], *n_out)
    r0, r1 = n_out[0] / n_in[0], n_out[1] / n_in[1]
    a1_first = r1 < r0 if r0 != r1 else (d1 > d0 if r0 > 1 else d1 < d0)
    steps = ((a1, d1, n_out[1]), (a0, d0, n_out[0])) if a1_first else ((a0, d0, n_out[0]), (a1, d1, n_out[1]))
    y = x
    for a, d, n in steps:
        y = _last_dim_product(y, a) if d == y.ndim - 1 else _matmul_dim(y, a, d, n)
    return y


def _kron(n_in: Sequence[int], n_out: Sequence[int]) -> bool:
    return max(n_in[0] * n_in[1], n_out[0] * n_out[1]) <= KRON_MAX_SAMPLES


def _swapped(x: torch.Tensor, n_in: Sequence[int], n_out: Sequence[int]) -> bool:
    """Whether maps of x on its last two dims resample with ``_swapped_products``."""
    return _conv_products(x) and not _kron(n_in, n_out) and min(*n_in, *n_out) >= SWAP_MIN_SIZE


def keeps_transposed(x: torch.Tensor, size: Sequence[int], dims: Dims = (-2, -1), method: str | None = None
                     ) -> bool:
    """Whether ``ideal_resample(x, size, dims, method)`` runs as ``_swapped_products``: a caller that resamples
    twice (up, a pointwise op, down) then passes ``transposed`` and keeps the map between in the swapped layout,
    two copies fewer."""
    d0, d1 = _norm_dims(x, dims)
    n_in, n_out = (x.shape[d0], x.shape[d1]), tuple(int(s) for s in size)
    return (d0, d1) == (x.ndim - 2, x.ndim - 1) and _use_matmul(x, method, n_in + n_out) and _swapped(x, n_in, n_out)


def _sizes(x: torch.Tensor, d0: int, d1: int, transposed: tuple[bool, bool]) -> tuple[int, int]:
    """The map's sizes along (d0, d1), read swapped when ``transposed[0]``; a transposed layout (in or out) needs
    (d0, d1) to be the last two dims."""
    if any(transposed) and (d0, d1) != (x.ndim - 2, x.ndim - 1):
        raise ValueError(f"a transposed layout needs the maps on the last two dims, got dims {(d0, d1)}")
    return (x.shape[d1], x.shape[d0]) if transposed[0] else (x.shape[d0], x.shape[d1])


def _in_plain_layout(fn, x: torch.Tensor, transposed: tuple[bool, bool]) -> torch.Tensor:
    """fn (a map in the plain layout to one) on x stored as ``transposed`` says: a copy each way where swapped."""
    y = fn(_swap(x) if transposed[0] else x)
    return _swap(y) if transposed[1] else y


def _swap(x: torch.Tensor) -> torch.Tensor:
    """The last two dims swapped, stored so (a copy)."""
    return x.transpose(-1, -2).contiguous()


def ideal_resample(x: torch.Tensor, size: Sequence[int], dims: Dims = (-2, -1), method: str | None = None,
                   transposed: tuple[bool, bool] = (False, False)) -> torch.Tensor:
    """Ideal band-limited resampling of a periodic signal to ``size`` (per dim).

    y = irfft2(R(rfft2(x))) * (n0 n1) / (N0 N1), where R crops (keeping |k| < n/2, zeroing the
    edge) or zero-pads (splitting the Nyquist bin) the spectrum. Shrinking is an ideal low-pass
    followed by sub-sampling on a grid of spacing N/n (any N, not only multiples of n); growing
    is ideal interpolation. Shapes: x (..., N0, ..., N1, ...) -> (..., n0, ..., n1, ...).

    ``method``: ``"fft"``; ``"matmul"``, the same linear map as two real matrix products
    A_0 X A_1^T (``resample_matrix``: no complex numbers, fast on small maps, exportable); ``"auto"``
    (see ``MATMUL_MAX_SIZE``); None: the one set by ``resample_method`` ("auto" unless set).
    ``transposed`` (in, out): x, and the result, stored with the two dims swapped (``keeps_transposed``; dims the
    last two): x (..., N1, N0) for sizes (N0, N1).
    """
    d0, d1 = _norm_dims(x, dims)
    n_in, n_out = _sizes(x, d0, d1, transposed), tuple([int(s) for s in size])
    if min(n_out) < 1:
        raise ValueError(f"resample size must be positive, got {n_out}")
    matmul = _use_matmul(x, method, n_in + n_out)
    if n_in == n_out:
        return x if transposed[0] == transposed[1] else _swap(x)
    dtype, rdt = x.dtype, _real_dtype(x)
    if matmul:
        a0 = resample_matrix(n_in[0], n_out[0], rdt, x.device)
        a1 = resample_matrix(n_in[1], n_out[1], rdt, x.device)
        return as_dtype(_separable_matmul(x, a0, a1, d0, d1, n_out, ("resample", n_in, n_out, rdt, x.device),
                                          transposed), dtype)
    if any(transposed):
        return _in_plain_layout(lambda v: ideal_resample(v, n_out, (d0, d1), method), x, transposed)
    spec = torch.fft.rfftn(as_dtype(x, rdt), dim=(d0, d1))
    spec = _crop_or_pad_full(spec, d0, n_in[0], n_out[0])
    spec = _crop_or_pad_half(spec, d1, n_in[1], n_out[1])
    y = torch.fft.irfftn(spec, s=n_out, dim=(d0, d1))
    return as_dtype(y * (n_out[0] * n_out[1] / (n_in[0] * n_in[1])), dtype)


def resample_adjoint(g: torch.Tensor, size: Sequence[int], dims: Dims = (-2, -1), method: str | None = None,
                     transposed: tuple[bool, bool] = (False, False)) -> torch.Tensor:
    """R^T g for R = ``ideal_resample`` from ``size`` to g's size along ``dims``: the gradient of that resampling
    (g (..., n0, ..., n1, ...) -> (..., size0, ..., size1, ...)). In the form ``ideal_resample`` would take for
    the same map: the transposed matrices, or, for the FFT form, its vector-Jacobian product. ``transposed`` as
    there."""
    d0, d1 = _norm_dims(g, dims)
    n_out, n_in = _sizes(g, d0, d1, transposed), tuple(int(s) for s in size)
    if n_in == n_out:
        return g if transposed[0] == transposed[1] else _swap(g)
    rdt = _real_dtype(g)
    if _use_matmul(g, method, n_in + n_out):
        a0 = resample_matrix(n_in[0], n_out[0], rdt, g.device)
        a1 = resample_matrix(n_in[1], n_out[1], rdt, g.device)
        return as_dtype(_separable_matmul(g, a0.T, a1.T, d0, d1, n_in, ("adjoint", n_in, n_out, rdt, g.device),
                                          transposed), g.dtype)
    if any(transposed):
        return _in_plain_layout(lambda v: resample_adjoint(v, n_in, (d0, d1), method), g, transposed)
    shape = list(g.shape)
    shape[d0], shape[d1] = n_in
    with torch.enable_grad():
        probe = torch.zeros(shape, dtype=rdt, device=g.device, requires_grad=True)
        out = ideal_resample(probe, n_out, (d0, d1), "fft")
        return as_dtype(torch.autograd.grad(out, probe, as_dtype(g, rdt))[0], g.dtype)


def ideal_downsample(x: torch.Tensor, factor: int | Sequence[int], dims: Dims = (-2, -1),
                     size: Sequence[int] | None = None) -> torch.Tensor:
    """Ideal low-pass (cutoff 1/factor) and sub-sampling by ``factor``.

    The output size is ``size`` when given (a strided layer's own output size), else
    ceil(N / factor). For N divisible by the factor this is exactly low-pass + ``x[::f, ::f]``.
    """
    d0, d1 = _norm_dims(x, dims)
    f = (factor, factor) if isinstance(factor, int) else tuple(factor)
    if size is None:
        size = (math.ceil(x.shape[d0] / f[0]), math.ceil(x.shape[d1] / f[1]))
    return ideal_resample(x, size, (d0, d1))


def ideal_upsample(x: torch.Tensor, factor: int | Sequence[int] = 2, dims: Dims = (-2, -1)) -> torch.Tensor:
    """Ideal (sinc) interpolation by an integer factor: (N0, N1) -> (f N0, f N1)."""
    d0, d1 = _norm_dims(x, dims)
    f = (factor, factor) if isinstance(factor, int) else tuple(factor)
    return ideal_resample(x, (x.shape[d0] * f[0], x.shape[d1] * f[1]), (d0, d1))


def _separable_filter(x: torch.Tensor, dims: Dims, factor_1d) -> torch.Tensor:
    """irfft2(rfft2(x) * f0[k0] * f1[k1]): multiply each 2D bin by a product of per-dim factors.

    ``factor_1d(axis, n, onesided, device, dtype)`` gives the factors of one dim (axis 0 or 1),
    over its full spectrum (n bins) or, for the rfft dim, its one-sided half (n // 2 + 1 bins)."""
    d0, d1 = _norm_dims(x, dims)
    rdt = _real_dtype(x)
    spec = torch.fft.rfftn(as_dtype(x, rdt), dim=(d0, d1))
    shape = [1] * x.ndim
    shape[d0] = x.shape[d0]
    factor = factor_1d(0, x.shape[d0], False, x.device, rdt).reshape(shape)
    shape[d0], shape[d1] = 1, x.shape[d1] // 2 + 1
    factor = factor * factor_1d(1, x.shape[d1], True, x.device, rdt).reshape(shape)
    y = torch.fft.irfftn(spec * factor, s=(x.shape[d0], x.shape[d1]), dim=(d0, d1))
    return as_dtype(y, x.dtype)


def _bins(n: int, onesided: bool, device, dtype) -> torch.Tensor:
    """Signed integer frequencies of the bins of a length-n signal (one-sided: 0 .. n // 2)."""
    k = torch.fft.rfftfreq(n, device=device, dtype=dtype) if onesided else \
        torch.fft.fftfreq(n, device=device, dtype=dtype)
    return torch.round(k * n)


def ideal_lowpass(x: torch.Tensor, cutoff: float, dims: Dims = (-2, -1), method: str | None = None) -> torch.Tensor:
    """Ideal low-pass at the same rate: keep bins |k| < cutoff * N / 2 in each dim.

    ``cutoff`` is a fraction of the Nyquist band (1 keeps everything but the Nyquist bin).
    The official code's ``LPF_RFFT(cutoff)`` keeps |k| <= floor(cutoff N / 2) and zeroes that
    bin when N % 4 == 0; both agree whenever cutoff * N / 2 is an integer or N % 4 != 0.
    ``method`` as in ``ideal_resample`` (the matmul form: ``lowpass_matrix`` on each dim).
    """
    d0, d1 = _norm_dims(x, dims)
    if _use_matmul(x, method, (x.shape[d0], x.shape[d1])):
        rdt = _real_dtype(x)
        a0 = lowpass_matrix(x.shape[d0], float(cutoff), rdt, x.device)
        a1 = lowpass_matrix(x.shape[d1], float(cutoff), rdt, x.device)
        size = (x.shape[d0], x.shape[d1])
        key = ("lowpass", size, float(cutoff), rdt, x.device)
        return as_dtype(_separable_matmul(x, a0, a1, d0, d1, size, key), x.dtype)

    return _separable_filter(x, dims, lambda axis, n, onesided, device, dtype:
                             _lowpass_mask(n, cutoff, onesided, device, dtype))


def _lowpass_mask(n: int, cutoff: float, onesided: bool, device, dtype) -> torch.Tensor:
    """1 on the bins |k| < cutoff n / 2 of a length-n signal, 0 elsewhere (one-sided: bins 0 .. n // 2)."""
    return (_bins(n, onesided, device, dtype).abs() < cutoff * n / 2).to(dtype)


def zero_nyquist(x: torch.Tensor, dims: Dims = (-2, -1), method: str | None = None) -> torch.Tensor:
    """Remove the Nyquist bins (even sizes): the one part of a signal with no unique sub-pixel shift."""
    return ideal_lowpass(x, 1.0, dims, method)


def fractional_shift(x: torch.Tensor, dy: float, dx: float, dims: Dims = (-2, -1)) -> torch.Tensor:
    """Band-limited circular shift by any real (dy, dx): y(n) = x_interp(n - d).

    For integer shifts it equals ``torch.roll(x, (dy, dx), dims)``. See the module docstring
    for the Nyquist-bin convention. Shapes are kept.
    """
    d0, d1 = _norm_dims(x, dims)
    shift = (float(dy), float(dx))
    if all(s == int(s) for s in shift):
        return torch.roll(x, (int(shift[0]), int(shift[1])), (d0, d1))

    def phase(axis, n, onesided, device, dtype):
        d = shift[axis]
        k = _bins(n, onesided, device, dtype)
        out = torch.polar(torch.ones_like(k), -2 * math.pi * k * d / n)
        if n % 2 == 0:  # Nyquist bin: symmetric convention, the real factor cos(pi d)
            out[n // 2] = math.cos(math.pi * d)
        return out
    return _separable_filter(x, (d0, d1), phase)
