"""The alias-free degree-2 activation in closed form, with a gradient that keeps no up-sampled map.

With U the ideal 2x up-sampling, D the ideal low-pass back to the input's N and P the removal of the
Nyquist bins, an alias-free quadratic q(u) = a0 + a1 u + a2 u^2 is

    D(q(U x)) = a0 + a1 P x + a2 B(x),       B(x) = D((U x)^2)  (the band-limited square):

D(U x) = P x, so only the square needs another rate. ``band_limited_square`` computes B on a grid of
M = ceil(3N / 2) per dim (the 3/2 rule of spectral methods, Orszag 1971): x's square reaches |k| < N there
and its aliases fold back to |k| >= N/2, above the band that D keeps, so B equals the 2x form exactly at
(9/4 instead of 4) N^2 samples. The scale-equivariant form (``normalize``) divides by the **in-band
scale** s = (mean B^2 + eps^4)^(1/4), taken over the same dims as the L4 scale:

    y = a0 s + a1 P x + (a2 / s) B(x).

s is exactly shift-invariant (B commutes with every circular shift, fractional ones included, and its
energy does not change) and bounds the quadratic term as the L4 scale does: (a2 / s) B has energy a2^2 s^2.

**Down-sampling fused** (``out``, a smaller size n): when an ideal down-sampling R_n follows the layer,
R_n(y) = a0 s + a1 R_n x + (a2 / s) R_n B(x), and R_n B(x) = R_n((R_M x)^2) on the smaller grid
M = N + ceil(n / 2) per dim (the square's aliases there land at |k| >= M - N >= n / 2, outside the band R_n
keeps): for n = N / 2 a 5/4 grid instead of 3/2 plus a full-size B and a second resampling. Its scale is the
energy of the band it outputs, s = (mean over the n grid of (R_n B)^2)^(1/4): as shift-invariant, and the same
bound (the quadratic term has energy a2^2 s^2).

``BandLimitedQuadratic`` is its autograd form: it saves x and B (two maps of x's size) and recomputes the
M-grid map in backward, instead of the several up-sampled maps that autograd would keep.
Shapes: x (..., H, ..., W, ...) with its channels at ``channel_dim``, coefficients (C, 3) or (1, 3); y is x's
shape, or ``out`` along the spatial dims.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from afconvert.layers.products import along
from afconvert.layers.spectral import ideal_resample, resample_adjoint, resample_through

__all__ = ["in_place", "band_limited_square", "inband_scale", "drop_nyquist", "band_limited_quadratic",
           "BandLimitedQuadratic", "channel_view", "max_abs"]


def in_place() -> bool:
    """Whether a layer may overwrite its temporaries: no gradient recorded and no graph traced (a traced graph
    must be the same with and without gradients, as ``torch.jit.trace`` checks)."""
    return not torch.is_grad_enabled() and not torch.jit.is_tracing()


def channel_view(v: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against an ``ndim`` tensor whose channels are at ``channel_dim``."""
    shape = [1] * ndim
    shape[channel_dim] = v.numel()
    return v.reshape(shape)


