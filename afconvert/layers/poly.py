"""Polynomial activations, and their alias-free form.

A degree-d polynomial of a signal band-limited to |k| < N/2 is band-limited to |k| < dN/2.
Evaluated on the signal ideally up-sampled by u >= (d+1)/2, its harmonics above the original
band fold back only above N/2, where the ideal low-pass that returns to the original rate
removes them: the activation then commutes with every (fractional) circular shift.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn

from afconvert.layers.graph_leaf import GraphLeaf
from afconvert.layers.quadratic import band_limited_quadratic, channel_view, in_place, inband_scale, max_abs
from afconvert.layers.spectral import as_dtype, ideal_lowpass, ideal_resample, ideal_upsample, promote_half

__all__ = [
    "PolyActivation",
    "AliasFreePolyActivation",
    "LowpassPolyActivation",
    "ResidualActivation",
    "fit_polynomial",
    "PolyFit",
    "l4_scale",
    "upsampling_factor",
]

NORMALIZE = ("none", "channel", "sample")
SCALES = ("inband", "outband", "l4")  # the scale of a scale-equivariant alias-free polynomial (AliasFreePolyActivation)


def upsampling_factor(degree: int) -> int:
    """The least integer u with u >= (degree + 1) / 2: enough rate for x**degree to not alias."""
    return max(1, math.ceil((degree + 1) / 2))


def fit_polynomial(fn: Callable[[torch.Tensor], torch.Tensor], degree: int = 2,
                   input_range: tuple[float, float] = (-3.0, 3.0), samples: torch.Tensor | None = None,
                   points: int = 2001) -> list[float]:
    """Least-squares coefficients a_0..a_d of sum_k a_k x^k ~ fn(x).

    Over ``points`` uniform points of ``input_range``, or over ``samples`` (e.g. measured
    pre-activations) when given. Solved in float64; returns plain floats.
    """
    if samples is None:
        x = torch.linspace(*input_range, points, dtype=torch.float64)
    else:
        x = samples.detach().to(torch.float64).flatten()
    y = fn(x.clone()).to(torch.float64)
    vander = torch.stack([x ** k for k in range(degree + 1)], dim=1)
    sol = torch.linalg.lstsq(vander, y.unsqueeze(1)).solution.squeeze(1)
    return [float(v) for v in sol]


class _InitialisedByConversion(GraphLeaf, nn.Module):
    """A layer that conversion adds: a checkpoint of the *source* model has none of its keys.

    Loading such a checkpoint (strict or not) keeps this layer's conversion-time values, so an
    original checkpoint loads strictly into the converted model; a checkpoint that has some but
    not all of its keys is still an error."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = [prefix + name for name, _ in self.named_parameters(recurse=False)] + \
              [prefix + name for name, _ in self.named_buffers(recurse=False)]
        if own and not any(k in state_dict for k in own):
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _l4_with_scratch(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, scratch): the L4 scale s = r (mean((x / r)^4) + (eps / r)^4)^(1/4) of ``l4_scale``, r = max(max |x|,
    eps) a constant (no gradient): |x / r| <= 1, so nothing overflows float32 however large x is. ``scratch``:
    when ``in_place()``, a buffer of x's shape that the caller may overwrite, else None."""
    n = math.prod([x.shape[d] for d in dims])
    r = max_abs(x, dims, eps)     # a constant (detached, not no_grad: graph capture then keeps one graph)
    if not in_place():
        m4 = torch.linalg.vector_norm((x / r).square(), 2, dims, keepdim=True).square() / n
        scratch = None
    else:   # in place: the fourth power, then a plain sum (fast over strided dims too, e.g. NHWC)
        scratch = torch.div(x, r).square_().square_()
        m4 = scratch.sum(dims, keepdim=True) / n
    return r * (m4 + (eps / r) ** 4).sqrt().sqrt(), scratch


