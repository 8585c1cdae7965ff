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

from .spectral import ideal_lowpass, ideal_resample, ideal_upsample

__all__ = [
    "PolyActivation",
    "AliasFreePolyActivation",
    "LowpassPolyActivation",
    "ResidualActivation",
    "fit_polynomial",
    "fit_polynomial_per_channel",
    "upsampling_factor",
]


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


class _InitialisedByConversion(nn.Module):
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


def fit_polynomial_per_channel(fn: Callable[[torch.Tensor], torch.Tensor], mean: torch.Tensor, std: torch.Tensor,
                               degree: int = 2, points: int = 121, min_std: float = 0.5) -> torch.Tensor:
    """Per-channel least squares under each channel's measured input distribution N(mean_c, std_c^2):
    minimises sum_t w(t) (p_c(mean_c + std_c t) - fn(mean_c + std_c t))^2, w(t) = exp(-t^2 / 2),
    t uniform on [-3, 3]. std_c is floored at ``min_std``: a fit over a nearly constant input has
    huge coefficients that blow up on any other input. Returns (C, degree + 1) coefficients, float64."""
    t = torch.linspace(-3.0, 3.0, points, dtype=torch.float64)
    w = torch.exp(-t ** 2 / 2).sqrt()
    x = mean.double()[:, None] + std.double().clamp_min(min_std)[:, None] * t[None, :]        # (C, P)
    y = fn(x.clone()).double()
    vander = torch.stack([x ** k for k in range(degree + 1)], dim=-1) * w[None, :, None]    # (C, P, d+1)
    return torch.linalg.lstsq(vander, (y * w[None, :]).unsqueeze(-1)).solution.squeeze(-1)


def _channel_view(v: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[channel_dim] = v.numel()
    return v.reshape(shape)


class PolyActivation(_InitialisedByConversion):
    """Per-channel polynomial f_c(x) = s_out * sum_k coef[c, k] (s_in x)^k (pointwise).

    ``coef``: (C, degree + 1). ``in_scale``/``out_scale``: the paper's input/output scales
    (shape (1,), trainable with ``train_scale``). ``channel_dim``: where C sits in the input
    (1 for NCHW, -1 for channels-last). Any input shape with C at ``channel_dim``.
    """

    def __init__(self, channels: int, degree: int = 2, coef: Sequence[float] | torch.Tensor | None = None,
                 in_scale: float = 1.0, out_scale: float = 1.0, train_scale: bool = False, channel_dim: int = 1):
        super().__init__()
        if degree < 1:
            raise ValueError(f"polynomial degree must be >= 1, got {degree}")
        self.channels, self.degree, self.channel_dim = channels, degree, channel_dim
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

    @classmethod
    def fitted(cls, fn: Callable, channels: int, degree: int = 2, input_range=(-3.0, 3.0),
               in_scale: float = 1.0, out_scale: float = 1.0, stats: tuple[torch.Tensor, torch.Tensor] | None = None,
               **kwargs) -> "PolyActivation":
        """A polynomial initialised to the least-squares fit of ``fn``: over ``input_range``
        (``fit_polynomial``), or per channel over measured input statistics ``stats`` = (mean, std)
        of shape (C,) (``fit_polynomial_per_channel``).

        The stored coefficients absorb the scales: coef_k = a_k / (s_out s_in^k)."""
        if stats is not None and stats[0].numel() == channels:
            a = fit_polynomial_per_channel(fn, stats[0], stats[1], degree)
        else:
            a = torch.tensor(fit_polynomial(fn, degree, input_range), dtype=torch.float64)
        powers = torch.tensor([out_scale * in_scale ** k for k in range(degree + 1)], dtype=torch.float64)
        return cls(channels, degree, (a / powers).float(), in_scale=in_scale, out_scale=out_scale, **kwargs)

    def effective_coef(self, dtype: torch.dtype) -> torch.Tensor:
        """a[c, k] = s_out coef[c, k] s_in^k: the polynomial in x itself, (C, degree + 1)."""
        powers = self.in_scale.to(dtype) ** torch.arange(self.degree + 1, device=self.coef.device, dtype=dtype)
        return self.coef.to(dtype) * powers * self.out_scale.to(dtype)

    def polynomial(self, x: torch.Tensor) -> torch.Tensor:
        a = self.effective_coef(x.dtype)
        view = lambda k: _channel_view(a[:, k], x.ndim, self.channel_dim)  # noqa: E731
        res = torch.addcmul(view(self.degree - 1), view(self.degree), x)    # Horner, one fused pass per degree
        for k in range(self.degree - 2, -1, -1):
            res = torch.addcmul(view(k), res, x)
        return res

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.polynomial(x)

    def extra_repr(self) -> str:
        return f"{self.channels}, degree={self.degree}, channel_dim={self.channel_dim}"


class AliasFreePolyActivation(PolyActivation):
    """PolyActivation evaluated alias-free: y = D(f(U_u x)), U_u ideal up-sampling by
    u = ceil((degree+1)/2) and D the ideal low-pass and return to the input size.

    ``spatial_dims``: the two dims of the input that are H and W (e.g. (2, 3) for NCHW,
    (1, 2) for channels-last NHWC).
    """

    def __init__(self, *args, spatial_dims: Sequence[int] = (2, 3), **kwargs):
        super().__init__(*args, **kwargs)
        self.spatial_dims = tuple(spatial_dims)

    @property
    def up(self) -> int:
        return upsampling_factor(self.degree)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = [x.shape[d] for d in self.spatial_dims]
        y = self.polynomial(ideal_upsample(x, self.up, self.spatial_dims))
        return ideal_resample(y, size, self.spatial_dims)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", spatial_dims={self.spatial_dims}, up={self.up}"


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
        if self.degree != 2:
            raise ValueError("LowpassPolyActivation is degree 2")
        self.cutoff = cutoff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x * self.in_scale.to(x.dtype)
        c = self.coef.to(x.dtype)
        view = lambda k: _channel_view(c[:, k], x.ndim, self.channel_dim)  # noqa: E731
        return (view(0) + view(1) * z + view(2) * z * ideal_lowpass(z, self.cutoff)) * self.out_scale.to(x.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", cutoff={self.cutoff}"


class ResidualActivation(_InitialisedByConversion):
    """y = x + gamma * act(x), gamma a learned scalar initialised to 0 (identity at conversion)."""

    def __init__(self, act: nn.Module, gamma: float = 0.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.tensor([float(gamma)]))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma.to(x.dtype) * self.act(x)