def _grid(x: torch.Tensor, dims: Sequence[int], out: Sequence[int] | None = None
          ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(N, M, n): x's size, the grid the square is taken on (M = N + ceil(n / 2)) and the output size n (N when
    ``out`` is None), per spatial dim."""
    n = (x.shape[dims[0]], x.shape[dims[1]])
    o = n if out is None else tuple(int(v) for v in out)
    return n, tuple([v + math.ceil(k / 2) for v, k in zip(n, o)]), o


def band_limited_square(x: torch.Tensor, dims: Sequence[int] = (-2, -1), method: str | None = None,
                        out: Sequence[int] | None = None) -> torch.Tensor:
    """B(x) = D((U x)^2), computed as R_N((R_M x)^2) on the 3/2 grid M = ceil(3N / 2) (R: ``ideal_resample``;
    ``method`` as there). Exactly the 2x form for any x. Same shape as x; with ``out`` = n, R_n B(x) from the
    grid M = N + ceil(n / 2) (n along ``dims``)."""
    _, m, o = _grid(x, dims, out)
    square = torch.Tensor.square_ if in_place() else torch.square
    return resample_through([(x, False)], m, square, o, dims, method)


def _square_vjp(h: torch.Tensor, xn: torch.Tensor, dims: Sequence[int], method, m: Sequence[int],
                n: Sequence[int]) -> torch.Tensor:
    """R_M^T ((R_M xn) * R_N^T h) (R_N: M grid -> h's size, R_M: n -> M): the vector-Jacobian product of
    R_N((R_M xn)^2) / 2 with h."""
    return resample_through([(h, True), (xn, False)], m, torch.Tensor.mul_, n, dims, method, adjoint=True)


def _kept(x: torch.Tensor, dims: Sequence[int], out: Sequence[int] | None) -> tuple[int, ...]:
    """The spatial dims whose size ``out`` keeps (all of them without ``out``)."""
    return tuple(dims) if out is None else tuple(d for d, n in zip(dims, out) if x.shape[d] == n)


def _linear(x: torch.Tensor, dims: Sequence[int], out: Sequence[int] | None, method) -> torch.Tensor:
    """The linear term's map: P x, or R_n P x with ``out`` = n (P then acts only along the dims n keeps: R_n
    drops the Nyquist bins of the others)."""
    px = drop_nyquist(x, _kept(x, dims, out))
    return px if out is None else ideal_resample(px, out, dims, method)


def _linear_adjoint(g: torch.Tensor, x: torch.Tensor, dims: Sequence[int], out: Sequence[int] | None, method
                    ) -> torch.Tensor:
    """The adjoint of ``_linear`` (P is symmetric): P g, or P R_n^T g."""
    if out is not None:
        g = resample_adjoint(g, [x.shape[d] for d in dims], dims, method)
    return drop_nyquist(g, _kept(x, dims, out))


def _alternating(n: int, like: torch.Tensor) -> torch.Tensor:
    return (1 - 2 * (torch.arange(n, device=like.device) % 2)).to(like.dtype)


def drop_nyquist(x: torch.Tensor, dims: Sequence[int] = (-2, -1)) -> torch.Tensor:
    """P x: x without its Nyquist bins (even sizes), as the projection x - c (-1)^n per dim, c = mean(x (-1)^n):
    one matrix-vector product and one pass per even dim, no transform. Odd sizes have no Nyquist bin: x itself.
    Symmetric: P^T = P."""
    for d in dims:
        d, n = d % x.ndim, x.shape[d % x.ndim]
        if n % 2:
            continue
        sign = _alternating(n, x)
        view = sign.reshape([n if i == d else 1 for i in range(x.ndim)])
        x = torch.addcmul(x, view, along(x, sign[None], d), value=-1.0 / n)
    return x


def max_abs(x: torch.Tensor, dims: Sequence[int], eps: float) -> torch.Tensor:
    """max(max |x|, eps) over ``dims``, kept, without gradient (a constant); as max and -min (faster on a CPU
    than an inf-norm)."""
    c = x.detach()
    return torch.maximum(c.amax(dims, keepdim=True), -c.amin(dims, keepdim=True)).clamp_min(eps)


def _normalised(x: torch.Tensor, spatial_dims, scale_dims, eps: float, method, out=None):
    """(Bn, r, t) with r = max |x| over ``scale_dims`` (a constant), Bn = B(x / r) = B(x) / r^2 (R_n B with
    ``out``) and t = (mean Bn^2 + (eps / r)^4)^(1/4) = s / r: |x / r| <= 1, so nothing overflows however large
    x is."""
    r = max_abs(x, scale_dims, eps)
    bn = band_limited_square(x / r, spatial_dims, method, out)
    count = math.prod([bn.shape[d] for d in scale_dims])
    m = torch.linalg.vector_norm(bn, 2, scale_dims, keepdim=True).square() / count
    return bn, r, (m + (eps / r) ** 4).sqrt().sqrt()


def inband_scale(x: torch.Tensor, spatial_dims: Sequence[int], scale_dims: Sequence[int], eps: float = 1e-6,
                 method: str | None = None, out: Sequence[int] | None = None) -> torch.Tensor:
    """s = (mean over ``scale_dims`` of B(x)^2 + eps^4)^(1/4), B the band-limited square over ``spatial_dims``
    (R_n B with ``out`` = n: the band a down-sampling to n keeps); ``scale_dims`` kept (size 1). Exactly
    shift-invariant over the spatial dims."""
    _, r, t = _normalised(x, tuple(spatial_dims), tuple(scale_dims), eps, method, out)
    return r * t


def _terms(x, coef, spatial_dims, channel_dim, scale_dims, eps, method, out):
    """(c0, c1, c2, B-like map, r, t): y = c0 + c1 P x + c2 Bn (R_n P x and R_n Bn with ``out``), per-(sample,
    channel) c0, c2."""
    a0, a1, a2 = [channel_view(coef[:, k], x.ndim, channel_dim) for k in range(3)]
    if scale_dims is None:
        return a0, a1, a2, band_limited_square(x, spatial_dims, method, out), None, None
    bn, r, t = _normalised(x, spatial_dims, scale_dims, eps, method, out)
    return a0 * (r * t), a1, a2 * (r / t), bn, r, t


def band_limited_quadratic(x: torch.Tensor, coef: torch.Tensor, spatial_dims: Sequence[int], channel_dim: int,
                           scale_dims: Sequence[int] | None, eps: float = 1e-6, method: str | None = None,
                           out: Sequence[int] | None = None) -> torch.Tensor:
    """y = a0 s + a1 P x + (a2 / s) B(x) (s = 1 when ``scale_dims`` is None), coefficients ``coef`` (C or 1, 3) in
    x's dtype; with ``out`` = n, R_n of it in the fused form (y = a0 s + a1 R_n x + (a2 / s) R_n B(x), s from
    R_n B). Through ``BandLimitedQuadratic`` when a gradient is recorded, else in place on B's buffer."""
    spatial_dims = tuple([d % x.ndim for d in spatial_dims])
    scale_dims = None if scale_dims is None else tuple([d % x.ndim for d in scale_dims])
    out = None if out is None or tuple(out) == tuple(x.shape[d] for d in spatial_dims) else tuple(out)
    if torch.is_grad_enabled() and (x.requires_grad or coef.requires_grad) and not torch.jit.is_tracing():
        return BandLimitedQuadratic.apply(x, coef, spatial_dims, channel_dim, scale_dims, eps, method, out)
    c0, c1, c2, b, _, _ = _terms(x, coef, spatial_dims, channel_dim, scale_dims, eps, method, out)
    if not in_place():  # a traced graph: plain differentiable ops (TorchScript keeps no Python autograd Function)
        return torch.addcmul(c0, c2, b).addcmul(c1, _linear(x, spatial_dims, out, method))
    return torch.addcmul(c0, c2, b, out=b).addcmul_(c1, _linear(x, spatial_dims, out, method))