def l4_scale(x: torch.Tensor, dims: Sequence[int], eps: float = 1e-6) -> torch.Tensor:
    """s = (mean over ``dims`` of x^4 + eps^4)^(1/4), with the ``dims`` kept (size 1).

    Shift-invariant over the spatial dims of a periodic map sampled at twice its band (the rate a
    degree-2 polynomial runs at): x^2 is then represented without aliasing, and its energy, the
    mean of x^4, does not change under any circular shift, fractional ones included (Parseval).
    Why L4 and not the RMS: with u = x / s, the quadratic term of s q(u) has energy
    a_2^2 s^2 mean(u^4) = a_2^2 s^2, bounded by the input's own scale; over the RMS it would be
    a_2^2 RMS^2 kurtosis(x), which grows on peaky maps layer after layer.

    Computed as r (mean((x / r)^4) + (eps / r)^4)^(1/4) with r = max(max |x|, eps) held constant: the
    same number for any r (s is homogeneous of degree 1), hence the same gradient, but x^4 no longer
    overflows float32 for |x| above 1e9."""
    return _l4_with_scratch(x, tuple(dims), eps)[0]


def scale_dims(normalize: str, spatial_dims: Sequence[int], channel_dim: int) -> tuple[int, ...] | None:
    """The dims a scale-equivariant polynomial takes its L4 scale over, or None for ``normalize="none"``."""
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got '{normalize}'")
    if normalize == "none":
        return None
    return tuple(spatial_dims) + ((channel_dim,) if normalize == "sample" else ())


