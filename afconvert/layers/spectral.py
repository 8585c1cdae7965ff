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

Each resampling and low-pass has two forms of one linear map: the FFT form, and the dense form A_0 X A_1^T
with the 1-D matrices built here (``resample_matrix``, ``lowpass_matrix``) and multiplied by
``afconvert.layers.products``, which alone decides how.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from afconvert import settings
from afconvert.layers import products

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
    "resampling",
    "resample_through",
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


def resample_matrix(n_in: int, n_out: int, dtype: torch.dtype = torch.float64,
                    device: torch.device | None = None) -> torch.Tensor:
    """The (n_out, n_in) real matrix of 1-D ideal resampling: column j is unit impulse j resampled.

    The same operator as the FFT path (same crop / pad and Nyquist conventions), built from it in
    float64 once per (sizes, dtype, device) and cached: ``ideal_resample`` on a map is A_0 X A_1^T."""
    return products.cached(("resample", n_in, n_out, dtype, device),
                           lambda: _from_impulses(_resample_op(n_in, n_out), n_in, dtype, device))


def lowpass_matrix(n: int, cutoff: float, dtype: torch.dtype = torch.float64,
                   device: torch.device | None = None) -> torch.Tensor:
    """The (n, n) real matrix of the 1-D ideal low-pass of ``ideal_lowpass`` (bins |k| < cutoff n / 2)."""
    cutoff = float(cutoff)
    return products.cached(("lowpass", n, cutoff, dtype, device),
                           lambda: _from_impulses(_lowpass_op(n, cutoff), n, dtype, device))


def resampling(n_in: Sequence[int], n_out: Sequence[int], dtype: torch.dtype, device) -> products.Separable:
    """Ideal resampling of 2-D maps from ``n_in`` to ``n_out`` as the separable pair (A_0, A_1) of
    ``resample_matrix``; ``.T`` its adjoint."""
    n_in, n_out = tuple(int(v) for v in n_in), tuple(int(v) for v in n_out)
    return products.Separable(resample_matrix(n_in[0], n_out[0], dtype, device),
                              resample_matrix(n_in[1], n_out[1], dtype, device),
                              ("resample", n_in, n_out, dtype, device))


METHODS = settings.CHOICES["resample"]


def _dense_form(x: torch.Tensor, method: str | None, sizes: Sequence[int]) -> bool:
    """Whether a resampling of x with ``method`` (None: the ``resample`` setting) over maps of ``sizes`` (in and
    out) takes the dense form; "auto" asks ``products.dense_preferred``."""
    method = settings.resample_method() if method is None else method
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got '{method}'")
    if method != "auto":
        return method == "matmul"
    return products.dense_preferred(_real_dtype(x), x.device, sizes)


def ideal_resample(x: torch.Tensor, size: Sequence[int], dims: Dims = (-2, -1), method: str | None = None
                   ) -> torch.Tensor:
    """Ideal band-limited resampling of a periodic signal to ``size`` (per dim).

    y = irfft2(R(rfft2(x))) * (n0 n1) / (N0 N1), where R crops (keeping |k| < n/2, zeroing the
    edge) or zero-pads (splitting the Nyquist bin) the spectrum. Shrinking is an ideal low-pass
    followed by sub-sampling on a grid of spacing N/n (any N, not only multiples of n); growing
    is ideal interpolation. Shapes: x (..., N0, ..., N1, ...) -> (..., n0, ..., n1, ...).

    ``method``: ``"fft"``; ``"matmul"``, the same linear map as two real matrix products
    A_0 X A_1^T (``resample_matrix``: no complex numbers, fast on small maps, exportable); ``"auto"``
    (the dense form up to ``products.DENSE_MAX_SIZE``); None: the ``resample`` setting
    (``afconvert.settings``, "auto" unless set).
    """
    d0, d1 = _norm_dims(x, dims)
    n_in, n_out = (x.shape[d0], x.shape[d1]), tuple([int(s) for s in size])
    if min(n_out) < 1:
        raise ValueError(f"resample size must be positive, got {n_out}")
    matmul = _dense_form(x, method, n_in + n_out)
    if n_in == n_out:
        return x
    dtype, rdt = x.dtype, _real_dtype(x)
    if matmul:
        return as_dtype(products.apply(x, resampling(n_in, n_out, rdt, x.device), (d0, d1)), dtype)
    spec = torch.fft.rfftn(as_dtype(x, rdt), dim=(d0, d1))
    spec = _crop_or_pad_full(spec, d0, n_in[0], n_out[0])
    spec = _crop_or_pad_half(spec, d1, n_in[1], n_out[1])
    y = torch.fft.irfftn(spec, s=n_out, dim=(d0, d1))
    return as_dtype(y * (n_out[0] * n_out[1] / (n_in[0] * n_in[1])), dtype)