def _sum_to_channels(v: torch.Tensor, channel_dim: int, channels: int) -> torch.Tensor:
    """Sum over every dim but the channels' (over those too when the coefficients are shared: ``channels`` 1)."""
    if channels == 1:
        return v.sum().reshape(1)
    return v.movedim(channel_dim, 0).reshape(v.shape[channel_dim], -1).sum(1)


class BandLimitedQuadratic(torch.autograd.Function):
    """Autograd form of ``band_limited_quadratic``. Saves x, Bn = B(x / r) and the per-group r, t.

    Backward, with g = dL/dy and n the size of a scale group:
      dL/ds = sum_group g (a0 - a2 B / s^2);   dL/dB = g a2 / s + dL/ds B / (2 n s^3)
      dL/dx = a1 P g + R_M^T (2 (R_M x) * R_N^T dL/dB)      (R_M: N -> M grid, R_N: M -> N)
    (fused down-sampling to n: P R_n^T g for P g, R_n from M for R_N.)
    dL/ds and the coefficients' gradients from per-map sums of g and g B (dL/dB is then one pass over g and B);
    computed in the normalised quantities (x / r, Bn, t = s / r) so that nothing overflows."""

    @staticmethod
    def forward(ctx, x, coef, spatial_dims, channel_dim, scale_dims, eps, method, out):
        c0, c1, c2, b, r, t = _terms(x, coef, spatial_dims, channel_dim, scale_dims, eps, method, out)
        px = _linear(x, spatial_dims, out, method)
        ctx.save_for_backward(x, coef, b, *(() if r is None else (r, t)))
        ctx.config = (spatial_dims, channel_dim, scale_dims, method, out)
        return torch.addcmul(c0, c2, b).addcmul_(c1, px)

    @staticmethod
    def backward(ctx, g):
        x, coef, b, *rt = ctx.saved_tensors
        spatial_dims, channel_dim, scale_dims, method, out = ctx.config
        a0, a1, a2 = [channel_view(coef[:, k], x.ndim, channel_dim) for k in range(3)]
        n, m, _ = _grid(x, spatial_dims, out)
        r, t = rt if rt else (None, None)
        if scale_dims is not None or ctx.needs_input_grad[1]:   # per-map sums of g and g B: the rest is small
            sg, sgb = g.sum(spatial_dims, keepdim=True), (g * b).sum(spatial_dims, keepdim=True)
        gx = gcoef = None
        pg = _linear_adjoint(g, x, spatial_dims, out, method)   # P g (also sum g P x = sum x P g), or P R_n^T g
        if ctx.needs_input_grad[0]:
            # h = 2 r dL/dB as per-map coefficients of g and B (dL/ds = sum g (a0 - a2 B / s^2) from the sums)
            if r is None:
                xn, h = x, g * (2 * a2)
            else:
                count = math.prod([b.shape[d] for d in scale_dims])
                dlds = (a0 * sg - (a2 / t.square()) * sgb).sum(scale_dims, keepdim=True)
                xn, h = x / r, torch.mul(g, 2 * a2 / t).addcmul_(b, dlds / (count * t ** 3))
            gx = _square_vjp(h, xn, spatial_dims, method, m, n).addcmul_(a1, pg)
        if ctx.needs_input_grad[1]:
            const, quad = (sg, sgb) if r is None else (sg * (r * t), sgb * (r / t))     # sums of g s and g B / s
            terms = (const, pg * x, quad)
            gcoef = torch.stack([_sum_to_channels(v, channel_dim, coef.shape[0]) for v in terms], 1)
        return gx, gcoef, None, None, None, None, None, None