class PolyFit:
    """Least-squares fit of a polynomial activation to a source activation ``f`` on measured inputs.

    Accumulates, over every observed element x (with its scale s over ``scale_dims``: the in-band scale over
    ``spatial_dims`` for ``scale="inband"`` and ``"outband"``, else ``l4_scale``; measured at the source's rate
    and over the input's band, an approximation of the converted layer's), the normal equations of
    min_a sum (sum_k a_k s^(1-k) x^k - f(x))^2, i.e. of s q(x / s) ~ f(x) (s = 1 when the polynomial is not
    scale-equivariant). Only sums are kept: (C, d+1, d+1) and (C, d+1), so every sample counts, tails included,
    at no memory cost. ``solve`` adds a small ridge towards a prior fit (channels with little or degenerate data
    keep the prior).
    """

    def __init__(self, degree: int, channel_dim: int, scale_dims: Sequence[int] | None = None,
                 shared: bool = False, eps: float = 1e-6, scale: str = "l4", spatial_dims: Sequence[int] = (2, 3)):
        self.degree, self.channel_dim, self.shared, self.eps = degree, channel_dim, shared, eps
        self.scale_dims = None if scale_dims is None else tuple(scale_dims)
        self.scale, self.spatial_dims = scale, tuple(spatial_dims)
        self.gram: torch.Tensor | None = None
        self.rhs: torch.Tensor | None = None
        self.count = 0

    @property
    def channels(self) -> int | None:
        return None if self.gram is None else self.gram.shape[0]

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One batch: the activation's input ``x`` and its output ``y = f(x)`` (same shape)."""
        x, y = x.detach().double(), y.detach().double()
        if self.scale_dims is None:
            s = torch.ones_like(x)
        elif self.scale in ("inband", "outband"):
            s = inband_scale(x, self.spatial_dims, self.scale_dims, self.eps)
        else:
            s = l4_scale(x, self.scale_dims, self.eps)
        feats = torch.stack([x ** k * s.expand_as(x) ** (1 - k) for k in range(self.degree + 1)], dim=-1)
        if self.shared:
            feats, y = feats.reshape(1, -1, self.degree + 1), y.reshape(1, -1)
        else:
            feats = feats.movedim(self.channel_dim % x.ndim, 0).flatten(1, -2)      # (C, P, d+1)
            y = y.movedim(self.channel_dim % x.ndim, 0).flatten(1)                  # (C, P)
        gram, rhs = feats.transpose(1, 2) @ feats, (feats * y.unsqueeze(-1)).sum(1)
        self.gram = gram if self.gram is None else self.gram + gram
        self.rhs = rhs if self.rhs is None else self.rhs + rhs
        self.count += y.shape[1]

    def solve(self, prior: torch.Tensor, ridge: float = 1e-9) -> torch.Tensor:
        """(C, d+1) coefficients: (G + r D) a = b + r D prior, D = diag(G) (scale-free ridge)."""
        prior = prior.double().expand(self.gram.shape[0], self.degree + 1)
        damp = ridge * torch.diag_embed(self.gram.diagonal(dim1=1, dim2=2)) + \
            1e-12 * torch.eye(self.degree + 1, dtype=torch.float64)
        a = torch.linalg.solve(self.gram + damp, (self.rhs + (damp @ prior.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1))
        a = a.squeeze(-1)
        bad = ~torch.isfinite(a).all(dim=1)
        return torch.where(bad[:, None], prior, a)


class PolyActivation(_InitialisedByConversion):
    """Per-channel polynomial f_c(x) = s_out * sum_k coef[c, k] (s_in x)^k (pointwise).

    ``coef``: (C, degree + 1). ``in_scale``/``out_scale``: the paper's input/output scales
    (shape (1,), trainable with ``train_scale``). ``channel_dim``: where C sits in the input
    (1 for NCHW, -1 for channels-last). Any input shape with C at ``channel_dim``.

    ``normalize`` makes it scale-equivariant, like the ReLU it replaces (ReLU(a x) = a ReLU(x)):
    y = s f(x / s), with s = ``l4_scale`` of x over ``spatial_dims`` per sample and channel
    (``"channel"``) or over C and ``spatial_dims`` per sample (``"sample"``). A plain polynomial
    grows like a^2 with its input's scale a, and stacked ones compound it until they overflow;
    y = s f(x / s) scales like a. s is spatially constant and shift-invariant when x is sampled at
    twice its band (``AliasFreePolyActivation``, ``HighRatePolyActivation``), so the layer then
    commutes with shifts exactly when the polynomial does. Needs degree >= 2.
    """

    def __init__(self, channels: int, degree: int = 2, coef: Sequence[float] | torch.Tensor | None = None,
                 in_scale: float = 1.0, out_scale: float = 1.0, train_scale: bool = False, channel_dim: int = 1,
                 normalize: str = "none", spatial_dims: Sequence[int] = (2, 3), eps: float = 1e-6):
        super().__init__()
        if degree < 1:
            raise ValueError(f"polynomial degree must be >= 1, got {degree}")
        if scale_dims(normalize, spatial_dims, channel_dim) is not None and degree < 2:
            raise ValueError("normalize needs a polynomial of degree >= 2 (a linear one is already scale-equivariant)")
        self.channels, self.degree, self.channel_dim = channels, degree, channel_dim
        self.normalize, self.spatial_dims, self.eps = normalize, tuple(spatial_dims), float(eps)
        if coef is None:
            coef = [0.0] * (degree + 1)
            coef[1] = 1.0
        coef = torch.as_tensor(coef, dtype=torch.float32)
        if coef.ndim == 1:
            coef = coef.expand(channels, degree + 1)
        if coef.shape != (channels, degree + 1):
            raise ValueError(f"coef must have shape ({channels}, {degree + 1}), got {tuple(coef.shape)}")
        self.coef = nn.Parameter(coef.clone())
        scales = {"in_scale": in_scale, "out_scale": out_scale}
        for name, value in scales.items():
            t = torch.tensor([float(value)])
            if train_scale:
                setattr(self, name, nn.Parameter(t))
            else:
                self.register_buffer(name, t)

    @property
    def scale_dims(self) -> tuple[int, ...] | None:
        return scale_dims(self.normalize, self.spatial_dims, self.channel_dim)

    @classmethod
    def fitted(cls, fn: Callable, channels: int, degree: int = 2, input_range=(-3.0, 3.0),
               in_scale: float = 1.0, out_scale: float = 1.0, fit: PolyFit | None = None,
               **kwargs) -> "PolyActivation":
        """A polynomial initialised to the least-squares fit of ``fn`` over ``input_range``
        (``fit_polynomial``; for a scale-equivariant layer, the fit of f(u) for u = x / s), or, when
        ``fit`` holds measured inputs for these channels, per channel to those (``PolyFit``),
        with a small ridge towards the range fit.

        The stored coefficients absorb the scales: coef_k = a_k / (s_out s_in^k)."""
        a = torch.tensor(fit_polynomial(fn, degree, input_range), dtype=torch.float64)
        if fit is not None and fit.channels == channels and fit.degree == degree:
            a = fit.solve(a)
        powers = torch.tensor([out_scale * in_scale ** k for k in range(degree + 1)], dtype=torch.float64)
        return cls(channels, degree, (a / powers).float(), in_scale=in_scale, out_scale=out_scale, **kwargs)

    def effective_coef(self, dtype: torch.dtype) -> torch.Tensor:
        """a[c, k] = s_out coef[c, k] s_in^k: the polynomial in x itself, (C, degree + 1)."""
        powers = as_dtype(self.in_scale, dtype) ** torch.arange(self.degree + 1, device=self.coef.device, dtype=dtype)
        return as_dtype(self.coef, dtype) * powers * as_dtype(self.out_scale, dtype)

    def polynomial(self, x: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        """sum_k a_k x^k, or s sum_k a_k (x / s)^k = sum_k (a_k s^(1-k)) x^k when normalising (``s`` when given,
        else the L4 scale over all of x's spatial dims: call it on the map the polynomial runs on). Horner's
        rule, one fused multiply-add pass per degree (no power of x is formed: nothing overflows); when no
        gradient is recorded, in the scale's scratch buffer, in place (a fresh large map costs more than a
        pass: page faults)."""
        a = self.effective_coef(x.dtype)
        dims = self.scale_dims
        coef = [channel_view(a[:, k], x.ndim, self.channel_dim) for k in range(self.degree + 1)]
        scratch = None
        if dims is not None:
            if s is None:
                s, scratch = _l4_with_scratch(x, dims, self.eps)
            coef = [c * s if k == 0 else c if k == 1 else c / s if k == 2 else c * s ** (1 - k)
                    for k, c in enumerate(coef)]
        if not in_place():
            res = torch.addcmul(coef[-2], coef[-1], x)
            for c in reversed(coef[:-2]):
                res = torch.addcmul(c, res, x)
            return res
        res = torch.addcmul(coef[-2], coef[-1], x, out=scratch)
        for c in reversed(coef[:-2]):
            torch.addcmul(c, res, x, out=res)
        return res

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return as_dtype(self.polynomial(promote_half(x)), x.dtype)   # float32 under autocast: powers need range

    def extra_repr(self) -> str:
        norm = f", normalize={self.normalize}, spatial_dims={self.spatial_dims}" if self.normalize != "none" else ""
        return f"{self.channels}, degree={self.degree}, channel_dim={self.channel_dim}{norm}"


class AliasFreePolyActivation(PolyActivation):
    """PolyActivation evaluated alias-free: y = D(f(U_u x)), U_u ideal up-sampling by
    u = ceil((degree+1)/2) and D the ideal low-pass and return to the input size.

    ``post_down`` (optional, NCHW): a strided conv's ``IdealDownsample2d``, applied to y (the conv's
    down-sampling moved after this layer, so the polynomial sees the conv's full band).

    With ``normalize``, y = s D(f(U_u x / s)) with the scale ``scale``: ``"inband"``, s = (mean B(x)^2)^(1/4)
    with B(x) = D((U x)^2) the band-limited square (``afconvert.layers.quadratic``); ``"outband"``, the same
    over the band the layer outputs: with a ``post_down`` to n, s = (mean (R_n B(x))^2)^(1/4) and, for degree 2,
    the down-sampling fused into the square (computed on a grid of N + n / 2, not 3N / 2: about 2.4x less work
    for n = N / 2); without one, "inband" itself; or ``"l4"``, the L4 norm of U_u x (the form of layers saved
    before ``scale`` existed: the class default). Degree 2 runs in the closed form of ``band_limited_quadratic``
    (no up-sampled map kept for backward) unless it takes the L4 scale.

    ``spatial_dims``: the two dims of the input that are H and W (e.g. (2, 3) for NCHW,
    (1, 2) for channels-last NHWC).
    """

    scale = "l4"

    def __init__(self, *args, scale: str = "inband", **kwargs):
        super().__init__(*args, **kwargs)
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got '{scale}'")
        self.scale = scale

    @property
    def up(self) -> int:
        return upsampling_factor(self.degree)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, x = x.dtype, promote_half(x)
        dims = self.scale_dims
        down = self._modules.get("post_down")     # a strided conv's down-sampling, moved after this layer
        out = None
        if down is not None and self.scale == "outband":
            out = down.output_size(*[x.shape[d] for d in self.spatial_dims])
        inband = dims is not None and self.scale != "l4"
        if self.degree == 2 and (dims is None or inband):
            y = band_limited_quadratic(x, self.effective_coef(x.dtype), self.spatial_dims, self.channel_dim, dims,
                                       self.eps, out=out)
            if out is not None:
                return as_dtype(y, dtype)
        else:
            s = inband_scale(x, self.spatial_dims, dims, self.eps, out=out) if inband else None
            size = [x.shape[d] for d in self.spatial_dims]
            y = ideal_resample(self.polynomial(ideal_upsample(x, self.up, self.spatial_dims), s), size,
                               self.spatial_dims)
        if down is not None:
            y = down(y)
        return as_dtype(y, dtype)

    def extra_repr(self) -> str:
        dims = f", spatial_dims={self.spatial_dims}" if self.normalize == "none" else f", scale={self.scale}"
        return super().extra_repr() + f"{dims}, up={self.up}"


class LowpassPolyActivation(PolyActivation):
    """The paper's stem activation: f(x) = s_out (c0 + c1 z + c2 z L_c(z)), z = s_in x.

    L_c is an ideal low-pass keeping |k| < c N/2. The product's band reaches (1 + c) N/2, so its
    aliases fold down to no lower than (1 - c) N/2: alias-free only when a down-sampling whose
    band is below that follows (the paper's stem: c = 0.75, then stride 4, band N/8).
    Degree 2 only; NCHW.
    """

    def __init__(self, channels: int, cutoff: float = 0.75, **kwargs):
        kwargs.setdefault("degree", 2)
        super().__init__(channels, **kwargs)
        if self.degree != 2 or self.normalize != "none":
            raise ValueError("LowpassPolyActivation is degree 2, without normalize")
        self.cutoff = cutoff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, x = x.dtype, promote_half(x)
        z = x * self.in_scale.to(x.dtype)
        c = self.coef.to(x.dtype)
        view = lambda k: channel_view(c[:, k], x.ndim, self.channel_dim)  # noqa: E731
        return ((view(0) + view(1) * z + view(2) * z * ideal_lowpass(z, self.cutoff)) * self.out_scale.to(x.dtype)
                ).to(dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", cutoff={self.cutoff}"


class ResidualActivation(_InitialisedByConversion):
    """y = x + gamma * act(x), gamma a learned scalar initialised to 0 (identity at conversion)."""

    def __init__(self, act: nn.Module, gamma: float = 0.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.tensor([float(gamma)]))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + as_dtype(self.gamma, x.dtype) * self.act(x)