def resample_adjoint(g: torch.Tensor, size: Sequence[int], dims: Dims = (-2, -1), method: str | None = None
                     ) -> torch.Tensor:
    """R^T g for R = ``ideal_resample`` from ``size`` to g's size along ``dims``: the gradient of that resampling
    (g (..., n0, ..., n1, ...) -> (..., size0, ..., size1, ...)). In the form ``ideal_resample`` would take for
    the same map: the transposed matrices, or, for the FFT form, its vector-Jacobian product."""
    d0, d1 = _norm_dims(g, dims)
    n_out, n_in = (g.shape[d0], g.shape[d1]), tuple(int(s) for s in size)
    if n_in == n_out:
        return g
    rdt = _real_dtype(g)
    if _dense_form(g, method, n_in + n_out):
        return as_dtype(products.apply(g, resampling(n_in, n_out, rdt, g.device).T, (d0, d1)), g.dtype)
    shape = list(g.shape)
    shape[d0], shape[d1] = n_in
    with torch.enable_grad():
        probe = torch.zeros(shape, dtype=rdt, device=g.device, requires_grad=True)
        out = ideal_resample(probe, n_out, (d0, d1), "fft")
        return as_dtype(torch.autograd.grad(out, probe, as_dtype(g, rdt))[0], g.dtype)


def resample_through(inputs: Sequence[tuple[torch.Tensor, bool]], grid: Sequence[int], fn, size: Sequence[int],
                     dims: Dims = (-2, -1), method: str | None = None, adjoint: bool = False) -> torch.Tensor:
    """R(fn(R_1 x_1, ..., R_k x_k)) over ``dims``: each x_i taken to ``grid`` by ideal resampling (R_i, or, with
    its flag set, the adjoint of the resampling from ``grid`` to x_i's size), combined pointwise by ``fn`` (which
    may work in place on its first argument), the result taken to ``size`` (R, or with ``adjoint`` the adjoint of
    the resampling from ``size`` to ``grid``). The form a pointwise activation between two resamplings takes,
    with the grid maps never all in memory at once in the dense form (``products.through``)."""
    x0 = inputs[0][0]
    d0, d1 = _norm_dims(x0, dims)
    grid, size = tuple(int(v) for v in grid), tuple(int(v) for v in size)
    shapes = [(x.shape[d0], x.shape[d1]) for x, _ in inputs]
    if not _dense_form(x0, method, sum(shapes, grid + size)):
        maps = [(resample_adjoint if adj else ideal_resample)(x, grid, (d0, d1), method) for x, adj in inputs]
        z = fn(*[v.clone() if v is x else v for v, (x, _) in zip(maps, inputs)])
        return resample_adjoint(z, size, (d0, d1), method) if adjoint else ideal_resample(z, size, (d0, d1), method)
    rdt, dev = _real_dtype(x0), x0.device

    def op(n_from, n_to, adj):
        return resampling(n_to, n_from, rdt, dev).T if adj else resampling(n_from, n_to, rdt, dev)
    ops = [(x, op(n, grid, adj)) for (x, adj), n in zip(inputs, shapes)]
    return as_dtype(products.through(ops, fn, op(grid, size, adjoint), (d0, d1)), x0.dtype)


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
    if _dense_form(x, method, (x.shape[d0], x.shape[d1])):
        rdt, size, cutoff = _real_dtype(x), (x.shape[d0], x.shape[d1]), float(cutoff)
        op = products.Separable(lowpass_matrix(size[0], cutoff, rdt, x.device),
                                lowpass_matrix(size[1], cutoff, rdt, x.device),
                                ("lowpass", size, cutoff, rdt, x.device))
        return as_dtype(products.apply(x, op, (d0, d1)), x.dtype)

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
